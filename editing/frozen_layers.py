"""Run the blocks below the first edited one once per edit, not once per step.

During an edit nothing below the first edited block changes, so the input to that
block is the same at every step. For llama-architecture models (SmolLM2) the decoder's
block list is sliced to start there and fed the cached input as `inputs_embeds`: the
same operations on the same tensors, a third less forward work per step for a
layer-10-of-30 edit. Other architectures (GPT-2 adds position embeddings to
`inputs_embeds`) simply run every block.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from editing.tokens import PairBatch

SLICEABLE = {"llama"}


@contextmanager
def skip_frozen_layers(model: torch.nn.Module, first_edited: int, batch: PairBatch):
    """Yields the cached input of block `first_edited`, (B, L, H), or None where not applicable."""
    base = getattr(model, model.base_model_prefix)
    layers = getattr(base, "layers", None)
    if model.config.model_type not in SLICEABLE or layers is None or first_edited <= 0:
        yield None
        return
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = layers[first_edited].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            base(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        handle.remove()
    base.layers = layers[first_edited:]  # an nn.ModuleList of the same block objects
    try:
        yield captured[0].detach()
    finally:
        base.layers = layers
