"""Issue 15 item 7: every command that reads or writes a store's files takes `--store`; the key commands
use STORE/keys.json, the file `lmedit up --store STORE` serves."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import typer

from tests.service import ROOT

STORE_COMMANDS = ["versions", "show", "diff", "tag", "rollback", "branch", "store fsck", "store gc", "up", "api",
                  "worker", "export", "import-adapter", "edit", "generate", "keys create", "keys list", "keys revoke"]


def test_every_store_command_takes_store():
    from app.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    for path in STORE_COMMANDS:
        command: click.Command = group
        for name in path.split():
            command = command.get_command(ctx, name)
            assert command is not None, f"no command lmedit {path}"
        assert any("--store" in p.opts for p in command.params), f"lmedit {path} takes no --store"


def _lmedit(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LMEDIT_KEYS_FILE", "LMEDIT_STORE")}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)


def test_keys_create_list_revoke_with_store(tmp_path):
    store = tmp_path / "store"
    created = _lmedit("keys", "create", "--scope", "edit", "--name", "ci", "--store", str(store))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("lme_") and key not in (store / "keys.json").read_text()
    key_id = created.stderr.split("created key ")[1].split()[0]
    listed = _lmedit("keys", "list", "--store", str(store))
    assert listed.returncode == 0 and key_id in listed.stdout and "active" in listed.stdout, listed.stdout
    revoked = _lmedit("keys", "revoke", key_id, "--store", str(store))
    assert revoked.returncode == 0 and f"revoked {key_id}" in revoked.stdout, revoked.stderr
    assert "revoked" in _lmedit("keys", "list", "--store", str(store)).stdout
    assert not (ROOT / "lmedit-store" / "keys.json").exists() or key_id not in (
        ROOT / "lmedit-store" / "keys.json").read_text()  # nothing went to the default store
