"""Storage backends of the version store: the few operations it needs, on a local directory
(LocalBackend) or any fsspec filesystem (FsspecBackend, with conditional PUTs on S3).

read / write (atomic overwrite) / create (exclusive; False if it exists) /
read_versioned + replace_if (compare-and-swap) / list / delete / stat.
Paths are relative to the store's root, with "/" separators; the layout is in editing/store.py.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"  # temporary files of atomic writes; every listing and gc recognise them


def is_tmp(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(TMP_PREFIX)


class LockTimeout(TimeoutError):
    """Another writer held a file lock for longer than `LocalBackend.lock_timeout`."""


class LocalBackend:
    """A local directory. Atomic writes by temporary file + rename; CAS under a file lock."""

    lock_timeout = 60.0  # seconds to wait for another writer's lock on a ref; then TimeoutError

    def __init__(self, root: str | Path, durable: bool = True):
        self.root = Path(root)
        self.durable = durable  # fsync files and directories (survives power loss, not just kills)

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def _mkdirs(self, path: Path) -> None:
        """`mkdir -p`, with each new level fsynced in its parent: a file fsynced in a new
        directory is lost on power loss if the directory's own entry is."""
        missing = []
        while not path.is_dir():
            missing.append(path)
            path = path.parent
        for level in reversed(missing):
            # A concurrent writer may have made it and not yet synced it: sync it either way.
            level.mkdir(exist_ok=True)
            self._sync_dir(level.parent)

    def _write_tmp(self, path: Path, data: bytes) -> str:
        self._mkdirs(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def _sync_dir(self, path: Path) -> None:
        if self.durable:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        tmp = self._write_tmp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._sync_dir(path.parent)

    def create(self, rel: str, data: bytes) -> bool:
        path = self._path(rel)
        tmp = self._write_tmp(path, data)
        try:
            os.link(tmp, path)  # atomic and exclusive: fails if `path` exists
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: the same under the file lock
            with self._lock(rel):
                if path.exists():
                    return False
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._sync_dir(path.parent)
        return True

    @contextlib.contextmanager
    def _lock(self, rel: str) -> Iterator[None]:
        from filelock import FileLock, Timeout  # lazy: `app/` lists versions without needing it

        lock_dir = self.root / "locks"
        self._mkdirs(lock_dir)
        lock = FileLock(lock_dir / (rel.replace("/", "~") + ".lock"), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise LockTimeout(f"{rel} is locked by another writer") from None
        try:
            yield
        finally:
            lock.release()

    def read_versioned(self, rel: str) -> tuple[bytes | None, Any]:
        try:
            data = self.read(rel)
        except FileNotFoundError:
            return None, None
        return data, data  # locally the token is the content itself, compared under the lock

    def replace_if(self, rel: str, data: bytes, token: Any) -> bool:
        with self._lock(rel):
            current, _ = self.read_versioned(rel)
            if current != token:
                return False
            self.write(rel, data)
            return True

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        out = []
        for dirpath, _, files in os.walk(base):
            for f in files:
                out.append(Path(dirpath, f).relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def stat(self, rel: str) -> tuple[float, int]:
        """(modification time, size in bytes)"""
        st = self._path(rel).stat()
        return st.st_mtime, st.st_size


class FsspecBackend:
    """Any fsspec filesystem. On S3 (s3fs), CAS is a conditional PUT (If-Match on the ETag read,
    If-None-Match: * to create), safe across machines. Other filesystems get a process-local
    lock only: fine for one process (tests, memory://), not for several writers."""

    def __init__(self, fs: Any, root: str):
        self.fs = fs
        self.root = root.rstrip("/")
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        self.s3 = "s3" in protocols and hasattr(fs, "_call_s3")
        self._mutex = threading.Lock()
        if not self.s3:
            warnings.warn(
                f"store on {protocols[0]}:// has no conditional writes: ref updates are safe within "
                "one process only",
                stacklevel=3,
            )

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def write(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)  # a single PUT: atomic on S3

    def _s3(self, method: str, rel: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self._path(rel))

        async def call() -> Any:
            resp = await self.fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
            if method == "get_object":  # read body and ETag from one response: no race between them
                try:
                    return await resp["Body"].read(), resp["ETag"]
                finally:
                    resp["Body"].close()
            return resp

        try:
            return sync(self.fs.loop, call)
        finally:
            self.fs.invalidate_cache(self._path(rel))

    def create(self, rel: str, data: bytes) -> bool:
        return self.replace_if(rel, data, None)

    def read_versioned(self, rel: str) -> tuple[bytes | None, Any]:
        if not self.s3:
            try:
                data = self.read(rel)
            except FileNotFoundError:
                return None, None
            return data, data
        try:
            return self._s3("get_object", rel)
        except FileNotFoundError:
            return None, None

    def replace_if(self, rel: str, data: bytes, token: Any) -> bool:
        if not self.s3:
            with self._mutex:
                current, _ = self.read_versioned(rel)
                if current != token:
                    return False
                self.write(rel, data)
                return True
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            self._s3("put_object", rel, Body=data, **condition)
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        self.fs.invalidate_cache()  # s3fs caches listings; the store needs the current state
        if not self.fs.exists(path):
            return []
        start = len(self.root) + 1
        return sorted(p[start:] for p in self.fs.find(path))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(rel))

    def stat(self, rel: str) -> tuple[float, int]:
        """(modification time, size in bytes)"""
        path = self._path(rel)
        return self.fs.modified(path).timestamp(), self.fs.size(path)


def _precondition_failed(error: BaseException) -> bool:
    """s3fs turns HTTP 412 (and AWS's 409 for racing conditional writes) into generic OSErrors."""
    if isinstance(error, FileExistsError):
        return True
    cause = error.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _backend_for(url: str, storage_options: dict | None, durable: bool) -> LocalBackend | FsspecBackend:
    if "://" not in url or url.startswith("file://"):
        return LocalBackend(Path(url.removeprefix("file://")).expanduser(), durable=durable)
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return FsspecBackend(fs, root)
