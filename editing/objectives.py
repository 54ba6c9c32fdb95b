"""Training objectives over target-token logits: `ce`, `overtone` and `overtone-kl` (DESIGN.md).

Each takes the logits that predict each target token, (N, V), and the labels, (N,), and
return the loss plus per-token statistics the training loop uses for stopping rules and
the HTO diagnostic. OVERTONE (arXiv 2502.00602) replaces each one-hot label with
r_t = (1 - λ)·onehot(y_t) + λ·q_t, where q_t is the model's own prediction filtered to the
tokens within a factor ρ of its top token and renormalised, and drops tokens whose label
is already fit (p̂(y_t) ≥ τ): cross-entropy would keep pushing those toward 1 and damage
neighbouring knowledge (heterogeneous token overfitting).

`overtone-kl` is DESIGN.md's "second reading" of the same paper (a third-party
reimplementation's): the target is mostly the model's own top-nσ-filtered prediction with
a little one-hot mixed in, plain one-hot until the new token leads, and the loss is a
forward KL clipped from below at ε, so a token already within ε of its target gets no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.hparams import OBJECTIVES, EditHparams


@dataclass
class TokenStats:
    p_label: torch.Tensor  # (N,) p̂(y_t), detached
    top1: torch.Tensor  # (N,) bool: is y_t the argmax
    clipped: torch.Tensor  # (N,) bool: contributes no loss (overtone's clip, overtone-kl's KL < ε)


def ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, TokenStats]:
    """Mean cross-entropy over target tokens."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    logp_label = logp.gather(1, labels[:, None]).squeeze(1)  # (N,)
    with torch.no_grad():
        stats = TokenStats(
            p_label=logp_label.exp(),
            top1=logp.argmax(-1) == labels,
            clipped=torch.zeros_like(labels, dtype=torch.bool),
        )
    return -logp_label.mean(), stats


def overtone(
    logits: torch.Tensor, labels: torch.Tensor, lam: float = 0.1, rho: float = 0.1, tau: float = 0.9
) -> tuple[torch.Tensor, TokenStats]:
    """DESIGN.md's OVERTONE: mean over target tokens of −Σ_v r_t(v) log p(v), clipped tokens giving 0."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    with torch.no_grad():
        p_hat = logp.exp()  # (N, V) stop-gradient copy of p
        keep = p_hat >= rho * p_hat.max(dim=-1, keepdim=True).values  # (N, V) filtered self-prediction
        q = torch.where(keep, p_hat, torch.zeros_like(p_hat))
        q = q / q.sum(dim=-1, keepdim=True)
        p_label = p_hat.gather(1, labels[:, None]).squeeze(1)  # (N,)
        clipped = p_label >= tau
    # −Σ_v r(v) log p(v) = −(1−λ)·log p(y) − λ·Σ_v q(v) log p(v): no (N, V) one-hot built.
    logp_label = logp.gather(1, labels[:, None]).squeeze(1)  # (N,)
    per_token = -(1.0 - lam) * logp_label - lam * (q * logp).sum(dim=-1)  # (N,)
    per_token = torch.where(clipped, torch.zeros_like(per_token), per_token)
    with torch.no_grad():
        stats = TokenStats(p_label=p_label, top1=p_hat.argmax(-1) == labels, clipped=clipped)
    return per_token.mean(), stats


def overtone_kl(
    logits: torch.Tensor, labels: torch.Tensor, onehot_weight: float = 0.1, epsilon: float = 0.01,
    nsigma: float = 0.5,
) -> tuple[torch.Tensor, TokenStats]:
    """The second reading: mean over target tokens of max(KL(π_tar ‖ p_θ), ε).

    π_flt = softmax over the logits above max − nσ·std (top-nσ; the argmax always kept),
    stop-gradient; π_tar = w·onehot(y) + (1 − w)·π_flt, or onehot(y) where y is not π_tar's
    argmax. `onehot_weight` w weighs the one-hot: the opposite of `overtone`'s λ.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    with torch.no_grad():
        z = logits.detach().float()  # (N, V)
        top = z.max(dim=-1, keepdim=True).values  # (N, 1)
        # "| (z == top)" keeps the argmax even where nσ·std is 0 (nσ = 0, or a flat row).
        keep = (z > top - nsigma * z.std(dim=-1, keepdim=True)) | (z == top)  # (N, V)
        pi_flt = torch.where(keep, z, float("-inf")).softmax(dim=-1)  # (N, V)
        onehot = F.one_hot(labels, z.shape[-1]).float()  # (N, V)
        target = onehot_weight * onehot + (1.0 - onehot_weight) * pi_flt
        # Until the new token leads the target, the target is the one-hot (plain CE then).
        fallback = target.gather(1, labels[:, None]) < target.max(dim=-1, keepdim=True).values  # (N, 1)
        target = torch.where(fallback, onehot, target)
        neg_entropy = torch.xlogy(target, target).sum(dim=-1)  # (N,) Σ π log π, 0·log 0 = 0
    kl = neg_entropy - (target * logp).sum(dim=-1)  # (N,) KL(π_tar ‖ p_θ)
    # clamp's gradient is exactly 0 below `min`: a token within ε of its target is left alone.
    per_token = torch.clamp(kl, min=epsilon)
    with torch.no_grad():
        stats = TokenStats(p_label=logp.gather(1, labels[:, None]).squeeze(1).exp(),
                           top1=logp.argmax(-1) == labels, clipped=kl < epsilon)
    return per_token.mean(), stats


# Each objective of hparams.OBJECTIVES (the one list) with the settings it reads from EditHparams.
_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, EditHparams], tuple[torch.Tensor, TokenStats]]] = {
    "ce": lambda logits, labels, hp: ce(logits, labels),
    "overtone": lambda logits, labels, hp: overtone(logits, labels, lam=hp.lam, rho=hp.rho, tau=hp.tau),
    "overtone-kl": lambda logits, labels, hp: overtone_kl(
        logits, labels, onehot_weight=hp.kl_onehot_weight, epsilon=hp.kl_epsilon, nsigma=hp.kl_nsigma),
}


def objective_loss(
    name: str, logits: torch.Tensor, labels: torch.Tensor, hp: EditHparams | None = None
) -> tuple[torch.Tensor, TokenStats]:
    """The named objective's loss on (N, V) logits and (N,) labels, with its settings taken from `hp`."""
    if name not in OBJECTIVES or name not in _LOSSES:
        raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
    return _LOSSES[name](logits, labels, hp if hp is not None else EditHparams())
