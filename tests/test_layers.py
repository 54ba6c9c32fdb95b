"""Which package may import which (DESIGN.md, "Data flow"): workers/ never imports app/; app/ imports of
workers/ are workers.protocol only, except the CLI's `worker` command, which imports the worker lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from app.settings import Settings
from workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import statement in a source file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from workers import protocol` imports workers.protocol
            found += [(f"{node.module}.{a.name}" if node.module in ("app", "workers") else node.module,
                       id(node) in top) for a in node.names]
    return found


def test_workers_never_import_app():
    bad = [(p.name, m) for p in (ROOT / "workers").glob("*.py") for m, _ in imports(p)
           if m == "app" or m.startswith("app.")]
    assert not bad, bad


def test_app_imports_only_the_protocol_of_workers_at_module_level():
    bad = [(str(p.relative_to(ROOT)), m) for p in (ROOT / "app").rglob("*.py") for m, top in imports(p)
           if (m == "workers" or m.startswith("workers.")) and m != "workers.protocol" and top]
    assert not bad, bad


def test_the_protocol_imports_nothing_of_the_project():
    mods = [m for m, _ in imports(ROOT / "workers" / "protocol.py")]
    assert not [m for m in mods if m.split(".")[0] in ("app", "workers", "editing", "torch")], mods


def test_the_api_and_cli_load_no_worker_module_but_the_protocol():
    code = ("import sys; from app.main import create_app; from app.cli import app; import app.cli_service; "
            "create_app(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('workers', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "['workers', 'workers.protocol']", out.stdout


def test_worker_settings_agree_with_the_api_settings():
    """One environment configures both sides: the same names and defaults."""
    for name, field in WorkerSettings.model_fields.items():
        assert name in Settings.model_fields, name
        assert field.default == Settings.model_fields[name].default, name
    assert WorkerSettings.model_config["env_prefix"] == Settings.model_config["env_prefix"]


def test_no_test_hooks_in_production_code():
    """Fault injection lives in tests/fault_worker.py, not behind environment variables in the service."""
    hits = [str(p.relative_to(ROOT)) for d in ("app", "workers", "editing") for p in (ROOT / d).rglob("*.py")
            if "LMEDIT_TEST_" in p.read_text() or "_move_ref = " in p.read_text()]
    assert not hits, hits
