"""Edit hyperparameters: documented ranges, per-method defaults. No torch here: the API
validates client `hparams` with this model without loading any."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

METHODS = ("ft-l", "ft-m", "lora", "ft-k")
OBJECTIVES = ("ce", "overtone")
StopRule = Literal["auto", "loss", "clipped", "top1", "none"]


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
        "all", description="Where the edited weights act during training: 'all' tokens, the fact's "
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


# Per-method defaults: what `hparams` the client leaves out. Chosen by measurement on
# counterfact-dev records 0–999 only (benchmarks/tune.py); records 1000+ are for reporting.
METHOD_DEFAULTS: dict[str, dict] = {
    "ft-m": {"positions": "subject_last"},
    "ft-l": {"positions": "subject_last"},
    "lora": {"positions": "subject_last"},
    "ft-k": {"positions": "subject_last", "lr": 5e-2},
}


def resolve_hparams(method: str, overrides: dict | None = None) -> EditHparams:
    """The method's defaults with the caller's overrides on top (validated)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return EditHparams(**{**METHOD_DEFAULTS[method], **(overrides or {})})
