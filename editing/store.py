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
    metrics/<id>.json                  metrics measured after the version was committed (a manifest
                                       with `metrics_deferred: true`): {version, metrics, measured_at},
                                       written once; `get`, `log`, `versions` and `find_job` show them
                                       merged into the manifest's `metrics` once they exist
    keyframes/<id>.json                a keyframe record: {version, object, bytes, tensors, position};
                                       its object (in objects/, safetensors like a delta) holds the
                                       accumulated sum S_v of every tensor the version's weights chain
                                       touches, so a cold checkout starts there (editing/checkout.py)
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
period (never under 60 s, so a commit in flight keeps its blob); every ref always names a
complete version.

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

Keyframes are a cache of exact sums, never the definition: a version's weights are base + S_v with
or without them. One is written once per version (an exclusive create of its record, after its blob),
so a crash leaves at worst an unreferenced blob; `gc` keeps the blobs of records whose version exists
and removes the records (then the blobs) of versions that are gone.

Where things are: the two storage backends in `editing/backends.py`, this module the version
store itself (manifests, refs, ref log), `fsck` and `gc` in `editing/maintenance.py`.
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
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from editing.backends import FsspecBackend, LocalBackend, LockTimeout, _backend_for
from editing.backends import is_tmp as _is_tmp

if TYPE_CHECKING:
    from editing.delta import Delta
    from editing.maintenance import FsckReport

__all__ = [
    "BaseMismatchError", "ConflictError", "CorruptObjectError", "FsspecBackend", "LocalBackend",
    "NotFoundError", "StoreError", "VersionStore", "default_store_url", "job_metrics", "validate_name",
]

FORMAT_VERSION = 1
DEFAULT_STORE = "./lmedit-store"
REF_KINDS = ("branches", "tags")
VERSION_ID = re.compile(r"^[0-9a-f]{32}$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # a tag or branch name (and not a version id)
_NAME = re.compile(NAME_PATTERN)


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


def _metrics_path(vid: str) -> str:
    return f"metrics/{vid}.json"


def _keyframe_path(vid: str) -> str:
    return f"keyframes/{vid}.json"



def _made_by(manifest: dict, job_id: str) -> bool:
    return manifest.get("job_id") == job_id or job_id in (manifest.get("job_ids") or ())


def _job_group(jobs: list[tuple[str, int]], n_facts: int) -> list[dict]:
    """A coalesced edit's jobs as its manifest records them: job id and fact range [start, stop)."""
    out, start = [], 0
    for job_id, n in jobs:
        out.append({"job_id": str(job_id), "facts": [start, start + int(n)]})
        start += int(n)
    if not out or start != n_facts or len({g["job_id"] for g in out}) != len(out):
        raise ValueError(f"a coalesced edit's jobs must split its {n_facts} facts among distinct job ids")
    return out


def job_metrics(metrics: dict, job_id: str) -> dict:
    """One job's metrics from a version's: the version's own, or for a coalesced edit its shared training
    stats with that job's facts' metrics (`metrics["jobs"][job_id]`) in place of the group's."""
    own = (metrics.get("jobs") or {}).get(job_id)
    if not isinstance(own, dict):
        return metrics
    return {k: v for k, v in metrics.items() if k != "jobs"} | own


# --- the store -------------------------------------------------------------------------------


class VersionStore:
    """Versions, refs and delta blobs of one base model. Open with `VersionStore.open(url, ...)`."""

    def __init__(self, backend: LocalBackend | FsspecBackend, url: str, config: dict):
        self.backend = backend
        self.url = url
        self.config = config
        self._manifests: dict[str, dict] = {}  # manifests are immutable: cached forever
        self._measured: dict[str, dict] = {}  # so are metrics records, once written

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
        """The manifest of a version (any name `resolve` accepts): a copy, the cache stays intact;
        deferred metrics merged in once measured (`measured`)."""
        return self._view(self.resolve(name))

    def _view(self, vid: str) -> dict:
        manifest = copy.deepcopy(self._manifest(vid))
        if manifest.get("metrics_deferred") and (record := self.measured(vid)) is not None:
            manifest["metrics"] = {**manifest["metrics"], **record["metrics"]}
        return manifest

    def measured(self, name: str) -> dict | None:
        """The record of metrics measured after commit (None: none yet, or none deferred)."""
        vid = self.resolve(name)
        if vid in self._measured:
            return self._measured[vid]
        try:
            record = json.loads(self.backend.read(_metrics_path(vid)))
        except FileNotFoundError:
            return None
        except ValueError:
            raise CorruptObjectError(f"metrics record of version {vid} ({_metrics_path(vid)}) is corrupt") from None
        self._measured[vid] = record  # written once: cached like the manifests
        return record

    def write_metrics(self, name: str, metrics: dict) -> dict:
        """Record the metrics of a version measured after its commit (written once: a second writer
        keeps the first record, measured on the same exact weights). Returns the record in effect."""
        vid = self.resolve(name)
        record = {"version": vid, "metrics": _plain(dict(metrics)), "measured_at": _now()}
        if not self.backend.create(_metrics_path(vid), json.dumps(record, indent=1, sort_keys=True).encode()):
            return self.measured(vid) or record
        self._measured[vid] = record
        return record

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

    def weights_chain(self, name: str) -> list[str]:
        """The versions whose deltas sum to S_v, in order: from the last rebase version at or
        before `name` (S_rebase = its own delta), else from base. Checkout and diff use this."""
        chain = self.ancestry(name)
        for i in range(len(chain) - 1, 0, -1):
            if self._manifest(chain[i]).get("rebase"):
                return chain[i:]
        return chain

    def edits_since_rebase(self, name: str) -> int:
        """Versions stacked on the last rebase version at or before `name` (or on base): what a
        consolidate would fold into one (GET /branches/{name}, LMEDIT_AUTO_CONSOLIDATE_AFTER)."""
        return len(self.weights_chain(name)) - 1

    def log(self, name: str = "main") -> list[dict]:
        """Manifests from `name` back to base, newest first."""
        return [self._view(v) for v in reversed(self.ancestry(name))]

    def versions(self) -> list[dict]:
        """Every version in the store (not only those on a branch), newest first."""
        out = []
        for path in self.backend.list("versions"):
            vid = path.rsplit("/", 1)[-1].removesuffix(".json")
            if VERSION_ID.match(vid):
                out.append(self._view(vid))
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
        from editing.ledger import ledger_of

        history_a, history_b = self.ancestry(a), self.ancestry(b)
        common_ancestor = [v for v, w in zip(history_a, history_b) if v == w][-1]
        chain_a, chain_b = self.weights_chain(a), self.weights_chain(b)
        common = 0  # chains that start at different rebase roots share nothing
        while common < min(len(chain_a), len(chain_b)) and chain_a[common] == chain_b[common]:
            common += 1
        tensors = set()
        for vid in chain_a[common:] + chain_b[common:]:
            tensors.update(self.touched(vid))
        live_a = {f.fact_id: f for f in ledger_of(self, history_a[-1]).live}
        live_b = {f.fact_id: f for f in ledger_of(self, history_b[-1]).live}
        return {
            "a": history_a[-1], "b": history_b[-1], "common_ancestor": common_ancestor,
            "tensors": sorted(tensors),
            "facts_added": [f.fact for k, f in live_b.items() if k not in live_a],
            "facts_removed": [f.fact for k, f in live_a.items() if k not in live_b],
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

    def keyframe(self, name: str) -> dict | None:
        """The keyframe record of a version (None: it has none); CorruptObjectError if unreadable."""
        vid = self.resolve(name)
        try:
            data = self.backend.read(_keyframe_path(vid))
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
            ok = record.get("version") == vid and isinstance(record.get("object"), str)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise CorruptObjectError(f"keyframe record of version {vid} ({_keyframe_path(vid)}) is corrupt")
        return record

    def load_keyframe(self, name: str) -> dict[str, Any] | None:
        """The verified accumulated sums S_v (fp32 tensors by parameter name) a version's keyframe holds,
        or None when it has none. CorruptObjectError if its record or blob is damaged."""
        from editing.delta import Delta

        record = self.keyframe(name)
        if record is None:
            return None
        sums = Delta.from_bytes(self._read_object(record["version"], record["object"])).dense
        if sorted(sums) != sorted(record.get("tensors", [])):
            raise CorruptObjectError(f"keyframe of version {record['version']}: its blob holds other tensors "
                                     "than its record lists")
        return sums

    def write_keyframe(self, name: str, sums: dict[str, Any], position: int, heal: bool = False) -> dict:
        """Record S_v (every tensor its weights chain touches; `position`: v's index in that chain) as
        the version's keyframe: the blob first, then the record, created once (a second writer keeps
        the first record: both hold the same exact sums). Returns the record in effect. `heal`: the
        record's blob was found damaged; write it again (the same exact bytes) even though a record exists."""
        from editing.delta import Delta

        vid = self.resolve(name)
        if not heal and (existing := self.keyframe(vid)) is not None:  # written already: no second blob
            return existing
        data = Delta(dense=dict(sums)).to_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.backend.write(_object_path(sha), data)  # rewritten: a fresh mtime, as in commit
        record = {"version": vid, "object": sha, "bytes": len(data), "tensors": sorted(sums), "position": position}
        if not self.backend.create(_keyframe_path(vid), json.dumps(record, indent=1, sort_keys=True).encode()):
            return self.keyframe(vid) or record
        return record

    def keyframes(self) -> list[str]:
        """Version ids that have a keyframe record."""
        return sorted(p.rsplit("/", 1)[-1].removesuffix(".json") for p in self.backend.list("keyframes")
                      if not _is_tmp(p))

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
        rebase: dict | None = None,
        metrics_deferred: bool = False,
        jobs: list[tuple[str, int]] | None = None,
    ) -> dict:
        """Record `delta` (made on top of version `parent`) as a new version on `branch`.

        `rebase`: the version is a rebase (consolidate, revert): its delta is the whole sum,
        S_v = d_v, and the parent link is history only (`weights_chain`); the dict says what it
        does to the branch's facts (editing/ledger.py) and goes into the manifest as `ledger`.
        ConflictError if the branch no longer points at `parent`. If `job_id` is already in
        the branch's ancestry, that version's manifest is returned and nothing is written.
        `base_fingerprint` (default: the one the store was opened with) must be the store's.
        `metrics_deferred`: the version's metrics are measured after it is live (`write_metrics`).
        `jobs`: a coalesced edit, one version for several jobs: (job id, number of facts) in acceptance
        order, each job's facts the next ones of `facts`. The manifest then lists `job_ids` and `jobs`
        (each job's fact range [start, stop)); `job_id` is the first; per-job metrics go in
        `metrics["jobs"][job_id]` (`job_metrics`).
        """
        if base_fingerprint is not None and base_fingerprint != self.base_fingerprint:
            raise BaseMismatchError(
                f"delta was made on base model {base_fingerprint[:16]}…; this store holds "
                f"{self.base_fingerprint[:16]}…"
            )
        head = self.head(branch)
        group = _job_group(jobs, len(facts)) if jobs else None
        if group is not None:
            job_id = group[0]["job_id"]
        for jid in [g["job_id"] for g in group] if group else [job_id] if job_id is not None else []:
            if (done := self.find_job(head, jid)) is not None:
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
            "delta": {"object": sha, "bytes": len(data), "tensors": names, "kind": kind,
                      **({"memory": True} if delta.memory else {})},
            "metrics": _plain(dict(metrics)), "job_id": job_id, "key_id": key_id,
        }
        if rebase is not None:  # only then: the ids of ordinary manifests stay as they were
            manifest.update(rebase=True, ledger=_plain(dict(rebase)))
        if metrics_deferred:  # likewise
            manifest["metrics_deferred"] = True
        if group is not None:  # likewise: a single job's manifest keeps its form
            manifest.update(job_ids=[g["job_id"] for g in group], jobs=group)
        manifest["id"] = _version_id(manifest)
        self.backend.write(
            f"versions/{manifest['id']}.json", json.dumps(manifest, indent=1, sort_keys=True).encode()
        )
        self._manifests[manifest["id"]] = copy.deepcopy(manifest)
        try:
            self._move_ref("branches", branch, parent, manifest["id"], "commit")
        except ConflictError:
            # A retry racing its own earlier attempt: the job may have landed meanwhile.
            if job_id is not None and (done := self.find_job(self.head(branch), job_id)) is not None:
                return done
            raise
        return dict(manifest)

    def find_job(self, head: str | None, job_id: str) -> dict | None:
        """The manifest of the version that job `job_id` made, or None: the one answer to "which version
        did job X make?" (a retried job makes nothing new, so there is at most one). The version of a
        coalesced edit is found for every job in its `job_ids`; `job_metrics` gives one job's share.

        With `head`: only that version's ancestry, newest first (what a job checks before it commits).
        With None: every branch's ancestry, then the versions on no branch (rolled back past). Manifests
        are immutable and cached, so only the first miss reads each of them from the backend."""
        seen: set[str] = set()
        for start in [head] if head is not None else self.branches().values():
            for vid in reversed(self.ancestry(start)):
                if vid in seen:  # and so is everything before it
                    break
                seen.add(vid)
                if _made_by(self._manifest(vid), job_id):
                    return self._view(vid)
        if head is None:
            for path in self.backend.list("versions"):
                vid = path.rsplit("/", 1)[-1].removesuffix(".json")
                if VERSION_ID.match(vid) and vid not in seen and _made_by(self._manifest(vid), job_id):
                    return self._view(vid)
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
        path, what = f"refs/{kind}/{name}", {"branches": "branch", "tags": "tag"}[kind]
        data, token = self.backend.read_versioned(path)
        current = json.loads(data) if data is not None else None
        if (current["version"] if current else None) != expected:
            raise ConflictError(
                f"{what} {name!r} is at {current['version'] if current else 'nothing'}, not {expected}"
            )
        if current is not None:
            self._append_log(current, data)  # backfill, if the previous mover crashed before logging
        entry = {"ref": f"{kind}/{name}", "seq": (current["seq"] if current else 0) + 1, "version": new,
                 "previous": expected, "action": action, "at": _now()}
        payload = json.dumps(entry, sort_keys=True).encode()
        try:
            moved = self.backend.replace_if(path, payload, token)
        except LockTimeout:  # another writer holds the ref's lock (or hangs while holding it)
            raise ConflictError(f"{what} {name!r} is locked by another writer; try again") from None
        if not moved:
            # A retried request whose first try landed (S3) looks like a conflict: check.
            if self.backend.read_versioned(path)[0] != payload:
                raise ConflictError(f"{what} {name!r} moved concurrently")
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

    # --- maintenance (editing/maintenance.py) --------------------------------------------------
    def gc(self, grace_seconds: float = 3600.0) -> dict:
        """Remove blobs that no manifest names (and temporary files), older than the grace period
        (at least `maintenance.MIN_GRACE_SECONDS`, 60 s: a commit in flight keeps its blob)."""
        from editing import maintenance

        return maintenance.gc(self, grace_seconds)

    def fsck(self, repair: bool = False) -> FsckReport:
        """Check every manifest, object and ref; with `repair`, rebuild refs from the ref log."""
        from editing import maintenance

        return maintenance.fsck(self, repair)
