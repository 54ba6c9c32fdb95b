"""store.find_job: the one answer to "which version did job X make?" (the worker before it commits, the
API once Redis has forgotten a job)."""

from __future__ import annotations

from pathlib import Path

import pytest

from editing.store import CorruptObjectError, VersionStore
from tests.test_store import FP, commit


def test_find_job_on_a_head_on_any_branch_and_rolled_back_past(tmp_path: Path):
    st = VersionStore.open(tmp_path / "store", base_fingerprint=FP)
    v1 = commit(st, seed=1, job_id="job-1")
    v2 = commit(st, seed=2, job_id="job-2")
    st.create_branch("exp", v1["id"])
    v3 = commit(st, branch="exp", seed=3, job_id="job-3")
    st.rollback("main", v1["id"])  # v2 is now on no branch

    assert st.find_job(st.head("main"), "job-1")["id"] == v1["id"]
    assert st.find_job(st.head("main"), "job-2") is None  # with a head: only its ancestry
    assert st.find_job(st.head("main"), "job-3") is None
    assert st.find_job(None, "job-3")["id"] == v3["id"]
    assert st.find_job(None, "job-2")["id"] == v2["id"]  # rolled back past: still the job's version
    assert st.find_job(None, "no-such-job") is None

    # A job on a branch is found without reading the versions on no branch: a fresh store (no cache)
    # with v2's manifest damaged still answers for job-3, and fails only when it has to look at v2.
    path = tmp_path / "store" / "versions" / f"{v2['id']}.json"
    path.write_bytes(b"{damaged")
    fresh = VersionStore.open(tmp_path / "store")
    assert fresh.find_job(None, "job-3")["id"] == v3["id"]
    assert fresh.find_job(None, "job-1")["id"] == v1["id"]
    with pytest.raises(CorruptObjectError):
        fresh.find_job(None, "no-such-job")
