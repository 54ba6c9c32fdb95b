"""The one training loop every edit method shares.

`edit(lm, facts, method, objective, hparams)` trains the method's parameters on the
facts' (prompt, target_new) pairs with the chosen objective, forms the delta, and
leaves the model exactly as it found it (also on error or cancellation). Applying the
delta is the caller's move (`apply_delta`, or a version checkout), so that metrics are
measured on re-materialised weights, never on the trained ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from editing.delta import Delta
from editing.essence import essence_pairs, essence_term
from editing.facts import Fact
from editing.frozen_layers import skip_frozen_layers
from editing.frozen_positions import first_acting_position, freeze_prefix
from editing.hparams import EditHparams, choose_objective, resolve_hparams
from editing.keys import fact_keys
from editing.locate import RowNormalizedGD, blocks, closed_form_delta, default_layers, residual_values
from editing.methods import first_layer, get_method, only_at, target_modules, trainable
from editing.model import LoadedModel
from editing.neighbours import with_own
from editing.no_repeat import no_repeat_pairs, no_repeat_term
from editing.objectives import TokenStats, objective_loss
from editing.precision import bfloat16_linears, resolve_precision
from editing.prefixes import context_prefixes
from editing.protected import ProtectedKeys
from editing.tokens import PairBatch, pair_batch


class EditError(RuntimeError):
    """An edit that could not be made (the model is left unchanged)."""


class EditCanceled(EditError):
    pass


@dataclass
class StepInfo:
    step: int
    steps: int
    loss: float
    p_label: list[float]  # p(target token) of the facts' own prompts, in order
    # The delta as it would be stored if the edit ended at this step (make it only when needed: it
    # copies the edited weights); None for locate-then-edit methods, whose ΔW is solved after training.
    delta: Callable[[], Delta] | None = None
    # Locate-then-edit: the values z (F, H) as they stand at this step (the closed form comes after training).
    values: Callable[[], torch.Tensor] | None = None


@dataclass
class EditResult:
    delta: Delta
    method: str
    objective: str
    hparams: EditHparams
    steps: int  # optimisation steps taken
    stopped_early: bool  # the stop rule fired before `hparams.steps`
    seconds: float  # the edit alone: training and forming the delta
    losses: list[float] = field(default_factory=list)
    trace: list[list[float]] = field(default_factory=list)  # per step: p(target token) of each own token
    target_tokens: list[str] = field(default_factory=list)


def target_logits(model: torch.nn.Module, batch: PairBatch, inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Logits only at the positions that predict target tokens: (N, V).

    Running the LM head on N positions instead of all B·L saves a (B·L, V) matmul per step.
    `inputs`: hidden states to start from instead of token ids (see frozen_layers.py).
    """
    base = getattr(model, model.base_model_prefix)
    if inputs is None:
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    else:
        hidden = base(inputs_embeds=inputs, attention_mask=batch.attention_mask).last_hidden_state  # (B, L, H)
    return model.get_output_embeddings()(hidden[batch.rows, batch.cols])  # (N, V)


def should_stop(rule: str, objective: str, loss: float, stats: TokenStats, hp: EditHparams) -> bool:
    if rule == "auto" and objective == "overtone-kl":
        return bool(stats.clipped.all())  # every token's KL < ε: its mean of max(KL, ε) never drops below ε
    if rule == "auto":
        rule = "clipped" if objective == "overtone" else "loss"
    if rule == "loss":
        return loss < hp.loss_threshold
    if rule == "clipped":
        return bool((stats.p_label >= hp.tau).all())
    if rule == "top1":
        return bool(stats.top1.all())
    return False


def edit(
    lm: LoadedModel,
    facts: list[Fact],
    method: str = "ft-m",
    objective: str | None = None,
    hparams: EditHparams | dict | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    is_canceled: Callable[[], bool] | None = None,
    live_keys: ProtectedKeys | None = None,
    solve: bool = True,
) -> EditResult:
    """Train `facts` into the model's weights and return the delta; the model is left unchanged.

    `live_keys`: keys of the facts already in effect on the branch, which alphaedit keeps in
    place (editing/protected.py); it keeps the edited facts' neighbour keys too (editing/neighbours.py).
    `solve` False (locate-then-edit): train the values only; the delta is empty but for `memory["values"]`."""
    if not facts:
        raise ValueError("an edit needs at least one fact")
    m = get_method(method)
    objective = choose_objective(method, objective)  # None: the method's own
    hp = hparams if isinstance(hparams, EditHparams) else resolve_hparams(method, hparams)
    model, tok = lm.model, lm.tokenizer
    device = lm.device
    if m.closed_form:
        if any(not f.subject for f in facts):
            raise EditError(f"{method} needs every fact's subject: it finds the fact's key there")
        hp = hp.model_copy(update={"positions": "subject_last",
                                   "layers": hp.layers if hp.layers is not None else default_layers(model)})

    hp = resolve_precision(hp, model)

    # The facts' own prompts first, then each behind every context prefix.
    pairs = [(f.prompt, f.target_new) for f in facts]
    own = len(pairs)
    for prefix in context_prefixes(lm, hp.context_prefixes):
        pairs += [(f"{prefix}. {f.prompt}", f.target_new) for f in facts]
    subjects = [f.subject for f in facts] * (len(pairs) // own)
    # Pairs the objective fits come first; after them the rows of the value's regularisers: each answer
    # followed by itself (editing/no_repeat.py), then ROME's "{subject} is a" (editing/essence.py).
    fitted = len(pairs)
    if hp.no_repeat_weight > 0:
        repeated = no_repeat_pairs(facts)
        pairs += repeated
        subjects += [f.subject for f in facts] * (len(repeated) // own)
    no_repeat_rows = range(fitted, len(pairs))
    if hp.essence_weight > 0 and all(f.subject for f in facts):
        pairs += essence_pairs(facts)
        subjects += [f.subject for f in facts]
    essence_rows = range(no_repeat_rows.stop, len(pairs))

    def batch_of(n: int) -> PairBatch:
        return pair_batch(tok, pairs[:n], prompt_last=m.prompt_last, subjects=subjects[:n],
                          subject_last=hp.positions == "subject_last", append_eos=hp.append_eos).to(device)

    batch = batch_of(len(pairs))
    fit = int((batch.seq_of_token < fitted).sum())  # tokens are in pair order: the first `fit` are fitted
    own_tokens = batch.seq_of_token[:fit] < own  # (fit,) tokens of the unprefixed prompts
    no_repeat = no_repeat_term(batch, no_repeat_rows, hp.no_repeat_weight, hp.no_repeat_floor)
    essence = essence_term(batch, essence_rows, hp.essence_weight)

    started = time.perf_counter()
    result = EditResult(delta=Delta(), method=method, objective=objective, hparams=hp, steps=0,
                        stopped_early=False, seconds=0.0,
                        target_tokens=tok.convert_ids_to_tokens(batch.labels[:fit][own_tokens].tolist()))
    penalty = project = values = None
    edited = {n: None for n in target_modules(model, hp)}
    # The lowest block that training runs: the top edited one for a residual value, else the first edited.
    first = first_layer(edited, top=bool(m.closed_form))
    everywhere = not m.closed_form and hp.positions == "all"
    with ExitStack() as stack:
        lowered = stack.enter_context(ExitStack())  # the training passes' precision: closed before the delta
        if hp.precision == "bfloat16":  # blocks up to `first` stay float32: what the value is added to is exact
            below = {id(b) for b in blocks(model)[: first + 1]}
            kept = [name for name, module in model.named_modules() if id(module) in below]
            lowered.enter_context(bfloat16_linears(model, keep=[*edited, *kept]))
        # Positions before the first one the edit acts at never change: cached once, not run per step.
        frozen = None if everywhere else freeze_prefix(model, first, batch, first_acting_position(batch), hp.precision)
        run = frozen.batch if frozen is not None else batch  # the rows training runs, as the edit's hooks see them
        if m.closed_form:  # train the residual value δ at the top edited block; ΔW comes after the loop
            params, penalty, project, values = stack.enter_context(residual_values(model, first, run, own, hp))
            make_delta, originals = None, {}
        else:
            keys = fact_keys(lm, target_modules(model, hp), batch, hp.positions, hp.whiten) if m.along_keys else None
            trained = stack.enter_context(trainable(model, m, hp, keys))
            params, make_delta, originals = trained.params, trained.make_delta, trained.original_weights
            if hp.positions != "all":
                stack.enter_context(only_at(trained.edited, trained.unedited, run.subject_mask))
        inputs = None if frozen is not None else stack.enter_context(skip_frozen_layers(model, first, batch))
        normalized = m.closed_form and hp.value_optimizer == "normalized"  # the residual value's step (README)
        optimizer = RowNormalizedGD(params, hp.lr) if normalized else torch.optim.Adam(params, lr=hp.lr)
        for step in range(hp.steps + 1):  # the extra pass checks the stop rule after the last step
            if is_canceled is not None and is_canceled():
                raise EditCanceled(f"edit canceled at step {step}")
            logits = frozen.logits(model) if frozen is not None else target_logits(model, batch, inputs)  # (N, V)
            loss, stats = objective_loss(objective, logits[:fit], batch.labels[:fit], hp)
            value = loss.item()  # the fit alone: the stop rule and the trace read it
            if no_repeat is not None:
                loss = loss + no_repeat(logits)
            if essence is not None:
                loss = loss + essence(logits)
            if penalty is not None:
                loss = loss + penalty()
            if not math.isfinite(value):
                raise EditError(f"loss became {value} at step {step}; no delta was formed")
            result.losses.append(value)
            result.trace.append(stats.p_label[own_tokens].tolist())
            if on_step is not None:
                on_step(StepInfo(step, hp.steps, value, result.trace[-1], make_delta, values))
            if step == hp.steps:
                break
            if hp.stop != "none" and step >= hp.min_steps and should_stop(hp.stop, objective, value, stats, hp):
                result.stopped_early = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if project is not None:
                project()
            if hp.norm_constraint is not None and originals:
                with torch.no_grad():
                    for p, orig in zip(params, originals.values()):
                        p.copy_(torch.clamp(p, orig - hp.norm_constraint, orig + hp.norm_constraint))
            result.steps += 1
        lowered.close()
        delta = make_delta() if make_delta is not None else None
        z = values() if values is not None else None
    if m.closed_form and not solve:
        delta = Delta(memory={"values": z.cpu()})
    elif m.closed_form:  # with the full model back: the closed form reads keys below the top block
        if m.closed_form == "alphaedit" and hp.neighbour_weight > 0:  # the facts' neighbours stay put too
            live_keys = with_own(lm, hp, facts, live_keys)
        # the keys: the facts' prompts and context prefixes, not the regularisers' rows
        key_rows = batch if fitted == len(pairs) else batch_of(fitted)
        delta, memory = closed_form_delta(lm, m.closed_form, hp, key_rows, own, z, live_keys)
        delta.memory = memory.to_tensors()
    bad = [n for n in delta.names() if not torch.isfinite(delta.change(n)).all()]
    if bad:
        raise EditError(f"edit produced non-finite weights in {bad[:3]}")
    result.delta = delta.to("cpu")
    result.seconds = time.perf_counter() - started
    return result
