"""Cold checkout against history depth, with keyframes (issue 14 item 6).

One branch of D versions, each a random one-layer dense delta of SmolLM2's size (576×1536 fp32,
3.4 MiB: what a default ft-m edit of SmolLM2 stores, `model.layers.10.mlp.down_proj.weight`), on
a module that holds just that one parameter (the other SmolLM2 tensors would not be read by a
checkout of these versions). The store is written without fsync (setup only; checkouts only read).

Cold checkout: a new `ResidentModel` (empty sum cache) moves a module at base to the version d
deep; the blobs are in the OS page cache (just written). Per depth, K = 0 (no keyframes: every
delta, today's behaviour), K = 20 (the default) and K = 50. A first cold checkout with K writes
the keyframes it needs (timed once); the rows are medians of later cold checkouts, every case
interleaved with the others in each repeat, each bit-compared to `materialize` from the deltas
alone. Depths: 10, and 1000 (a keyframe position: one keyframe read), 1010, and 1019 / 1049 (one
keyframe + K-1 deltas: the worst case).

    python benchmarks/keyframes.py [--repeats 5] [--deep 1000] [--json out.json]   # --deep 100: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from editing.checkout import ResidentModel, materialize  # noqa: E402
from editing.delta import Delta  # noqa: E402
from editing.store import VersionStore  # noqa: E402

SHAPE = (576, 1536)  # SmolLM2-135M mlp.down_proj
NAME = "weight"
GOAL = 2.0  # a version 1,000 deep within 2x of one 10 deep


def module() -> torch.nn.Module:
    m = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 0.02)
    return m


def build(st: VersionStore, depth: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    chain = []
    for i in range(depth):
        delta = Delta(dense={NAME: torch.randn(SHAPE, generator=g) * 1e-3})
        chain.append(st.commit("main", delta, parent=st.head("main"), facts=[], method="ft-m", objective="ce",
                               hparams={}, metrics={})["id"])
        if (i + 1) % 200 == 0:
            print(f"  {i + 1} versions", flush=True)
    return chain


def cold(st: VersionStore, base: torch.nn.Module, vid: str, every: int) -> tuple[float, torch.Tensor, dict]:
    """One cold checkout: seconds, the weight, and the blobs read (counted at the store's public reads)."""
    model = module()
    model.load_state_dict(base.state_dict())
    reads = {"deltas": 0, "keyframes": 0}
    load_delta, load_keyframe = st.load_delta, st.load_keyframe

    def delta(v):
        reads["deltas"] += 1
        return load_delta(v)

    def keyframe(v):
        sums = load_keyframe(v)
        reads["keyframes"] += sums is not None
        return sums

    st.load_delta, st.load_keyframe = delta, keyframe
    try:
        start = time.perf_counter()
        ResidentModel(model, st, keyframe_every=every).checkout(vid)
        seconds = time.perf_counter() - start
    finally:
        del st.load_delta, st.load_keyframe
    return seconds, model.weight.detach().clone(), reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deep", type=int, default=1000, help="the deep version (a multiple of 50)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    deep = args.deep
    depths = [10, deep, deep + 10, deep + 19, deep + 49]
    with tempfile.TemporaryDirectory() as tmp:
        st = VersionStore.open(Path(tmp) / "store", base_fingerprint="k" * 64, durable=False)
        base = module()
        t0 = time.perf_counter()
        chain = build(st, depths[-1])
        print(f"built {depths[-1]} versions in {time.perf_counter() - t0:.1f} s", flush=True)
        references = {}
        for d in depths:
            ref = module()
            ref.load_state_dict(base.state_dict())
            materialize(ref, st, chain[d - 1])
            references[d] = ref.weight.detach().clone()
        first = {every: cold(st, base, chain[-1], every)[0] for every in (20, 50)}  # writes each K's keyframes
        cases = [(every, d) for every in (0, 20, 50) for d in depths if every or d in (10, deep)]
        times: dict[tuple[int, int], list[float]] = {c: [] for c in cases}
        reads, same = {}, dict.fromkeys(cases, True)
        for _ in range(args.repeats):  # interleaved, so that the machine's load hits every case alike
            for every, d in cases:
                seconds, weight, reads[every, d] = cold(st, base, chain[d - 1], every)
                times[every, d].append(seconds)
                same[every, d] &= torch.equal(weight.view(torch.int32), references[d].view(torch.int32))
        rows = []
        for every, d in cases:
            rows.append({"keyframe_every": every, "depth": d, "cold_s": statistics.median(times[every, d]),
                         "all_s": [round(t, 4) for t in times[every, d]], "reads": reads[every, d],
                         "bit_identical_to_materialize": same[every, d]})
            print(json.dumps(rows[-1]), flush=True)
        keyframes = st.keyframes()
        kf_bytes = sum(st.keyframe(v)["bytes"] for v in keyframes)
        delta_bytes = sum(st.get(v)["delta"]["bytes"] for v in chain)

    def at(every: int, d: int) -> float:
        return next(r["cold_s"] for r in rows if r["keyframe_every"] == every and r["depth"] == d)

    result = {
        "what": "cold checkout, one-layer dense deltas of SmolLM2 size (576x1536 fp32), CPU, 1 thread",
        "rows": rows, "repeats": args.repeats,
        "first_cold_checkout_writing_keyframes_s": {f"K={k}": round(v, 3) for k, v in first.items()},
        "deep": deep, "ratio_deep_over_10": {f"K={k}": round(at(k, deep) / at(k, 10), 3) for k in (0, 20, 50)},
        "ratio_worst_over_10": {f"K={k}": round(at(k, deep + k - 1) / at(k, 10), 3) for k in (20, 50)},
        "ratio_deep_plus_10_over_10": {f"K={k}": round(at(k, deep + 10) / at(k, 10), 3) for k in (20, 50)},
        "goal_ratio": GOAL, "keyframes": len(keyframes), "keyframe_bytes_over_delta_bytes":
            round(kf_bytes / delta_bytes, 4), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
