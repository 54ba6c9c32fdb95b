"""The arithmetic of an edit's training passes: float32, or bfloat16 matrix products.

An edit's training steps are almost all matrix products of a few dozen tokens against the
frozen weights of the blocks above the edit (a locate-then-edit value trains through 22 of
SmolLM2's 30 blocks and its output head). Where the hardware multiplies bfloat16 natively
(a CPU with AVX512-BF16 or AMX, a CUDA GPU from Ampere on), those products take about 0.4 of
float32's time. `bfloat16_linears` runs every frozen `nn.Linear` of the model in bfloat16 for the
length of a `with` block: the weights are cast once (not at every call, as torch.autocast casts
weights that need no gradient), each product's input is cast down and its output back up to
float32, so the residual stream, the embeddings, the norms, attention's softmax and the loss stay float32. (CPU
attention in bfloat16 is slower than in float32 at these sizes: it is not lowered.) The trained
parameters, the closed form and the delta stay float32; the weights are the same objects again
afterwards, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from editing.hparams import EditHparams


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: a CPU with AVX512-BF16 or AMX (oneDNN's own
    bf16 check also says yes on AVX512 CPUs that only emulate it), a CUDA GPU from Ampere on (older
    ones emulate it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # an older torch: no such check, so no claim
            return False
    return False


def resolve_precision(hp: EditHparams, model: torch.nn.Module) -> EditHparams:
    """`precision` "auto" made concrete, so that a version's manifest records what ran."""
    if hp.precision != "auto":
        return hp
    weight = next(model.parameters())
    bf16 = native_bfloat16(weight.device) and all(p.dtype == torch.float32 for p in model.parameters())
    return hp.model_copy(update={"precision": "bfloat16" if bf16 else "float32"})


def _down(module, args, kwargs):
    if args:
        return (args[0].to(torch.bfloat16), *args[1:]), kwargs
    return args, {**kwargs, "input": kwargs["input"].to(torch.bfloat16)}


def _up(module, args, out):
    return out.float()


@contextmanager
def bfloat16_linears(model: torch.nn.Module, keep: Iterable[str] = ()) -> Iterator[None]:
    """Run the model's frozen `nn.Linear`s in bfloat16 inside the block. `keep`: module names
    (and everything under them) left in float32: the modules an edit trains, and the blocks up to the
    one whose output a locate-then-edit value is added to (its h must be float32's: the closed form
    writes z − h with h read in float32; they run once per edit anyway, in the prefix pass)."""
    keep = tuple(keep)
    originals: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    handles = []
    try:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or any(name == k or name.startswith(k + ".") for k in keep):
                continue
            params = {n: p for n, p in (("weight", module.weight), ("bias", module.bias)) if p is not None}
            if any(p.requires_grad or p.dtype != torch.float32 for p in params.values()):
                continue
            for attr, p in params.items():  # a bfloat16 copy in the module's slot: a tied weight (the output
                originals.append((module, attr, p))  # head's, the embeddings') stays float32 where else it is used
                setattr(module, attr, torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
            handles += [module.register_forward_pre_hook(_down, with_kwargs=True), module.register_forward_hook(_up)]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, attr, p in reversed(originals):
            setattr(module, attr, p)
