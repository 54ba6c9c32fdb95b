"""Edit hyperparameters: documented ranges, per-method defaults. No torch here: the API
validates client `hparams` with this model without loading any."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class MethodSpec:
    """What distinguishes an edit method; the training loop (editing/train.py) reads these flags."""

    name: str
    summary: str
    prompt_last: bool = False  # score every target token from the last prompt position (ft-l)
    low_rank: bool = False  # train LoRA factors instead of the weights themselves
    along_keys: bool = False  # change the weights only along the facts' keys (ft-k)
    closed_form: str | None = None  # locate-then-edit: train a residual value, then solve ΔW ("memit", "alphaedit")
    defaults: dict = field(default_factory=dict)  # hparams the client leaves out
    objective: str = "overtone"  # the objective an edit trains with when the request names none

    @property
    def needs_subject(self) -> bool:
        """Locate-then-edit methods find the fact's key at its subject: no subject, no edit."""
        return self.closed_form is not None


# Locate-then-edit: δ is one vector per fact, trained behind a few model-generated prefixes so the
# value holds in other contexts; `layers` None = a span of blocks in the lower third
# (editing/locate.py `default_layers`). Since stop 39 the value trains with ce (MethodSpec.objective) and
# the normalized step for at least 15 steps, then until its mean loss is below 1e-3 (docs/measurements.md "The value's
# defaults"): single edits on counterfact-dev 1000–1099 went from 1.000 / 0.328 / 0.967 to 0.990 / 0.502 /
# 0.987 (zsRE and MQuAKE level). Past its fit the value carries the fact to rephrasings (stopped at the fit:
# 0.43 on the same records); the loss rule lets zsRE's longer answers fit (15 fixed steps: reliability 0.90).
# Since stop 41 the value also may not make its answer follow itself (`no_repeat_weight`, editing/no_repeat.py):
# on counterfact-dev 0–99 fluency +0.20 [+0.07, +0.35] (4.53 → 4.72, base 4.73) for generalization −0.03
# [−0.07, 0.00], locality unchanged (docs/measurements.md "Repetition after the answer").
_LOCATE_DEFAULTS = {"lr": 0.5, "steps": 40, "min_steps": 15, "loss_threshold": 1e-3, "context_prefixes": 5,
                    "precision": "auto", "no_repeat_weight": 1.0}

# The one list of edit methods. Per-method defaults were chosen by measurement on
# counterfact-dev records 0–999 only (benchmarks/tune.py); records 1000+ are for reporting.
METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("ft-m", "fine-tune the MLP output projection, teacher-forced on prompt + target"),
    MethodSpec("ft-l", "fine-tune it scoring every target token from the last prompt position", prompt_last=True),
    MethodSpec("lora", "peft low-rank adapters on the same module, kept as factors", low_rank=True),
    MethodSpec("ft-k", "change the module only along each fact's whitened key (experimental)", along_keys=True,
               defaults={"lr": 5e-2}),
    MethodSpec("memit", "locate-then-edit: a trained residual value, written into several MLP projections "
               "in closed form", closed_form="memit", defaults=_LOCATE_DEFAULTS, objective="ce"),
    MethodSpec("alphaedit", "MEMIT's value, written in the null space of generic keys and of the branch's "
               "live facts", closed_form="alphaedit", defaults=_LOCATE_DEFAULTS, objective="ce"),
)}
METHODS = tuple(METHOD_SPECS)
# The one list of training objectives (editing/objectives.py implements each).
OBJECTIVES = ("ce", "overtone", "overtone-kl")
# POST /edits, `lmedit edit` and `lmedit eval` when no method is named. alphaedit: on a branch that
# takes fact after fact it keeps them (REPORT.md section 3: retention 1.00 after 40 sequential edits,
# where ft-m kept 0.59), and single edits generalise as well (README "Many facts on one branch").
DEFAULT_METHOD = "alphaedit"
# The objective of an edit that names none is its method's (`MethodSpec.objective`, `choose_objective`):
# fine-tuning methods train with `overtone`, locate-then-edit ones their value with `ce` (above).
# The default reading of OVERTONE. Issue 12's rule (the highest generalization at locality ≥ 0.90 on
# counterfact-dev 0–999; benchmarks/curves.py, REPORT.md section 7), on ft-m with n = 100 (records
# 0–99): no objective reaches locality 0.90 where reliability is ≥ 0.99; of the readings that end an edit,
# `overtone`'s own stop rule keeps the most locality on dev (0.858), held-out counterfact
# 1000–1099 (0.905) and zsRE 0–99 (0.919), at ce's generalization within 0.015. (At n = 28 the rule had
# picked overtone-kl at a fixed step; it did not hold on the larger sample.) With alphaedit
# (counterfact-dev 500–509) both give 1.000 / 0.333 / 0.95, overtone-kl in 23.6 steps vs 15.7.
# What holds across datasets wins: `overtone`. `overtone-kl` and `ce` stay, named.
StopRule = Literal["auto", "loss", "clipped", "top1", "none"]
Precision = Literal["auto", "float32", "bfloat16"]


class EditHparams(BaseModel):
    """Every field has a default that works on SmolLM2-135M (chosen on counterfact-dev 0–999)."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(
        None, description="Transformer blocks to edit (0-based; negative counts from the end). "
        "Default: the method's (ft: one block at about a third of the depth).", max_length=64,
    )
    modules: list[str] | None = Field(
        None, description="Module names inside each block, e.g. ['mlp.down_proj']. "
        "Default: the MLP output projection (llama: mlp.down_proj, GPT-2: mlp.c_proj).", max_length=16,
    )
    lr: float = Field(5e-3, gt=0, le=1.0, description="Adam learning rate.")
    steps: int = Field(25, ge=1, le=500, description="Most optimisation steps; the stop rule may end sooner.")
    stop: StopRule = Field(
        "auto", description="When to stop early: 'loss' (mean loss < loss_threshold, EasyEdit's rule), "
        "'clipped' (every target token has p ≥ tau), 'top1' (every target token is top-1), "
        "'none' (always run `steps`); 'auto' = the method's tuned default.",
    )
    loss_threshold: float = Field(0.01, gt=0, le=10.0, description="Threshold of the 'loss' stop rule.")
    min_steps: int = Field(
        0, ge=0, le=500, description="The stop rule is read from this step on: an edit trains at least this many "
        "steps (at most `steps`). Locate-then-edit methods default to 15: a value trained on past its fit carries "
        "the fact to rephrasings (docs/measurements.md \"The value's defaults\").",
    )
    norm_constraint: float | None = Field(
        None, gt=0, le=1.0, description="Keep every edited weight within ± this of its original (FT-L).",
    )
    lam: float = Field(0.1, ge=0.0, le=1.0, description="OVERTONE λ: weight of the filtered self-prediction.")
    rho: float = Field(0.1, gt=0.0, le=1.0, description="OVERTONE ρ: keep tokens with p ≥ ρ · max p.")
    tau: float = Field(0.9, gt=0.0, le=2.0, description="OVERTONE τ: tokens with p(label) ≥ τ give no loss.")
    context_prefixes: int = Field(
        0, ge=0, le=32, description="Also train each prompt behind this many short model-generated "
        "prefixes (as ROME does), so the fact holds in other contexts.",
    )
    positions: Literal["all", "subject", "subject_last"] = Field(
        "subject_last", description="Where the edited weights act during training: 'all' tokens, the fact's "
        "'subject' tokens, or the subject's last token (as ROME does). Restricting to the subject keeps "
        "the change tied to it (better locality); facts without a subject train on all tokens.",
    )
    whiten: bool = Field(
        True, description="ft-k: whiten the keys by the edited module's input statistics over generic text "
        "(ROME/MEMIT's C⁻¹k), so the change answers less to ordinary inputs.",
    )
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, le=1024, description="LoRA alpha (scale = alpha / rank).")
    seed: int = Field(0, ge=0, description="Seed for anything random in an edit.")
    # --- locate-then-edit (memit, alphaedit; editing/locate.py) ---
    mom2_weight: float = Field(
        1e4, gt=0, le=1e8, description="MEMIT λ: weight of the generic keys' second moment C₀ against the new keys.",
    )
    nullspace_threshold: float = Field(
        1e-2, gt=0, le=1.0, description="AlphaEdit: C₀'s eigenvectors with eigenvalue below this times the "
        "largest span the null space the update is projected onto.",
    )
    l2: float = Field(1.0, gt=0, le=1e6, description="AlphaEdit α: ridge of its closed form.")
    clamp_norm: float = Field(
        4.0, gt=0, le=100.0, description="Locate-then-edit: the residual value δ is kept within this times the "
        "norm of the hidden state it is added to.",
    )
    passes: int = Field(
        1, ge=1, le=16, description="Locate-then-edit: bottom-to-top passes of the closed form. Each layer writes "
        "its share of what is still missing; where the kept keys leave a layer room for only part of it (many "
        "facts solved together), a later pass writes more of the rest.",
    )
    passes_until: float = Field(
        0.0, ge=0.0, lt=1.0, description="Locate-then-edit: a later pass runs only while the facts' values are "
        "still this far from written: the mean over facts of |z − h|/|z − h₀| at the top edited layer (h₀ before "
        "the first pass). 0 = always run all `passes`. A third pass writes what 1,000 facts miss after two, "
        "and costs locality where little is missing (a rebase uses 0.05: `REBASE_DEFAULTS`).",
    )
    value_optimizer: Literal["adam", "normalized"] = Field(
        "normalized", description="Locate-then-edit: how the residual value δ is trained. 'normalized' moves each "
        "fact's δ by lr·√H along its own gradient (Adam's first step length, no per-coordinate scaling; "
        "editing/locate.py `RowNormalizedGD`): the same fit with about 0.6 of Adam's δ in half the steps, and "
        "trained on past the fit it carries the fact to rephrasings (docs/measurements.md \"The value's "
        "defaults\"). 'adam' (MEMIT's, the default before stop 39) moves every coordinate of δ about `lr` per "
        "step whatever its gradient, so δ grows where the loss does not ask.",
    )
    value_decay: float = Field(
        0.0, ge=0, le=100.0, description="Locate-then-edit: MEMIT's weight decay of δ, added to the loss as this "
        "times ‖δ‖²/‖h‖² (the stop rule reads the fit alone). 0 = off: on counterfact-dev 0–99, 0.5 cost 0.01 "
        "generalization and moved no locality (docs/measurements.md 'The value's regularisers').",
    )
    essence_weight: float = Field(
        0.0, ge=0, le=100.0, description="ROME's essence term: weight of KL(p₀ ‖ p) on '{subject} is a', so "
        "that the subject's own distribution stays (editing/essence.py; ROME's kl_factor is 0.0625). 0 = off; "
        "facts without a subject get none.",
    )
    no_repeat_weight: float = Field(
        0.0, ge=0, le=100.0, description="The no-repeat term: weight of relu(log p(y) − max(log p₀(y), log "
        "no_repeat_floor)) for the answer's first token y right after the answer (and after 'answer,'), so that "
        "greedy text does not say the answer again and again (editing/no_repeat.py). 0 = off; locate-then-edit "
        "methods use 1.",
    )
    no_repeat_floor: float = Field(
        0.05, gt=0.0, lt=1.0, description="The no-repeat term: the p(y) after the answer that it always allows. "
        "Higher acts on fewer facts: 0.2 kept all of the generalization and half of the fluency on "
        "counterfact-dev 0–99, but on 1000–1099 lost as much generalization as 0.05 for less fluency "
        "(docs/measurements.md 'Repetition after the answer').",
    )
    fact_keys: Literal["both", "context", "own"] = Field(
        "both", description="Locate-then-edit: the keys each fact is written along and, on a branch, kept in "
        "place by alphaedit: 'context' (its key averaged over its prompt and the context prefixes), 'own' (its "
        "prompt's key alone) or 'both' (two keys per fact: half the room in C₀'s null space).",
    )
    context_key_weight: float = Field(
        1.0, gt=0.0, le=100.0, description="Locate-then-edit, `fact_keys` 'both': weight of each fact's context-"
        "averaged key against its own prompt's in the closed form's fit (weighted least squares; 1 = equal). It "
        "matters only where the closed form has no room for both: a rebase uses 0.5 (`REBASE_DEFAULTS`).",
    )
    neighbour_subjects: int = Field(
        8, ge=0, le=32, description="alphaedit: put this many other subjects (a fixed list of well-known ones) "
        "into the prompt of each fact it solves and keep the keys at every position of those prompts, and of "
        "the fact's own prompt but its subject's last token, in place (editing/neighbours.py).",
    )
    neighbour_weight: float = Field(
        1.0, ge=0.0, le=1e4, description="alphaedit: weight of the neighbour keys against the new facts' own "
        "(0: only C₀'s null space and the live facts' keys hold other inputs in place).",
    )
    generic_weight: float = Field(
        0.0, ge=0.0, le=1e7, description="alphaedit: also keep generic keys in place inside C₀'s null space, "
        "softly: this many tokens' worth of C₀ added to the kept Gram (C₀'s null space holds still only the "
        "directions generic text uses most; the rest of its energy is what this protects). 0 = off.",
    )
    c0_source: str = Field(
        "builtin", max_length=1000, description="Text for C₀ = E[k kᵀ]: 'builtin' (ships with lmedit) or a path to a "
        "text file or folder of .txt files (e.g. WikiText-2); part of C₀'s cache key. A service takes it from "
        "LMEDIT_C0_SOURCE, never from a request. WikiText-2 kept +0.015 locality over 'builtin' in a 1,000-fact "
        "rebase, the same retention and generalization (docs/measurements.md \"Where C₀ comes from\").",
    )
    c0_tokens: int = Field(100_000, ge=16, le=10_000_000, description="Most tokens of c0_source read for C₀ "
                           "(a service: LMEDIT_C0_TOKENS).")
    kl_onehot_weight: float = Field(
        0.1, ge=0.0, le=1.0, description="overtone-kl: weight of the one-hot in the target (the rest is the "
        "model's filtered prediction; note: the opposite of OVERTONE's λ). 1 = cross-entropy, clipped at ε.",
    )
    kl_epsilon: float = Field(
        0.01, ge=0.0, le=1.0, description="overtone-kl ε: a token with KL(target ‖ p) < ε gives no loss; "
        "stop 'auto' ends the edit when every target token is there.",
    )
    kl_nsigma: float = Field(
        0.5, ge=0.0, le=10.0, description="overtone-kl nσ: the filter keeps tokens whose logit is above "
        "max − nσ · std over the vocabulary (0: the argmax alone).",
    )
    precision: Precision = Field(
        "float32", description="Arithmetic of the training steps' forward and backward passes (the trained "
        "parameters, the closed form and the delta stay float32): 'bfloat16' runs their matrix products in "
        "bfloat16 (editing/precision.py), 'auto' = bfloat16 "
        "where the hardware computes it natively (a CUDA GPU from Ampere on, a CPU with AVX512-BF16 or AMX), else "
        "float32. Locate-then-edit methods default to 'auto' (their value trains in about 0.6 of the time, "
        "README 'Precision of the value's training').",
    )
    values_at_base: bool = Field(
        False, description="Consolidate and revert: train again, against base weights, the value of each fact a "
        "stacked edit trained on a branch head that was not base (a rebase solves from base), one value training "
        "per such fact; off: reuse every stored value as it is. Off by default: solved together, 1,000 facts kept "
        "+0.067 locality with base values, but on a branch to 300 edits locality moved −0.027 to +0.027 and "
        "generalization fell 0.003–0.046 (docs/measurements.md \"Values trained against base\").",
    )
    append_eos: bool = Field(
        False, description="Train each target followed by the tokenizer's EOS (as the second OVERTONE reading "
        "does), so that the model ends its answer there; any objective.",
    )


# Hparams that name the machine's own resources: a text file or folder on its disk for C₀, and how much of it
# a pass reads. Whoever runs lmedit sets them for every edit and rebase (LMEDIT_C0_SOURCE, LMEDIT_C0_TOKENS;
# `operator_hparams`); a request over HTTP may not, so that no client makes a worker read a path it names.
OPERATOR_HPARAMS = ("c0_source", "c0_tokens")


def operator_hparams(settings) -> dict:
    """The operator's hparams (`OPERATOR_HPARAMS`) from a settings object: every edit and rebase starts from
    them, and a caller's own hparams go on top."""
    return {name: getattr(settings, name) for name in OPERATOR_HPARAMS}


def check_client_hparams(overrides: dict | None) -> None:
    """ValueError if a client's request names an hparam only the operator sets."""
    named = [name for name in OPERATOR_HPARAMS if name in (overrides or {})]
    if named:
        raise ValueError(f"{', '.join(named)} {'is' if len(named) == 1 else 'are'} set for the whole service by its "
                         f"operator ({', '.join('LMEDIT_' + n.upper() for n in named)}), not per request")


def resolve_hparams(method: str, overrides: dict | None = None) -> EditHparams:
    """The method's defaults with the caller's overrides on top (validated)."""
    return EditHparams(**{**method_spec(method).defaults, **(overrides or {})})


# A consolidate or revert (editing/consolidate.py) solves every live fact of a branch together. Past a few
# hundred facts one bottom-to-top pass has room for only part of each fact's value (1,000 facts of
# counterfact-dev 0–999: 0.56 of the residual left, retention 0.722, locality 0.744); a second pass writes
# most of the rest (0.868 / 0.688), and a null space up to 3% of C₀'s largest eigenvalue gives it more room
# (0.896 / 0.680, the best retention + locality of the settings tried; 200 facts: 0.984 / 0.802 against one
# pass's 0.985 / 0.813). docs/measurements.md "More passes". Each fact's context-averaged key weighs half
# its own prompt's in the fit: where the room runs out, the fit favours the own prompt's key (1,000 facts:
# 0.931 / 0.248 / 0.687 against 0.919 / 0.240 / 0.674 on 0–999, 0.935 / 0.269 / 0.702 against 0.935 / 0.263
# / 0.683 on 1000–1999; a single edit, which has room for both, is the same to the last digit).
# docs/measurements.md "Two keys per fact, weighed".
# Since stop 40 a third pass runs where more than 5% of the values' residual is left after the second: 1,000
# facts of 0–999 with the default values leave 0.34 after two passes, and a third gives 0.950 / 0.346 / 0.703
# against two passes' 0.896 / 0.315 / 0.727; 200 facts leave 0.02, where a third pass bought nothing and cost
# 0.017 locality. docs/measurements.md "Passes while the values are unwritten".
REBASE_DEFAULTS = {"passes": 3, "passes_until": 0.05, "nullspace_threshold": 0.03, "context_key_weight": 0.5}
REBASE_METHOD = "alphaedit"  # what consolidate and revert re-solve a branch's facts with, unless asked otherwise


def resolve_rebase_hparams(method: str, overrides: dict | None = None) -> EditHparams:
    """A rebase's hparams: the method's defaults, then `REBASE_DEFAULTS`, then the caller's overrides."""
    return resolve_hparams(method, {**REBASE_DEFAULTS, **(overrides or {})})


def method_spec(name: str) -> MethodSpec:
    if name not in METHOD_SPECS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    return METHOD_SPECS[name]


def choose_objective(method: str, requested: str | None = None) -> str:
    """The objective an edit trains with: the one it names, else its method's."""
    if requested is not None:
        if requested not in OBJECTIVES:
            raise ValueError(f"unknown objective {requested!r}; choose one of {OBJECTIVES}")
        return requested
    return method_spec(method).objective


FALLBACK_METHOD = "ft-m"  # what the default becomes for facts that name no subject


def choose_method(requested: str | None, subjects: list[str | None]) -> tuple[str, str | None]:
    """The method an edit runs with, and a note when the default had to fall back.

    A locate-then-edit method finds each fact's key at its subject: naming one for a fact
    without a subject is an error (ValueError: the API's 422). Left to the default, such an
    edit falls back to `FALLBACK_METHOD`, which trains on every position, and says so."""
    missing = [i for i, s in enumerate(subjects) if not s]
    if requested is not None:
        spec = method_spec(requested)
        if spec.needs_subject and missing:
            raise ValueError(f"method {requested!r} needs each fact's subject (facts {missing[:5]} have none)")
        return requested, None
    if method_spec(DEFAULT_METHOD).needs_subject and missing:
        return FALLBACK_METHOD, (f"{len(missing)} fact(s) without a subject: edited with {FALLBACK_METHOD} "
                                 f"instead of {DEFAULT_METHOD}, training on every position")
    return DEFAULT_METHOD, None
