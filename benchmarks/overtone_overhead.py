"""Step time of `overtone` and `overtone-kl` vs `ce` on the same SmolLM2 edit, same run.

Both OVERTONE readings cost a few extra softmax-sized passes over the target positions
only (the filtered self-prediction, and for overtone-kl its KL); the forward and backward
through the model are the same. This times single training steps (forward, loss,
backward, Adam step) of the same ft-m edit, cycling ce / overtone / overtone-kl step by
step so that machine noise hits all alike, and reports each one's ratio of the medians
to ce, in CPU time (robust on a shared machine) and in wall time. Results go to
benchmarks/results/overtone_overhead.json.

    python benchmarks/overtone_overhead.py [--steps 30] [--threads 1] [--target "Rio de Janeiro"] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from editing.frozen_layers import skip_frozen_layers
from editing.hparams import OBJECTIVES, resolve_hparams
from editing.methods import first_layer, get_method, only_at, trainable
from editing.model import load_model
from editing.objectives import objective_loss
from editing.tokens import pair_batch
from editing.train import target_logits

OUT = Path(__file__).resolve().parent / "results" / "overtone_overhead.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per objective")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--subject", default="The Eiffel Tower")
    ap.add_argument("--target", default="Rio de Janeiro")
    ap.add_argument("--out", type=Path, default=OUT, help="where the JSON goes (a quick look: not the committed one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    hp = resolve_hparams("ft-m", {})
    batch = pair_batch(lm.tokenizer, [(args.prompt, args.target)], subjects=[args.subject], subject_last=True)
    wall: dict[str, list[float]] = {o: [] for o in OBJECTIVES}  # every objective, timed in turn
    cpu: dict[str, list[float]] = {o: [] for o in OBJECTIVES}
    with ExitStack() as stack:
        trained = stack.enter_context(trainable(lm.model, get_method("ft-m"), hp))
        stack.enter_context(only_at(trained.edited, trained.unedited, batch.subject_mask))
        inputs = stack.enter_context(skip_frozen_layers(lm.model, first_layer(trained.edited), batch))
        optimizer = torch.optim.Adam(trained.params, lr=hp.lr)

        def step(objective: str) -> None:
            logits = target_logits(lm.model, batch, inputs)  # (N, V)
            loss, _ = objective_loss(objective, logits, batch.labels, hp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for objective in wall:  # warm-up
            step(objective)
        for _ in range(args.steps):
            for objective in wall:
                w, c = time.perf_counter(), time.process_time()
                step(objective)
                wall[objective].append(time.perf_counter() - w)
                cpu[objective].append(time.process_time() - c)
    med = {kind: {k: statistics.median(v) for k, v in d.items()} for kind, d in (("wall", wall), ("cpu", cpu))}
    ratio = {kind: {o: m[o] / m["ce"] for o in m if o != "ce"} for kind, m in med.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"threads": args.threads, "steps": args.steps, "target_tokens": len(batch.labels),
              "median_step_s": med, "ratio": ratio, "commit": commit, "machine": platform.machine(),
              "load_average": list(__import__("os").getloadavg())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"ce {med['cpu']['ce'] * 1000:.1f} ms/step (CPU time)")
    for o in ratio["cpu"]:
        print(f"{o} {med['cpu'][o] * 1000:.1f} ms/step: ratio to ce {ratio['cpu'][o]:.3f}; "
              f"wall-time ratio {ratio['wall'][o]:.3f} (goal ≤ 1.05)")


if __name__ == "__main__":
    main()
