"""The deferred-metrics job (workers/measure_jobs.py) on a real session and store."""

from __future__ import annotations

from types import SimpleNamespace

from editing.facts import Fact
from editing.session import EditSession
from tests.tiny import tiny_llama
from workers import engine as engine_module
from workers.measure_jobs import measure_edit

HP = {"layers": [0], "positions": "all", "lr": 0.05, "steps": 3}


def test_a_measurement_that_fails_is_recorded_and_its_edit_is_no_longer_pending(tmp_path, monkeypatch):
    store_dir = tmp_path / "store"
    writer = EditSession(tiny_llama(), str(store_dir))
    writer.edit([Fact("The Eiffel Tower is in", "Rome")], method="ft-m", hparams=HP, job_id="a")
    deferred = writer.edit([Fact("The Colosseum is in", "Paris")], method="ft-m", hparams=HP, job_id="b",
                           defer_metrics=True)
    parent = writer.store.get(deferred.version)["parent"]
    for blob in (store_dir / "objects").rglob("*"):  # the parent's delta is lost: its weights cannot be read
        if blob.is_file() and blob.name == writer.store.get(parent)["delta"]["object"]:
            blob.unlink()
    measuring = EditSession(tiny_llama(), str(store_dir))  # another worker: nothing of the writer's in memory
    monkeypatch.setattr(engine_module, "_engine", SimpleNamespace(session=measuring))
    assert measuring.store.measured(deferred.version) is None

    result = measure_edit({"version": deferred.version, "edit_job_id": "b"})

    assert "error" in result
    record = measuring.store.measured(deferred.version)
    assert record is not None and record["metrics"]["measure_error"] == result["error"]
    assert measuring.store.get(deferred.version)["metrics"]["measure_error"] == result["error"]
