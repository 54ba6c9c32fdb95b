"""Step time of `overtone` vs `ce` on the same SmolLM2 edit, same run.

OVERTONE costs one extra softmax-sized pass over the target positions only (the filtered
self-prediction); the forward and backward through the model are the same. Both
objectives train the same fact for a fixed number of steps (no early stop), interleaved
over several rounds so that machine noise hits both alike; the ratio of median step
times is printed and written to benchmarks/results/overtone_overhead.json.

    python benchmarks/overtone_overhead.py [--rounds 5] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from pathlib import Path

import torch

from editing.facts import Fact
from editing.model import load_model
from editing.train import edit

OUT = Path(__file__).resolve().parent / "results" / "overtone_overhead.json"
FACT = Fact("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default="ft-m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    hp = {"steps": args.steps, "stop": "none"}
    edit(lm, [FACT], args.method, "ce", hp)  # warm-up
    per_step: dict[str, list[float]] = {"ce": [], "overtone": []}
    for _ in range(args.rounds):
        for objective in per_step:
            r = edit(lm, [FACT], args.method, objective, hp)
            per_step[objective].append(r.seconds / r.steps)
    median = {k: statistics.median(v) for k, v in per_step.items()}
    ratio = median["overtone"] / median["ce"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"method": args.method, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "ce_step_s": median["ce"], "overtone_step_s": median["overtone"], "ratio": ratio,
              "all": per_step, "commit": commit, "cpu": platform.processor() or platform.machine()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(f"ce {median['ce'] * 1000:.1f} ms/step, overtone {median['overtone'] * 1000:.1f} ms/step, "
          f"ratio {ratio:.3f} (goal ≤ 1.05)")


if __name__ == "__main__":
    main()
