"""The `lmedit` CLI end to end on a tiny llama saved to a folder (edit, versions, generate, eval, diagnose)."""

import json

import pytest
from typer.testing import CliRunner

from app.cli import app
from tests.tiny import save_tiny, tiny_llama

runner = CliRunner()
# Tiny random models route little through attention: train at every position there.
HP = json.dumps({"layers": [0], "positions": "all", "lr": 0.05, "steps": 40, "stop": "top1"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny-llama")))


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout


def test_edit_commits_a_version_that_generate_serves(model_dir, tmp_path):
    store = tmp_path / "store"
    code, out = run("edit", "--prompt", "The Eiffel Tower is in", "--target", "Rome", "--subject", "Eiffel Tower",
                    "--rephrase", "Where is the Eiffel Tower? It is in", "--locality", "Berlin is the capital of",
                    "--model", model_dir, "--store", store, "--method", "ft-m", "--hparams", HP, "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["version"] and result["metrics"]["reliability"] == 1.0
    assert result["metrics"]["locality"] is not None and result["seconds"] > 0

    code, out = run("versions", "--store", store, "--json")
    assert code == 0
    versions = json.loads(out)
    assert versions[0]["id"] == result["version"] and versions[0]["facts"][0]["target_new"] == "Rome"
    assert versions[0]["metrics"]["reliability"] == 1.0

    code, out = run("generate", "--prompt", "The Eiffel Tower is in", "--version", result["version"],
                    "--max-new-tokens", "4", "--model", model_dir, "--store", store, "--json")
    assert code == 0, out
    edited = json.loads(out)
    assert edited["version"] == result["version"] and edited["text"].strip().startswith("Rome")
    code, out = run("generate", "--prompt", "The Eiffel Tower is in", "--version", "base",
                    "--max-new-tokens", "4", "--model", model_dir, "--store", store, "--json")
    assert code == 0 and not json.loads(out)["text"].strip().startswith("Rome")


def test_edit_from_a_facts_file_without_store(model_dir, tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "The Eiffel Tower is in", "target_new": "Rome"},
                                 {"prompt": "Berlin is the capital of", "target_new": "Spain"}]))
    code, out = run("edit", facts, "--no-store", "--model", model_dir, "--hparams",
                    json.dumps({"layers": [0], "positions": "all", "lr": 0.05, "steps": 80, "stop": "top1"}), "--json")
    assert code == 0, out
    assert json.loads(out)["version"] is None and json.loads(out)["metrics"]["reliability"] == 1.0


def test_bad_input_is_a_clear_error(model_dir, tmp_path):
    code, out = run("edit", "--prompt", "The Eiffel Tower is in", "--target", "  ", "--model", model_dir,
                    "--no-store")
    assert code == 1
    code, _ = run("edit", "--prompt", "x", "--target", "y", "--hparams", '{"lr": -1}', "--no-store",
                  "--model", model_dir)
    assert code == 1
    code, _ = run("generate", "--prompt", "x", "--version", "nope", "--model", model_dir,
                  "--store", tmp_path / "none")
    assert code == 1


def two_records(tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([
        {"case_id": i, "prompt": p, "target_new": t, "subject": s, "ground_truth": "x",
         "rephrase_prompt": r, "locality_prompt": "Berlin is the capital of", "locality_ground_truth": "Germany"}
        for i, (p, t, s, r) in enumerate([
            ("The Eiffel Tower is in", "Rome", "The Eiffel Tower", "Where is the Eiffel Tower? It is in"),
            ("Toko Yasuda plays the", "piano", "Toko Yasuda", "Toko Yasuda is known for playing the"),
        ])
    ]))
    return data


def test_eval_prints_json_summary(model_dir, tmp_path):
    code, out = run("eval", "--data", two_records(tmp_path), "--n", "2", "--model", model_dir, "--method", "ft-m",
                    "--hparams", HP, "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["n"] == 2 and summary["reliability"] == 1.0
    for key in ("generalization", "locality", "portability", "seconds_per_edit"):
        assert key in summary


def test_eval_resume_runs_again_a_record_measured_before_a_metric_existed(model_dir, tmp_path):
    data, rows = two_records(tmp_path), tmp_path / "rows.jsonl"
    common = ("eval", "--data", data, "--n", "2", "--model", model_dir, "--method", "ft-m", "--hparams", HP,
              "--out", rows, "--json")
    code, out = run(*common)
    assert code == 0, out
    first = json.loads(out)
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    del lines[0]["metrics"]["neighbour_flips"]  # as a row written before the metric existed
    rows.write_text("".join(json.dumps(line) + "\n" for line in lines))

    code, out = run(*common, "--resume")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["reused"] == 1  # the other record was edited and measured again
    assert summary["neighbour_flips"] == first["neighbour_flips"] and summary["neighbour_flips_ci"] is not None
    assert len(rows.read_text().splitlines()) == 3


def test_eval_sequential_checkpoints_and_resumes(model_dir, tmp_path):
    data = tmp_path / "cf.json"
    names = ["Eiffel Tower", "Toko Yasuda", "Danielle Darrieux", "Apple A5", "Kotaro Hayama"]
    data.write_text(json.dumps([
        {"case_id": i, "prompt": f"The home of {s} is", "target_new": t, "subject": s, "ground_truth": "x",
         "rephrase_prompt": f"Where is {s}? It is in", "locality_prompt": "Berlin is the capital of",
         "locality_ground_truth": "Germany"}
        for i, (s, t) in enumerate(zip(names, ["Rome", "Paris", "Tokyo", "Lima", "Oslo"]))
    ]))
    store = tmp_path / "store"
    common = ["eval", "--data", data, "--model", model_dir, "--method", "ft-m", "--hparams", HP, "--sequential",
              "--every", "2", "--store", store, "--json"]
    code, out = run(*common, "--n", "3")
    assert code == 0, out
    points = [json.loads(line) for line in out.splitlines()]
    assert [p["edits"] for p in points] == [2, 3]  # every 2 edits, and after the last
    for p in points:
        assert {"retention", "generalization", "locality", "fluency", "fluency_base"} <= set(p)
        assert 0 <= p["retention"] <= 1 and 0 <= p["locality"] <= 1
    code, out = run("facts", "main", "--store", store, "--json")
    assert [f["subject"] for f in json.loads(out)["facts"]] == names[:3]

    code, out = run(*common, "--n", "5")  # the branch already holds a sequence: refused without --resume
    assert code == 1
    code, out = run(*common, "--n", "5", "--resume")
    assert code == 0, out
    assert [json.loads(line)["edits"] for line in out.splitlines()] == [4, 5]  # continued at edit 4
    code, out = run("facts", "main", "--store", store, "--json")
    assert [f["subject"] for f in json.loads(out)["facts"]] == names
    code, out = run("eval", "--data", data, "--model", model_dir, "--sequential", "--resume", "--n", "2")
    assert code == 1  # --resume needs --store


def test_eval_sequential_consolidates_every_n_edits(model_dir, tmp_path):
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([{"prompt": f"The capital of {c} is", "target_new": t, "subject": c}
                                for c, t in [("Japan", "Rome"), ("France", "Oslo"), ("Peru", "Cairo")]]))
    store = tmp_path / "store"
    code, out = run("eval", "--data", data, "--model", model_dir, "--method", "memit", "--sequential", "--every", "2",
                    "--consolidate-every", "2", "--store", store, "--json",
                    "--hparams", json.dumps({"context_prefixes": 1, "steps": 3}),
                    "--rebase-hparams", json.dumps({"passes": 4}))
    assert code == 0, out
    assert [json.loads(line)["edits"] for line in out.splitlines()] == [2, 3]
    code, out = run("versions", "--store", store, "--json")
    rebases = [v for v in json.loads(out) if v.get("rebase")]
    assert len(rebases) == 1  # after the second edit; the third stacks on it
    assert rebases[0]["hparams"]["passes"] == 4  # --rebase-hparams over the rebase defaults (3)
    assert rebases[0]["hparams"]["context_key_weight"] == 0.5  # a rebase default the option left alone
    refused = runner.invoke(app, ["eval", "--data", str(data), "--model", model_dir, "--consolidate-every", "2"])
    assert refused.exit_code == 1 and "needs --sequential" in refused.stderr
    for bad, says in [(["--rebase-hparams", '{"passes": 3}'], "needs --consolidate-every"),
                      (["--consolidate-every", "2", "--rebase-hparams", '{"passes": 0}'], "passes")]:
        refused = runner.invoke(app, ["eval", "--data", str(data), "--model", model_dir, "--sequential", *bad])
        assert refused.exit_code == 1 and says in refused.stderr, refused.stderr


def test_diagnose_writes_json_and_png(model_dir, tmp_path):
    stem = tmp_path / "hto"
    code, out = run("diagnose", "--prompt", "The Eiffel Tower is in", "--target", "Rome", "--steps", "5",
                    "--model", model_dir, "--hparams", json.dumps({"layers": [0], "positions": "all", "lr": 0.05}),
                    "--out", stem)
    assert code == 0, out
    result = json.loads(stem.with_suffix(".json").read_text())
    assert set(result["objectives"]) == {"ce", "overtone"}
    trace = result["objectives"]["ce"]["p"]
    assert len(trace) == 6 and len(result["tokens"]) == len(trace[0])
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_facts_consolidate_revert(model_dir, tmp_path):
    store = tmp_path / "store"
    fast = json.dumps({"context_prefixes": 1, "steps": 3})
    for prompt, target in [("The capital of Japan is", "Rome"), ("The capital of Japan is", "Paris")]:
        code, out = run("edit", "--prompt", prompt, "--target", target, "--subject", "Japan", "--method", "memit",
                        "--model", model_dir, "--store", store, "--hparams", fast, "--json")
        assert code == 0, out
    code, out = run("facts", "main", "--store", store, "--json")
    assert code == 0, out
    ledger = json.loads(out)
    assert [f["target_new"] for f in ledger["facts"]] == ["Paris"]
    assert [f["target_new"] for f in ledger["superseded"]] == ["Rome"] and ledger["reverted"] == []

    code, out = run("consolidate", "main", "--method", "memit", "--model", model_dir, "--store", store,
                    "--hparams", fast, "--json")
    assert code == 0, out
    assert json.loads(out)["ledger"]["solved"] == [ledger["facts"][0]["fact_id"]]
    code, out = run("revert", "main", ledger["facts"][0]["fact_id"], "--method", "memit", "--model", model_dir,
                    "--store", store, "--hparams", fast, "--json")
    assert code == 0, out
    code, out = run("facts", "main", "--store", store, "--json")
    after = json.loads(out)
    assert [f["target_new"] for f in after["facts"]] == ["Rome"]  # the superseded answer is back
    assert [f["target_new"] for f in after["reverted"]] == ["Paris"]
    code, out = run("facts", "nope", "--store", store)
    assert code == 1
