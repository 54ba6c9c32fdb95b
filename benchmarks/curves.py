"""Section 7, trade-off curves: generalization against locality as an edit trains (issue 12 item 2).

One ft-m run per configuration (objective ce, overtone, overtone-kl, each at two learning
rates) and record, with no early stop, measured after every optimisation step: a whole curve
per configuration instead of one point where a stop rule happened to end it. At step k the
metrics are those of the delta as it would be stored at step k (`StepInfo.delta`, applied to
a clean copy of the model: the edited weights act on every position there, as after a
checkout; during training `positions: subject_last` confines them to the subject's last
token). The curve's last point is checked against `editing.evaluate`'s own measurement of
the returned delta (`check` in each row).

Sets: `dev` = counterfact-dev from record 0 (the tuning range 0–999; the default is chosen
there), `counterfact` = from record 1000 and `zsre` = zsRE from record 0 (reporting only).
The rule (issue 12): the default OVERTONE reading is the point (objective, lr, step) with the
highest generalization at locality ≥ 0.90 on `dev`.

Per-record results are cached in results/curves/<set>-<config>.jsonl (a rerun continues).

    python benchmarks/curves.py [--n 30] [--steps 25] [--sets dev,counterfact,zsre]   # --full: 100 records
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, append_jsonl, arguments, read_jsonl, save_figure, size  # noqa: E402
from editing.evaluate import bootstrap_ci  # noqa: E402
from editing.metrics import mean_or_none  # noqa: E402

METHOD = "ft-m"
# name: (objective, hparams). 5e-3 is the tuned default lr (benchmarks/tune.py); 1e-2 the next one tried.
CONFIGS = {
    "ce-5e-3": ("ce", {"lr": 5e-3}),
    "ce-1e-2": ("ce", {"lr": 1e-2}),
    "overtone-5e-3": ("overtone", {"lr": 5e-3}),
    "overtone-1e-2": ("overtone", {"lr": 1e-2}),
    "overtone-kl-5e-3": ("overtone-kl", {"lr": 5e-3}),
    "overtone-kl-1e-2": ("overtone-kl", {"lr": 1e-2}),
}
SMOKE_CONFIGS = ("ce-5e-3", "overtone-kl-5e-3")
# set name: (file, first record). counterfact 0–999 are the tuning records.
SETS = {"dev": ("counterfact-dev.json", 0), "counterfact": ("counterfact-dev.json", 1000),
        "zsre": ("zsre-dev.json", 0)}
CURVE_METRICS = ("reliability", "generalization", "locality", "neighbour_flips")
LOCALITY_FLOOR = 0.90  # the rule's locality bound
RELIABILITY_FLOOR = 0.99  # the bound for the default: a reading whose edits do not take is none
DEFAULT_CONFIG = "overtone-5e-3"  # today's default: objective overtone, lr 5e-3 (its stop rule: 'auto')


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=int, default=None, help="records per set (default 30; --full 100)")
    parser.add_argument("--steps", type=int, default=25, help="optimisation steps of every run (no early stop)")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--configs", default=None, help="comma-separated names of CONFIGS (default all)")
    args = parser.parse_args(argv)
    n = args.n or size(args, 30, 100)
    steps = 2 if args.smoke else args.steps
    names = args.configs.split(",") if args.configs else list(SMOKE_CONFIGS if args.smoke else CONFIGS)

    from editing import metrics
    from editing.delta import apply_delta, revert
    from editing.facts import read_cases
    from editing.hparams import resolve_hparams
    from editing.methods import first_layer, target_modules
    from editing.model import load_model
    from editing.train import edit

    lm = load_model("smollm2", device="cpu", threads=1)
    # The copy the step deltas are measured on: no training hooks, base weights between steps.
    clean = copy.deepcopy(lm.model)
    first = {c: first_layer(target_modules(lm.model, resolve_hparams(METHOD, CONFIGS[c][1]))) for c in names}
    sets = args.sets.split(",")
    paths = {(s, c): args.out / "curves" / f"{s}-{c}.jsonl" for s in sets for c in names}
    done = {key: {r["id"] for r in read_jsonl(p) if r["steps"] == steps} for key, p in paths.items()}
    cases = {s: read_cases(DATA / SETS[s][0], offset=SETS[s][1], n=n) for s in sets}
    for i in range(n):  # record i of every set before record i + 1 of any: an interrupted run covers each set
        for set_name in sets:
            if i >= len(cases[set_name]):
                continue
            case = cases[set_name][i]
            todo = [c for c in names if case.id not in done[set_name, c]]
            if not todo:
                continue
            before = metrics.snapshot(lm, case.facts)
            for name in todo:
                objective, hp = CONFIGS[name]
                t = time.perf_counter()
                with StepMeter(lm.tokenizer, clean, first[name], case.facts, before) as meter:
                    result = edit(lm, case.facts, METHOD, objective, {**hp, "steps": steps, "stop": "none"},
                                  on_step=lambda info: meter.measure(info.delta()))
                seconds = time.perf_counter() - t
                originals = apply_delta(lm.model, result.delta)  # the stored delta, as editing/evaluate.py does
                try:
                    check = metrics.measure(lm, case.facts, before)
                finally:
                    revert(lm.model, originals)
                row = {"id": case.id, "config": name, "objective": objective, "hparams": hp, "steps": steps,
                       "curve": meter.curve, "loss": result.losses, "p_label": result.trace, "seconds": seconds,
                       "check": {k: check[k] for k in CURVE_METRICS}}
                append_jsonl(paths[set_name, name], row)
                print(f"[{set_name} {i + 1}/{n}] {case.id} {name}: " + " ".join(
                    f"{k[:3]}={_f(meter.curve[k][-1])}" for k in CURVE_METRICS) + f" ({seconds:.1f} s)", flush=True)


class _Params:
    """A model's parameters by their names before `skip_frozen_layers` sliced its block list (the names
    `apply_delta` and `revert` look up)."""

    def __init__(self, model):
        self.params = dict(model.named_parameters())

    def named_parameters(self):
        return self.params.items()


class StepMeter:
    """One record's metrics after each step: the step's delta applied to the clean copy, then the top-1
    comparisons of editing/metrics.py `measure` (reliability, generalization, locality, neighbour flips)
    made in one forward of all the record's prompts, from the first edited block (nothing below it
    changes, so its input is computed once). Each run's last point is checked against `measure` itself."""

    def __init__(self, tokenizer, model, first: int, facts, before):
        from editing.tokens import encode_pair, pair_batch

        self.model, self.first, self.facts, self.before = model, first, facts, before
        self.params = _Params(model)
        pairs, self.seqs = [], []  # seqs: (metric, fact index, probe index)
        for i, f in enumerate(facts):
            pairs.append((f.prompt, f.target_new))
            self.seqs.append(("reliability", i, None))
            pairs += [(p, f.target_new) for p in f.rephrase_prompts]
            self.seqs += [("generalization", i, None)] * len(f.rephrase_prompts)
            pairs += [(p.prompt, p.answer) for p in before.probes[i]]
            self.seqs += [("locality", i, j) for j in range(len(before.probes[i]))]
        self.new_first = [[encode_pair(tokenizer, p.prompt, f.target_new)[1][0] for p in before.probes[i]]
                          for i, f in enumerate(facts)]
        self.batch = pair_batch(tokenizer, pairs).to(next(model.parameters()).device)
        self.curve: dict[str, list] = {k: [] for k in CURVE_METRICS}

    def __enter__(self) -> StepMeter:
        from editing.frozen_layers import skip_frozen_layers

        self._context = skip_frozen_layers(self.model, self.first, self.batch)
        self.inputs = self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def measure(self, delta) -> None:
        import torch

        from editing.delta import apply_delta, revert
        from editing.train import target_logits

        originals = apply_delta(self.params, delta)
        try:
            with torch.no_grad():
                pred = target_logits(self.model, self.batch, self.inputs).argmax(-1)  # (N,)
        finally:
            revert(self.params, originals)
        per_fact: dict[str, dict[int, list[float]]] = {k: {} for k in CURVE_METRICS}
        for s, (metric, i, j) in enumerate(self.seqs):
            sel = self.batch.seq_of_token == s
            post, labels = pred[sel].tolist(), self.batch.labels[sel].tolist()
            if metric == "locality":
                pre, t = self.before.predicted[i][j], self.new_first[i][j]
                per_fact["locality"].setdefault(i, []).append(sum(a == b for a, b in zip(pre, post)) / len(pre))
                per_fact["neighbour_flips"].setdefault(i, []).append(float(pre[0] != t and post[0] == t))
            else:
                per_fact[metric].setdefault(i, []).append(sum(a == b for a, b in zip(post, labels)) / len(labels))
        for k in CURVE_METRICS:
            self.curve[k].append(mean_or_none([mean_or_none(v) for v in per_fact[k].values()]))


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def load(results: Path, set_name: str) -> dict[str, list[dict]]:
    """config -> rows of one set, restricted to the records every config has (paired curves)."""
    rows = {c: read_jsonl(results / "curves" / f"{set_name}-{c}.jsonl") for c in CONFIGS}
    rows = {c: r for c, r in rows.items() if r}
    if not rows:
        return {}
    steps = max(r["steps"] for rs in rows.values() for r in rs)
    rows = {c: [r for r in rs if r["steps"] == steps] for c, rs in rows.items()}
    common = set.intersection(*({r["id"] for r in rs} for rs in rows.values()))
    return {c: sorted((r for r in rs if r["id"] in common), key=lambda r: r["id"]) for c, rs in rows.items()}


def point(rows: list[dict], step: int) -> dict:
    """Means over records at one step, with 95% bootstrap intervals (`<metric>_ci`)."""
    out: dict = {"step": step, "n": len(rows)}
    for k in CURVE_METRICS:
        values = [r["curve"][k][step] for r in rows if r["curve"][k][step] is not None]
        out[k] = mean_or_none(values)
        out[f"{k}_ci"] = bootstrap_ci(values)
    return out


def curve(rows: list[dict]) -> list[dict]:
    """Mean metrics at every step 0..steps (step 0: the unedited model)."""
    return [point(rows, s) for s in range(len(rows[0]["curve"]["reliability"]))]


def best_point(points: list[dict], floor: float = LOCALITY_FLOOR, reliability: float = 0.0) -> dict | None:
    """The rule: highest generalization among the steps with locality ≥ floor (and reliability ≥
    `reliability`; ties: higher reliability, then higher locality, then the earlier step); step 0
    (no edit) does not count."""
    ok = [p for p in points if p["step"] != 0 and p["locality"] is not None and p["locality"] >= floor
          and p["reliability"] >= reliability]
    return max(ok, key=_rank) if ok else None


def _rank(p: dict) -> tuple:
    return p["generalization"], p["reliability"], p["locality"], -p.get("mean_step", p["step"])


def auto_stop_step(row: dict, objective: str, tau: float = 0.9, loss_threshold: float = 0.01) -> int | None:
    """The step at which the objective's default stop rule ('auto', editing/train.py should_stop) would
    have ended this run: ce every-step mean loss < 0.01, overtone every target token p ≥ τ. None for
    overtone-kl (its rule reads per-token KLs that the trace does not keep) or when it never fires."""
    for step, (loss, ps) in enumerate(zip(row["loss"], row["p_label"])):
        if objective == "ce" and loss < loss_threshold:
            return step
        if objective == "overtone" and all(p >= tau for p in ps):
            return step
    return None


def choose(results: Path) -> dict | None:
    """The rule applied on `dev`, per config, over its fixed steps and its own stop rule ('auto'):
    `best` at locality ≥ 0.90, `reliable` also at reliability ≥ 0.99 (the issue's bound for the
    default). `chosen`: the best OVERTONE reading of `reliable` (of `best` where none is reliable;
    exact ties go to today's default, DEFAULT_CONFIG)."""
    rows = load(results, "dev")
    if not rows:
        return None
    readings = {c: curve(rs) + [a for a in [_auto_point(rs, CONFIGS[c][0])] if a] for c, rs in rows.items()}
    best = {c: best_point(pts) for c, pts in readings.items()}
    reliable = {c: best_point(pts, reliability=RELIABILITY_FLOOR) for c, pts in readings.items()}
    out = {"best": best, "reliable": reliable, "chosen": None}
    for kind, found in (("reliable", reliable), ("best", best)):
        overtone = [(c, p) for c, p in found.items() if p is not None and CONFIGS[c][0] != "ce"]
        if overtone:
            c, p = max(overtone, key=lambda cp: (_rank(cp[1]), cp[0] == DEFAULT_CONFIG))
            return {**out, "chosen": c, "point": p, "kind": kind}
    return out


def _cell(p: dict | None, k: str) -> str:
    if p is None or p.get(k) is None:
        return "—"
    ci = p.get(f"{k}_ci")
    return f"{p[k]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{p[k]:.3f}"


def _step(p: dict) -> str:
    return f"auto (mean {p['mean_step']:.1f})" if p["step"] == "auto" else str(p["step"])


def _row(name: str, what: str, p: dict | None) -> str:
    step = "—" if p is None else _step(p)
    return f"| {name} | {what} | {step} | " + " | ".join(_cell(p, k) for k in CURVE_METRICS) + " |"


def report(results: Path) -> str:
    lines = ["## 7. Trade-off curves (ft-m: ce, overtone, overtone-kl)", "",
             "One run per configuration and record, no early stop, every metric measured after every "
             "optimisation step on the delta as it would be stored at that step (applied to a clean copy of the "
             "model, acting on every position). Points: means over records; cells: mean [95% bootstrap interval "
             "over records]. `dev` = counterfact-dev records from 0 (the tuning range): the choice is made there, "
             "over every fixed step and the objective's own stop rule (*auto*: each record ends at its own step; "
             "not available for overtone-kl, whose rule reads per-token KLs the trace does not keep). *At dev's "
             "reading*: the reporting sets read at the reading chosen on dev for the config (reliability ≥ 0.99 "
             "where dev has one). *Best here*: the rule applied on the set itself (what the curve allows, not a "
             "choice).", ""]
    chosen = choose(results)
    if chosen is None:
        return "\n".join(lines + ["(no results)", ""])
    for set_name, (file, offset) in SETS.items():
        rows = load(results, set_name)
        if not rows:
            continue
        n = len(next(iter(rows.values())))
        steps = len(next(iter(rows.values()))[0]["curve"]["reliability"]) - 1
        points = {c: curve(rs) for c, rs in rows.items()}
        lines += [f"### {set_name} ({file}, records {offset}–{offset + n - 1}, n = {n}, {steps} steps)", "",
                  "| config | reading | step | " + " | ".join(CURVE_METRICS) + " |", "|---|---|---|" + "---|" * 4]
        for c, rs in rows.items():
            dev_best = chosen["reliable"].get(c) or chosen["best"].get(c)
            if set_name == "dev":
                lines.append(_row(c, "best at locality ≥ 0.90", chosen["best"].get(c)))
                lines.append(_row(c, "best at locality ≥ 0.90, reliability ≥ 0.99", chosen["reliable"].get(c)))
            else:
                if dev_best is None:
                    at = None
                elif dev_best["step"] == "auto":
                    at = _auto_point(rs, CONFIGS[c][0])
                else:
                    at = points[c][dev_best["step"]] if dev_best["step"] <= steps else None
                lines.append(_row(c, "at dev's reading" + ("" if chosen["reliable"].get(c) else " (unreliable)"), at))
                lines.append(_row(c, "best here at locality ≥ 0.90", best_point(points[c])))
            lines.append(_row(c, f"last step ({steps})", points[c][-1]))
            auto = _auto_point(rs, CONFIGS[c][0])
            if auto is not None:
                lines.append(_row(c, "its own stop rule (auto)", auto))
        mismatches = sum(any(r["check"][k] != r["curve"][k][-1] for k in CURVE_METRICS)
                         for rs in rows.values() for r in rs)
        total = sum(len(rs) for rs in rows.values())
        png = f"curves-{set_name}.png"
        marked = {c: chosen["reliable"].get(c) or chosen["best"].get(c) for c in rows} if set_name == "dev" else {}
        _plot(points, marked, results / png, set_name)
        lines += ["", f"![generalization against locality per step, {set_name}]({png})", "",
                  f"Check: the last point of {total - mismatches} of {total} runs equals editing/evaluate.py's "
                  "measurement of the returned delta.", ""]
    if chosen.get("chosen"):
        p = chosen["point"]
        objective, hp = CONFIGS[chosen["chosen"]]
        where = "locality ≥ 0.90 and reliability ≥ 0.99" if chosen["kind"] == "reliable" else \
            "locality ≥ 0.90 (no OVERTONE reading also reaches reliability ≥ 0.99 there)"
        lines += [f"**The rule on dev (n = {p['n']})**, highest generalization at {where}: `{chosen['chosen']}` "
                  f"({objective}, lr {hp['lr']:g}) at step {_step(p)}: generalization {_cell(p, 'generalization')}, "
                  f"locality {_cell(p, 'locality')}, reliability {_cell(p, 'reliability')}, neighbour flips "
                  f"{_cell(p, 'neighbour_flips')}.", ""]
    else:
        lines += ["**The rule on dev**: no OVERTONE reading reaches locality ≥ 0.90 at any step.", ""]
    lines += ["Command: `python benchmarks/curves.py` (per-record curves in `curves/<set>-<config>.jsonl`).", ""]
    return "\n".join(lines)


def _auto_point(rows: list[dict], objective: str) -> dict | None:
    stops = [auto_stop_step(r, objective) for r in rows]
    if objective == "overtone-kl":
        return None
    last = len(rows[0]["curve"]["reliability"]) - 1
    at = [last if s is None else s for s in stops]  # never fired: the run's last step, as `steps` ends it
    out: dict = {"step": "auto", "n": len(rows), "mean_step": sum(at) / len(at)}
    for k in CURVE_METRICS:
        values = [r["curve"][k][s] for r, s in zip(rows, at) if r["curve"][k][s] is not None]
        out[k] = mean_or_none(values)
        out[f"{k}_ci"] = bootstrap_ci(values)
    return out


def _plot(points: dict[str, list[dict]], marked: dict[str, dict | None], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ce": "tab:gray", "overtone": "tab:blue", "overtone-kl": "tab:orange"}
    widths = {"ce": 5.0, "overtone": 3.0, "overtone-kl": 1.2}  # curves that coincide stay visible
    fig, ax = plt.subplots(figsize=(7, 5))
    for c, pts in points.items():
        objective, hp = CONFIGS[c]
        xs = [p["locality"] for p in pts]
        ys = [p["generalization"] for p in pts]
        style = "-" if math.isclose(hp["lr"], 5e-3) else "--"
        ax.plot(xs, ys, style, marker="o", markersize=3, color=colors[objective], label=c,
                linewidth=widths[objective], alpha=0.8)
        ax.annotate(str(pts[-1]["step"]), (xs[-1], ys[-1]), fontsize=7, color=colors[objective])
        if marked.get(c) and marked[c]["step"] == "auto":
            ax.plot([marked[c]["locality"]], [marked[c]["generalization"]], marker="X", markersize=11,
                    color=colors[objective], markeredgecolor="black")
        elif marked.get(c):
            ax.plot([marked[c]["locality"]], [marked[c]["generalization"]], marker="*", markersize=12,
                    color=colors[objective], markeredgecolor="black")
    ax.axvline(LOCALITY_FLOOR, color="red", linewidth=0.8, linestyle=":")
    ax.set_xlabel("locality")
    ax.set_ylabel("generalization")
    ax.set_title(f"{title}: a point per step (step 0: locality 1); ★ the rule's reading per config (✕: its stop rule)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
