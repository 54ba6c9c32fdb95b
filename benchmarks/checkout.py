"""Checkout benchmark: moving the resident SmolLM2 between versions vs reloading it.

Measures, in one run on one machine:
- switch: median time to move the resident model between two versions whose deltas touch
  one MLP layer (layer 10 down_proj, like a one-layer FT-M edit), against a full reload
  (`load_model` again); the ratio is the point (goal: >= 100x);
- deep: checkout of a version 100 edits deep on one branch, with an empty sum cache (cold;
  the blobs are in the OS page cache, just written) and with a warm one;
- size: bytes on disk per version, as % of the model's fp32 bytes, for a one-layer dense
  edit and a rank-8 LoRA edit (q_proj, v_proj, all 30 layers), and what zstd would save.

Deltas are random but made as an edit makes them: trained weights minus base weights, in fp32.

    python benchmarks/checkout.py [--quick]     # JSON: benchmarks/results/checkout.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.checkout import ResidentModel, materialize  # noqa: E402
from editing.delta import Delta, LoraFactors  # noqa: E402
from editing.model import load_model  # noqa: E402
from editing.store import VersionStore  # noqa: E402

LAYER = "model.layers.10.mlp.down_proj.weight"
RESULTS = Path(__file__).resolve().parent / "results" / "checkout.json"


def edit_delta(params: dict, names: list[str], seed: int, scale: float = 1e-3) -> Delta:
    """What an FT-M edit yields: (trained - base) in fp32, for random small training moves."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        base = params[n].detach().float()
        trained = base + torch.randn(base.shape, generator=g) * scale
        out[n] = trained - base
    return Delta(dense=out)


def lora_delta(params: dict, rank: int, seed: int) -> Delta:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for n, p in params.items():
        if n.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
            out_f, in_f = p.shape
            factors[n] = LoraFactors(torch.randn(rank, in_f, generator=g) * 1e-2,
                                     torch.randn(out_f, rank, generator=g) * 1e-2, scale=2.0)
    return Delta(lora=factors)


def commit(st: VersionStore, branch: str, delta: Delta) -> str:
    m = st.commit(branch, delta, parent=st.head(branch), facts=[{"prompt": "bench", "target_new": "x"}],
                  method="ft-m", objective="overtone", hparams={"layers": [10]}, metrics={})
    return m["id"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def blob_path(root: Path, st: VersionStore, vid: str) -> Path:
    sha = st.get(vid)["delta"]["object"]
    return root / "objects" / sha[:2] / sha


def on_disk(root: Path, st: VersionStore, vid: str) -> tuple[int, int]:
    """(blob bytes, metadata bytes: manifest + the ref log entry of its commit, the branch's latest)."""
    log = max((root / "reflog" / "branches" / st.get(vid)["branch"]).iterdir()).stat().st_size
    return blob_path(root, st, vid).stat().st_size, (root / "versions" / f"{vid}.json").stat().st_size + log


def zstd(path: Path) -> dict | None:
    """What zstd (level 3) would do to a blob: size ratio, compress and decompress time."""
    try:
        import zstandard
    except ImportError:
        return None
    data = path.read_bytes()
    packed = zstandard.ZstdCompressor(level=3).compress(data)
    return {"ratio": len(packed) / len(data),
            "compress_ms": 1e3 * timed(lambda: zstandard.ZstdCompressor(level=3).compress(data)),
            "decompress_ms": 1e3 * timed(lambda: zstandard.ZstdDecompressor().decompress(packed))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, one reload, a 30-deep chain")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats, reloads, depth = (5, 1, 30) if args.quick else (21, 3, 100)

    start = time.perf_counter()
    lm = load_model("smollm2", device="cpu")
    load_time = time.perf_counter() - start
    params = dict(lm.model.named_parameters())
    model_bytes = sum(p.numel() * 4 for p in params.values())  # fp32; the tied embedding once
    reload_times = [timed(lambda: load_model("smollm2", device="cpu")) for _ in range(reloads)]

    with tempfile.TemporaryDirectory(prefix="lmedit-bench-") as tmp:
        root = Path(tmp) / "store"
        st = VersionStore.open(root, base_fingerprint=lm.fingerprint)
        a = commit(st, "main", edit_delta(params, [LAYER], 1))
        st.create_branch("other", "base")
        b = commit(st, "other", edit_delta(params, [LAYER], 2))

        resident = ResidentModel(lm.model, st, fingerprint=lm.fingerprint)
        resident.checkout(a)
        resident.checkout(b)  # both sums are cached now: the steady state of a serving worker
        switches = []
        for i in range(repeats):
            target = a if i % 2 == 0 else b
            switches.append(timed(lambda target=target: resident.checkout(target)))

        st.create_branch("deep", "base")
        commit_times = []
        for i in range(depth):
            delta = edit_delta(params, [LAYER], 100 + i)
            commit_times.append(timed(lambda delta=delta: commit(st, "deep", delta)))
        head = st.head("deep")
        resident.checkout("base")
        cold = ResidentModel(lm.model, st, fingerprint=lm.fingerprint)  # an empty sum cache
        deep_cold = timed(lambda: cold.checkout(head))
        deep_warm = []
        for _ in range(max(3, repeats // 4)):
            cold.checkout(a)
            deep_warm.append(timed(lambda: cold.checkout(head)))
        parent_of_head = st.get(head)["parent"]
        deep_parent = timed(lambda: cold.checkout(parent_of_head))  # resumes from a cached partial sum
        cold.checkout(head)
        fresh = load_model("smollm2", device="cpu").model
        materialize(fresh, st, head)
        pairs = zip(fresh.parameters(), lm.model.parameters(), strict=True)
        deep_identical = all(torch.equal(p, q) for p, q in pairs)
        del fresh
        cold.checkout("base")

        dense_blob, dense_meta = on_disk(root, st, a)
        touched_bytes = params[LAYER].numel() * 4
        dense_zstd = zstd(blob_path(root, st, a))
        st.create_branch("lora", "base")
        lora = lora_delta(params, rank=8, seed=3)
        lora_id = commit(st, "lora", lora)
        lora_blob, lora_meta = on_disk(root, st, lora_id)
        factor_bytes = sum((f.A.numel() + f.B.numel()) * 4 for f in lora.lora.values())
        lora_zstd = zstd(blob_path(root, st, lora_id))
        lora_switch = timed(lambda: cold.checkout(lora_id))
        cold.checkout("base")

    switch = statistics.median(switches)
    reload = statistics.median(reload_times)
    result = {
        "device": "cpu, 1 thread",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "model_fp32_bytes": model_bytes,
        "first_load_s": load_time,
        "reload_s": reload,
        "switch_s": switch,
        "switch_speedup_vs_reload": reload / switch,
        "switch_repeats": repeats,
        "deep_chain_length": depth,
        "deep_checkout_cold_s": deep_cold,
        "deep_checkout_warm_s": statistics.median(deep_warm),
        "deep_checkout_parent_s": deep_parent,
        "deep_bit_identical_to_materialize": deep_identical,
        "commit_s_median": statistics.median(commit_times),
        "dense_one_layer": {
            "tensor": LAYER, "touched_fp32_bytes": touched_bytes, "blob_bytes": dense_blob,
            "blob_over_touched": dense_blob / touched_bytes, "metadata_bytes": dense_meta,
            "percent_of_model": 100 * (dense_blob + dense_meta) / model_bytes, "zstd3": dense_zstd,
        },
        "lora_rank8_q_v_all_layers": {
            "tensors": len(lora.lora), "factor_fp32_bytes": factor_bytes, "blob_bytes": lora_blob,
            "blob_over_factors": lora_blob / factor_bytes, "metadata_bytes": lora_meta,
            "percent_of_model": 100 * (lora_blob + lora_meta) / model_bytes, "zstd3": lora_zstd,
            "checkout_from_base_s": lora_switch,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    d, lo = result["dense_one_layer"], result["lora_rank8_q_v_all_layers"]
    rows = [
        ("full reload (load_model)", f"{reload * 1e3:,.0f} ms"),
        ("switch between two one-layer versions", f"{switch * 1e3:.2f} ms  ({reload / switch:,.0f}x faster)"),
        (f"checkout {depth} edits deep, cold cache", f"{deep_cold * 1e3:,.0f} ms"),
        (f"checkout {depth} edits deep, warm cache", f"{result['deep_checkout_warm_s'] * 1e3:.2f} ms"),
        ("checkout its parent (partial sum cached)", f"{deep_parent * 1e3:.2f} ms"),
        ("deep checkout == fresh materialize", str(deep_identical)),
        ("one-layer dense version on disk", f"{d['blob_bytes'] + d['metadata_bytes']:,} B = "
         f"{d['percent_of_model']:.3f}% of model; blob/touched {d['blob_over_touched']:.4f}"),
        ("rank-8 LoRA (q,v x 30 layers) on disk", f"{lo['blob_bytes'] + lo['metadata_bytes']:,} B = "
         f"{lo['percent_of_model']:.3f}% of model; blob/factors {lo['blob_over_factors']:.4f}"),
    ]
    if d["zstd3"] and lo["zstd3"]:
        z, zl = d["zstd3"], lo["zstd3"]
        rows.append(("zstd-3 size ratio dense / LoRA", f"{z['ratio']:.3f} / {zl['ratio']:.3f} (dense: "
                     f"{z['compress_ms']:.0f} ms to pack, {z['decompress_ms']:.0f} ms to unpack)"))
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
