"""Run only the positions an edit can change, once the rest is cached.

An edit that acts at the subject's last token (ROME/MEMIT's value δ, or ft-m/ft-k/lora with
`positions` "subject_last" or "subject") cannot change anything before the first position where
it acts: in a causal model those hidden states, and the keys and values every attention layer
reads from them, are the same at every step. So the whole batch runs once without gradients,
keeping each block's attention keys and values of those frozen positions and the input of the
first edited block; every training step then runs the blocks from the first edited one on the
remaining positions alone (the subject's last token, the rest of the prompt and the target:
about a third of a prompt behind a context prefix), attending to the cached keys and values.

Rows are laid out so that the frozen positions of every row end at one column S (left-padded
before it, right-padded after): the cache is (B, heads, S, d), the suffix (B, T), and a 4-D
additive mask says which cached and suffix columns each suffix token sees. Position ids stay
each token's own, so rotary embeddings are unchanged. It is the same computation on fewer
tokens; a check against the full forward at the start falls back to it (None) if the installed
transformers or architecture does not give the same logits.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from editing.frozen_layers import SLICEABLE
from editing.tokens import PairBatch

log = logging.getLogger(__name__)
# Logits of the suffix run against the full forward, relative to their largest magnitude, per precision of the
# products (editing/precision.py): float32 agrees to about 1e-6; with bfloat16 products the two runs round
# differently (up to about 1e-2); a wrong mask or cache differs by O(1).
_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


def _cache_kwarg(base: torch.nn.Module) -> str:
    """transformers 5 names the forward's cache `cache`; 4.x names it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers 5
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]  # 4.x


@dataclass
class FrozenPrefix:
    """The suffix of each row that training runs, and what it attends to."""

    batch: PairBatch  # the suffix rows (B, T); rows/cols/labels point into it; what the edit's hooks see
    inputs: torch.Tensor  # (B, T, H) the first edited block's input at the suffix positions
    past: list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys, values (B, kv_heads, S, d) of frozen positions
    position_ids: torch.Tensor  # (B, T) each suffix token's position in its own row
    mask: torch.Tensor  # (B, 1, T, S + T) additive: 0 where a suffix token may attend, the dtype's min elsewhere
    first: int  # the first edited block

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        """(N, V) logits at the positions that predict target tokens, from block `first` up."""
        from transformers import DynamicCache

        base = getattr(model, model.base_model_prefix)
        cache = DynamicCache()
        for i, (k, v) in enumerate(self.past):
            cache.update(k, v, i)  # a fresh cache each step: the forward appends the suffix to it
        layers = base.layers
        base.layers = layers[self.first:]  # the same block objects; those below ran once
        try:
            hidden = base(inputs_embeds=self.inputs, attention_mask=self.mask, position_ids=self.position_ids,
                          use_cache=True, **{_cache_kwarg(base): cache}).last_hidden_state  # (B, T, H)
        finally:
            base.layers = layers
        return model.get_output_embeddings()(hidden[self.batch.rows, self.batch.cols])  # (N, V)


@torch.no_grad()
def freeze_prefix(model: torch.nn.Module, first: int, batch: PairBatch, acts_from: torch.Tensor,
                  precision: str = "float32") -> FrozenPrefix | None:
    """Cache everything before `acts_from` (B,): each row's first position the edit can change.
    None where this does not apply (not a llama-architecture model) or does not reproduce the
    full forward; the caller then runs whole rows."""
    base = getattr(model, model.base_model_prefix)
    layers = getattr(base, "layers", None)
    if model.config.model_type not in SLICEABLE or layers is None:
        return None
    from transformers import DynamicCache

    lengths = batch.attention_mask.sum(1)  # (B,)
    label_start = torch.full_like(lengths, batch.input_ids.shape[1])
    label_start.scatter_reduce_(0, batch.rows, batch.cols, reduce="amin")  # (B,) first position predicting a label
    start = torch.minimum(acts_from.to(lengths), label_start).clamp(0)  # (B,)
    S = int(start.max())
    T = int((lengths - start).max())
    if S == 0:
        return None  # nothing to freeze
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    cache = DynamicCache()
    handle = layers[first].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        full = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True,
                    **{_cache_kwarg(base): cache}).last_hidden_state  # (B, L, H)
    finally:
        handle.remove()
    reference = model.get_output_embeddings()(full[batch.rows, batch.cols])  # (N, V)

    B, L = batch.input_ids.shape
    device = batch.input_ids.device
    # Frozen columns 0…S−1: row r's positions 0…start_r−1, right-aligned at S.
    pre = torch.arange(S, device=device)[None, :] - (S - start[:, None])  # (B, S) source position, < 0 = padding
    pre_valid = pre >= 0
    # Suffix columns 0…T−1: row r's positions start_r … length_r − 1.
    post = start[:, None] + torch.arange(T, device=device)[None, :]  # (B, T)
    post_valid = post < lengths[:, None]
    post_at = post.clamp(max=L - 1)

    def gather_positions(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # t (B, h, L, d), index (B, n)
        idx = index.clamp(min=0)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
        return t.gather(2, idx)

    past = [tuple(gather_positions(x, pre) for x in _layer_kv(cache, i)) for i in range(len(layers))]
    dtype = full.dtype
    see_pre = pre_valid[:, None, :].expand(B, T, S)  # (B, T, S)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    see_post = causal[None] & post_valid[:, None, :]  # (B, T, T)
    allowed = torch.cat([see_pre, see_post], dim=2)[:, None]  # (B, 1, T, S + T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    inputs = captured[0].gather(1, post_at[..., None].expand(-1, -1, captured[0].shape[-1])) if first > 0 \
        else base.embed_tokens(batch.input_ids.gather(1, post_at))  # (B, T, H)
    suffix = PairBatch(
        input_ids=batch.input_ids.gather(1, post_at) * post_valid,
        attention_mask=post_valid.long(),
        rows=batch.rows,
        cols=batch.cols - start[batch.rows],
        labels=batch.labels,
        seq_of_token=batch.seq_of_token,
        subject_mask=batch.subject_mask.gather(1, post_at) & post_valid,
    )
    frozen = FrozenPrefix(suffix, inputs.detach(), past, post_at, mask, first)
    got = frozen.logits(model)
    error = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
    if error > _TOLERANCE[precision]:
        log.warning("frozen-prefix run differs from the full forward (%.2g): running whole rows", error)
        return None
    return frozen


def first_acting_position(batch: PairBatch) -> torch.Tensor:
    """(B,) each row's first position where an edit restricted to the subject mask acts (0 where none is set)."""
    mask = batch.subject_mask
    first = mask.float().argmax(1)  # (B,) first set position (0 when none is set)
    return torch.where(mask.any(1), first, torch.zeros_like(first))
