"""Choose edit defaults on tuning records only: counterfact-dev 0–999 (never 1000+).

Runs each configuration (method, objective, hparams) on the same random sample of
tuning records with the single-edit protocol and appends one JSON line per
configuration to benchmarks/results/tune.jsonl. Reporting uses records 1000+ only.

    python benchmarks/tune.py --n 30 --config '["ft-m","overtone",{"lr":1e-2}]' ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA as DATA_DIR  # noqa: E402  (honours LMEDIT_DATA)
from editing.evaluate import evaluate, summarize  # noqa: E402
from editing.facts import read_cases  # noqa: E402
from editing.model import load_model  # noqa: E402

DATA = DATA_DIR / "counterfact-dev.json"
OUT = Path(__file__).resolve().parent / "results" / "tune.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=30, help="tuning records sampled from 0–999")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", action="append", required=True, help='JSON: ["method","objective",{hparams}]')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pool = read_cases(args.data, offset=0, n=1000)
    cases = random.Random(args.seed).sample(pool, args.n)
    lm = load_model()
    for raw in args.config:
        method, objective, hp = json.loads(raw)
        t = time.perf_counter()
        summary = summarize(evaluate(lm, cases, method, objective, hp))
        row = {"method": method, "objective": objective, "hparams": hp, "n": args.n, "seed": args.seed,
               "threads": args.threads, **summary, "wall": time.perf_counter() - t}
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
