"""How long a closed form's key read takes, against reading whole rows (the read before stop 42).

A consolidate re-solves every live fact of a branch. Per edited block and pass it reads each fact's key
at its subject under its own prompt and 5 context prefixes, and block `top`'s output at the subject of the
prompt itself (editing/locate.py `read_keys_and_top`). The read now cuts each chunk after its last
subject token, sorts rows by where their subject ends, and stops the contexts' rows at the edited module.
This times it, on counterfact-dev records 0…n−1, against the same read over whole rows (each chunk of 64
rows as the batch holds them: prompt, target and the padding to the widest row, every row run up to block
`top`). The two alternate block by block, both from the embeddings, and must read the same keys.

    python benchmarks/key_read.py [--n 1000] [--threads 2]      # results/key_read.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, arguments, run_facts, write_json  # noqa: E402


class _Stop(Exception):
    pass


def whole_rows(model, module, top: int, batch, n_facts: int, chunk: int = 64):
    """(keys averaged over contexts (F, in), block `top`'s output at the own prompts' subjects (F, H)),
    every chunk run as the batch holds it."""
    import torch

    from editing.locate import blocks

    keys, tops = None, []
    for first in range(0, len(batch.input_ids), chunk):
        rows = slice(first, first + chunk)
        weights = batch.subject_mask[rows].float()  # (b, L)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1)
        found = {}

        def key_hook(m, args, weights=weights, found=found):
            found["key"] = torch.einsum("bl,bli->bi", weights, args[0].float())  # (b, in)

        def top_hook(m, args, out, weights=weights, found=found):
            found["top"] = torch.einsum("bl,blh->bh", weights, (out[0] if isinstance(out, tuple) else out).float())
            raise _Stop

        handles = [module.register_forward_pre_hook(key_hook), blocks(model)[top].register_forward_hook(top_hook)]
        try:
            model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows])
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if keys is None:
            keys = torch.zeros(n_facts, found["key"].shape[1])
        keys.index_add_(0, torch.arange(first, first + len(weights)) % n_facts, found["key"])
        tops.append(found["top"])
    return keys / (len(batch.input_ids) // n_facts), torch.cat(tops)[:n_facts]


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=int, default=1000, help="counterfact-dev records 0…n−1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    n = 2 if args.smoke else args.n

    import torch

    from editing.consolidate import key_batch
    from editing.facts import read_cases
    from editing.hparams import resolve_rebase_hparams
    from editing.locate import block_of, default_layers, read_keys_and_top
    from editing.methods import target_modules
    from editing.model import load_model

    lm = load_model("smollm2", device="cpu", threads=args.threads)
    facts = [c.facts[0] for c in read_cases(DATA / "counterfact-dev.json", n=n)]
    hp = resolve_rebase_hparams("alphaedit")
    hp = hp.model_copy(update={"layers": hp.layers if hp.layers is not None else default_layers(lm.model)})
    modules = target_modules(lm.model, hp)
    top = max(map(block_of, modules))
    batch = key_batch(lm, facts, hp)
    whole_s, read_s, diff = [], [], 0.0
    with torch.no_grad():
        for name, module in modules.items():
            t0 = time.perf_counter()
            keys, tops = whole_rows(lm.model, module, top, batch, n)
            t1 = time.perf_counter()
            read = read_keys_and_top(lm.model, module, top, batch, n)
            t2 = time.perf_counter()
            whole_s.append(round(t1 - t0, 2))
            read_s.append(round(t2 - t1, 2))
            for a, b in ((read.keys, keys), (read.top, tops)):
                diff = max(diff, float((a - b).abs().max() / b.abs().max()))
            print(f"{name}: whole rows {t1 - t0:.1f} s, read {t2 - t1:.1f} s", flush=True)
    if diff > 1e-4:
        raise SystemExit(f"the read differs from whole rows by {diff:.2e} of the largest key")
    row = {"n": n, "rows": len(batch.input_ids), "threads": args.threads, "modules": list(modules),
           "whole_rows_s": whole_s, "read_s": read_s, "ratio": round(sum(read_s) / sum(whole_s), 3),
           "max_relative_difference": diff, **run_facts()}
    write_json(args.out / "key_read.json", row)
    print(f"read / whole rows: {row['ratio']:.3f} ({sum(read_s):.1f} s / {sum(whole_s):.1f} s), "
          f"largest difference {diff:.1e}")


if __name__ == "__main__":
    main()
