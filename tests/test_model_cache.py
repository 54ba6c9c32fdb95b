"""The model cache is keyed on the GGUF's content: two installs of one file share one dequantized folder,
a file is hashed once per (path, size, mtime), and `lmedit cache list|clear` shows and removes entries."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

import editing.model_cache as model_cache
from app.cli import app as cli_app
from editing.model import load_model
from tests.test_export import write_tiny_gguf
from tests.tiny import tiny_llama


@pytest.fixture
def two_installs(tmp_path):
    """One GGUF at two paths with different mtimes, as two venvs' pip installs leave it."""
    a = tmp_path / "venv-a" / "model.gguf"
    b = tmp_path / "venv-b" / "model.gguf"
    a.parent.mkdir()
    b.parent.mkdir()
    write_tiny_gguf(tiny_llama(), a)
    shutil.copyfile(a, b)
    os.utime(b, (1_000_000_000, 1_000_000_000))
    return a, b


@pytest.fixture
def count_hashes(monkeypatch):
    calls = []
    real = model_cache._sha256_file
    monkeypatch.setattr(model_cache, "_sha256_file", lambda p: calls.append(p) or real(p))
    return calls


def test_the_key_is_the_content_and_each_file_is_hashed_once(two_installs, tmp_path, count_hashes):
    a, b = two_installs
    cache = tmp_path / "cache"
    assert model_cache.cache_folder(a, cache) == model_cache.cache_folder(b, cache)
    assert len(count_hashes) == 2  # each path once
    model_cache.cache_folder(a, cache)
    model_cache.cache_folder(b, cache)
    assert len(count_hashes) == 2  # remembered in the index
    os.utime(a, (2_000_000_000, 2_000_000_000))  # a reinstall: new mtime, hashed again
    model_cache.cache_folder(a, cache)
    assert len(count_hashes) == 3
    with a.open("r+b") as f:  # other content, other key
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    assert model_cache.cache_folder(a, cache) != model_cache.cache_folder(b, cache)


def test_two_installs_share_one_cached_model_and_the_cli_lists_and_clears_it(two_installs, tmp_path):
    a, b = two_installs
    cache = tmp_path / "cache"
    lm_a = load_model(str(a), device="cpu", cache_dir=cache)
    lm_b = load_model(str(b), device="cpu", cache_dir=cache)
    assert lm_a.fingerprint == lm_b.fingerprint
    [entry] = model_cache.list_cache(cache)
    assert entry.model == "model.gguf" and entry.size_bytes > 0

    runner = CliRunner()
    listed = runner.invoke(cli_app, ["cache", "list", "--json", "--cache-dir", str(cache)])
    assert listed.exit_code == 0, listed.output
    assert [(e["key"], e["model"]) for e in json.loads(listed.output)] == [(entry.key, "model.gguf")]
    assert runner.invoke(cli_app, ["cache", "clear", "--cache-dir", str(cache)]).exit_code == 2  # KEY or --all
    missing = runner.invoke(cli_app, ["cache", "clear", "ffff", "--cache-dir", str(cache)])
    assert missing.exit_code == 1 and "no cache entry" in missing.output
    cleared = runner.invoke(cli_app, ["cache", "clear", entry.key[:6], "--cache-dir", str(cache)])
    assert cleared.exit_code == 0 and entry.key in cleared.output, cleared.output
    assert model_cache.list_cache(cache) == [] and not entry.path.exists()

    load_model(str(a), device="cpu", cache_dir=cache)  # dequantized again
    assert runner.invoke(cli_app, ["cache", "clear", "--all", "--cache-dir", str(cache)]).exit_code == 0
    assert model_cache.list_cache(cache) == []
