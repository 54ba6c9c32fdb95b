"""The version store: immutable, content-addressed weight deltas with branches, tags and rollback.

A store is a directory (default `./lmedit-store`) or any fsspec URL (`s3://bucket/prefix`).
It is the system of record: everything an edit produced is here, and the refs can be
rebuilt from the ref log. Layout (all paths relative to the store's root):

    store.json                         {format_version, base_fingerprint, base_version, created_at}
    objects/ab/<sha256>                a delta blob: exactly `Delta.to_bytes()` (safetensors),
                                       named by the sha256 of its bytes, verified on every read
    versions/<id>.json                 a manifest (JSON, readable without torch); the id is the
                                       first 32 hex digits of the sha256 of the manifest's
                                       canonical JSON (without the id), checked on every read
    refs/branches/<name>               a ref: the JSON entry of its latest move (below)
    refs/tags/<name>                   a tag: written once, never moved
    reflog/<branches|tags>/<name>/<seq>.json   the append-only ref log: one object per move
    locks/                             file locks (local stores only)

A ref entry is `{ref, seq, version, previous, action, at}`; `seq` counts the moves of that
ref (1, 2, ...). A move is a compare-and-swap on the ref object (a file lock around
read-compare-rename locally; a conditional PUT with If-Match / If-None-Match on S3); then
the same bytes are written to `reflog/.../<seq>.json` with an exclusive create. A crash
between the two leaves the log one entry behind: the next move of that ref and
`fsck --repair` write the missing entry (from the ref itself), so the log never holds a
move that did not happen, and never loses one unless the ref is lost in the same crash.

A commit writes the blob, then the manifest, then moves the branch; each write is atomic
(temporary file + rename locally; a single PUT on S3). A process killed at any point
leaves at worst an unreferenced blob or manifest, which `gc` removes after a grace
period; every ref always names a complete version.

The `base` version stands for the unedited model: its manifest has no parent and no
delta, and carries the model's fingerprint. Its id depends on the fingerprint alone, so
it is the same in every store of that model. Branch `main` starts at `base`.

Names resolve in this order: `base`, a full version id, a tag, a branch. Tag and branch
names are safe path segments that cannot take the form of a version id.

On S3, credentials and the endpoint come from the usual AWS settings (environment,
~/.aws; AWS_ENDPOINT_URL for MinIO and other S3-compatible servers) or from
`VersionStore.open(url, storage_options=...)`, passed to s3fs.

This module imports neither torch nor `editing.delta` at import time (the API lists
versions without torch); only the functions that read or write blobs do.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from editing.delta import Delta

FORMAT_VERSION = 1
DEFAULT_STORE = "./lmedit-store"
REF_KINDS = ("branches", "tags")
VERSION_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TMP_PREFIX = ".tmp-"


class StoreError(Exception):
    """Base class of the store's expected errors (the CLI and API turn them into messages)."""


class NotFoundError(StoreError):
    """No such store, version, tag or branch."""


class ConflictError(StoreError):
    """A ref moved under us (stale parent), a tag exists, or a rollback target is not an ancestor."""


class BaseMismatchError(StoreError):
    """The store is bound to another base model."""


class CorruptObjectError(StoreError):
    """A blob or manifest is missing or its bytes do not match its name."""


def default_store_url() -> str:
    return os.environ.get("LMEDIT_STORE") or DEFAULT_STORE


def validate_name(name: str, what: str = "name") -> str:
    """A tag or branch name: a safe path segment that cannot be mistaken for `base` or a version id."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid {what} {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if VERSION_ID.match(name):
        raise ValueError(f"invalid {what} {name!r}: 32 hex digits is the form of a version id")
    if name == "base":
        raise ValueError(f"invalid {what} 'base': it names the unedited model")
    return name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """JSON-ready copy of manifest content. Non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if hasattr(value, "model_dump"):  # pydantic models
        return _plain(value.model_dump())
    if hasattr(value, "item"):  # numpy / torch scalars
        return _plain(value.item())
    raise TypeError(f"cannot store {type(value).__name__} in a manifest (JSON values only)")


def _canonical(obj: Any) -> bytes:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode()


def _version_id(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "id"}
    return hashlib.sha256(_canonical(body)).hexdigest()[:32]


def _object_path(sha: str) -> str:
    return f"objects/{sha[:2]}/{sha}"


def _is_tmp(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(_TMP_PREFIX)


# --- backends: the few storage operations the store needs -------------------------------------
#
# read / write (atomic overwrite) / create (exclusive; False if it exists) /
# read_versioned + replace_if (compare-and-swap) / list / delete / stat.


class LocalBackend:
    """A local directory. Atomic writes by temporary file + rename; CAS under a file lock."""

    def __init__(self, root: str | Path, durable: bool = True):
        self.root = Path(root)
        self.durable = durable  # fsync files and directories (survives power loss, not just kills)

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def _write_tmp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
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
        from filelock import FileLock  # lazy: `app/` lists versions without needing it

        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(lock_dir / (rel.replace("/", "~") + ".lock"), timeout=60):
            yield

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


# --- the store -------------------------------------------------------------------------------


@dataclass
class Problem:
    kind: str  # corrupt-manifest, missing-parent, missing-object, corrupt-object, missing-ref, ...
    path: str
    message: str


@dataclass
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harmless leftovers (temporary files, orphans)
    versions: int = 0
    objects: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, path: str, message: str) -> None:
        self.problems.append(Problem(kind, path, message))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ok": self.ok}


class VersionStore:
    """Versions, refs and delta blobs of one base model. Open with `VersionStore.open(url, ...)`."""

    def __init__(self, backend: LocalBackend | FsspecBackend, url: str, config: dict):
        self.backend = backend
        self.url = url
        self.config = config
        self._manifests: dict[str, dict] = {}  # manifests are immutable: cached forever

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        base_fingerprint: str | None = None,
        storage_options: dict | None = None,
        durable: bool = True,
    ) -> VersionStore:
        """Open the store at `url`; with `base_fingerprint`, create it if missing and refuse
        (BaseMismatchError) a store bound to another base model."""
        url = str(url or default_store_url())
        backend = _backend_for(url, storage_options, durable)
        try:
            config = json.loads(backend.read("store.json"))
        except FileNotFoundError:
            if base_fingerprint is None:
                raise NotFoundError(
                    f"no version store at {url} (set --store or LMEDIT_STORE; the first edit creates it)"
                ) from None
            config = cls._create(backend, base_fingerprint)
        if config.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store at {url} has format_version {config.get('format_version')!r}, "
                             f"this lmedit reads {FORMAT_VERSION}")
        if base_fingerprint is not None and config["base_fingerprint"] != base_fingerprint:
            raise BaseMismatchError(
                f"store at {url} belongs to base model {config['base_fingerprint'][:16]}…, "
                f"not {base_fingerprint[:16]}… (use another --store for this model)"
            )
        return cls(backend, url, config)

    @staticmethod
    def _create(backend: LocalBackend | FsspecBackend, fingerprint: str) -> dict:
        # Every step is idempotent and store.json comes last: a crash during creation is
        # finished by the next open, and a store "exists" only once it is complete.
        base = {
            "format_version": FORMAT_VERSION, "parent": None, "branch": None, "created_at": None,
            "base_fingerprint": fingerprint, "facts": [], "method": None, "objective": None,
            "hparams": {}, "delta": None, "metrics": {}, "job_id": None, "key_id": None,
        }
        base["id"] = _version_id(base)
        backend.write(f"versions/{base['id']}.json", json.dumps(base, indent=1, sort_keys=True).encode())
        config = {"format_version": FORMAT_VERSION, "base_fingerprint": fingerprint,
                  "base_version": base["id"], "created_at": _now()}
        store = VersionStore(backend, "", config)
        if store._read_ref("branches", "main") is None:
            with contextlib.suppress(ConflictError):  # another process created it first
                store._move_ref("branches", "main", None, base["id"], "create")
        if not backend.create("store.json", json.dumps(config, indent=1, sort_keys=True).encode()):
            config = json.loads(backend.read("store.json"))
        return config

    @property
    def base_fingerprint(self) -> str:
        return self.config["base_fingerprint"]

    @property
    def base_id(self) -> str:
        return self.config["base_version"]

    # --- reading -------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """Version id for `name`: `base`, a full version id, a tag, a branch (in that order)."""
        if name == "base":
            return self.base_id
        if VERSION_ID.match(name):
            self._manifest(name)
            return name
        if _NAME.match(name):  # anything else cannot be a ref, and must not reach a path
            for kind in ("tags", "branches"):
                entry = self._read_ref(kind, name)
                if entry is not None:
                    return entry["version"]
        raise NotFoundError(f"{name!r} is not base, a version id, a tag or a branch")

    def head(self, branch: str) -> str:
        """The version a branch points at (a branch, never a tag of the same name)."""
        entry = self._read_ref("branches", validate_name(branch, "branch name"))
        if entry is None:
            raise NotFoundError(f"no branch {branch!r}")
        return entry["version"]

    def get(self, name: str) -> dict:
        """The manifest of a version (any name `resolve` accepts): a copy, the cache stays intact."""
        return copy.deepcopy(self._manifest(self.resolve(name)))

    def _manifest(self, vid: str) -> dict:
        if vid in self._manifests:
            return self._manifests[vid]
        try:
            data = self.backend.read(f"versions/{vid}.json")
        except FileNotFoundError:
            raise NotFoundError(f"no version {vid}") from None
        try:
            manifest = json.loads(data)
            ok = manifest.get("id") == vid and _version_id(manifest) == vid
        except (ValueError, AttributeError, TypeError):
            ok = False
        if not ok:
            raise CorruptObjectError(f"manifest of version {vid} (versions/{vid}.json) is corrupt")
        self._manifests[vid] = manifest
        return manifest

    def touched(self, name: str) -> list[str]:
        """Parameter names that a version's own delta changes (a cheap read: no manifest copy)."""
        info = self._manifest(self.resolve(name))["delta"]
        return list(info["tensors"]) if info else []

    def ancestry(self, name: str) -> list[str]:
        """Version ids from base to `name`, inclusive."""
        chain, seen, vid = [], set(), self.resolve(name)
        while vid is not None:
            if vid in seen:
                raise CorruptObjectError(f"version {vid} is its own ancestor")
            chain.append(vid)
            seen.add(vid)
            parent = self._manifest(vid)["parent"]
            if parent is not None:
                try:
                    self._manifest(parent)
                except NotFoundError:
                    raise CorruptObjectError(f"version {vid} names a missing parent {parent}") from None
            vid = parent
        return chain[::-1]

    def log(self, name: str = "main") -> list[dict]:
        """Manifests from `name` back to base, newest first."""
        return [copy.deepcopy(self._manifest(v)) for v in reversed(self.ancestry(name))]

    def versions(self) -> list[dict]:
        """Every version in the store (not only those on a branch), newest first."""
        out = []
        for path in self.backend.list("versions"):
            vid = path.rsplit("/", 1)[-1].removesuffix(".json")
            if VERSION_ID.match(vid):
                out.append(copy.deepcopy(self._manifest(vid)))
        return sorted(out, key=lambda m: (m["created_at"] or "", m["id"]), reverse=True)

    def branches(self) -> dict[str, str]:
        return self._refs("branches")

    def tags(self) -> dict[str, str]:
        return self._refs("tags")

    def _refs(self, kind: str) -> dict[str, str]:
        out = {}
        for path in self.backend.list(f"refs/{kind}"):
            name = path.rsplit("/", 1)[-1]
            if not _is_tmp(path):
                entry = self._read_ref(kind, name)
                if entry is not None:
                    out[name] = entry["version"]
        return dict(sorted(out.items()))

    def diff(self, a: str, b: str) -> dict:
        """What differs between versions a and b: the tensors touched on either side since their
        last common ancestor, and the facts b has that a lacks (added) and vice versa (removed)."""
        chain_a, chain_b = self.ancestry(a), self.ancestry(b)
        common = 0
        while common < min(len(chain_a), len(chain_b)) and chain_a[common] == chain_b[common]:
            common += 1
        tensors = set()
        for vid in chain_a[common:] + chain_b[common:]:
            tensors.update(self.touched(vid))

        def facts(chain: list[str]) -> dict[bytes, dict]:
            return {_canonical(f): f for v in chain for f in self._manifest(v)["facts"]}

        facts_a, facts_b = facts(chain_a), facts(chain_b)
        return {
            "a": chain_a[-1], "b": chain_b[-1], "common_ancestor": chain_a[common - 1],
            "tensors": sorted(tensors),
            "facts_added": [f for k, f in facts_b.items() if k not in facts_a],
            "facts_removed": [f for k, f in facts_a.items() if k not in facts_b],
        }

    def load_delta(self, name: str) -> Delta:
        """The verified delta of a version (an empty Delta for base)."""
        from editing.delta import Delta

        vid = self.resolve(name)
        info = self._manifest(vid)["delta"]
        if info is None:
            return Delta()
        return Delta.from_bytes(self._read_object(vid, info["object"]))

    def _read_object(self, vid: str, sha: str) -> bytes:
        path = _object_path(sha)
        try:
            data = self.backend.read(path)
        except FileNotFoundError:
            raise CorruptObjectError(f"version {vid}: delta object {sha} ({path}) is missing") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise CorruptObjectError(
                f"version {vid}: delta object {sha} ({path}) is corrupt (its bytes hash to {actual[:16]}…)"
            )
        return data

    # --- writing -------------------------------------------------------------------------------
    def commit(
        self,
        branch: str,
        delta: Delta,
        *,
        parent: str,
        facts: list,
        method: str,
        objective: str,
        hparams: dict,
        metrics: dict,
        job_id: str | None = None,
        key_id: str | None = None,
        base_fingerprint: str | None = None,
    ) -> dict:
        """Record `delta` (made on top of version `parent`) as a new version on `branch`.

        ConflictError if the branch no longer points at `parent`. If `job_id` is already in
        the branch's ancestry, that version's manifest is returned and nothing is written.
        `base_fingerprint` (default: the one the store was opened with) must be the store's.
        """
        if base_fingerprint is not None and base_fingerprint != self.base_fingerprint:
            raise BaseMismatchError(
                f"delta was made on base model {base_fingerprint[:16]}…; this store holds "
                f"{self.base_fingerprint[:16]}…"
            )
        head = self.head(branch)
        if job_id is not None and (done := self._find_job(head, job_id)) is not None:
            return done
        if head != parent:
            raise ConflictError(f"branch {branch!r} moved: it is at {head}, not at the parent {parent}")

        data = delta.to_bytes()
        sha = hashlib.sha256(data).hexdigest()
        # Always (re)written, even when an identical blob exists: this refreshes its mtime, so
        # a concurrent gc cannot remove it between here and the manifest naming it.
        self.backend.write(_object_path(sha), data)
        names = delta.names()
        kind = "lora" if delta.lora and not delta.dense else "mixed" if delta.lora else "dense"
        manifest = {
            "format_version": FORMAT_VERSION, "parent": parent, "branch": branch, "created_at": _now(),
            "base_fingerprint": self.base_fingerprint, "facts": _plain(list(facts)),
            "method": method, "objective": objective, "hparams": _plain(dict(hparams)),
            "delta": {"object": sha, "bytes": len(data), "tensors": names, "kind": kind},
            "metrics": _plain(dict(metrics)), "job_id": job_id, "key_id": key_id,
        }
        manifest["id"] = _version_id(manifest)
        self.backend.write(
            f"versions/{manifest['id']}.json", json.dumps(manifest, indent=1, sort_keys=True).encode()
        )
        self._manifests[manifest["id"]] = copy.deepcopy(manifest)
        try:
            self._move_ref("branches", branch, parent, manifest["id"], "commit")
        except ConflictError:
            # A retry racing its own earlier attempt: the job may have landed meanwhile.
            if job_id is not None and (done := self._find_job(self.head(branch), job_id)) is not None:
                return done
            raise
        return dict(manifest)

    def _find_job(self, head: str, job_id: str) -> dict | None:
        for vid in reversed(self.ancestry(head)):
            if self._manifest(vid)["job_id"] == job_id:
                return copy.deepcopy(self._manifest(vid))
        return None

    def create_branch(self, name: str, from_version: str = "main") -> str:
        """A new branch at any version; ConflictError if the branch exists."""
        validate_name(name, "branch name")
        target = self.resolve(from_version)
        try:
            self._move_ref("branches", name, None, target, "branch")
        except ConflictError:
            raise ConflictError(f"branch {name!r} already exists") from None
        return target

    def tag(self, name: str, version: str) -> str:
        """Name a version, for good: tagging the same version again is a no-op, another is a conflict."""
        validate_name(name, "tag name")
        target = self.resolve(version)
        for _ in range(2):  # a lost creation race re-reads the winner's tag
            entry = self._read_ref("tags", name)
            if entry is not None:
                if entry["version"] != target:
                    raise ConflictError(f"tag {name!r} already names {entry['version']} (tags never move)")
                return target
            with contextlib.suppress(ConflictError):
                self._move_ref("tags", name, None, target, "tag")
                return target
        raise ConflictError(f"tag {name!r} is being created concurrently")

    def rollback(self, branch: str, version: str) -> str:
        """Move `branch` back to `version`, which must be its head or an ancestor of it."""
        head = self.head(branch)
        target = self.resolve(version)
        if target not in self.ancestry(head):
            raise ConflictError(f"{version} ({target}) is not an ancestor of branch {branch!r} (at {head})")
        if target != head:
            self._move_ref("branches", branch, head, target, "rollback")
        return target

    # --- refs ----------------------------------------------------------------------------------
    def _read_ref(self, kind: str, name: str) -> dict | None:
        data, _ = self.backend.read_versioned(f"refs/{kind}/{name}")
        return json.loads(data) if data is not None else None

    def _move_ref(self, kind: str, name: str, expected: str | None, new: str, action: str) -> dict:
        """Compare-and-swap ref `kind/name` from version `expected` (None: must not exist) to `new`."""
        path = f"refs/{kind}/{name}"
        data, token = self.backend.read_versioned(path)
        current = json.loads(data) if data is not None else None
        if (current["version"] if current else None) != expected:
            raise ConflictError(
                f"{kind[:-1]} {name!r} is at {current['version'] if current else 'nothing'}, not {expected}"
            )
        if current is not None:
            self._append_log(current, data)  # backfill, if the previous mover crashed before logging
        entry = {"ref": f"{kind}/{name}", "seq": (current["seq"] if current else 0) + 1, "version": new,
                 "previous": expected, "action": action, "at": _now()}
        payload = json.dumps(entry, sort_keys=True).encode()
        if not self.backend.replace_if(path, payload, token):
            # A retried request whose first try landed (S3) looks like a conflict: check.
            if self.backend.read_versioned(path)[0] != payload:
                raise ConflictError(f"{kind[:-1]} {name!r} moved concurrently")
        self._append_log(entry, payload)
        return entry

    def _append_log(self, entry: dict, payload: bytes) -> None:
        self.backend.create(f"reflog/{entry['ref']}/{entry['seq']:010d}.json", payload)

    def reflog(self, kind: str, name: str) -> list[dict]:
        """Every logged move of one ref, oldest first."""
        out = []
        for path in self.backend.list(f"reflog/{kind}/{name}"):
            if not _is_tmp(path):
                out.append(json.loads(self.backend.read(path)))
        return sorted(out, key=lambda e: e["seq"])

    # --- maintenance ---------------------------------------------------------------------------
    def gc(self, grace_seconds: float = 3600.0) -> dict:
        """Remove blobs that no manifest names (and temporary files), older than the grace period."""
        referenced = set()
        for path in self.backend.list("versions"):
            if _is_tmp(path):
                continue
            try:
                info = json.loads(self.backend.read(path)).get("delta")
            except ValueError:
                raise StoreError(f"{path} is unreadable: run `lmedit store fsck` before gc") from None
            if info:
                referenced.add(info["object"])
        cutoff = time.time() - grace_seconds
        removed, kept, freed = [], 0, 0
        candidates = self.backend.list("objects") + [
            p for prefix in ("versions", "refs", "reflog") for p in self.backend.list(prefix) if _is_tmp(p)
        ]
        for path in candidates:
            name = path.rsplit("/", 1)[-1]
            if name in referenced:
                kept += 1
                continue
            try:
                mtime, size = self.backend.stat(path)
            except FileNotFoundError:
                continue
            if mtime > cutoff:  # possibly a commit in flight: its manifest is not written yet
                kept += 1
                continue
            self.backend.delete(path)
            removed.append(path)
            freed += size
        return {"removed": removed, "kept": kept, "bytes_freed": freed}

    def fsck(self, repair: bool = False) -> FsckReport:
        """Check every manifest, object and ref; with `repair`, rebuild refs from the ref log.
        The report lists the problems found (before any repair) and the repairs made."""
        report = FsckReport()
        ok: dict[str, bool] = {}  # version id -> its manifest reads and verifies
        for path in self.backend.list("versions"):
            if _is_tmp(path):
                report.notes.append(f"temporary file {path} (gc removes it)")
                continue
            vid = path.rsplit("/", 1)[-1].removesuffix(".json")
            try:
                self._manifest(vid)
                ok[vid] = True
            except StoreError as e:
                ok[vid] = False
                report.add("corrupt-manifest", path, str(e))
        report.versions = len(ok)
        if self.base_id not in ok:
            report.add("missing-base", f"versions/{self.base_id}.json", "the base manifest is missing")

        complete: dict[str, bool] = {}  # version id -> its manifest and all its ancestors' are sound

        def is_complete(vid: str | None) -> bool:
            walked = []
            while vid is not None and vid not in complete and ok.get(vid) and vid not in walked:
                walked.append(vid)
                vid = self._manifest(vid)["parent"]
            result = True if vid is None else complete.get(vid, False)  # missing, corrupt or a cycle
            for v in walked:
                complete[v] = result
            return result

        referenced = set()
        for vid in sorted(v for v, good in ok.items() if good):
            m = self._manifest(vid)
            if m["parent"] is not None and not ok.get(m["parent"]):
                report.add("missing-parent", f"versions/{vid}.json",
                           f"version {vid} names parent {m['parent']}, which is missing or corrupt")
            if m["delta"] is not None:
                sha = m["delta"]["object"]
                referenced.add(sha)
                try:
                    self._read_object(vid, sha)
                except CorruptObjectError as e:
                    kind = "missing-object" if "missing" in str(e) else "corrupt-object"
                    report.add(kind, _object_path(sha), str(e))
        objects = self.backend.list("objects")
        report.objects = sum(not _is_tmp(p) for p in objects)
        orphans = sum(not _is_tmp(p) and p.rsplit("/", 1)[-1] not in referenced for p in objects)
        if orphans:
            report.notes.append(f"{orphans} blob(s) no manifest names (gc removes them after a grace period)")
        report.notes += [f"temporary file {p} (gc removes it)" for p in objects if _is_tmp(p)]

        for kind in REF_KINDS:
            paths = self.backend.list(f"refs/{kind}") + self.backend.list(f"reflog/{kind}")
            names = {p.split("/")[2] for p in paths if not _is_tmp(p)}
            for name in sorted(names):
                self._fsck_ref(kind, name, is_complete, report, repair)
        if self._read_ref("branches", "main") is None and not self.reflog("branches", "main"):
            report.add("missing-ref", "refs/branches/main", "branch main is missing and has no ref log")
            if repair:
                self._move_ref("branches", "main", None, self.base_id, "repair")
                report.repaired.append(f"refs/branches/main: set to base {self.base_id}")
        return report

    def _fsck_ref(self, kind: str, name: str, is_complete: Any, report: FsckReport, repair: bool) -> None:
        path, log_dir = f"refs/{kind}/{name}", f"reflog/{kind}/{name}"
        data, token = self.backend.read_versioned(path)
        try:
            ref = json.loads(data) if data is not None else None
        except ValueError:
            ref = None
            report.add("corrupt-ref", path, f"{path} is not valid JSON")
        try:
            log = self.reflog(kind, name)
        except ValueError:
            log = []
            report.add("corrupt-reflog", log_dir, f"an entry of {log_dir} is not valid JSON")
        last = log[-1] if log else None

        if ref is not None and is_complete(ref["version"]) and (last is None or last["seq"] <= ref["seq"]):
            if last is None or last["seq"] < ref["seq"]:  # killed between the ref move and its log entry
                report.add("reflog-behind", path, f"the ref log lacks {path}'s latest move")
                if repair:
                    self._append_log(ref, data)
                    report.repaired.append(f"{path}: logged move {ref['seq']}")
            return
        if ref is None and data is None:
            report.add("missing-ref", path, f"{path} is missing (moves in its ref log: {len(log)})")
        elif ref is not None and not is_complete(ref["version"]):
            report.add("ref-to-incomplete", path, f"{path} points at {ref['version']}, missing or incomplete")
        elif ref is not None:
            report.add("ref-behind", path, f"{path} is at move {ref['seq']}, its ref log at {last['seq']}")
        if not repair:
            return
        for entry in reversed(log):  # the newest logged move whose version is complete
            if not is_complete(entry["version"]):
                continue
            if entry is last:  # the ref becomes exactly its last logged move
                payload = self.backend.read(f"{log_dir}/{entry['seq']:010d}.json")
            else:  # the newest moves name lost versions: a new move back to a sound one
                entry = {"ref": f"{kind}/{name}", "seq": max(last["seq"], ref["seq"] if ref else 0) + 1,
                         "version": entry["version"], "previous": ref["version"] if ref else None,
                         "action": "repair", "at": _now()}
                payload = json.dumps(entry, sort_keys=True).encode()
            if not self.backend.replace_if(path, payload, token):
                report.add("ref-moved", path, f"{path} moved during fsck: run it again")
                return
            self._append_log(entry, payload)
            report.repaired.append(f"{path}: set to {entry['version']} (move {entry['seq']})")
            return
        report.add("unrepairable-ref", path, f"no logged move of {path} names a complete version")

