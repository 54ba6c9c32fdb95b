"""A fact to write into the model, and readers for the benchmark formats.

Formats (../shared/data/README.md): CounterFact (EasyEdit "edit" layout), zsRE (MEND
layout), MQuAKE-CF (each case one multi-fact batch edit, its multi-hop questions as
portability), and lmedit's own fact JSON: a list of Fact objects, or {"facts": [...]}.
Rephrase, locality and portability prompts measure an edit; they are never trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Probe:
    """A prompt and the answer expected after it (locality: the pre-edit answer)."""

    prompt: str
    answer: str = ""


@dataclass
class Fact:
    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality_prompts: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("fact prompt is empty")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise ValueError(f"fact target_new is empty (prompt {self.prompt!r})")
        if self.subject is not None and not self.subject.strip():
            self.subject = None
        if self.subject is not None and self.subject.lower() not in self.prompt.lower():
            # Silently training on every position instead would spread the edit to other subjects.
            raise ValueError(f"subject {self.subject!r} does not occur in the prompt {self.prompt!r}: give the "
                             "subject as written in the prompt, or leave it out to train on every position")
        self.locality_prompts = [_probe(p) for p in self.locality_prompts]
        self.portability = [_probe(p) for p in self.portability]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fact:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "target" in d and "target_new" not in known:  # a common shorthand
            known["target_new"] = d["target"]
        missing = {"prompt", "target_new"} - set(known)
        if missing:
            raise ValueError(f"fact is missing {sorted(missing)}: {json.dumps(d)[:200]}")
        return cls(**known)


def _probe(p: Probe | dict | str) -> Probe:
    if isinstance(p, Probe):
        return p
    if isinstance(p, str):
        return Probe(prompt=p)
    return Probe(prompt=p["prompt"], answer=p.get("answer", p.get("ground_truth", "")))


@dataclass
class Case:
    """One evaluation record: the facts edited together (one batch edit)."""

    id: str
    facts: list[Fact]


def _first(x):
    return x[0] if isinstance(x, list) else x


def from_counterfact(r: dict) -> Case:
    fact = Fact(
        prompt=r["prompt"],
        target_new=r["target_new"],
        subject=r.get("subject"),
        target_true=r.get("ground_truth"),
        rephrase_prompts=[r["rephrase_prompt"]] if r.get("rephrase_prompt") else [],
        locality_prompts=[Probe(r["locality_prompt"], r.get("locality_ground_truth", ""))]
        if r.get("locality_prompt")
        else [],
    )
    return Case(id=f"counterfact-{r.get('case_id')}", facts=[fact])


def from_zsre(r: dict, index: int) -> Case:
    fact = Fact(
        prompt=r["src"],
        target_new=_first(r["alt"]),
        subject=r.get("subject"),
        target_true=_first(r.get("answers") or [None]),
        rephrase_prompts=[r["rephrase"]] if r.get("rephrase") else [],
        locality_prompts=[Probe(r["loc"], _first(r.get("loc_ans", "")))] if r.get("loc") else [],
    )
    return Case(id=f"zsre-{index}", facts=[fact])


def from_mquake(r: dict) -> Case:
    facts = []
    for rw in r["requested_rewrite"]:
        facts.append(
            Fact(
                prompt=rw["prompt"].format(rw["subject"]),
                target_new=rw["target_new"]["str"],
                subject=rw["subject"],
                target_true=rw["target_true"]["str"],
                rephrase_prompts=[rw["question"]] if rw.get("question") else [],
            )
        )
    # The multi-hop questions measure the case as a whole: attach them to its first fact.
    facts[0].portability = [Probe(q, r["new_answer"]) for q in r.get("questions", [])]
    return Case(id=f"mquake-{r.get('case_id')}", facts=facts)


FORMATS = ("counterfact", "zsre", "mquake", "facts")


def detect_format(records: list[dict]) -> str:
    first = records[0] if records else {}
    if "requested_rewrite" in first:
        return "mquake"
    if "src" in first and "alt" in first:
        return "zsre"
    if "rephrase_prompt" in first or "locality_prompt" in first:
        return "counterfact"
    return "facts"


def read_cases(path: str | Path, fmt: str | None = None, offset: int = 0, n: int | None = None) -> list[Case]:
    """Read evaluation cases from a JSON file (format detected unless given)."""
    data = json.loads(Path(path).read_text())
    records = data["facts"] if isinstance(data, dict) and "facts" in data else data
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records (or {{'facts': [...]}})")
    fmt = fmt or detect_format(records)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    end = None if n is None else offset + n
    cases = []
    for i, r in enumerate(records[offset:end], start=offset):
        if fmt == "counterfact":
            cases.append(from_counterfact(r))
        elif fmt == "zsre":
            cases.append(from_zsre(r, i))
        elif fmt == "mquake":
            cases.append(from_mquake(r))
        else:
            cases.append(Case(id=f"fact-{i}", facts=[Fact.from_dict(r)]))
    return cases


def read_facts(path: str | Path) -> list[Fact]:
    """lmedit's own fact file: every record is one fact, all edited together."""
    return [f for case in read_cases(path, fmt="facts") for f in case.facts]
