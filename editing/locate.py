"""Locate-then-edit: MEMIT and AlphaEdit on the shared training loop (DESIGN.md, "Editing").

The MLP output projection W (out, in) of each edited block is read as a key→value memory:
the key k of a fact is W's input at the subject's last token, averaged over the fact's
prompt and its model-generated context prefixes. An edit has two steps:

1. value (trained, on editing/train.py's loop with the request's objective, ce or overtone):
   a residual vector δ per fact added to the output of the top edited block at the
   subject's last token, so that the model then predicts the new target. z = h + δ is the
   hidden state the top block should produce for that subject.
2. closed form (here): for each edited block l, bottom to top, the share of z − h_cur that
   is still missing is written into W_l along the keys:
     memit:      ΔW = R Kᵀ (λ C₀ + K Kᵀ)⁻¹
     alphaedit:  ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹
   with K (in, F) the facts' keys, R (out, F) the residuals, C₀ = E[k kᵀ] over generic text
   (editing/keys.py), P the projector onto C₀'s null space (its eigenvectors whose
   eigenvalues fall below a threshold), and K_p the keys of the facts still in effect on the
   branch, joined (weighted by `neighbour_weight`) by every fact's neighbour keys: its prompt's
   other positions and the same prompt about other subjects (editing/neighbours.py).
   AlphaEdit's ΔW annihilates every key C₀ has seen (ΔW k₀ = 0 up to the threshold), so edits
   stacked on a branch leave preserved knowledge, each other and their neighbours in place.

The update has rank ≤ F: it is stored as factors (A = the solved keys, B = R). Each fact's
keys and value go into the delta's `memory`, so that consolidate can reuse the values and
later alphaedit edits can protect the keys without recomputing anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from editing.delta import Delta, LoraFactors
from editing.frozen_layers import SLICEABLE
from editing.hparams import EditHparams
from editing.keys import second_moment
from editing.methods import _BLOCK, is_conv1d, target_modules
from editing.model import LoadedModel
from editing.protected import ProtectedKeys
from editing.tokens import PairBatch

log = logging.getLogger(__name__)


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's block list (llama-style `layers`, GPT-2's `h`)."""
    base = getattr(model, model.base_model_prefix)
    return base.layers if hasattr(base, "layers") else base.h


def default_layers(model: torch.nn.Module) -> list[int]:
    """Five consecutive blocks in the lower third, as MEMIT edits (Llama-3-8B: 4–8 of 32);
    SmolLM2's 30 blocks give 4–8, a tiny test model what fits."""
    n = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    low, high = round(n * 4 / 30), round(n * 8 / 30)
    return list(range(min(low, n - 1), min(high, n - 1) + 1))


def block_of(name: str) -> int:
    return int(_BLOCK.search(name).group(1))


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(out, hidden: torch.Tensor):
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


@dataclass
class Memory:
    """What a locate-then-edit version keeps per fact (rows in the order of its facts)."""

    keys: dict[str, torch.Tensor]  # module name -> (F, in), the key each fact was written along (`fact_keys`)
    values: torch.Tensor  # (F, H) z: the hidden state the top edited block should give at the subject
    own_keys: dict[str, torch.Tensor] = field(default_factory=dict)  # (F, in) its second key (`fact_keys` "both")
    # (F,) bool: the value was trained on a branch head that was not base (editing/session.py); a consolidate,
    # which solves from base, trains it again there (`values_at_base`). None: every value was trained at base.
    on_head: torch.Tensor | None = None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, **{f"keys:{n}": k for n, k in self.keys.items()},
                **{f"own_keys:{n}": k for n, k in self.own_keys.items()},
                **({"on_head": self.on_head} if self.on_head is not None else {})}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Memory | None:
        if "values" not in tensors:
            return None

        def named(prefix: str) -> dict[str, torch.Tensor]:
            return {k.split(":", 1)[1]: t for k, t in tensors.items() if k.startswith(prefix)}

        return cls(keys=named("keys:"), values=tensors["values"], own_keys=named("own_keys:"),
                   on_head=tensors.get("on_head"))

    def fact_keys(self, module: str, row: int) -> list[torch.Tensor]:
        """The keys a fact was written along in `module` (what alphaedit keeps in place)."""
        own = self.own_keys.get(module)
        return [self.keys[module][row]] + ([own[row]] if own is not None else [])


@contextmanager
def residual_values(model: torch.nn.Module, top: int, batch: PairBatch, n_facts: int, hp: EditHparams):
    """Step 1: δ (F, H) trained from zero, added to block `top`'s output at each row's subject
    position (`batch.subject_mask`); row r belongs to fact r % n_facts. Yields
    (params, penalty, project, values): `penalty()` is MEMIT's weight decay ‖δ‖²/‖h‖², `project()`
    clamps each ‖δ‖ to `hp.clamp_norm` · ‖h‖ after a step, `values()` gives z = h + δ (F, H)."""
    block = blocks(model)[top]
    hidden_size = model.config.hidden_size
    device = batch.input_ids.device
    delta = torch.zeros(n_facts, hidden_size, device=device, requires_grad=True)
    fact_of_row = torch.arange(len(batch.input_ids), device=device) % n_facts  # (B,)
    mask = batch.subject_mask  # (B, L): one position per row (the subject's last token)
    own_rows = torch.arange(n_facts, device=device)
    h0: list[torch.Tensor] = []  # block output at the facts' own subject positions, before any change

    def hook(module, args, out):
        hidden = _hidden(out)  # (B, L, H)
        if not h0:
            h0.append(_at_subject(hidden.detach(), mask)[own_rows].float())  # (F, H)
        shift = delta.to(hidden.dtype)[fact_of_row][:, None, :] * mask[..., None]  # (B, L, H)
        return _replace_hidden(out, hidden + shift)

    def penalty() -> torch.Tensor:
        if not h0 or hp.value_decay == 0:
            return delta.sum() * 0
        return hp.value_decay * ((delta.norm(dim=-1) / h0[0].norm(dim=-1)) ** 2).mean()

    def project() -> None:
        with torch.no_grad():
            limit = hp.clamp_norm * h0[0].norm(dim=-1, keepdim=True)  # (F, 1)
            norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)))

    def values() -> torch.Tensor:
        return (h0[0] + delta.detach()).float()  # (F, H)

    handle = block.register_forward_hook(hook)
    try:
        yield [delta], penalty, project, values
    finally:
        handle.remove()


class RowNormalizedGD(torch.optim.Optimizer):
    """Gradient descent on δ (F, H) with each fact's step normalised: δ_f −= lr · √H · g_f / ‖g_f‖.

    Adam scales each coordinate by its own gradient history, so its first steps move every coordinate
    by about lr (a step of length lr·√H in a sign-like direction) and δ grows in directions the loss
    barely asks for. This takes steps of the same length along the gradient itself: the fit is reached
    with a smaller δ (counterfact-dev 0–99: ‖δ‖ 0.45 of ‖h‖ against Adam's 0.77), so the closed form
    writes a smaller ΔW (docs/measurements.md "The value's optimizer")."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    direction = p.grad / p.grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (F, H), unit rows
                    p.add_(direction, alpha=-group["lr"] * p.shape[-1] ** 0.5)


def _at_subject(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H): each row's hidden state at its subject position (the mean if several are set)."""
    weights = mask.to(hidden.dtype)  # (B, L)
    return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)


class _Enough(Exception):
    pass


class KeyRead(NamedTuple):
    keys: torch.Tensor  # (F, in) each fact's key averaged over its contexts (its own prompt among them)
    own_keys: torch.Tensor  # (F, in) the key in the fact's own prompt alone
    top: torch.Tensor  # (F, H) block `top`'s output at the subject in the facts' own prompts
    inputs: list[torch.Tensor]  # per chunk, the input of the `capture` block (empty without one)


@torch.no_grad()
def read_keys_and_top(model: torch.nn.Module, module: torch.nn.Module, top: int, batch: PairBatch, n_facts: int,
                      chunk: int = 64, start: int = 0, inputs: list[torch.Tensor] | None = None,
                      capture: int | None = None) -> KeyRead:
    """`module`'s input at the subject position, averaged over every context of a fact and in its own
    prompt, and block `top`'s output there for the facts' own prompts (batch rows 0…F−1).

    `start`, `inputs`: run from block `start`, fed its input per chunk as cached by an earlier call
    (valid while no block below `start` has changed since): the blocks below are not run again.
    `capture`: also return each chunk's input to that block (else an empty list)."""
    base = getattr(model, model.base_model_prefix)
    layers = blocks(model)
    sliceable = model.config.model_type in SLICEABLE and hasattr(base, "layers")
    if not sliceable:
        start, inputs = 0, None
    keys = torch.zeros(n_facts, module.weight.shape[0 if is_conv1d(module) else 1], device=batch.input_ids.device)
    own, captured = [], []
    for c, (rows, width) in enumerate(_read_chunks(batch, n_facts, chunk)):
        mask = batch.subject_mask[rows, :width]  # (b, width)
        attention_mask = batch.attention_mask[rows, :width]
        keys_only = bool(rows[0] >= n_facts)  # a chunk holds own prompts or contexts, not both
        found: dict[str, torch.Tensor] = {}

        def key_hook(m, args, mask=mask, found=found, keys_only=keys_only):
            found["key"] = _at_subject(args[0].float(), mask)  # (b, in)
            if keys_only and (capture is None or "input" in found):
                raise _Enough

        def capture_hook(m, args, kwargs, found=found):
            found["input"] = args[0] if args else kwargs["hidden_states"]  # (b, L, H)

        def top_hook(m, args, out, mask=mask, found=found):
            found["top"] = _at_subject(_hidden(out).float(), mask)  # (b, H)
            raise _Enough

        handles = [module.register_forward_pre_hook(key_hook), layers[top].register_forward_hook(top_hook)]
        if capture is not None:
            handles.append(layers[capture].register_forward_pre_hook(capture_hook, with_kwargs=True))
        try:
            if start > 0 and inputs is not None:
                base.layers = layers[start:]  # the same block objects; those below are unchanged
                base(inputs_embeds=inputs[c], attention_mask=attention_mask)
            else:
                base(input_ids=batch.input_ids[rows, :width], attention_mask=attention_mask)
        except _Enough:
            pass
        finally:
            if sliceable:
                base.layers = layers
            for h in handles:
                h.remove()
        keys.index_add_(0, rows % n_facts, found["key"])
        if not keys_only:
            own.append((rows, found["key"], found["top"]))
        if capture is not None:
            captured.append(found["input"])
    facts = torch.cat([r for r, _, _ in own])  # (F,) the own prompts in the order they were read
    own_keys, top_out = torch.empty_like(keys), keys.new_empty(n_facts, own[0][2].shape[-1])
    own_keys[facts], top_out[facts] = torch.cat([k for _, k, _ in own]), torch.cat([t for _, _, t in own])
    contexts = len(batch.input_ids) // n_facts
    return KeyRead(keys / contexts, own_keys, top_out, captured)


def _read_chunks(batch: PairBatch, n_facts: int, chunk: int) -> list[tuple[torch.Tensor, int]]:
    """(rows, width) per chunk of a key read: the own prompts (rows 0…F−1) and the contexts' rows (F…) in
    chunks of their own, each sorted by where its subject ends and cut after its last subject token.

    The own prompts are read up to block `top`, the contexts only up to the edited module (5/6 of the rows
    with 5 context prefixes). Attention is causal: no token after a subject changes its key or the output
    above it, so the prompt's rest, the target and the padding to the batch's widest row are not run (a
    rebase of 1,000 counterfact facts runs 77k of the batch's 222k token cells). The same batch gives the
    same chunks, so that cached block inputs line up with them."""
    marked = batch.subject_mask | ~batch.subject_mask.any(1, keepdim=True)  # (B, L) no subject: every column
    ends = (marked * torch.arange(1, marked.shape[1] + 1, device=marked.device)).amax(1)  # (B,) last + 1
    chunks = []
    for group in (torch.arange(n_facts), torch.arange(n_facts, len(ends))):
        group = group.to(ends.device)
        group = group[torch.argsort(ends[group], stable=True)]
        chunks += [(rows, int(ends[rows].max())) for rows in group.split(chunk) if len(rows)]
    return chunks


class NullSpace(NamedTuple):
    basis: torch.Tensor  # U (in, r), orthonormal, float64: AlphaEdit's projector is P = U Uᵀ
    eigenvalues: torch.Tensor  # (r,) C₀'s eigenvalues along U's columns: UᵀC₀U = diag(eigenvalues)


def null_space(c0: torch.Tensor, threshold: float) -> NullSpace:
    """C₀'s eigenvectors whose eigenvalue is below `threshold` · (largest eigenvalue), the directions no
    generic key uses much, with those eigenvalues."""
    eigenvalues, vectors = torch.linalg.eigh(c0.double())  # ascending
    below = eigenvalues < threshold * eigenvalues[-1]
    return NullSpace(vectors[:, below].contiguous(), eigenvalues[below].clamp_min(0))


_SPACES: dict[tuple[int, float], tuple[torch.Tensor, NullSpace]] = {}  # (id(C₀), threshold) -> (C₀, its null space)


def _null_space(c0: torch.Tensor, threshold: float) -> NullSpace:
    key = (id(c0), threshold)
    if key not in _SPACES or _SPACES[key][0] is not c0:  # one eigendecomposition per C₀ and threshold, not per edit
        _SPACES[key] = (c0, null_space(c0, threshold))
    return _SPACES[key][1]


def _basis(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    return _null_space(c0, threshold).basis


def kept_in_place(protected: ProtectedKeys | None, c0: dict[str, torch.Tensor], hp: EditHparams
                  ) -> dict[str, torch.Tensor]:
    """{module: (r, r) float64}, alphaedit's Gram of what each module's update must keep in place, in its
    C₀'s null-space basis: the live facts' keys (K_p), the solved facts' neighbour keys (read for every
    module in one pass) weighted by `neighbour_weight`, and `generic_weight` tokens' worth of C₀ itself."""
    if protected is None and hp.generic_weight == 0:
        return {}
    spaces = {n: _null_space(c, hp.nullspace_threshold) for n, c in c0.items()}
    bases = {n: space.basis for n, space in spaces.items()}
    near = protected.neighbour_grams(bases) if protected is not None and hp.neighbour_weight > 0 else {}
    kept = {}
    for n, U in bases.items():
        gram = protected.gram(n, U) if protected is not None else None
        if n in near:
            gram = hp.neighbour_weight * near[n] + (gram if gram is not None else 0)
        if hp.generic_weight > 0:
            # The null space drops only C₀'s large eigenvalues; the generic energy left in it (a fifth to a
            # third at SmolLM2's blocks 4–8) is held here as if that many generic keys were kept:
            # w · UᵀC₀U, which is diagonal in C₀'s own eigenvectors (no in×in product per edit). (r, r)
            generic = torch.diag(hp.generic_weight * spaces[n].eigenvalues)
            gram = generic + (gram if gram is not None else 0)
        if gram is not None:
            kept[n] = gram
    return kept


def solve_update(closed_form: str, keys: torch.Tensor, residuals: torch.Tensor, c0: torch.Tensor,
                 hp: EditHparams, kept: torch.Tensor | None = None, weights: torch.Tensor | None = None
                 ) -> LoraFactors:
    """The closed form for one layer. keys (F, in), residuals (F, out) → factors of ΔW (out, in).
    `kept`: alphaedit's Gram of the keys to keep in place (`kept_in_place`). `weights` (F,): each key's
    weight in the fit, ‖ΔW kᵢ − rᵢ‖² counted wᵢ² times (None: all 1)."""
    w2 = None if weights is None else (weights.double() ** 2)  # (F,)
    if closed_form == "memit":
        K = keys.T.double()  # (in, F)
        KW = K if w2 is None else K * w2  # (in, F)
        A = hp.mom2_weight * c0.double() + KW @ K.T  # (in, in), symmetric
        solved = torch.linalg.solve(A, KW)  # (in, F) = A⁻¹ K W², so ΔW = R (A⁻¹KW²)ᵀ
    elif closed_form == "alphaedit":
        # M x = P K with M = P C + α I, C = K₁K₁ᵀ + K_pK_pᵀ and P = U Uᵀ. Its solution lies in P's range:
        # x = U z with (Uᵀ C U + α I) z = Uᵀ K, an r × r positive definite system. Uᵀ C U = G Gᵀ with
        # G = Uᵀ K₁ (r, F), and K_p's share kept up to date per branch (editing/protected.py): nothing
        # in×in is formed per edit, and its cost does not grow with the branch (r·in·F + r²·F + r³/3).
        U = _basis(c0, hp.nullspace_threshold)  # (in, r) float64, on C₀'s device (the model's)
        keys = keys.to(U.device)
        G = U.T @ keys.T.double()  # (r, F)
        GW = G if w2 is None else G * w2.to(G.device)  # (r, F)
        gram = GW @ G.T  # (r, r) = G W² Gᵀ
        if kept is not None:
            gram += kept.to(gram.device)
        gram.diagonal().add_(hp.l2)
        z = torch.cholesky_solve(GW, torch.linalg.cholesky(gram))  # (r, F)
        solved = U @ z  # (in, F) = M⁻¹ P K, so ΔWᵀ = M⁻¹ P K Rᵀ
    else:
        raise ValueError(f"unknown closed form {closed_form!r}")
    return LoraFactors(A=solved.T.float().contiguous(), B=residuals.T.float().contiguous(), scale=1.0)


def _stacked(a: LoraFactors | None, b: LoraFactors) -> LoraFactors:
    """a + b as one factor pair (their ranks add): a later pass's update on top of an earlier one's."""
    if a is None:
        return b
    return LoraFactors(A=torch.cat([a.A, b.A]), B=torch.cat([a.B, b.B], dim=1), scale=1.0,
                       fan_in_fan_out=a.fan_in_fan_out)


def closed_form_delta(lm: LoadedModel, closed_form: str, hp: EditHparams, batch: PairBatch, n_facts: int,
                      values: torch.Tensor, live_keys: ProtectedKeys | None = None,
                      on_layer: Callable[[int, int], None] | None = None) -> tuple[Delta, Memory]:
    """Step 2: write z = `values` (F, H) into the edited projections, bottom to top; each layer
    takes an equal share of what is still missing; `hp.passes` repeats the sweep.
    `on_layer(done, total)` after each module's update. The model is left as it was."""
    model = lm.model
    modules = target_modules(model, hp)
    order = sorted(modules, key=block_of)
    top = block_of(order[-1])
    c0 = second_moment(lm, modules, source=hp.c0_source, max_tokens=hp.c0_tokens)
    # Read before any weight changes here (neighbour keys are read on the base weights).
    kept = kept_in_place(live_keys, c0, hp) if closed_form == "alphaedit" else {}
    originals = {n: modules[n].weight.detach() for n in order}  # kept as they are: the update goes to copies
    for n in order:
        modules[n].weight.data = originals[n].clone()
    factors: dict[str, LoraFactors] = {}
    first_keys: dict[str, torch.Tensor] = {}
    first_own: dict[str, torch.Tensor] = {}
    try:
        inputs, start, bottom, missing, written_enough = None, 0, None, None, False
        contexts = len(batch.input_ids) // n_facts
        for sweep in range(hp.passes):
            if bottom is not None:  # a later pass starts again at the lowest edited block
                inputs, start = bottom, block_of(order[0])
            for i, name in enumerate(order):
                # Blocks below `start` are as they were in the last read: run from its cached input.
                read = read_keys_and_top(model, modules[name], top, batch, n_facts, start=start, inputs=inputs,
                                         capture=block_of(name))
                inputs, start = read.inputs, block_of(name)
                if i == 0 and missing is None:  # each fact's residual before any pass (F,)
                    missing = (values.to(read.top.device) - read.top).norm(dim=-1)
                elif i == 0:  # a later pass: how much of it is still unwritten
                    gap = (values.to(read.top.device) - read.top).norm(dim=-1)
                    left = (gap / missing.clamp_min(1e-12)).mean().item()
                    log.info("closed form, before pass %d: %.3f of the values' residual left", sweep + 1, left)
                    written_enough = left < hp.passes_until
                    if written_enough:
                        break
                if bottom is None and hp.passes > 1:  # kept only for a later pass (it is large: every row's input)
                    bottom = read.inputs
                if sweep == 0:
                    first_keys[name], first_own[name] = read.keys, read.own_keys
                residuals = (values.to(read.top.device) - read.top) / (len(order) - i)  # (F, H)
                keys = read.own_keys if hp.fact_keys == "own" else read.keys
                weights = None
                if contexts > 1 and hp.fact_keys == "both":
                    # Without a BOS token the own prompt puts the subject at the sequence's start, where
                    # its key differs from the context average (cosine 0.4–0.9 on SmolLM2): write both.
                    keys, residuals = torch.cat([read.keys, read.own_keys]), torch.cat([residuals, residuals])
                    weights = torch.cat([torch.full((n_facts,), hp.context_key_weight), torch.ones(n_facts)])
                f = solve_update(closed_form, keys, residuals, c0[name], hp, kept.get(name), weights)
                f.fan_in_fan_out = is_conv1d(modules[name])
                factors[f"{name}.weight"] = _stacked(factors.get(f"{name}.weight"), f)
                with torch.no_grad():  # the layers above (and the next pass) see this one's update
                    w = modules[name].weight
                    w.copy_((w.float() + f.dense().to(w.device)).to(w.dtype))
                if on_layer is not None:
                    on_layer(sweep * len(order) + i + 1, hp.passes * len(order))
            if written_enough:  # no later pass: the progress is complete
                if on_layer is not None:
                    on_layer(hp.passes * len(order), hp.passes * len(order))
                break
    finally:
        for n, w in originals.items():
            modules[n].weight.data = w
    written = first_own if hp.fact_keys == "own" else first_keys
    memory = Memory(keys={n: k.cpu() for n, k in written.items()}, values=values.cpu(),
                    own_keys={n: k.cpu() for n, k in first_own.items()}
                    if contexts > 1 and hp.fact_keys == "both" else {})
    return Delta(lora=factors), memory
