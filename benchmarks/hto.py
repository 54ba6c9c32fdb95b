"""Section 2, heterogeneous token overfitting (HTO): how unevenly a fact's target tokens are fit.

For each counterfact record (1000 onward) whose target is two or more tokens (a one-token
target has no spread to measure), the same fact is trained with CE and with OVERTONE
for a fixed number of steps (no early stop; ft-m, lmedit's default otherwise) and p(target
token | context) is recorded for every token at every step (`editing.diagnose.trajectories`).
Per fact and objective, with p > 0.9 as "fit":
- spread: steps between the first and the last target token being fit;
- early_p_at_last: mean p of the tokens fit earlier, at the step the last one is fit
  (how far the early ones climbed meanwhile);
- final: p of every token after the last step (CE drives them all to 1; OVERTONE stops near τ).

Per-record results are cached in results/hto/records.jsonl (an interrupted run continues).

    python benchmarks/hto.py [--full] [--steps 20]     # quick: 20 records, full: 50
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, append_jsonl, arguments, read_jsonl, save_figure, size  # noqa: E402

FIRST_RECORD = 1000
OBJECTIVES = ("ce", "overtone")


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    n = size(args, 20, 50)
    steps = 3 if args.smoke else args.steps

    from editing.diagnose import trajectories
    from editing.facts import read_cases
    from editing.model import load_model
    from editing.tokens import encode_pair

    path = args.out / "hto" / "records.jsonl"
    done = {r["id"] for r in read_jsonl(path) if r["steps"] == steps}
    lm = load_model("smollm2", device="cpu", threads=1)
    multi = [c for c in read_cases(DATA / "counterfact-dev.json", offset=FIRST_RECORD, n=12 * n)
             if len(encode_pair(lm.tokenizer, c.facts[0].prompt, c.facts[0].target_new)[1]) >= 2][:n]
    cases = [c for c in multi if c.id not in done]
    for i, case in enumerate(cases, start=1):
        t = trajectories(lm, case.facts[0], objectives=OBJECTIVES, steps=steps)
        row = {"id": case.id, "steps": steps, "prompt": t["prompt"], "target": t["target"], "tokens": t["tokens"],
               "p": {o: t["objectives"][o]["p"] for o in OBJECTIVES}, "spread": t["spread"]}
        append_jsonl(path, row)
        print(f"[{len(done) + i}/{n}] {case.id} {t['target']!r}: " + " ".join(
            f"{o} spread={row['spread'][o]['spread']}" for o in OBJECTIVES), flush=True)


def fit_steps(trace: list[list[float]], threshold: float = 0.9) -> list[int]:
    """Per target token: the first step with p > threshold (len(trace) if never)."""
    return [next((s for s, ps in enumerate(trace) if ps[t] > threshold), len(trace)) for t in range(len(trace[0]))]


def summarize(rows: list[dict], objective: str) -> dict:
    multi = [r for r in rows if len(r["tokens"]) >= 2]
    spreads = [r["spread"][objective] for r in multi]
    fit = [s for s in spreads if s["spread"] is not None]
    early = [s["early_p_at_last"] for s in fit if s["early_p_at_last"] is not None]
    finals = [p for r in rows for p in r["p"][objective][-1]]
    first_hit = [s["first"] for r in rows for s in [r["spread"][objective]] if s["first"] is not None]
    return {
        "facts": len(rows), "multi_token": len(multi), "all_fit": len(fit),
        "spread_mean": statistics.mean(s["spread"] for s in fit) if fit else None,
        "spread_max": max((s["spread"] for s in fit), default=None),
        "spread_ge3": sum(s["spread"] >= 3 for s in fit),
        "early_p_at_last": statistics.mean(early) if early else None,
        "first_fit_step": statistics.mean(first_hit) if first_hit else None,
        "final_p_mean": statistics.mean(finals) if finals else None,
        "final_p_min": min(finals, default=None),
        "final_p_over_0.99": sum(p > 0.99 for p in finals) / max(1, len(finals)),
    }


def report(results: Path) -> str:
    rows = read_jsonl(results / "hto" / "records.jsonl")
    lines = ["## 2. Heterogeneous token overfitting", "",
             "Each fact trained for a fixed number of steps with CE and with OVERTONE (ft-m, no early stop), "
             "p(target token) recorded per token per step (counterfact-dev from record 1000, the first records "
             "whose target is ≥ 2 tokens: a one-token target has no spread). A token is "
             "*fit* once p > 0.9. *Spread*: steps between the first and the last token of a fact being fit "
             "(facts with ≥ 2 target tokens, all fit). *Early p at last*: mean p of the earlier-fit tokens at the "
             "step the last one is fit. *Final*: p of every target token after the last step.", ""]
    if not rows:
        return "\n".join(lines + ["(no results)", ""])
    stats = {o: summarize(rows, o) for o in OBJECTIVES}
    keys = [("facts", "facts", "{}"), ("multi_token", "facts with ≥ 2 target tokens", "{}"),
            ("all_fit", "of those, all tokens fit", "{}"),
            ("spread_mean", "spread, mean steps", "{:.2f}"), ("spread_max", "spread, max", "{}"),
            ("spread_ge3", "facts with spread ≥ 3", "{}"),
            ("early_p_at_last", "early tokens' p when the last is fit", "{:.3f}"),
            ("first_fit_step", "step the first token is fit, mean", "{:.2f}"),
            ("final_p_mean", f"final p, mean (after {rows[0]['steps']} steps)", "{:.3f}"),
            ("final_p_min", "final p, min", "{:.3f}"),
            ("final_p_over_0.99", "share of tokens with final p > 0.99", "{:.2f}")]
    lines += ["| measure | ce | overtone |", "|---|---|---|"]
    for k, label, fmt in keys:
        cells = [("—" if stats[o][k] is None else fmt.format(stats[o][k])) for o in OBJECTIVES]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    _plot(rows, results / "hto.png")
    lines += ["", "![per-token probability across steps, CE vs OVERTONE](hto.png)", "",
              "Left pair: every target token of every fact (thin lines; blue: a fact's first target token, "
              "red: its later ones). Right: mean over multi-token facts of p of the token fit first and of the "
              "token fit last, per step.", ""]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, o in zip(axes[:2], OBJECTIVES):
        for r in rows:
            trace = r["p"][o]  # (steps + 1) x tokens
            for t in range(len(r["tokens"])):
                ax.plot([ps[t] for ps in trace], color="tab:blue" if t == 0 else "tab:red", lw=0.5, alpha=0.35)
        ax.set_title(f"{o}: p(target token) per step")
        ax.set_xlabel("step")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("p (blue: first target token, red: later ones)")
    ax = axes[2]
    for o, style in zip(OBJECTIVES, ("-", "--")):
        for which, color in (("first", "tab:blue"), ("last", "tab:red")):
            curves = []
            for r in rows:
                if len(r["tokens"]) < 2:
                    continue
                trace = r["p"][o]
                hits = fit_steps(trace)
                pick = min if which == "first" else max
                t = pick(range(len(hits)), key=hits.__getitem__)
                curves.append([ps[t] for ps in trace])
            if curves:
                mean = [statistics.mean(c[s] for c in curves) for s in range(len(curves[0]))]
                ax.plot(mean, style, color=color, label=f"{o}: {which}-fit token")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_title("mean p of each fact's first- and last-fit token")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
