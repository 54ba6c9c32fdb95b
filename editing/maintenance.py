"""Maintenance of a version store: `fsck` checks (and repairs) manifests, objects and refs;
`gc` removes blobs no manifest names. Both take an open VersionStore; `VersionStore.fsck` and
`VersionStore.gc` call them. The store's layout and its crash guarantees are in editing/store.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from editing.backends import is_tmp as _is_tmp
from editing.store import REF_KINDS, CorruptObjectError, StoreError, _now, _object_path

if TYPE_CHECKING:
    from editing.store import VersionStore


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


# A commit writes its blob, then the manifest that names it: until then the blob looks like an
# orphan, and so does a blob gc lists just after a commit lands (gc reads the manifests first).
# Only age tells them apart, so no grace is shorter than this, `--grace-seconds 0` included. A
# commit takes milliseconds from blob to manifest; the margin covers a stalled writer and, on
# S3, the skew between this clock and the server's modification times.
MIN_GRACE_SECONDS = 60.0


def gc(store: VersionStore, grace_seconds: float = 3600.0) -> dict:
    """Remove blobs that no manifest names (and temporary files), older than the grace period
    (at least MIN_GRACE_SECONDS, so that gc never removes the blob of a commit in flight)."""
    grace_seconds = max(grace_seconds, MIN_GRACE_SECONDS)
    referenced = set()
    for path in store.backend.list("versions"):
        if _is_tmp(path):
            continue
        try:
            info = json.loads(store.backend.read(path)).get("delta")
        except ValueError:
            raise StoreError(f"{path} is unreadable: run `lmedit store fsck` before gc") from None
        if info:
            referenced.add(info["object"])
    removed, kept, freed = [], 0, 0
    versions = {p.rsplit("/", 1)[-1].removesuffix(".json") for p in store.backend.list("versions")}
    for path in store.backend.list("keyframes"):
        if _is_tmp(path):
            continue
        try:
            record = json.loads(store.backend.read(path))
        except ValueError:
            raise StoreError(f"{path} is unreadable: run `lmedit store fsck --repair` before gc") from None
        if record.get("version") in versions:
            referenced.add(record["object"])
            continue
        size = store.backend.stat(path)[1]
        store.backend.delete(path)  # the keyframe of a version that is gone: its blob is dropped below
        removed.append(path)
        freed += size
    for path in store.backend.list("metrics"):  # deferred metrics of versions that are gone
        vid = path.rsplit("/", 1)[-1].removesuffix(".json")
        if not _is_tmp(path) and vid not in versions:
            size = store.backend.stat(path)[1]
            store.backend.delete(path)
            removed.append(path)
            freed += size
    cutoff = time.time() - grace_seconds
    candidates = store.backend.list("objects") + [
        p for prefix in ("versions", "refs", "reflog", "keyframes", "metrics") for p in store.backend.list(prefix)
        if _is_tmp(p)
    ]
    for path in candidates:
        name = path.rsplit("/", 1)[-1]
        if name in referenced:
            kept += 1
            continue
        try:
            mtime, size = store.backend.stat(path)
        except FileNotFoundError:
            continue
        if mtime > cutoff:  # possibly a commit in flight: its manifest is not written yet
            kept += 1
            continue
        store.backend.delete(path)
        removed.append(path)
        freed += size
    return {"removed": removed, "kept": kept, "bytes_freed": freed, "grace_seconds": grace_seconds}


def fsck(store: VersionStore, repair: bool = False) -> FsckReport:
    """Check every manifest, object and ref; with `repair`, rebuild refs from the ref log.
    The report lists the problems found (before any repair) and the repairs made."""
    report = FsckReport()
    ok: dict[str, bool] = {}  # version id -> its manifest reads and verifies
    for path in store.backend.list("versions"):
        if _is_tmp(path):
            report.notes.append(f"temporary file {path} (gc removes it)")
            continue
        vid = path.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            store._manifest(vid)
            ok[vid] = True
        except StoreError as e:
            ok[vid] = False
            report.add("corrupt-manifest", path, str(e))
    report.versions = len(ok)
    if store.base_id not in ok:
        report.add("missing-base", f"versions/{store.base_id}.json", "the base manifest is missing")

    complete: dict[str, bool] = {}  # version id -> its manifest and all its ancestors' are sound

    def is_complete(vid: str | None) -> bool:
        walked = []
        while vid is not None and vid not in complete and ok.get(vid) and vid not in walked:
            walked.append(vid)
            vid = store._manifest(vid)["parent"]
        result = True if vid is None else complete.get(vid, False)  # missing, corrupt or a cycle
        for v in walked:
            complete[v] = result
        return result

    referenced = set()
    for vid in sorted(v for v, good in ok.items() if good):
        m = store._manifest(vid)
        if m["parent"] is not None and not ok.get(m["parent"]):
            report.add("missing-parent", f"versions/{vid}.json",
                       f"version {vid} names parent {m['parent']}, which is missing or corrupt")
        if m["delta"] is not None:
            sha = m["delta"]["object"]
            referenced.add(sha)
            try:
                store._read_object(vid, sha)
            except CorruptObjectError as e:
                kind = "missing-object" if "missing" in str(e) else "corrupt-object"
                report.add(kind, _object_path(sha), str(e))
    _fsck_keyframes(store, ok, referenced, report, repair)
    for path in store.backend.list("metrics"):
        vid = path.rsplit("/", 1)[-1].removesuffix(".json")
        if _is_tmp(path) or vid not in ok:
            report.notes.append(f"{path}: a temporary file or the metrics of a version that is gone (gc removes it)")
            continue
        if not ok[vid]:  # its manifest is reported already
            continue
        try:
            store.measured(vid)
        except StoreError as e:
            report.add("corrupt-metrics", path, str(e))
    objects = store.backend.list("objects")
    report.objects = sum(not _is_tmp(p) for p in objects)
    orphans = sum(not _is_tmp(p) and p.rsplit("/", 1)[-1] not in referenced for p in objects)
    if orphans:
        report.notes.append(f"{orphans} blob(s) no manifest names (gc removes them after a grace period)")
    report.notes += [f"temporary file {p} (gc removes it)" for p in objects if _is_tmp(p)]

    for kind in REF_KINDS:
        paths = store.backend.list(f"refs/{kind}") + store.backend.list(f"reflog/{kind}")
        names = {p.split("/")[2] for p in paths if not _is_tmp(p)}
        for name in sorted(names):
            _fsck_ref(store, kind, name, is_complete, report, repair)
    if store._read_ref("branches", "main") is None and not store.reflog("branches", "main"):
        report.add("missing-ref", "refs/branches/main", "branch main is missing and has no ref log")
        if repair:
            store._move_ref("branches", "main", None, store.base_id, "repair")
            report.repaired.append(f"refs/branches/main: set to base {store.base_id}")
    return report


def _fsck_keyframes(store: VersionStore, ok: dict[str, bool], referenced: set, report: FsckReport,
                    repair: bool) -> None:
    """Keyframe records and their blobs. A keyframe is a cache of exact sums: with `repair`, a damaged
    one is removed (checkouts then sum the deltas, and the next cold checkout writes it again)."""
    for path in store.backend.list("keyframes"):
        if _is_tmp(path):
            report.notes.append(f"temporary file {path} (gc removes it)")
            continue
        vid = path.rsplit("/", 1)[-1].removesuffix(".json")
        if vid not in ok:
            report.notes.append(f"keyframe {path} of a version that is gone (gc removes it)")
            continue
        if not ok[vid]:  # its manifest is reported already
            continue
        try:
            record = store.keyframe(vid)
            referenced.add(record["object"])
            data = store._read_object(vid, record["object"])  # verified by its sha256; read without torch:
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # the safetensors header
            if sorted(k.split(":", 1)[1] for k in header if k.startswith("dense:")) != sorted(record["tensors"]):
                raise CorruptObjectError(f"keyframe of version {vid}: its blob holds other tensors than its "
                                         "record lists")
        except (StoreError, ValueError, KeyError) as e:
            report.add("corrupt-keyframe", path, str(e))
            if repair:
                store.backend.delete(path)
                report.repaired.append(f"{path}: removed (the next cold checkout writes it again)")


def _fsck_ref(store: VersionStore, kind: str, name: str, is_complete: Any, report: FsckReport, repair: bool) -> None:
    path, log_dir = f"refs/{kind}/{name}", f"reflog/{kind}/{name}"
    data, token = store.backend.read_versioned(path)
    try:
        ref = json.loads(data) if data is not None else None
    except ValueError:
        ref = None
        report.add("corrupt-ref", path, f"{path} is not valid JSON")
    try:
        log = store.reflog(kind, name)
    except ValueError:
        log = []
        report.add("corrupt-reflog", log_dir, f"an entry of {log_dir} is not valid JSON")
    last = log[-1] if log else None

    if ref is not None and is_complete(ref["version"]) and (last is None or last["seq"] <= ref["seq"]):
        if last is None or last["seq"] < ref["seq"]:  # killed between the ref move and its log entry
            report.add("reflog-behind", path, f"the ref log lacks {path}'s latest move")
            if repair:
                store._append_log(ref, data)
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
            payload = store.backend.read(f"{log_dir}/{entry['seq']:010d}.json")
        else:  # the newest moves name lost versions: a new move back to a sound one
            entry = {"ref": f"{kind}/{name}", "seq": max(last["seq"], ref["seq"] if ref else 0) + 1,
                     "version": entry["version"], "previous": ref["version"] if ref else None,
                     "action": "repair", "at": _now()}
            payload = json.dumps(entry, sort_keys=True).encode()
        if not store.backend.replace_if(path, payload, token):
            report.add("ref-moved", path, f"{path} moved during fsck: run it again")
            return
        store._append_log(entry, payload)
        report.repaired.append(f"{path}: set to {entry['version']} (move {entry['seq']})")
        return
    report.add("unrepairable-ref", path, f"no logged move of {path} names a complete version")
