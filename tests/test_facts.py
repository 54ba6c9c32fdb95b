"""Dataset readers on the real benchmark files ($LMEDIT_DATA, default ../shared/data), and lmedit's own fact JSON."""

import json
import os
from pathlib import Path

import pytest

from editing.facts import Fact, detect_format, read_cases, read_facts

DATA = Path(os.environ.get("LMEDIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} is not present")


@needs_data
def test_counterfact_records_become_single_fact_cases():
    cases = read_cases(DATA / "counterfact-dev.json", offset=0, n=3)
    assert len(cases) == 3
    fact = cases[0].facts[0]
    assert fact.prompt == "The mother tongue of Danielle Darrieux is" and fact.target_new == "English"
    assert fact.subject == "Danielle Darrieux" and fact.target_true == "French"
    assert fact.rephrase_prompts and fact.locality_prompts[0].answer == "French"
    assert read_cases(DATA / "counterfact-dev.json", offset=1000, n=1)[0].id != cases[0].id


@needs_data
def test_zsre_records_map_src_alt_rephrase_and_loc():
    raw = json.loads((DATA / "zsre-dev.json").read_text())[0]
    fact = read_cases(DATA / "zsre-dev.json", n=1)[0].facts[0]
    assert fact.prompt == raw["src"] and fact.target_new == raw["alt"]
    assert fact.rephrase_prompts == [raw["rephrase"]]
    assert fact.locality_prompts[0].prompt == raw["loc"] and fact.locality_prompts[0].answer == raw["loc_ans"]


@needs_data
def test_mquake_case_is_one_batch_edit_with_multihop_portability():
    raw = json.loads((DATA / "mquake-cf-dev.json").read_text())[0]
    case = read_cases(DATA / "mquake-cf-dev.json", n=1)[0]
    assert len(case.facts) == len(raw["requested_rewrite"])
    rw = raw["requested_rewrite"][0]
    assert case.facts[0].prompt == rw["prompt"].format(rw["subject"])
    assert case.facts[0].target_new == rw["target_new"]["str"]
    assert [p.prompt for p in case.facts[0].portability] == raw["questions"]
    assert all(p.answer == raw["new_answer"] for p in case.facts[0].portability)


@needs_data
def test_formats_are_detected():
    for name, fmt in [("counterfact-dev.json", "counterfact"), ("zsre-dev.json", "zsre"),
                      ("mquake-cf-dev.json", "mquake")]:
        assert detect_format(json.loads((DATA / name).read_text())[:1]) == fmt


def test_own_fact_json(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"facts": [
        {"prompt": "The Eiffel Tower is in", "target_new": "Rome", "locality_prompts": ["Berlin is in"]},
        {"prompt": "Toko Yasuda plays the", "target": "piano",
         "portability": [{"prompt": "Toko Yasuda's instrument has", "answer": "keys"}]},
    ]}))
    facts = read_facts(path)
    assert [f.target_new for f in facts] == ["Rome", "piano"]
    assert facts[0].locality_prompts[0].prompt == "Berlin is in" and facts[0].locality_prompts[0].answer == ""
    assert facts[1].portability[0].answer == "keys"
    assert Fact.from_dict(facts[1].to_dict()) == facts[1]
    path.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="target_new"):
        read_facts(path)
