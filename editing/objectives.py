"""Training objectives over target-token logits: `ce` and `overtone` (DESIGN.md).

Both take the logits that predict each target token, (N, V), and the labels, (N,), and
return the loss plus per-token statistics the training loop uses for stopping rules and
the HTO diagnostic. OVERTONE (arXiv 2502.00602) replaces each one-hot label with
r_t = (1 - λ)·onehot(y_t) + λ·q_t, where q_t is the model's own prediction filtered to the
tokens within a factor ρ of its top token and renormalised, and drops tokens whose label
is already fit (p̂(y_t) ≥ τ): cross-entropy would keep pushing those toward 1 and damage
neighbouring knowledge (heterogeneous token overfitting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.hparams import OBJECTIVES


@dataclass
class TokenStats:
    p_label: torch.Tensor  # (N,) p̂(y_t), detached
    top1: torch.Tensor  # (N,) bool: is y_t the argmax
    clipped: torch.Tensor  # (N,) bool: contributes no loss (overtone's clip)


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


def objective_loss(
    name: str, logits: torch.Tensor, labels: torch.Tensor, lam: float, rho: float, tau: float
) -> tuple[torch.Tensor, TokenStats]:
    if name == "ce":
        return ce(logits, labels)
    if name == "overtone":
        return overtone(logits, labels, lam=lam, rho=rho, tau=tau)
    raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
