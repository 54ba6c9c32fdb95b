"""Seconds per alphaedit edit against the branch's length, and what the frozen prefix saves.

An alphaedit edit on a branch protects the keys of every live fact (editing/protected.py keeps
their Gram in C₀'s null-space basis up to date, so an edit costs the same on a long branch as on
a short one). This times the edit alone (training and closed form, 1 torch thread) on SmolLM2:

- on a branch of 10 and of 1,000 live facts: each timed edit adds the previous fact's keys to the
  protected set, as the next edit on a growing branch sees it (the warm, incremental case), and the
  first edit on the long branch is reported apart (a cold worker builds the Gram once);
- the same edits with every step running whole rows (editing/frozen_positions.py off): the
  baseline of the frozen prefix, in the same run;
- the value alone, without the closed form: what a consolidate with `values_at_base` pays per fact a
  stacked edit wrote (it trains that fact's value again at base);
- with `--also JSON`, the same edits on the short branch with those hparams on top of the
  defaults (a candidate setting, e.g. '{"lr": 1.0}'), timed in the same run; `--also-objective`
  trains those with another objective than the method's default (e.g. an earlier default).

The live facts' keys are drawn from N(0, C₀), a key distribution like generic text's: the cost
depends on their number, not their values. Edits alternate between the settings, so that
drifting load touches each alike.

    python benchmarks/edit_speed.py [--edits N] [--threads 1] [--also '{"lr": 1.0}' [--also-objective overtone]]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, RESULTS, arguments, cpu_model, write_json  # noqa: E402
from workers.settings import WorkerSettings  # noqa: E402

FIRST_RECORD = 1000
BRANCHES = (10, 1000)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--edits", type=int, default=4, help="timed edits per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--also", type=json.loads, default=None,
                        help="JSON hparams: also time the short branch's edits with these on top of the defaults")
    parser.add_argument("--also-objective", default=None, help="--also: train those edits with this objective")
    args = parser.parse_args(argv)
    import torch

    import editing.train as train
    from editing.facts import read_cases
    from editing.hparams import resolve_hparams
    from editing.keys import second_moment
    from editing.locate import default_layers
    from editing.methods import target_modules
    from editing.model import load_model
    from editing.protected import ProtectedKeys

    lm = load_model("smollm2", device="cpu", threads=args.threads)
    # --smoke: 1 timed edit of 3 steps on branches of 10 and 50, with C₀ from 2,000 tokens (checks it runs)
    n, sizes = (1, (10, 50)) if args.smoke else (args.edits, BRANCHES)
    overrides = {"steps": 3, "c0_tokens": 2000} if args.smoke else {}
    facts = [c.facts[0] for c in read_cases(DATA / "counterfact-dev.json", offset=FIRST_RECORD, n=n + 1)]
    hp = resolve_hparams("alphaedit", overrides)
    modules = target_modules(lm.model, hp.model_copy(update={"layers": default_layers(lm.model)}))
    c0 = second_moment(lm, modules, source=hp.c0_source, max_tokens=hp.c0_tokens)
    gen = torch.Generator().manual_seed(0)
    roots = {m: torch.linalg.cholesky(c.double() + 1e-6 * c.diagonal().mean() * torch.eye(len(c), dtype=torch.float64))
             for m, c in c0.items()}

    def key_rows(k: int) -> dict[str, torch.Tensor]:  # k facts' keys, 2 rows each (context average, own prompt)
        return {m: (torch.randn(2 * k, len(r), generator=gen, dtype=torch.float64) @ r.T).float()
                for m, r in roots.items()}

    branches = {}
    for size in sizes:
        keys = key_rows(size)
        branches[size] = ProtectedKeys({m: {f"live-{i}": k[2 * i:2 * i + 2] for i in range(size)}
                                        for m, k in keys.items()}, scope=f"edit-speed-{size}")
    frozen = train.freeze_prefix
    short, long = sizes
    train.edit(lm, [facts[0]], method="alphaedit", hparams=overrides, live_keys=branches[short])  # warm: C₀'s basis
    t = time.perf_counter()
    train.edit(lm, [facts[0]], method="alphaedit", hparams=overrides, live_keys=branches[long])
    cold = time.perf_counter() - t  # includes building the long branch's Gram once
    base_value = f"value alone, branch {short}"
    seconds: dict[str, list[float]] = {f"branch {s}": [] for s in sizes} | {f"whole rows, branch {short}": [],
                                                                            base_value: []}
    also = (f"{json.dumps(args.also, sort_keys=True)}{' + ' + args.also_objective if args.also_objective else ''}, "
            f"branch {short}") if args.also else None
    if also:
        seconds[also] = []
    steps: dict[str, list[int]] = {k: [] for k in seconds}
    for i, fact in enumerate(facts[1:]):
        for size in sizes:
            for m, k in key_rows(1).items():  # the previous edit's fact joins the live set
                branches[size].rows[m][f"new-{i}"] = k
        for name in seconds:
            size = int(name.rsplit(" ", 1)[1])
            train.freeze_prefix = (lambda *a: None) if name.startswith("whole rows") else frozen
            hparams = overrides | (args.also if name == also else {})
            try:
                r = train.edit(lm, [fact], method="alphaedit", objective=args.also_objective if name == also else None,
                               hparams=hparams, live_keys=branches[size], solve=name != base_value)
            finally:
                train.freeze_prefix = frozen
            seconds[name].append(r.seconds)
            steps[name].append(r.steps)
            print(f"{fact.subject!r} {name}: {r.seconds:.2f} s ({r.steps} steps)", flush=True)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "cpu": cpu_model(), "threads": args.threads, "edits": n, "seconds": seconds, "steps": steps,
        "median_s": median, "cold_first_edit_on_1000_s": cold,
        "ratio_1000_to_10": median[f"branch {long}"] / median[f"branch {short}"],
        "speedup_of_frozen_prefix": median[f"whole rows, branch {short}"] / median[f"branch {short}"],
        "value_at_base_s": median[base_value],
        "also": {"hparams": args.also, "objective": args.also_objective,
                 "ratio_to_defaults": median[also] / median[f"branch {short}"],
                 "mean_steps": statistics.mean(steps[also]),
                 "mean_steps_defaults": statistics.mean(steps[f"branch {short}"])} if also else None,
        "note": "live facts' keys drawn from N(0, C0); 1 torch thread; the edit alone (training + closed form)",
    }
    print({k: v for k, v in result.items() if k not in ("seconds", "steps")})
    if not args.smoke:
        write_json(args.out / "edit_speed.json", result)


def report(results: Path = RESULTS) -> list[str]:
    path = results / "edit_speed.json"
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    m = r["median_s"]
    line = (f"Seconds per alphaedit edit (`benchmarks/edit_speed.py`, {r['threads']} torch thread, the edit alone, "
            f"median of {r['edits']}, {r['cpu']}): {m['branch 10']:.2f} s on a branch of 10 live facts, "
            f"{m['branch 1000']:.2f} s on a branch of 1,000 (ratio {r['ratio_1000_to_10']:.2f}; the first edit "
            f"of a cold worker there {r['cold_first_edit_on_1000_s']:.2f} s); every step on whole rows instead "
            f"of the frozen prefix: {m['whole rows, branch 10']:.2f} s ({r['speedup_of_frozen_prefix']:.2f}× "
            "slower).")
    if r.get("value_at_base_s") is not None:
        line += (f" With `values_at_base` a consolidate trains again at base the value of each fact a stacked "
                 f"edit wrote: {r['value_at_base_s']:.2f} s per such fact, up to "
                 f"{WorkerSettings.model_fields['auto_consolidate_after'].default} of them per automatic "
                 "consolidate.")
    if r.get("also"):
        a = r["also"]
        objective = f" and objective {a['objective']}" if a.get("objective") else ""
        line += (f" With {json.dumps(a['hparams'])}{objective} on top of the defaults: "
                 f"{a['ratio_to_defaults']:.2f}× the defaults' time ({a['mean_steps']:.1f} value steps against "
                 f"{a['mean_steps_defaults']:.1f}).")
    return [line, ""]


if __name__ == "__main__":
    main()
