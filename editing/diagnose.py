"""HTO diagnostic: how fast each target token is fit, under CE and under OVERTONE.

Heterogeneous token overfitting shows as tokens reaching p ≈ 1 at very different steps,
the early ones then pushed on while the late ones catch up. This trains the same fact
with each objective for a fixed number of steps (no early stop) and records p(target
token | context) for every token at every step; `plot` draws one panel per objective.
"""

from __future__ import annotations

import json
from pathlib import Path

from editing.facts import Fact
from editing.model import LoadedModel
from editing.train import edit


def trajectories(
    lm: LoadedModel, fact: Fact, method: str = "ft-m", objectives=("ce", "overtone"),
    hparams: dict | None = None, steps: int = 20,
) -> dict:
    """{"tokens": [...], "objectives": {name: {"p": [[p per token] per step], "loss": [...]}}}"""
    out: dict = {"prompt": fact.prompt, "target": fact.target_new, "method": method, "objectives": {}}
    for objective in objectives:
        hp = {**(hparams or {}), "steps": steps, "stop": "none"}
        r = edit(lm, [fact], method=method, objective=objective, hparams=hp)
        out["tokens"] = r.target_tokens
        out["objectives"][objective] = {"p": r.trace, "loss": r.losses, "hparams": r.hparams.model_dump()}
    out["spread"] = {name: spread(o["p"]) for name, o in out["objectives"].items()}
    return out


def spread(trace: list[list[float]], threshold: float = 0.9) -> dict:
    """Steps between the first and the last token reaching p > threshold, and how far the
    early ones climb meanwhile (their mean p when the last one gets there)."""
    first_hit = []
    for t in range(len(trace[0])):
        hit = next((s for s, ps in enumerate(trace) if ps[t] > threshold), None)
        first_hit.append(hit)
    reached = [h for h in first_hit if h is not None]
    if len(reached) < len(first_hit) or not reached:
        return {"first": min(reached) if reached else None, "last": None, "spread": None, "early_p_at_last": None}
    first, last = min(reached), max(reached)
    early = [trace[last][t] for t, h in enumerate(first_hit) if h < last]
    return {"first": first, "last": last, "spread": last - first,
            "early_p_at_last": sum(early) / len(early) if early else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["objectives"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        trace = result["objectives"][name]["p"]
        for t, token in enumerate(result["tokens"]):
            ax.plot([ps[t] for ps in trace], marker=".", label=repr(token))
        ax.set_title(f"{name}: p(target token) per step")
        ax.set_xlabel("step")
        ax.axhline(0.9, color="grey", lw=0.6, ls="--")
    axes[0][0].set_ylabel("probability")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['prompt']} → {result['target']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, json_path: Path, png_path: Path) -> None:
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path)
