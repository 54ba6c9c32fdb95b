"""Short model-generated context prefixes (as ROME does), so an edit holds in other contexts.

Generated once per base model (keyed by fingerprint) from fixed seeds with the weights
the model has at first use, then reused by every edit: an edit pays no generation cost.
"""

from __future__ import annotations

import threading

import torch

from editing.model import LoadedModel

_STARTS = ["The", "Therefore", "Because", "I", "You", "However", "In", "It", "We", "This",
           "When", "After", "Many", "A", "Some", "For"]
_cache: dict[str, list[str]] = {}
_lock = threading.Lock()


def context_prefixes(lm: LoadedModel, n: int, length: int = 8) -> list[str]:
    if n <= 0:
        return []
    key = f"{lm.fingerprint}:{length}"
    with _lock:
        have = _cache.get(key, [])
        if len(have) < n:
            have = have + [_generate(lm, _STARTS[i % len(_STARTS)], length, seed=i) for i in range(len(have), n)]
            _cache[key] = have
        return have[:n]


@torch.no_grad()
def _generate(lm: LoadedModel, start: str, length: int, seed: int) -> str:
    """Sample `length` tokens after `start` (top-k 5), deterministic for a seed."""
    tok, model = lm.tokenizer, lm.model
    ids = tok(start, return_tensors="pt").input_ids.to(lm.device)  # (1, T)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(length):
        logits = model(input_ids=ids).logits[0, -1].float().cpu()  # (V,)
        top = logits.topk(5)
        choice = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
        ids = torch.cat([ids, choice.to(ids.device)[None]], dim=1)
    text = tok.decode(ids[0], skip_special_tokens=True)
    return " ".join(text.replace("{", " ").replace("}", " ").split())
