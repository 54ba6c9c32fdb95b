"""Text generation from the model as it stands (whatever version is checked out)."""

from __future__ import annotations

import torch

from editing.model import LoadedModel


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Continue each prompt; greedy when temperature is 0. Prompts are batched (left padding)."""
    tok, model = lm.tokenizer, lm.model
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True).to(lm.device)
    finally:
        tok.padding_side = side
    if seed is not None:
        torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
    )  # (B, T + new)
    new = out[:, enc.input_ids.shape[1] :]
    return [tok.decode(row, skip_special_tokens=True) for row in new]
