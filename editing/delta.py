"""Weight deltas: what an edit changes, as data.

A `Delta` maps parameter names to the change an edit made to them, either dense
(an fp32 tensor of the parameter's shape) or low-rank (LoRA factors, kept as factors).
It serializes to safetensors bytes deterministically, so the version store can name a
delta by the sha256 of its bytes.

Applying and reverting never goes through subtraction: `apply_delta` returns the exact
original tensors it overwrote and `revert` copies them back, so apply + revert leaves
the weights bit-identical (float addition is not invertible).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "lmedit-delta/1"


@dataclass
class LoraFactors:
    """A low-rank change: dense = scale · B @ A, transposed for GPT-2's Conv1D (fan_in_fan_out)."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scale: float
    fan_in_fan_out: bool = False

    def dense(self) -> torch.Tensor:
        change = (self.B.float() @ self.A.float()) * self.scale  # (out, in)
        return change.T.contiguous() if self.fan_in_fan_out else change


@dataclass
class Delta:
    """Per-parameter changes of one edit. Keys are `model.named_parameters()` names."""

    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, LoraFactors] = field(default_factory=dict)
    # Not weights: what a locate-then-edit version keeps per fact (keys, values; editing/locate.py),
    # so that consolidate and later edits reuse them. Checkout never reads it.
    memory: dict[str, torch.Tensor] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(set(self.dense) | set(self.lora))

    def change(self, name: str) -> torch.Tensor:
        """The fp32 change to parameter `name`, in the parameter's own shape."""
        if name in self.dense:
            return self.dense[name].float()
        return self.lora[name].dense()

    def to(self, device: torch.device | str) -> Delta:
        return Delta(
            dense={k: v.to(device) for k, v in self.dense.items()},
            lora={
                k: LoraFactors(f.A.to(device), f.B.to(device), f.scale, f.fan_in_fan_out)
                for k, f in self.lora.items()
            },
            memory={k: v.to(device) for k, v in self.memory.items()},
        )

    # --- serialization -------------------------------------------------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, t in self.dense.items():
            tensors[f"dense:{name}"] = t.detach().float().contiguous().cpu()
        lora_meta = {}
        for name, f in self.lora.items():
            tensors[f"lora_A:{name}"] = f.A.detach().float().contiguous().cpu()
            tensors[f"lora_B:{name}"] = f.B.detach().float().contiguous().cpu()
            lora_meta[name] = {"scale": f.scale, "fan_in_fan_out": f.fan_in_fan_out}
        for name, t in self.memory.items():
            tensors[f"memory:{name}"] = t.detach().float().contiguous().cpu()
        # One metadata key: safetensors writes a header map in no fixed order, and the
        # store names a blob by the sha256 of its bytes, so they must be deterministic.
        metadata = {"lmedit": json.dumps({"format": FORMAT, "lora": lora_meta}, sort_keys=True)}
        return tensors, metadata

    def to_bytes(self) -> bytes:
        tensors, metadata = self.to_tensors()
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> Delta:
        tensors = st_load(data)
        metadata = json.loads(_read_metadata(data).get("lmedit", "{}"))
        if metadata.get("format") != FORMAT:
            raise ValueError(f"not an lmedit delta (format {metadata.get('format')!r})")
        lora_meta = metadata["lora"]
        dense, lora, memory = {}, {}, {}
        for key, t in tensors.items():
            kind, name = key.split(":", 1)
            if kind == "dense":
                dense[name] = t
            elif kind == "memory":
                memory[name] = t
        for name, meta in lora_meta.items():
            lora[name] = LoraFactors(
                tensors[f"lora_A:{name}"], tensors[f"lora_B:{name}"], meta["scale"], meta["fan_in_fan_out"]
            )
        return cls(dense=dense, lora=lora, memory=memory)


def _read_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {})


def apply_delta(model: torch.nn.Module, delta: Delta) -> dict[str, torch.Tensor]:
    """Add `delta` to the model's weights in place; returns the exact originals for `revert`."""
    params = dict(model.named_parameters())
    missing = [n for n in delta.names() if n not in params]
    if missing:
        raise KeyError(f"delta touches parameters the model does not have: {missing[:3]}")
    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in delta.names():
            p = params[name]
            originals[name] = p.detach()  # kept as it is: the parameter gets a new tensor, so that nothing is
            p.data = (p.float() + delta.change(name).to(p.device)).to(p.dtype)  # written into a shared base
    return originals


def revert(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Restore the tensors `apply_delta` (or an edit) saved: exact, by copy."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in originals.items():
            params[name].copy_(t)
