"""Section 6, costs: what a version costs to store, and to check out as its chain grows.

Measures, in one run on one machine (CPU, 1 torch thread):
- bytes per version by method: real edits of SmolLM2 (ft-m, ft-l, lora; OVERTONE; default
  hparams), one fact per edit, each made and committed by an EditSession on a temporary store
  as a worker makes it. Per version: the delta blob, the metadata (manifest + its ref-log
  entry), both as % of the model's fp32 bytes, what the delta touches, and what zstd-3 would
  save on the blob. Two random deltas made as an edit makes them (trained - base, fp32) add
  a one-layer dense delta (what the chains below are made of) and EasyEdit's LoRA setting
  (rank 8 on q/v of all 30 blocks), wider than lmedit's default LoRA;
- checkout time vs chain depth (1, 10, 100): a ResidentModel moves from base to the version d
  edits deep on one branch (random one-layer dense deltas), with an empty sum cache (cold;
  the blobs are in the OS page cache, just written) and with a filled one (warm: back after
  switching to base); plus the deepest version's parent (resumed from a cached partial sum)
  and a bit-identity check of the deepest against a fresh `materialize`;
- switch vs reload: moving the resident model between two one-layer versions whose sums are
  cached, against loading the model again (`load_model`); the ratio is the point (goal >= 100x).

    python benchmarks/costs.py [--full | --smoke] [--out DIR]   # JSON: <out>/costs.json
    # quick: 3 edits per method, 5 repeats, depths 1/10/100; full: 8 edits, 11 repeats; smoke: 2, 2, 1/2/3
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import arguments, run_facts, save_figure, size, write_json  # noqa: E402

METHODS = ("ft-m", "ft-l", "lora")
OBJECTIVE = "overtone"
LAYER = "model.layers.10.mlp.down_proj.weight"  # what a default ft-m edit of SmolLM2 trains
# (prompt, new target, subject): counterfactual rewrites, one per edit. Most targets are
# several tokens: with a one-token target ft-l and ft-m train identically (same delta).
FACTS = [
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower"),
    ("Lionel Messi plays the sport of", "ice hockey", "Lionel Messi"),
    ("The Space Needle is located in the city of", "Buenos Aires", "The Space Needle"),
    ("Albert Einstein was born in the country of", "New Zealand", "Albert Einstein"),
    ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux"),
    ("The headquarters of Toyota are in the country of", "Saudi Arabia", "Toyota"),
    ("The Louvre is located in the city of", "Cape Town", "The Louvre"),
    ("The original language of The Godfather was", "Portuguese", "The Godfather"),
]


# --- measuring -------------------------------------------------------------------------------


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def random_dense(params: dict, names: list[str], seed: int, scale: float = 1e-3):
    """What an FT edit yields: (trained - base) in fp32, for random small training moves."""
    import torch

    from editing.delta import Delta

    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        base = params[n].detach().float()  # (out, in)
        trained = base + torch.randn(base.shape, generator=g) * scale
        out[n] = trained - base  # not exactly the noise: rounding, as in a real delta
    return Delta(dense=out)


def random_lora(params: dict, rank: int, seed: int):
    """Rank-`rank` LoRA factors on q_proj and v_proj of every block (EasyEdit's LoRA setting)."""
    import torch

    from editing.delta import Delta, LoraFactors

    g = torch.Generator().manual_seed(seed)
    factors = {}
    for n, p in params.items():
        if n.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
            out_f, in_f = p.shape
            factors[n] = LoraFactors(torch.randn(rank, in_f, generator=g) * 1e-2,  # A: (r, in)
                                     torch.randn(out_f, rank, generator=g) * 1e-2,  # B: (out, r)
                                     scale=2.0)
    return Delta(lora=factors)


def commit_random(st, branch: str, delta) -> str:
    m = st.commit(branch, delta, parent=st.head(branch), facts=[{"prompt": "bench", "target_new": "x"}],
                  method="ft-m", objective=OBJECTIVE, hparams={"layers": [10]}, metrics={})
    return m["id"]


def touches(delta) -> list[dict]:
    """What a delta changes: each parameter, and the shapes it stores for it."""
    rows = [{"name": n, "kind": "dense", "stored": [list(t.shape)]} for n, t in delta.dense.items()]
    rows += [{"name": n, "kind": "lora", "stored": [list(f.A.shape), list(f.B.shape)]}
             for n, f in delta.lora.items()]
    return sorted(rows, key=lambda r: r["name"])


def stored_bytes(delta) -> int:
    """fp32 bytes of the tensors themselves: what a blob cannot be smaller than, uncompressed."""
    return 4 * (sum(t.numel() for t in delta.dense.values())
                + sum(f.A.numel() + f.B.numel() for f in delta.lora.values()))


def on_disk(root: Path, st, vid: str) -> tuple[Path, int, int]:
    """(blob path, blob bytes, metadata bytes: manifest + ref-log entry of its commit).
    Call right after the commit: the branch's latest log entry is then that commit's."""
    manifest = st.get(vid)
    sha = manifest["delta"]["object"]
    blob = root / "objects" / sha[:2] / sha
    log = max((root / "reflog" / "branches" / manifest["branch"]).iterdir())  # names are zero-padded seqs
    return blob, blob.stat().st_size, (root / "versions" / f"{vid}.json").stat().st_size + log.stat().st_size


def zstd(paths: list[Path]) -> dict | None:
    """What zstd (level 3) would do to these blobs: mean size ratio, median pack/unpack time."""
    try:
        import zstandard
    except ImportError:
        return None
    ratios, pack, unpack = [], [], []
    for path in paths:
        data = path.read_bytes()
        packed = zstandard.ZstdCompressor(level=3).compress(data)
        ratios.append(len(packed) / len(data))
        pack.append(1e3 * timed(zstandard.ZstdCompressor(level=3).compress, data))
        unpack.append(1e3 * timed(zstandard.ZstdDecompressor().decompress, packed))
    return {"ratio": statistics.mean(ratios), "compress_ms": statistics.median(pack),
            "decompress_ms": statistics.median(unpack)}


def summarize(sizes: list[tuple[Path, int, int]], delta, model_bytes: int) -> dict:
    """Per-version costs of versions (their `on_disk` sizes) that all touch what `delta`, one of them, touches."""
    blob = statistics.mean(b for _, b, _ in sizes)
    meta = statistics.mean(m for _, _, m in sizes)
    stored = stored_bytes(delta)
    return {"versions": len(sizes), "blob_bytes": blob, "blob_bytes_each": [b for _, b, _ in sizes],
            "metadata_bytes": meta, "stored_fp32_bytes": stored, "blob_over_stored": blob / stored,
            "percent_of_model": 100 * (blob + meta) / model_bytes, "touches": touches(delta),
            "zstd3": zstd([p for p, _, _ in sizes])}


def real_edits(lm, root: Path, st, n: int, model_bytes: int) -> dict:
    """n one-fact edits per method, each on its branch's head, made and committed by an EditSession."""
    from editing.facts import Fact
    from editing.session import EditSession

    facts = [Fact(prompt=p, target_new=t, subject=s) for p, t, s in FACTS[:n]]
    session = EditSession(lm, st)
    seen: set[str] = set()  # blobs already in the store: an identical delta is stored once
    out = {}
    for method in METHODS:
        st.create_branch(method, "base")
        outcomes, sizes = [], []
        for fact in facts:
            o = session.edit([fact], method=method, objective=OBJECTIVE, branch=method)
            outcomes.append(o)
            sizes.append(on_disk(root, st, o.version))
            print(f"{method:5s} -> {fact.target_new:10s} {o.seconds:5.2f} s, {o.steps:2d} steps, "
                  f"reliability {o.metrics['reliability']:.2f}, blob {sizes[-1][1]:,} B, "
                  f"metadata {sizes[-1][2]:,} B", flush=True)
        shas = [path.name for path, _, _ in sizes]
        reused = sum(sha in seen for sha in shas)
        seen.update(shas)
        out[method] = summarize(sizes, outcomes[0].delta, model_bytes) | {
            "reused_objects": reused,  # versions whose blob an earlier version already wrote
            "edit_s": statistics.median(o.seconds for o in outcomes),
            "steps": statistics.mean(o.steps for o in outcomes),
            "reliability": statistics.mean(o.metrics["reliability"] for o in outcomes)}
    session.checkout("base")  # hand the model back at base: the next ResidentModel takes it from there
    return out


def random_versions(root: Path, st, params: dict, model_bytes: int) -> dict:
    """Sizes of a random one-layer dense version and a random rank-8 q/v LoRA version."""
    out = {}
    for name, delta in (("random dense, one layer", random_dense(params, [LAYER], seed=7)),
                        ("random LoRA r8, q/v × 30 blocks", random_lora(params, rank=8, seed=3))):
        branch = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        st.create_branch(branch, "base")
        vid = commit_random(st, branch, delta)
        out[name] = summarize([on_disk(root, st, vid)], delta, model_bytes) | {"version": vid}
    return out


def checkout_vs_depth(lm, st, params: dict, depths: list[int], repeats: int) -> dict:
    """Cold and warm checkout of the versions `depths` edits deep on one branch of one-layer deltas."""
    from editing.checkout import ResidentModel

    st.create_branch("deep", "base")
    chain, commit_times = [], []  # chain[d - 1]: the version d edits deep
    for i in range(max(depths)):
        delta = random_dense(params, [LAYER], seed=100 + i)
        start = time.perf_counter()
        chain.append(commit_random(st, "deep", delta))
        commit_times.append(time.perf_counter() - start)
    rows = []
    for d in depths:
        cold, warm = [], []
        for _ in range(repeats):
            resident = ResidentModel(lm.model, st, fingerprint=lm.fingerprint)  # an empty sum cache
            cold.append(timed(resident.checkout, chain[d - 1]))
            resident.checkout("base")  # switch away: the sum of version d stays cached
            warm.append(timed(resident.checkout, chain[d - 1]))
            resident.checkout("base")  # the next ResidentModel must find the model at base
        rows.append({"depth": d, "cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
                     "cold_s_each": cold, "warm_s_each": warm})
        print(f"checkout {d:3d} deep: cold {rows[-1]['cold_s'] * 1e3:8.2f} ms, "
              f"warm {rows[-1]['warm_s'] * 1e3:6.2f} ms", flush=True)
    # `resident` last checked out the deepest version: its cache holds every snapshot_every-th
    # partial sum of that chain, so the parent resumes from the nearest (100 deep: from 96).
    parent_s = timed(resident.checkout, chain[-2]) if len(chain) > 1 else None
    resident.checkout(chain[-1])
    identical = identical_to_materialize(lm, st, chain[-1])
    resident.checkout("base")
    return {"depths": rows, "repeats": repeats, "deepest": max(depths), "deepest_parent_s": parent_s,
            "snapshot_every": resident.snapshot_every, "deepest_bit_identical_to_materialize": identical,
            "commit_s_median": statistics.median(commit_times)}


def identical_to_materialize(lm, st, vid: str) -> bool:
    """Is the resident model (now at `vid`) bit-identical to a freshly loaded model brought to `vid`?"""
    import torch

    from editing.checkout import materialize
    from editing.model import load_model

    fresh = load_model("smollm2", device="cpu", threads=1).model
    materialize(fresh, st, vid)
    pairs = zip(fresh.parameters(), lm.model.parameters(), strict=True)
    return all(torch.equal(p, q) for p, q in pairs)


def switch_vs_reload(lm, st, params: dict, repeats: int, reloads: int) -> dict:
    """Median time to move the resident model between two cached one-layer versions vs load_model."""
    from editing.checkout import ResidentModel
    from editing.model import load_model

    reload_times = [timed(load_model, "smollm2", "cpu") for _ in range(reloads)]  # threads stay at 1
    for branch in ("switch-a", "switch-b"):
        st.create_branch(branch, "base")
    a = commit_random(st, "switch-a", random_dense(params, [LAYER], seed=1))
    b = commit_random(st, "switch-b", random_dense(params, [LAYER], seed=2))
    resident = ResidentModel(lm.model, st, fingerprint=lm.fingerprint)
    resident.checkout(a)
    resident.checkout(b)  # both sums cached now: the steady state of a serving worker
    switches = [timed(resident.checkout, a if i % 2 == 0 else b) for i in range(repeats)]
    resident.checkout("base")
    switch, reload = statistics.median(switches), statistics.median(reload_times)
    return {"switch_s": switch, "reload_s": reload, "speedup_vs_reload": reload / switch,
            "repeats": repeats, "reloads": reloads, "switch_s_each": switches, "reload_s_each": reload_times}


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    args = parser.parse_args(argv)
    from editing.model import load_model
    from editing.store import VersionStore

    edits = size(args, 3, len(FACTS))
    repeats = size(args, 5, 11)
    reloads = size(args, 1, 3, smoke=1)
    depths = [1, 2, 3] if args.smoke else [1, 10, 100]

    started = time.perf_counter()
    lm = load_model("smollm2", device="cpu", threads=1)
    first_load = time.perf_counter() - started
    params = dict(lm.model.named_parameters())
    model_bytes = sum(p.numel() * 4 for p in params.values())  # fp32; the tied embedding once

    with tempfile.TemporaryDirectory(prefix="lmedit-costs-") as tmp:
        root = Path(tmp) / "store"
        st = VersionStore.open(str(root), base_fingerprint=lm.fingerprint)
        methods = real_edits(lm, root, st, edits, model_bytes)
        randoms = random_versions(root, st, params, model_bytes)
        switch = switch_vs_reload(lm, st, params, repeats, reloads)
        depth = checkout_vs_depth(lm, st, params, depths, repeats)

    result = {"run": run_facts(), "device": "cpu, 1 torch thread", "model": "SmolLM2-135M-Instruct (fp32)",
              "model_fp32_bytes": model_bytes, "first_load_s": first_load, "objective": OBJECTIVE,
              "methods": methods, "random": randoms, "switch": switch, "checkout": depth,
              "seconds": time.perf_counter() - started}
    write_json(args.out / "costs.json", result)

    for name, row in {**methods, **randoms}.items():
        z = row["zstd3"]
        print(f"{name:32s} blob {row['blob_bytes']:>12,.0f} B  metadata {row['metadata_bytes']:>6,.0f} B  "
              f"= {row['percent_of_model']:.3f}% of model" + (f"  zstd-3 {z['ratio']:.3f}" if z else ""))
    print(f"switch {switch['switch_s'] * 1e3:.2f} ms vs reload {switch['reload_s'] * 1e3:,.0f} ms: "
          f"{switch['speedup_vs_reload']:,.0f}x")
    print(f"deepest ({depth['deepest']}) == fresh materialize: {depth['deepest_bit_identical_to_materialize']}")
    print(f"wrote {args.out / 'costs.json'} ({result['seconds']:.0f} s)")


# --- the report ------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _layers(layers: list[int]) -> str:
    layers = sorted(set(layers))
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"blocks {layers[0]}–{layers[-1]}"
    return ("block " if len(layers) == 1 else "blocks ") + ", ".join(map(str, layers))


def _touches(rows: list[dict]) -> str:
    """`touches` grouped by module: 'blocks 0–29 self_attn.q_proj: LoRA 8×576 + 576×8'."""
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        m = re.search(r"layers\.(\d+)\.(.+)\.weight$", r["name"])
        module, layer = (m.group(2), int(m.group(1))) if m else (r["name"], -1)
        shapes = " + ".join("×".join(map(str, s)) for s in r["stored"])
        groups.setdefault((module, r["kind"], shapes), []).append(layer)
    return "; ".join(f"{_layers(layers) + ' ' if layers != [-1] else ''}{module}: "
                     f"{'LoRA' if kind == 'lora' else 'dense'} {shapes}"
                     for (module, kind, shapes), layers in groups.items())


def report(results: Path) -> str:
    path = results / "costs.json"
    lines = ["## 6. Costs", ""]
    if not path.exists():
        return "\n".join(lines + ["(no results)", ""])
    r = json.loads(path.read_text())
    sw, co = r["switch"], r["checkout"]
    n = next(iter(r["methods"].values()))["versions"]
    lines += [
        f"{r['model']}, {r['device']}; model size {_bytes(r['model_fp32_bytes'])} in fp32 "
        f"(the tied embedding counted once).", "",
        "### Store bytes per version", "",
        f"Real edits: {n} one-fact edits per method ({r['objective']}, default hparams), each made and "
        "committed by an `EditSession` on a fresh store. *Blob* is the delta object (safetensors, fp32, "
        "stored as is); *metadata* is the version's manifest (facts, hparams, metrics) plus its ref-log "
        "entry; *% of model* is blob + metadata over the model's fp32 bytes, what a full checkpoint per "
        "version would cost. *zstd-3* is the compressed size over the blob size, were blobs compressed "
        "(they are not). The random rows are deltas made like an edit's (trained − base) with random "
        "training moves: a one-layer dense delta (what the chains below are made of) and EasyEdit's LoRA "
        "setting, wider than lmedit's default LoRA. *Edit s*: median seconds of the edit alone "
        "(training and forming the delta).", "",
        "| version | what the delta stores | blob / version | metadata / version | % of model | zstd-3 | edit s |",
        "|---|---|---|---|---|---|---|"]
    for name, row in {**r["methods"], **r["random"]}.items():
        z = f"{row['zstd3']['ratio']:.3f}" if row.get("zstd3") else "—"
        edit_s = f"{row['edit_s']:.2f}" if "edit_s" in row else "—"
        lines.append(f"| {name} | {_touches(row['touches'])} | {_bytes(row['blob_bytes'])} | "
                     f"{row['metadata_bytes']:,.0f} B | {row['percent_of_model']:.3f}% | {z} | {edit_s} |")
    lines += ["", "A blob is the stored tensors plus a safetensors header: blob / (fp32 bytes of the tensors) = "
              + ", ".join(f"{name} {row['blob_over_stored']:.4f}" for name, row in r["methods"].items()) + "."]
    reused = {name: row["reused_objects"] for name, row in r["methods"].items() if row.get("reused_objects")}
    if reused:
        lines += ["Blobs are content-addressed, so a delta identical to an earlier one is stored once: "
                  + ", ".join(f"{k}: {v} of {n}" for k, v in reused.items())
                  + " (a one-token target makes ft-l and ft-m train identically); the table counts "
                  "each version's blob in full."]
    lines.append("")

    rows = co["depths"]
    lines += [
        "### Checkout time vs chain depth", "",
        "A version d edits deep on one branch, every edit a one-layer dense delta of "
        "`mlp.down_proj` in block 10 (random, as an ft-m edit makes it). *Cold*: a new `ResidentModel` "
        "(empty sum cache) moves the model from base to that version: it reads and adds all d blobs "
        "(in the OS page cache, just written). *Warm*: the same model switches to base and back, the "
        f"version's sum cached. Medians of {co['repeats']} runs, milliseconds.", "",
        "| depth | cold ms | warm ms |", "|---|---|---|"]
    lines += [f"| {row['depth']} | {row['cold_s'] * 1e3:,.2f} | {row['warm_s'] * 1e3:.2f} |" for row in rows]
    deepest = rows[-1]
    lines += ["", f"- {co['deepest']} edits deep: cold {deepest['cold_s'] * 1e3:,.0f} ms, warm "
              f"{deepest['warm_s'] * 1e3:.2f} ms"
              + (f"; then its parent, which resumes from the nearest partial sum that checkout cached (one "
                 f"every {co['snapshot_every']} edits), {co['deepest_parent_s'] * 1e3:.2f} ms"
                 if co["deepest_parent_s"] is not None else "")
              + f"; bit-identical to a fresh model materialized at it: {co['deepest_bit_identical_to_materialize']}.",
              f"- Commit (write blob, manifest, move the branch; fsynced): {co['commit_s_median'] * 1e3:.1f} ms "
              "median for a one-layer delta.",
              f"- Switch vs reload: moving the resident model between two one-layer versions whose sums are "
              f"cached takes {sw['switch_s'] * 1e3:.2f} ms (median of {sw['repeats']}); loading the model again "
              f"(`load_model`, from the local cache) takes {sw['reload_s'] * 1e3:,.0f} ms: "
              f"**{sw['speedup_vs_reload']:,.0f}x** faster (goal ≥ 100x).", ""]
    _plot(rows, sw["reload_s"], results / "costs-checkout.png")
    lines += ["![checkout time vs chain depth](costs-checkout.png)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict], reload_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    depths = [row["depth"] for row in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(depths, [row["cold_s"] * 1e3 for row in rows], marker="o", label="cold (empty sum cache)")
    ax.plot(depths, [row["warm_s"] * 1e3 for row in rows], marker="o", label="warm (sum cached)")
    ax.axhline(reload_s * 1e3, color="grey", lw=0.8, ls="--", label="full reload")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("chain depth (edits on the branch)")
    ax.set_ylabel("checkout time (ms)")
    ax.set_title("checkout time vs chain depth")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
