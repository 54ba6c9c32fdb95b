"""The report scripts run end to end on 2 records each and REPORT.md gets all seven sections.

Benchmarks are not tests: this checks only that every script runs, resumes from its cache,
and that the report renders tables and plots from what they wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("quality", "hto", "sequential", "edit_speed", "batch", "costs", "service", "curves", "multihop_ceiling",
           "rephrase_ceiling", "rephrase_text", "measure_speed", "key_read")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (DATA / "counterfact-dev.json").exists(),
                                                   reason="../shared/data is not here")]


def run_script(name: str, *args: str) -> None:
    done = subprocess.run([sys.executable, f"benchmarks/{name}.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{name}.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


# Thirteen scripts load the model in turn: more than pytest's 600 s on a loaded 2-core machine.
@pytest.mark.timeout(1500)
def test_every_script_runs_on_two_records_and_the_report_has_every_section(tmp_path):
    for name in SCRIPTS:
        run_script(name, "--smoke", "--out", str(tmp_path))

    # Resumable: a second run reuses every cached record instead of editing again.
    run_script("quality", "--smoke", "--out", str(tmp_path), "--datasets", "counterfact")
    summary = json.loads((tmp_path / "eval" / "counterfact-ft-m-overtone.json").read_text())
    assert summary["n"] == 2 and summary["reused"] == 2
    assert summary["command"].startswith("lmedit eval --data ../shared/data/counterfact-dev.json")
    assert len((tmp_path / "eval" / "counterfact-ft-m-overtone.jsonl").read_text().splitlines()) == 2

    run_script("report", "--results", str(tmp_path))
    report = (tmp_path / "REPORT.md").read_text()
    for heading in ("## 1. Editing quality", "## 2. Heterogeneous token overfitting", "## 3. Sequential editing",
                    "## 4. Batch editing", "## 5. Service", "## 6. Costs", "## 7. Trade-off curves",
                    "## Summary"):
        assert heading in report
    assert "(no results)" not in report
    pngs = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(pngs) >= 4
    for png in pngs:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.timeout(900)
def test_solve_together_measures_a_batch_and_where_its_locality_goes(tmp_path):
    run_script("solve_together", "values", "--smoke", "--out", str(tmp_path))
    run_script("solve_together", "positions", "--smoke", "--out", str(tmp_path), "--text-tokens", "6")
    row = json.loads((tmp_path / "solve_together.jsonl").read_text().splitlines()[-1])
    # what the model writes after each prompt: every solved fact's new answer, and no fact's before the solve
    assert row["text"]["edited"]["new_after_prompt"] == 1.0 and row["text"]["base"]["new_after_prompt"] == 0.0
    assert row["n"] == 2 and 0 <= row["locality"] <= 1 and 0 <= row["reliability"] <= 1
    assert set(row["positions"]) == {"all", "first", "middle", "last"}
    assert row["positions"]["all"]["locality"] == pytest.approx(row["locality"])  # the hooks add ΔW exactly
    # the field's scores beside ours, after the solve and on the base model
    for scores in (row["counterfact_scores"], row["base_counterfact_scores"]):
        assert set(scores) == {"efficacy_score", "paraphrase_score", "neighbourhood_score"}
        assert all(0 <= v <= 1 for v in scores.values())
    # a random ΔW beside the solved one: x0 changes nothing, so it keeps every answer
    run_script("solve_together", "noise", "--smoke", "--scales", "0,1", "--out", str(tmp_path))
    lines = (tmp_path / "solve_together_noise.jsonl").read_text().splitlines()
    noise = {r["change"]: r for r in map(json.loads, lines)}
    assert set(noise) == {"solved", "random x0.0", "random x1.0"}
    assert noise["solved"]["locality"] == pytest.approx(row["locality"])
    assert noise["random x0.0"]["locality"] == 1.0 and 0 <= noise["random x1.0"]["locality"] <= 1


@pytest.mark.timeout(900)
def test_value_curves_solve_each_record_at_each_step(tmp_path):
    run_script("value_curves", "--smoke", "--out", str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "value_curves" / "dev-alphaedit-overtone.jsonl").read_text()
            .splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(set(r["steps"]) == {"2"} for r in rows)
    assert all(0 <= r["steps"]["2"]["locality"] <= 1 for r in rows)


@pytest.mark.timeout(900)
def test_locality_failures_reads_a_sequential_checkpoint(tmp_path):
    run_script("sequential", "--smoke", "--variants", "alphaedit", "--out", str(tmp_path))
    checkpoint = json.loads((tmp_path / "sequential" / "alphaedit-overtone.jsonl").read_text().splitlines()[-1])
    assert all(0 <= checkpoint[k] <= 1 for k in ("efficacy_score", "paraphrase_score", "neighbourhood_score"))
    run_script("locality_failures", "--run", "alphaedit-overtone", "--edits", "2", "--out", str(tmp_path))
    result = json.loads((tmp_path / "locality-failures" / "alphaedit-overtone-2.json").read_text())
    assert result["probes"] == 2 and 0 <= result["first_token_agreement"] <= 1
    assert sum(result["counts"].get(k, 0) for k in ("unchanged", "own_new_target", "another_new_target",
                                                    "toward_true_answer", "away_from_true_answer", "elsewhere")) == 2
