"""Many facts solved together (a consolidate's closed form) and where its locality goes.

A consolidate solves every live fact of a branch in one closed form (editing/consolidate.py
`solve_together`). This measures that step alone, on counterfact-dev records 0…n−1 (the tuning
range), from values z optimised once and cached: retention (reliability of every fact),
generalization, locality against the base model, neighbour flips. `positions` also applies the
solved ΔW at chosen positions of the probes only (the first token; the tokens between the first
and the prompt's last; the prompt's last and the answer's), which says where locality is lost.

    python benchmarks/solve_together.py values --n 1000      # z per record, 8 at a time (resumable)
    python benchmarks/solve_together.py solve --n 200 [--hparams '{"neighbour_weight": 0}']
    python benchmarks/solve_together.py positions --n 200 [--hparams ...]
    python benchmarks/solve_together.py noise --n 200 [--scales 0.25,0.5,0.75,1]   # a random ΔW's locality
    python benchmarks/solve_together.py values --n 1000 --values '{"tau": 0.99}'   # a second set of values
    python benchmarks/solve_together.py solve --n 1000 --values '{"tau": 0.99}' [--hparams ...]
    python benchmarks/solve_together.py values --n 500 --offset 1000   # records no tuning saw (1000 and up);
    python benchmarks/solve_together.py values --n 500 --offset 1500   # two ranges may run at once
    python benchmarks/solve_together.py solve --n 1000 --offset 1000
    python benchmarks/solve_together.py unedited --n 100 --offset 1000   # the unedited model's CounterFact scores

Values are trained 8 records at a time until all 8 fit (at most the method's `steps`), so they
are somewhat stronger than a single edit's; compare rows made from the same values. `--values`
names hparams the values are trained with (a file of their own; rows record them). The hparams are an
edit's (one pass of the closed form); a consolidate adds `REBASE_DEFAULTS` (up to 3 `passes`). Rows go to
results/solve_together.jsonl; values to results/cache/solve_together/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, append_jsonl, arguments, read_after, save_figure  # noqa: E402

CHUNK = 8  # records whose values are trained together
REGIONS = ("all", "first", "middle", "last")


def load(threads: int):
    from editing.model import load_model

    return load_model("smollm2", device="cpu", threads=threads)


def read_facts(n: int, offset: int = 0):
    from editing.facts import read_cases

    return [c.facts[0] for c in read_cases(DATA / "counterfact-dev.json", offset=offset, n=n)]


def values_path(out: Path, objective: str, trained_with: dict) -> Path:
    label = "".join(f"-{k}-{v}" for k, v in sorted(trained_with.items()))
    return out / "cache" / "solve_together" / f"values-{objective}{label}.pt"


def values(n: int, objective: str, trained_with: dict, out: Path, threads: int, offset: int = 0) -> None:
    """Values of records offset…offset+n−1, kept by record number. Runs over other ranges may share the
    file at the same time (each save merges under a lock)."""
    import fcntl

    import torch

    from editing.train import edit

    path = values_path(out, objective, trained_with)
    have = torch.load(path) if path.exists() else {}
    lm, facts = load(threads), read_facts(n, offset)
    for start in range(offset, offset + n, CHUNK):
        rows = list(range(start, min(offset + n, start + CHUNK)))
        if all(i in have for i in rows):
            continue
        t0 = time.perf_counter()
        result = edit(lm, facts[rows[0] - offset: rows[-1] - offset + 1], method="alphaedit", objective=objective,
                      hparams=trained_with)
        new = {i: result.delta.memory["values"][j].clone() for j, i in enumerate(rows)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            have = {**(torch.load(path) if path.exists() else {}), **new}
            torch.save(have, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        print(f"values {rows[0]}–{rows[-1]}: {time.perf_counter() - t0:.0f} s, {result.steps} steps", flush=True)


def _solved(n: int, objective: str, trained_with: dict, method: str, overrides: dict, out: Path, threads: int,
            offset: int = 0):
    """counterfact-dev offset…offset+n−1 solved together from their cached values:
    (lm, facts, hp, before, delta, seconds)."""
    import torch

    from editing import metrics
    from editing.consolidate import solve_together
    from editing.hparams import resolve_hparams
    from editing.locate import default_layers

    path = values_path(out, objective, trained_with)
    have = torch.load(path) if path.exists() else {}
    missing = [i for i in range(offset, offset + n) if i not in have]
    if missing:
        raise SystemExit(f"no values for records {missing[:5]}…: run `values --n {n} --offset {offset}` (with the "
                         "same --values) first")
    lm, facts = load(threads), read_facts(n, offset)
    hp = resolve_hparams(method, overrides)
    hp = hp.model_copy(update={"layers": hp.layers if hp.layers is not None else default_layers(lm.model)})
    before = metrics.snapshot(lm, facts)
    t0 = time.perf_counter()
    delta = solve_together(lm, facts, torch.stack([have[i] for i in range(offset, offset + n)]), method, hp)
    return lm, facts, hp, before, delta, time.perf_counter() - t0


def _measured(lm, facts, before, delta) -> dict:
    """The metrics with `delta` added to the weights, then taken off."""
    from editing import metrics
    from editing.delta import apply_delta, revert

    originals = apply_delta(lm.model, delta)
    try:
        return metrics.measure(lm, facts, before)
    finally:
        revert(lm.model, originals)


def in_text(lm, facts, delta, tokens: int) -> dict:
    """Shares of the facts whose new (and true) answer the model writes in `tokens` greedy tokens after the
    rephrase and after the prompt, with `delta` added and on the base model (rephrase_text.py reads single
    edits the same way)."""
    from editing.delta import apply_delta, revert

    def shares() -> dict:
        read = read_after(lm, facts, tokens)
        return {k: sum(row[k] for row in read) / len(read)
                for k in ("new_after_rephrase", "true_after_rephrase", "new_after_prompt")}

    base = shares()
    originals = apply_delta(lm.model, delta)
    try:
        return {"tokens": tokens, "edited": shares(), "base": base}
    finally:
        revert(lm.model, originals)


def solve(n: int, objective: str, trained_with: dict, method: str, overrides: dict, out: Path, threads: int,
          regions: bool, offset: int = 0, text_tokens: int = 0) -> dict:
    from editing import metrics

    lm, facts, hp, before, delta, seconds = _solved(n, objective, trained_with, method, overrides, out, threads,
                                                    offset)
    measured = _measured(lm, facts, before, delta)
    row = {"n": n, **({"offset": offset} if offset else {}), "method": method, "objective": objective,
           "hparams": overrides,
           **({"values": trained_with} if trained_with else {}), "threads": threads,
           # since stop 31, facts of one template share their neighbour prompts (editing/neighbours.py);
           # rows without the field read one set per fact
           "neighbour_texts": "distinct",
           "seconds": round(seconds, 1), **{k: measured[k] for k in
                                            ("reliability", "generalization", "locality", "neighbour_flips")},
           # ROME / MEMIT / AlphaEdit's efficacy, generalization and specificity (two answers' likelihoods
           # compared), after the solve and on the base model: the scale of the field's reference points
           "counterfact_scores": {k: measured[k] for k in metrics.COUNTERFACT_SCORES},
           "base_counterfact_scores": metrics.counterfact_scores(lm, facts)}
    if regions:
        row["positions"] = {r: where(lm, facts, before, delta, r) for r in REGIONS}
    if text_tokens:
        row["text"] = in_text(lm, facts, delta, text_tokens)
    append_jsonl(out / "solve_together.jsonl", row)
    return row


def unedited(n: int, offset: int, out: Path, threads: int) -> dict:
    """The field's CounterFact scores of the unedited model on records offset…offset+n−1 (the baseline of a
    single-edit run on the same records; a solve's rows carry their own)."""
    from editing import metrics

    row = {"n": n, "offset": offset, **metrics.counterfact_scores(load(threads), read_facts(n, offset))}
    append_jsonl(out / "solve_together_unedited.jsonl", row)
    return row


def noise(n: int, objective: str, trained_with: dict, method: str, overrides: dict, out: Path, threads: int,
          scales: list[float]) -> list[dict]:
    """How much of the lost locality the size of ΔW alone explains. Beside the solved ΔW, a random one that
    teaches nothing: per edited module Gaussian rows inside C₀'s null space (what an alphaedit update may
    use), scaled so that it moves generic keys as much as the solved one (the same tr(ΔW C₀ ΔWᵀ)), times
    each of `scales`. Rows go to results/solve_together_noise.jsonl."""
    import torch

    from editing.delta import Delta
    from editing.keys import second_moment
    from editing.locate import null_space

    lm, facts, hp, before, delta, _ = _solved(n, objective, trained_with, method, overrides, out, threads)
    named = dict(lm.model.named_modules())
    c0 = second_moment(lm, {name.removesuffix(".weight"): named[name.removesuffix(".weight")]
                            for name in delta.names()}, source=hp.c0_source, max_tokens=hp.c0_tokens)
    generator = torch.Generator().manual_seed(0)
    random = {}
    for name in delta.names():
        solved = delta.change(name).double()  # (out, in)
        C = c0[name.removesuffix(".weight")].double()  # (in, in)
        U = null_space(C, hp.nullspace_threshold).basis  # (in, r)
        R = torch.randn(solved.shape[0], U.shape[1], generator=generator, dtype=torch.float64).to(U.device) @ U.T
        size = (torch.trace(solved @ C @ solved.T) / torch.trace(R @ C @ R.T)).sqrt()
        random[name] = (size * R).float()
    rows = []
    changes = [("solved", delta)]
    changes += [(f"random x{k}", Delta(dense={name: k * r for name, r in random.items()})) for k in scales]
    for label, change in changes:
        measured = _measured(lm, facts, before, change)
        rows.append({"n": n, "method": method, "objective": objective, "hparams": overrides,
                     **({"values": trained_with} if trained_with else {}), "change": label,
                     **{k: measured[k] for k in ("reliability", "generalization", "locality")}})
        append_jsonl(out / "solve_together_noise.jsonl", rows[-1])
        print(json.dumps(rows[-1]), flush=True)
    return rows


def where(lm, facts, before, delta, region: str) -> dict:
    """Locality and reliability with ΔW acting only in `region` of each sequence: 'first' (position 0),
    'middle' (1 … the prompt's second-to-last), 'last' (the prompt's last token and the answer's)."""
    import torch

    from editing import metrics
    from editing.tokens import encode_pair, pair_batch

    modules = dict(lm.model.named_modules())
    changes = {name.removesuffix(".weight"): delta.change(name) for name in delta.names()}
    state: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, out):
            x = args[0]  # (B, L, in)
            pos = torch.arange(x.shape[1])[None, :]  # (1, L)
            end = state["prompt_len"][:, None] - 1  # (B, 1): the prompt's last position
            mask = {"all": pos >= 0, "first": pos == 0, "middle": (pos >= 1) & (pos < end),
                    "last": pos >= end}[region]
            return out + (x @ changes[name].T.to(x.dtype)) * mask[..., None]  # (B, L, out)
        return hook

    def run(pairs):
        handles = [modules[n].register_forward_hook(hook_for(n)) for n in changes]
        try:
            found = []
            for i in range(0, len(pairs), 32):
                part = pairs[i:i + 32]
                # the hook's prompt lengths follow the batch's rows: read this batch as made, not re-ordered
                state["prompt_len"] = torch.tensor([len(encode_pair(lm.tokenizer, p, a)[0]) for p, a in part])
                found += [(r.predicted, r.labels) for r in metrics.read_batch(lm, pair_batch(lm.tokenizer, part))]
            return found
        finally:
            for h in handles:
                h.remove()

    probes = [(p.prompt, p.answer) for ps in before.probes for p in ps]
    pre = [x for ps in before.predicted for x in ps]
    post = [p for p, _ in run(probes)]
    own = run([(f.prompt, f.target_new) for f in facts])
    return {"locality": sum(sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(pre, post)) / len(pre),
            "reliability": sum(sum(a == b for a, b in zip(p, t)) / len(t) for p, t in own) / len(own)}


def report(results: Path) -> str:
    """Section 8 (empty without rows): every solve, latest row per configuration."""
    from benchmarks.common import read_jsonl

    runs: dict[tuple, list[dict]] = {}
    for r in read_jsonl(results / "solve_together.jsonl"):
        key = (r["n"], r.get("offset", 0), r["method"], r["objective"], json.dumps(r["hparams"], sort_keys=True),
               json.dumps(r.get("values", {}), sort_keys=True), r.get("neighbour_texts", "per fact"))
        runs.setdefault(key, []).append(r)
    if not runs:
        return ""
    rows = {key: rs[-1] for key, rs in runs.items()}

    def same(a: dict, b: dict) -> bool:
        return all(a[k] == b[k] for k in ("reliability", "generalization", "locality"))

    # the time of the fastest run that solved the same (a rerun beside other work is slower)
    fastest = {key: min((r for r in rs if same(r, rs[-1])), key=lambda r: r["seconds"]) for key, rs in runs.items()}
    lines = ["## 8. Many facts solved together", "",
             "counterfact-dev 0…n−1 (the tuning range; records no tuning saw where the n column names them) "
             "solved in one closed form, as a consolidate does "
             "(`benchmarks/solve_together.py`), from values optimised 8 records at a time and cached; one pass of the "
             "closed form unless the hparams name `passes` (a consolidate runs up to 3: `REBASE_DEFAULTS`). Positions: "
             "locality / retention with ΔW acting only at the probes' first token, between it and the prompt's "
             "last, or at the prompt's last token and the answer's. \"per fact\": rows measured before facts of "
             "one template shared their neighbour prompts (each fact's read, duplicates and all).", "",
             "| n (records) | method | hparams | retention | generalization | locality | neighbour flips | "
             "s (threads; the fastest run) | positions: first / middle / last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(rows.items()):
        n, offset, method, objective, hp, trained_with, texts = key
        method = method if objective == "overtone" else f"{method} ({objective} values)"
        if r.get("values"):
            hp = f"{hp}, values trained with {trained_with}"
        if texts == "per fact":
            hp = f"{hp}, per fact"
        where_ = r.get("positions")
        cell = " / ".join(f"{where_[k]['locality']:.3f}" for k in ("first", "middle", "last")) if where_ else "–"
        lines.append(f"| {_records(n, offset)} | {method} | `{hp}` | {r['reliability']:.3f} | "
                     f"{r['generalization']:.3f} | {r['locality']:.3f} | {r['neighbour_flips']:.3f} | "
                     f"{fastest[key]['seconds']:.0f} ({fastest[key]['threads']}) | {cell} |")
    scored = [(key, r) for key, r in sorted(rows.items()) if r.get("counterfact_scores")]
    if scored:
        lines += ["", "The same solves on the scale of the field's reference points (the scores ROME, MEMIT and "
                  "AlphaEdit report on CounterFact as efficacy, generalization and specificity: one answer likelier "
                  "than the other, `editing/metrics.py` `counterfact_scores_per_fact`), the base model's in brackets:",
                  "", "| n (records) | method | hparams | efficacy | paraphrase | neighbourhood |",
                  "|---|---|---|---|---|---|"]
        for (n, offset, method, objective, hp, trained_with, _texts), r in scored:
            method = method if objective == "overtone" else f"{method} ({objective} values)"
            cf, base = r["counterfact_scores"], r["base_counterfact_scores"]
            trained = f", values trained with {trained_with}" if r.get("values") else ""
            cells = " | ".join(f"{cf[k]:.3f} ({base[k]:.3f})" for k in
                               ("efficacy_score", "paraphrase_score", "neighbourhood_score"))
            lines.append(f"| {_records(n, offset)} | {method} | `{hp}`{trained} | {cells} |")
    written = [(key, r) for key, r in sorted(rows.items()) if r.get("text")]
    if written:
        lines += ["", "What the model writes (`--text-tokens`): the share of facts whose new answer occurs in the "
                  "greedy continuation of the prompt and of the rephrase, and whose true answer still occurs after the "
                  "rephrase; the base model's in brackets:", "",
                  "| n (records) | method | hparams | tokens | new after the prompt | new after the rephrase | "
                  "true after the rephrase |", "|---|---|---|---|---|---|---|"]
        for (n, offset, method, _, hp, _trained, _texts), r in written:
            t = r["text"]
            cells = " | ".join(f"{t['edited'][k]:.3f} ({t['base'][k]:.3f})" for k in
                               ("new_after_prompt", "new_after_rephrase", "true_after_rephrase"))
            lines.append(f"| {_records(n, offset)} | {method} | `{hp}` | {t['tokens']} | {cells} |")
    largest = max((n for n, offset, *_ in rows if not offset), default=0)  # the plot: the tuning range's
    if largest:
        _plot([r for (n, offset, *_), r in sorted(rows.items()) if n == largest and not offset],
              results / "solve_together.png")
        lines += ["", f"![retention against locality of {largest:,} facts solved together, one point per setting]"
                  "(solve_together.png)"]
    lines.append("")
    noise = {(r["n"], r["method"], r.get("objective", "overtone"), json.dumps(r["hparams"], sort_keys=True),
              json.dumps(r.get("values", {}), sort_keys=True), r["change"]): r
             for r in read_jsonl(results / "solve_together_noise.jsonl")}
    if noise:
        lines += ["How much of the lost locality ΔW's size explains (`solve_together.py noise`): the solved ΔW beside "
                  "a random one with rows in C₀'s null space that moves generic keys as much (x1), and smaller.", "",
                  "| n | method | hparams | change | retention | generalization | locality |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {method} {objective} | `{hp}`{f', values trained with {vals}' if vals != '{}' else ''} | "
                  f"{change} | {r['reliability']:.3f} | {r['generalization']:.3f} | {r['locality']:.3f} |"
                  for (n, method, objective, hp, vals, change), r in sorted(noise.items())]
        lines.append("")
    return "\n".join(lines + [""])


def _plot(rows: list[dict], path: Path) -> None:
    """Retention against locality, one numbered point per setting (named in the legend): a
    trade-off shows as a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for i, r in enumerate(rows, 1):
        label = ", ".join(_short(k, v) for k, v in r["hparams"].items()) or "one pass, defaults"
        if r.get("values"):
            label += "; values " + ", ".join(_short(k, v) for k, v in r["values"].items())
        if "neighbour_texts" not in r:
            label += " (per fact)"
        ax.scatter(r["locality"], r["reliability"], s=22, label=f"{i}: {label}")
        ax.annotate(str(i), (r["locality"], r["reliability"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("locality (against the base model)")
    ax.set_ylabel("retention (reliability of every fact)")
    ax.set_title(f"{rows[0]['n']:,} facts of counterfact-dev solved together ({rows[0]['method']})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_figure(fig, path)


def _records(n: int, offset: int) -> str:
    """The table's n: records 0…n−1 as before; a range no tuning saw spelled out."""
    return f"{n} ({offset}–{offset + n - 1})" if offset else str(n)


def _short(key: str, value) -> str:
    if key == "layers":
        return f"blocks {value[0]}–{value[-1]}"
    if key == "c0_source":
        return f"C0 {Path(value).name}"
    return f"{key} {value}"


def main(argv: list[str] | None = None) -> None:

    parser = arguments(__doc__)
    parser.add_argument("step", choices=["values", "solve", "positions", "noise", "unedited"])
    parser.add_argument("--n", type=int, default=200, help="records offset…offset+n−1 of counterfact-dev")
    parser.add_argument("--offset", type=int, default=0,
                        help="first record (0: the tuning range; 1000 and up: records no tuning saw)")
    parser.add_argument("--objective", default="overtone")
    parser.add_argument("--method", default="alphaedit", choices=["alphaedit", "memit"])
    parser.add_argument("--hparams", type=json.loads, default={}, help="JSON hparams on top of the method's")
    parser.add_argument("--values", type=json.loads, default={},
                        help="JSON hparams the values are trained with (their own file)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scales", default="0.25,0.5,0.75,1", help="noise: sizes of the random ΔW")
    parser.add_argument("--text-tokens", type=int, default=0,
                        help="solve: also read this many greedy tokens after each rephrase and prompt (does the "
                             "model write the new answer?)")
    args = parser.parse_args(argv)
    n = 2 if args.smoke else args.n
    if args.offset % CHUNK:
        raise SystemExit(f"--offset must be a multiple of {CHUNK}: values are trained {CHUNK} records at a time, "
                         "and another grouping would train cached records again")
    if args.step == "unedited":
        row = unedited(n, args.offset, args.out, args.threads)
        print(json.dumps(row))
        return
    if args.step == "values":
        values(n, args.objective, args.values, args.out, args.threads, args.offset)
        return
    if args.step == "noise":
        if args.offset:
            raise SystemExit("noise runs on records 0…n−1")
        noise(n, args.objective, args.values, args.method, args.hparams, args.out, args.threads,
              [float(k) for k in args.scales.split(",")])
        return
    row = solve(n, args.objective, args.values, args.method, args.hparams, args.out, args.threads,
                args.step == "positions", args.offset, args.text_tokens)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
