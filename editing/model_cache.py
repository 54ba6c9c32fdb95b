"""The cache of dequantized GGUF models: one fp32 folder per GGUF content, shared by every install.

A folder is named `<gguf stem>-fp32-<key>`, where the key is the start of the GGUF file's sha256, so
two installs of one model (pip gives each copy a new path and mtime) share one 0.5 GB folder. Hashing a
GGUF takes a moment, so `index.json` remembers each file's sha256 under its (path, size, mtime): a file
is hashed once, not on every load. Torch-free: `lmedit cache list|clear` uses it without loading a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

KEY_CHARS = 16  # of the sha256 in a folder's name: 64 bits, no collision among a cache's few models
INDEX = "index.json"
SOURCE = "source.json"  # inside a folder: the GGUF it came from (name, sha256)
MARK = "-fp32-"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMEDIT_CACHE_DIR") or Path.home() / ".cache" / "lmedit").expanduser()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_index(cache_dir: Path) -> dict:
    try:
        return json.loads((cache_dir / INDEX).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}  # none yet, or torn by a crash: files are hashed again


def gguf_sha256(gguf: Path, cache_dir: Path) -> str:
    """The sha256 of a GGUF file's bytes, remembered in the cache's index per (path, size, mtime)."""
    path, stat = Path(gguf).resolve(), Path(gguf).stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    known = _read_index(cache_dir).get(str(path))
    if known and {k: known.get(k) for k in stamp} == stamp:
        return known["sha256"]
    sha = _sha256_file(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = _read_index(cache_dir) | {str(path): stamp | {"sha256": sha}}  # re-read: another process may add
    index = {p: e for p, e in index.items() if Path(p).exists()}  # forget uninstalled copies
    fd, tmp = tempfile.mkstemp(prefix=INDEX + ".", dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, cache_dir / INDEX)  # readers see the old index or the new one, never half
    return sha


def cache_folder(gguf: Path, cache_dir: Path) -> Path:
    """Where the fp32 copy of `gguf` lives (or will): keyed on the file's content, not its path."""
    return Path(cache_dir) / f"{Path(gguf).stem}{MARK}{gguf_sha256(gguf, Path(cache_dir))[:KEY_CHARS]}"


@dataclass
class CacheEntry:
    key: str  # the folder's content key (what `lmedit cache clear KEY` takes)
    model: str  # the GGUF it was made from
    path: Path
    size_bytes: int

    def to_dict(self) -> dict:
        return {"key": self.key, "model": self.model, "path": str(self.path), "size_bytes": self.size_bytes}


def list_cache(cache_dir: Path | None = None) -> list[CacheEntry]:
    """Every cached model folder (also those of older lmedit versions, keyed on the install path)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if not cache_dir.is_dir():
        return []
    entries = []
    for folder in sorted(cache_dir.iterdir()):
        if not folder.is_dir() or MARK not in folder.name or ".tmp-" in folder.name:
            continue  # the index, or a dequantization in progress
        stem, key = folder.name.rsplit(MARK, 1)
        try:
            model = json.loads((folder / SOURCE).read_text())["model"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            model = f"{stem}.gguf"
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        entries.append(CacheEntry(key=key, model=model, path=folder, size_bytes=size))
    return entries


def clear_cache(cache_dir: Path | None = None, key: str | None = None) -> list[CacheEntry]:
    """Remove the entry whose key starts with `key` (None: every entry); returns what was removed.
    ValueError when `key` names no entry or more than one."""
    entries = list_cache(cache_dir)
    if key is not None:
        entries = [e for e in entries if e.key.startswith(key)]
        if len(entries) != 1:
            raise ValueError(f"{'no cache entry' if not entries else 'several cache entries'} with key {key!r}"
                             " (see `lmedit cache list`)")
    for entry in entries:
        shutil.rmtree(entry.path)
    return entries
