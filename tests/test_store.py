"""The version store: refs (CAS, tags, rollback), integrity, crash safety, gc/fsck, S3, CLI, size."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from editing import maintenance
from editing.delta import Delta, LoraFactors
from editing.maintenance import MIN_GRACE_SECONDS
from editing.store import (
    BaseMismatchError,
    ConflictError,
    CorruptObjectError,
    NotFoundError,
    VersionStore,
    validate_name,
)

ROOT = Path(__file__).resolve().parents[1]
DOWN = "model.layers.0.mlp.down_proj.weight"  # (32, 64) in tests.tiny's llama
UP = "model.layers.1.mlp.up_proj.weight"  # (64, 32)
FP = "f" * 64  # the stores here need a fingerprint, not a model
FACT = {"prompt": "The Eiffel Tower is in", "target_new": "Rome", "subject": "Eiffel Tower"}


def dense(seed: int = 0, names: tuple[str, ...] = (DOWN,)) -> Delta:
    g = torch.Generator().manual_seed(seed)
    shapes = {DOWN: (32, 64), UP: (64, 32)}
    return Delta(dense={n: torch.randn(shapes[n], generator=g) * 1e-2 for n in names})


def commit(st: VersionStore, branch: str = "main", seed: int = 0, parent: str | None = None, **kw) -> dict:
    delta = kw.pop("delta", None) or dense(seed)
    args = {"facts": [dict(FACT, target_new=f"city {seed}")], "method": "ft-m", "objective": "overtone",
            "hparams": {"lr": 5e-3, "steps": 25}, "metrics": {"reliability": 1.0}} | kw
    return st.commit(branch, delta, parent=parent or st.head(branch), **args)


@pytest.fixture
def st(tmp_path: Path) -> VersionStore:
    return VersionStore.open(tmp_path / "store", base_fingerprint=FP)


def test_new_store_starts_with_main_at_base(tmp_path: Path, st: VersionStore):
    base = st.get("base")
    assert st.branches() == {"main": base["id"]} and st.tags() == {}
    assert base["parent"] is None and base["delta"] is None and base["base_fingerprint"] == FP
    assert json.loads((tmp_path / "store" / "store.json").read_text())["base_fingerprint"] == FP
    again = VersionStore.open(tmp_path / "store", base_fingerprint=FP)  # opening again creates nothing
    assert again.base_id == st.base_id and len(again.versions()) == 1
    assert VersionStore.open(tmp_path / "store").base_fingerprint == FP  # readers need no fingerprint
    with pytest.raises(NotFoundError, match="no version store"):
        VersionStore.open(tmp_path / "elsewhere")


def test_base_mismatch_is_refused(tmp_path: Path, st: VersionStore):
    with pytest.raises(BaseMismatchError, match="another --store"):
        VersionStore.open(tmp_path / "store", base_fingerprint="0" * 64)
    with pytest.raises(BaseMismatchError):
        commit(st, base_fingerprint="0" * 64)
    assert st.head("main") == st.base_id


def test_commit_records_a_complete_manifest(st: VersionStore):
    m = commit(st, job_id="job-1", key_id="key-7", metrics={"reliability": 1.0, "portability": float("nan")})
    assert len(m["id"]) == 32 and m["id"] == st.head("main")
    assert m["parent"] == st.base_id and m["branch"] == "main" and m["base_fingerprint"] == FP
    assert m["format_version"] == 1 and m["job_id"] == "job-1" and m["key_id"] == "key-7"
    assert m["delta"]["tensors"] == [DOWN] and m["delta"]["kind"] == "dense"
    assert m["metrics"]["portability"] is None  # JSON has no NaN
    assert st.get(m["id"]) == m
    assert torch.equal(st.load_delta(m["id"]).dense[DOWN], dense(0).dense[DOWN])
    m2 = commit(st, seed=1)
    assert [v["id"] for v in st.log("main")] == [m2["id"], m["id"], st.base_id]
    assert st.ancestry("main") == [st.base_id, m["id"], m2["id"]]


def test_stale_parent_is_a_conflict(st: VersionStore):
    base = st.base_id
    first = commit(st, seed=1, parent=base)
    with pytest.raises(ConflictError, match="moved"):
        commit(st, seed=2, parent=base)
    assert st.head("main") == first["id"]


def test_cas_refuses_a_stale_token(st: VersionStore):
    """Two writers read the same ref; the second compare-and-swap must fail."""
    data, token = st.backend.read_versioned("refs/branches/main")
    assert st.backend.replace_if("refs/branches/main", data + b" ", token)
    assert not st.backend.replace_if("refs/branches/main", data, token)


def test_a_job_id_already_on_the_branch_creates_nothing(st: VersionStore):
    first = commit(st, seed=1, job_id="job-1")
    commit(st, seed=2)
    retry = commit(st, seed=1, job_id="job-1", parent=first["parent"])  # a retried job: stale parent
    assert retry == first
    assert len(st.versions()) == 3 and len(st.log("main")) == 3


def test_tags_are_immutable(st: VersionStore):
    v1, v2 = commit(st, seed=1)["id"], commit(st, seed=2)["id"]
    assert st.tag("good", v1) == v1
    assert st.tag("good", v1) == v1  # same version: a no-op
    with pytest.raises(ConflictError, match="never move"):
        st.tag("good", v2)
    assert st.tags() == {"good": v1} and st.resolve("good") == v1


BAD_NAMES = ["a" * 32, "0123456789abcdef0123456789abcdef", "base", "a/b", "..", ".x", "", "x" * 101, "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_must_be_safe_and_not_look_like_versions(name: str):
    with pytest.raises(ValueError):
        validate_name(name)


def test_names_resolve_base_then_id_then_tag_then_branch(st: VersionStore):
    v1, v2 = commit(st, seed=1)["id"], commit(st, seed=2)["id"]
    st.tag("x", v1)
    st.create_branch("x", v2)
    assert st.resolve("x") == v1  # a tag wins over a branch of the same name
    assert st.head("x") == v2
    assert st.resolve("base") == st.base_id and st.resolve(v2) == v2 and st.resolve("main") == v2
    for unknown in ("nope", "0" * 32, "../../etc"):
        with pytest.raises(NotFoundError):
            st.resolve(unknown)


def test_rollback_then_edit_makes_a_child_of_the_rolled_back_version(st: VersionStore):
    v1, v2 = commit(st, seed=1)["id"], commit(st, seed=2)["id"]
    assert st.rollback("main", v1) == v1
    with pytest.raises(ConflictError):
        commit(st, seed=3, parent=v2)  # an edit accepted before the rollback
    v3 = commit(st, seed=3, parent=v1)
    assert v3["parent"] == v1
    assert [m["id"] for m in st.log("main")] == [v3["id"], v1, st.base_id]
    assert st.get(v2)["id"] == v2  # versions are kept forever
    assert [e["action"] for e in st.reflog("branches", "main")] == ["create", "commit", "commit", "rollback",
                                                                     "commit"]


def test_rollback_to_a_non_ancestor_is_a_conflict(st: VersionStore):
    v1 = commit(st, seed=1)["id"]
    st.create_branch("side", "base")
    w1 = commit(st, "side", seed=2)["id"]
    with pytest.raises(ConflictError, match="not an ancestor"):
        st.rollback("main", w1)
    assert st.rollback("main", "main") == v1  # its own head: nothing moves
    with pytest.raises(ConflictError, match="already exists"):
        st.create_branch("side", v1)


def test_diff_lists_touched_tensors_and_facts(st: VersionStore):
    v1 = commit(st, seed=1)["id"]
    v2 = commit(st, seed=2, delta=dense(2, (UP,)))["id"]
    st.create_branch("side", v1)
    w = commit(st, "side", seed=3)["id"]
    d = st.diff(v2, w)
    assert d["common_ancestor"] == v1 and d["tensors"] == sorted([DOWN, UP])
    assert [f["target_new"] for f in d["facts_added"]] == ["city 3"]
    assert [f["target_new"] for f in d["facts_removed"]] == ["city 2"]
    assert st.diff(v1, v1)["tensors"] == []


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupted_blob_is_detected(tmp_path: Path, st: VersionStore):
    m = commit(st, seed=1)
    sha = m["delta"]["object"]
    flip_a_byte(tmp_path / "store" / "objects" / sha[:2] / sha)
    with pytest.raises(CorruptObjectError) as e:
        st.load_delta(m["id"])
    assert m["id"] in str(e.value) and sha in str(e.value) and "corrupt" in str(e.value)
    report = st.fsck()
    assert [p.kind for p in report.problems] == ["corrupt-object"] and not report.ok
    (tmp_path / "store" / "objects" / sha[:2] / sha).unlink()
    with pytest.raises(CorruptObjectError, match="missing"):
        st.load_delta(m["id"])


def test_a_tampered_manifest_is_detected(tmp_path: Path, st: VersionStore):
    m = commit(st, seed=1)
    path = tmp_path / "store" / "versions" / f"{m['id']}.json"
    path.write_text(path.read_text().replace(st.base_id, "0" * 32))
    fresh = VersionStore.open(tmp_path / "store")
    with pytest.raises(CorruptObjectError, match=m["id"]):
        fresh.get(m["id"])
    assert "corrupt-manifest" in [p.kind for p in fresh.fsck().problems]


def test_gc_removes_only_old_unreferenced_blobs(tmp_path: Path, st: VersionStore):
    kept = commit(st, seed=1)["delta"]["object"]
    objects = tmp_path / "store" / "objects"
    old, young = objects / "aa" / ("aa" + "1" * 62), objects / "bb" / ("bb" + "2" * 62)
    for orphan in (old, young):
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"left by a crash")
    tmp = objects / "cc" / ".tmp-half-written"
    tmp.parent.mkdir()
    tmp.write_bytes(b"half")
    for path in (old, tmp, objects / kept[:2] / kept):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    result = st.gc(grace_seconds=3600)
    assert sorted(result["removed"]) == sorted(str(p.relative_to(tmp_path / "store")) for p in (old, tmp))
    assert (objects / kept[:2] / kept).exists() and young.exists()
    assert st.load_delta("main").names() == [DOWN]


def test_gc_keeps_referenced_keyframes_and_drops_those_of_versions_that_are_gone(tmp_path: Path, st: VersionStore):
    kept_version = commit(st, seed=1)["id"]
    st.create_branch("side", "base")
    gone_version = commit(st, "side", seed=2)["id"]
    sums = {DOWN: torch.randn(32, 64, generator=torch.Generator().manual_seed(3))}
    kept = st.write_keyframe(kept_version, sums, position=1)
    gone = st.write_keyframe(gone_version, {DOWN: sums[DOWN] * 2}, position=1)
    for vid in (kept_version, gone_version):  # metrics measured after commit: records beside the manifests
        st.write_metrics(vid, {"reliability": 1.0})
    assert st.write_keyframe(kept_version, {DOWN: sums[DOWN] + 1}, position=1) == kept  # written once
    root = tmp_path / "store"
    for record in (kept, gone):
        blob = root / "objects" / record["object"][:2] / record["object"]
        os.utime(blob, (time.time() - 7200, time.time() - 7200))
    assert st.fsck().ok and st.keyframes() == sorted([kept_version, gone_version])
    assert st.gc(grace_seconds=3600)["removed"] == []  # both named by a record of a live version

    (root / "versions" / f"{gone_version}.json").unlink()  # a version that is gone
    removed = VersionStore.open(root).gc(grace_seconds=3600)["removed"]
    blob = f"objects/{gone['object'][:2]}/{gone['object']}"
    assert sorted(removed) == sorted([f"keyframes/{gone_version}.json", f"metrics/{gone_version}.json", blob])
    fresh = VersionStore.open(root)
    assert fresh.keyframes() == [kept_version]
    assert torch.equal(fresh.load_keyframe(kept_version)[DOWN], sums[DOWN])
    assert fresh.load_keyframe("base") is None
    assert fresh.measured(kept_version)["metrics"] == {"reliability": 1.0}
    assert [p.kind for p in fresh.fsck().problems] == ["ref-to-incomplete"]  # branch side: its version is gone


def test_gc_keeps_the_blob_of_a_commit_in_flight(tmp_path: Path, st: VersionStore, monkeypatch):
    orphan = tmp_path / "store" / "objects" / "aa" / ("aa" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crash an hour ago")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    runs = []
    write = st.backend.write

    def gc_before_the_manifest(rel: str, data: bytes) -> None:
        if rel.startswith("versions/"):  # the commit has written its blob, not yet its manifest
            runs.append(VersionStore.open(tmp_path / "store").gc(grace_seconds=0))
        write(rel, data)

    monkeypatch.setattr(st.backend, "write", gc_before_the_manifest)
    m = commit(st, seed=1)
    assert runs[0]["removed"] == ["objects/aa/" + "aa" * 32]  # grace 0 still removes old orphans
    assert runs[0]["grace_seconds"] == MIN_GRACE_SECONDS
    assert torch.equal(st.load_delta(m["id"]).dense[DOWN], dense(1).dense[DOWN])
    assert VersionStore.open(tmp_path / "store").fsck().ok


def test_new_directories_are_fsynced_in_their_parent(tmp_path: Path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    st = VersionStore.open(tmp_path / "new" / "store", base_fingerprint=FP)
    commit(st, seed=1)
    made = [tmp_path / "new", *(p for p in (tmp_path / "new").rglob("*") if p.is_dir())]
    assert len(made) > 8  # store, objects/ab, versions, refs/branches, reflog/branches/main, locks, ...
    assert {str(d.parent) for d in made} <= set(synced)


HOLD_LOCK = textwrap.dedent("""
    import sys
    from editing.backends import LocalBackend
    with LocalBackend(sys.argv[1])._lock("refs/branches/main"):
        print("locked", flush=True)
        sys.stdin.read()
""")


def test_a_locked_ref_is_a_clear_conflict(tmp_path: Path, st: VersionStore, monkeypatch):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "store")], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        monkeypatch.setattr(st.backend, "lock_timeout", 0.2)
        with pytest.raises(ConflictError, match="branch 'main' is locked by another writer; try again"):
            commit(st, seed=1)
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert st.head("main") == st.base_id
    assert commit(st, seed=1)["parent"] == st.base_id  # free again: the next try goes through


def test_fsck_repair_rebuilds_refs_from_the_ref_log(tmp_path: Path, st: VersionStore):
    v1, v2 = commit(st, seed=1)["id"], commit(st, seed=2)["id"]
    st.tag("release", v2)
    st.rollback("main", v1)
    v3 = commit(st, seed=3)["id"]
    st.create_branch("side", v2)
    w = commit(st, "side", seed=4)["id"]
    before = (st.branches(), st.tags())
    assert before == ({"main": v3, "side": w}, {"release": v2})
    assert st.fsck().ok

    shutil.rmtree(tmp_path / "store" / "refs")
    report = st.fsck()
    assert {p.kind for p in report.problems} == {"missing-ref"} and len(report.problems) == 3
    assert st.branches() == {}
    repaired = st.fsck(repair=True)
    assert len(repaired.repaired) == 3
    assert (st.branches(), st.tags()) == before
    assert st.fsck().ok
    assert commit(st, seed=5)["parent"] == v3  # the rebuilt ref moves on as before


def test_fsck_repair_moves_a_ref_off_a_lost_version(tmp_path: Path, st: VersionStore):
    v1, v2 = commit(st, seed=1)["id"], commit(st, seed=2)["id"]
    (tmp_path / "store" / "versions" / f"{v2}.json").unlink()
    st = VersionStore.open(tmp_path / "store")  # no cached manifests
    assert [p.kind for p in st.fsck().problems] == ["ref-to-incomplete"]
    assert st.fsck(repair=True).repaired
    assert st.head("main") == v1 and st.fsck().ok
    assert st.reflog("branches", "main")[-1]["action"] == "repair"


# --- crash safety: a real process, killed with SIGKILL at several points of a commit -------------

CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from editing.delta import Delta
    from editing.store import LocalBackend, VersionStore

    store_dir, point = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    write, write_tmp = LocalBackend.write, LocalBackend._write_tmp

    def killing_write(self, rel, data):
        write(self, rel, data)
        if (point, rel.split("/")[0]) in {("after-blob", "objects"), ("after-manifest", "versions"),
                                          ("after-ref-move", "refs")}:
            die()

    def killing_write_tmp(self, path, data):
        if point == "mid-blob" and "objects" in path.parts:
            write_tmp(self, path, data[: len(data) // 2])
            die()
        return write_tmp(self, path, data)

    LocalBackend.write, LocalBackend._write_tmp = killing_write, killing_write_tmp
    st = VersionStore.open(store_dir)
    delta = Delta(dense={sys.argv[3]: torch.full((32, 64), 0.25)})
    st.commit("main", delta, parent=st.head("main"), facts=[], method="ft-m", objective="ce",
              hparams={}, metrics={}, job_id="job-crash")
    print("not killed")
""")
CRASH_POINTS = ["mid-blob", "after-blob", "after-manifest", "after-ref-move"]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> dict[str, tuple[Path, str, int]]:
    """One store per kill point, each with a committed version; the crashing commits run concurrently."""
    runs = {}
    for point in CRASH_POINTS:
        path = tmp_path_factory.mktemp(point) / "store"
        st = VersionStore.open(path, base_fingerprint=FP)
        first = commit(st, seed=1)["id"]
        proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(path), point, DOWN], cwd=ROOT,
                                env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        runs[point] = (path, first, proc)
    out = {}
    for point, (path, first, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"{point}: {stdout}{stderr}"
        out[point] = (path, first, proc.returncode)
    return out


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_commit_killed_midway_leaves_a_sound_store(crashed, point: str):
    path, first, _ = crashed[point]
    st = VersionStore.open(path)
    head = st.head("main")
    # Every ref names a complete version whose delta loads and verifies.
    for vid in list(st.branches().values()) + list(st.tags().values()):
        for v in st.ancestry(vid):
            st.load_delta(v)
    moved = point == "after-ref-move"
    if moved:  # the ref moved before the kill: main is the crashed commit, a child of `first`
        assert head != first and st.get(head)["parent"] == first
        assert st.get(head)["job_id"] == "job-crash"
    else:
        assert head == first

    report = st.fsck()
    expected = {"reflog-behind"} if moved else set()  # killed between the ref move and its log entry
    assert {p.kind for p in report.problems} == expected
    if not report.ok:
        st.fsck(repair=True)
        assert st.fsck().ok

    # The retried job lands exactly once.
    retry = st.commit("main", Delta(dense={DOWN: torch.full((32, 64), 0.25)}), parent=first, facts=[],
                      method="ft-m", objective="ce", hparams={}, metrics={}, job_id="job-crash")
    assert st.head("main") == retry["id"] and retry["parent"] == first
    assert [m["job_id"] for m in st.log("main")].count("job-crash") == 1
    assert st.fsck().ok
    if point == "mid-blob":
        assert any("temporary file" in n for n in st.fsck().notes)
        assert not st.gc(grace_seconds=0)["removed"]  # younger than gc's minimum grace
        hour_ago = time.time() - 3600
        for f in (path / "objects").rglob("*"):
            os.utime(f, (hour_ago, hour_ago))
        assert [p.split("/")[-1][:5] for p in st.gc(grace_seconds=0)["removed"]] == [".tmp-"]


# --- size on disk -----------------------------------------------------------------------------


def version_bytes(root: Path, st: VersionStore, vid: str) -> tuple[int, int]:
    """(blob bytes, metadata bytes: manifest + ref log entry) that one commit added."""
    m = st.get(vid)
    blob = (root / "objects" / m["delta"]["object"][:2] / m["delta"]["object"]).stat().st_size
    manifest = (root / "versions" / f"{vid}.json").stat().st_size
    log = max((root / "reflog" / "branches" / "main").iterdir()).stat().st_size
    return blob, manifest + log


def test_bytes_on_disk_per_version(tmp_path: Path, st: VersionStore):
    root = tmp_path / "store"
    facts = [dict(FACT, rephrase_prompts=["Where is the Eiffel Tower?"], locality_prompts=["Paris is in"])]
    m = commit(st, seed=1, facts=facts)
    blob, meta = version_bytes(root, st, m["id"])
    assert blob <= 1.05 * 32 * 64 * 4 and meta < 8192

    lora = Delta(lora={
        f"model.layers.{i}.self_attn.{p}.weight": LoraFactors(torch.randn(8, 32), torch.randn(out, 8), 2.0)
        for i in range(2) for p, out in (("q_proj", 32), ("v_proj", 16))
    })
    m = commit(st, delta=lora, facts=facts)
    factor_bytes = sum(f.A.numel() * 4 + f.B.numel() * 4 for f in lora.lora.values())
    blob, meta = version_bytes(root, st, m["id"])
    assert m["delta"]["kind"] == "lora" and blob <= 1.05 * factor_bytes + 1024 and meta < 8192


# --- the CLI (no torch) -------------------------------------------------------------------------


def test_cli_store_commands(tmp_path: Path, st: VersionStore):
    import typer
    from typer.testing import CliRunner

    from app import cli_store

    app = typer.Typer()  # the store commands alone, as `lmedit` registers them
    cli_store.register(app)

    v1, v2 = commit(st, seed=1)["id"], commit(st, seed=2)["id"]
    run = CliRunner().invoke
    store = ["--store", str(tmp_path / "store")]

    result = run(app, ["versions", "--json", *store])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [m["id"] for m in listed] == [v2, v1, st.base_id]
    assert {"id", "parent", "branch", "created_at", "facts", "metrics"} <= set(listed[0])
    assert run(app, ["versions", *store]).exit_code == 0

    assert run(app, ["tag", "good", v1, *store]).exit_code == 0
    result = run(app, ["tag", "good", v2, *store])
    assert result.exit_code == 1 and "never move" in result.stderr and "Traceback" not in result.output
    assert run(app, ["rollback", "main", "good", *store]).exit_code == 0
    assert json.loads(run(app, ["versions", "--branch", "main", "--json", *store]).stdout)[0]["id"] == v1
    assert run(app, ["rollback", "main", v2, *store]).exit_code == 1  # v2 is no longer an ancestor
    assert run(app, ["branch", "side", "--from", v2, *store]).exit_code == 0
    assert json.loads(run(app, ["show", "side", "--json", *store]).stdout)["id"] == v2
    assert json.loads(run(app, ["diff", "main", "side", "--json", *store]).stdout)["tensors"] == [DOWN]
    assert "side" in run(app, ["branch", *store]).stdout
    assert run(app, ["store", "fsck", *store]).exit_code == 0
    assert run(app, ["store", "gc", *store]).exit_code == 0

    shutil.rmtree(tmp_path / "store" / "refs")
    assert run(app, ["store", "fsck", *store]).exit_code == 1
    assert run(app, ["store", "fsck", "--repair", *store]).exit_code == 0
    assert st.branches() == {"main": v1, "side": v2} and st.tags() == {"good": v1}

    result = run(app, ["versions", "--store", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no version store" in result.stderr
    assert run(app, ["show", "nope", *store]).exit_code == 1


def test_cli_store_does_not_import_torch():
    code = "import app.cli_store, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- S3, against a real S3-compatible server on 127.0.0.1 ----------------------------------------


@pytest.fixture(scope="module")
def s3_options():
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (make install)")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e .[s3])")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options)
    fs.call_s3("create_bucket", Bucket="lmedit")
    fs.call_s3("put_object", Bucket="lmedit", Key="probe", Body=b"1")
    try:
        fs.call_s3("put_object", Bucket="lmedit", Key="probe", Body=b"2", IfNoneMatch="*")
        supported = False
    except FileExistsError:
        supported = True
    if not supported:
        server.stop()
        pytest.skip("this S3 server ignores conditional writes (If-None-Match)")
    yield options
    server.stop()


def test_s3_store(s3_options, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    url = "s3://lmedit/store"
    st = VersionStore.open(url, base_fingerprint=FP, storage_options=s3_options)
    assert st.backend.s3 and st.branches() == {"main": st.base_id}
    v1 = commit(st, seed=1, job_id="j1")
    with pytest.raises(ConflictError):
        commit(st, seed=2, parent=st.base_id)
    assert commit(st, seed=1, job_id="j1", parent=st.base_id) == v1  # exactly once

    # Two writers read the same ref: the conditional PUT lets only the first through.
    data, token = st.backend.read_versioned("refs/branches/main")
    assert st.backend.replace_if("refs/branches/main", data + b" ", token)
    assert not st.backend.replace_if("refs/branches/main", data, token)
    assert not st.backend.create("store.json", b"{}")

    st.tag("t", v1["id"])
    with pytest.raises(ConflictError):
        st.tag("t", "base")
    other = VersionStore.open(url, storage_options=s3_options)
    assert other.resolve("t") == v1["id"]
    assert torch.equal(other.load_delta("t").dense[DOWN], dense(1).dense[DOWN])
    with pytest.raises(BaseMismatchError):
        VersionStore.open(url, base_fingerprint="0" * 64, storage_options=s3_options)
    assert other.fsck().ok

    assert [m["id"] for m in other.versions()] == [v1["id"], other.base_id]
    kf = {DOWN: torch.full((32, 64), 0.5)}  # keyframes and metrics records: written once, by conditional PUT
    record = st.write_keyframe(v1["id"], kf, position=1)
    assert other.write_keyframe(v1["id"], {DOWN: kf[DOWN] + 1}, position=1) == record
    assert torch.equal(other.load_keyframe(v1["id"])[DOWN], kf[DOWN]) and other.keyframes() == [v1["id"]]
    other.write_metrics(v1["id"], {"reliability": 0.5})
    assert other.measured(v1["id"])["metrics"] == {"reliability": 0.5} and other.fsck().ok
    other.backend.write("objects/ab/" + "ab" * 32, b"an orphan")
    assert other.gc(grace_seconds=0)["removed"] == []  # younger than gc's minimum grace
    now = time.time()
    monkeypatch.setattr(maintenance, "time", SimpleNamespace(time=lambda: now + 2 * MIN_GRACE_SECONDS))
    assert other.gc(grace_seconds=0)["removed"] == ["objects/ab/" + "ab" * 32]  # the keyframe's blob stays
    assert other.gc(grace_seconds=0)["removed"] == []
    monkeypatch.undo()

    other.backend.fs.rm("lmedit/store/refs", recursive=True)
    assert not other.fsck().ok
    other.fsck(repair=True)
    assert other.branches() == {"main": v1["id"]} and other.tags() == {"t": v1["id"]}

    sha = v1["delta"]["object"]
    blob = bytearray(other.backend.read(f"objects/{sha[:2]}/{sha}"))
    blob[100] ^= 1
    other.backend.write(f"objects/{sha[:2]}/{sha}", bytes(blob))
    with pytest.raises(CorruptObjectError, match=sha):
        other.load_delta(v1["id"])


KEYFRAME_CRASH = textwrap.dedent("""
    import os, signal, sys
    import torch
    from editing.store import LocalBackend, VersionStore

    store_dir, point, name = sys.argv[1:4]
    write, write_tmp = LocalBackend.write, LocalBackend._write_tmp

    def killing_write(self, rel, data):
        write(self, rel, data)
        if point == "after-blob" and rel.startswith("objects/"):
            os.kill(os.getpid(), signal.SIGKILL)

    def killing_write_tmp(self, path, data):
        if point == "mid-blob" and "objects" in path.parts:
            write_tmp(self, path, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return write_tmp(self, path, data)

    LocalBackend.write, LocalBackend._write_tmp = killing_write, killing_write_tmp
    st = VersionStore.open(store_dir)
    st.write_keyframe(st.head("main"), {name: torch.full((32, 64), 0.5)}, position=1)
    print("not killed")
""")


@pytest.mark.parametrize("point", ["mid-blob", "after-blob"])
def test_a_keyframe_write_killed_midway_leaves_no_keyframe_and_a_sound_store(tmp_path: Path, st: VersionStore,
                                                                               point: str):
    vid = commit(st, seed=1)["id"]
    r = subprocess.run([sys.executable, "-c", KEYFRAME_CRASH, str(tmp_path / "store"), point, DOWN], cwd=ROOT,
                       env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    fresh = VersionStore.open(tmp_path / "store")
    assert fresh.keyframes() == [] and fresh.load_keyframe(vid) is None  # no record: never half a keyframe
    assert fresh.fsck().ok  # at worst a temporary file or an orphan blob, which gc removes
    fresh.write_keyframe(vid, {DOWN: torch.full((32, 64), 0.5)}, position=1)  # the next checkout writes it
    assert torch.equal(VersionStore.open(tmp_path / "store").load_keyframe(vid)[DOWN], torch.full((32, 64), 0.5))
