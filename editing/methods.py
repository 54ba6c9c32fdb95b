"""Edit methods: which parameters an edit trains and how its delta is formed.

All methods share one training loop (editing/train.py); they differ only here:
- ft-l: fine-tune chosen MLP weights, every target token scored from the last prompt
  position (EasyEdit's `prompt_last`), usually with a norm constraint;
- ft-m: the same weights, teacher-forced on prompt + target, prompt tokens masked;
- lora: peft low-rank adapters on the chosen modules, teacher-forced; the delta keeps
  the factors (peft's own layer code handles GPT-2's Conv1D via fan_in_fan_out);
- ft-k: the same weights, teacher-forced, but changed only along the facts' keys (the
  module's input at the trained positions, as ROME writes a fact): ΔW = U K̃ᵀ with K̃ the
  keys, fixed, and only U trained. A dense Adam update moves every weight by about
  ±lr, so it answers to any input; this one answers to inputs in proportion to their
  cosine with the keys, so edits stacked on a branch disturb each other and unrelated
  prompts far less. The keys are whitened as ROME/MEMIT do (editing/keys.py). The delta
  is stored as factors (A = K̃, B = U).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

import torch

from editing.delta import Delta, LoraFactors
from editing.hparams import EditHparams, MethodSpec, method_spec

# The MLP output projection, by architecture: where fine-tuning edits go by default.
DEFAULT_MODULES = {"llama": ["mlp.down_proj"], "gpt2": ["mlp.c_proj"], "mistral": ["mlp.down_proj"],
                   "qwen2": ["mlp.down_proj"], "gemma": ["mlp.down_proj"], "phi3": ["mlp.down_proj"]}
_BLOCK = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


Method = MethodSpec  # the one list of methods and their flags lives in editing/hparams.py (torch-free)


def get_method(name: str) -> Method:
    return method_spec(name)


def num_layers(model: torch.nn.Module) -> int:
    config = model.config
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def target_modules(model: torch.nn.Module, hp: EditHparams) -> dict[str, torch.nn.Module]:
    """Modules to edit, by full name: `hp.modules` inside the blocks `hp.layers`."""
    n = num_layers(model)
    layers = hp.layers if hp.layers is not None else [round(n / 3)]
    layers = {layer % n if -n <= layer < n else -1 for layer in layers}
    if -1 in layers:
        raise ValueError(f"layers {hp.layers} out of range: the model has {n} blocks")
    suffixes = hp.modules or DEFAULT_MODULES.get(model.config.model_type)
    if not suffixes:
        raise ValueError(f"no default modules for model type {model.config.model_type!r}: set hparams.modules")
    found = {}
    for name, module in model.named_modules():
        m = _BLOCK.search(name)
        if m and int(m.group(1)) in layers and m.group(2) in suffixes and hasattr(module, "weight"):
            found[name] = module
    wanted = len(layers) * len(suffixes)
    if len(found) != wanted:
        raise ValueError(f"found {len(found)} of {wanted} modules {suffixes} in layers {sorted(layers)}")
    return found


def first_layer(modules: dict[str, torch.nn.Module | None], top: bool = False) -> int:
    """The lowest (`top`: highest) block index among edited modules' names."""
    pick = max if top else min
    return pick(int(_BLOCK.search(name).group(1)) for name in modules)


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's Conv1D stores weights as (in, out): peft needs fan_in_fan_out for it."""
    return type(module).__name__ == "Conv1D"


@contextmanager
def only_at(modules: dict[str, torch.nn.Module], frozen: dict[str, torch.nn.Module], mask: torch.Tensor):
    """While training, let each edited module's change act only where `mask` (B, L) is set:
    elsewhere its output is the unedited module's (`frozen`), so gradients reach the edited
    weights only through those positions."""

    def hook_for(name):
        def hook(module, args, out):
            reference = frozen[name](args[0])  # (B, L, out) the unedited output
            return torch.where(mask[..., None], out, reference)

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def along_keys(modules: dict[str, torch.nn.Module], keys: dict[str, torch.Tensor]):
    """ft-k: add x K̃ᵀ Uᵀ to each module's output, U (out, K) trained from zero, K̃ (K, in) the
    facts' keys (editing/keys.py); yields (params, make_delta)."""
    factors = {}
    for name, m in modules.items():
        out_features = m.weight.shape[1] if is_conv1d(m) else m.weight.shape[0]
        factors[name] = torch.zeros(out_features, len(keys[name]), device=m.weight.device, requires_grad=True)

    def hook_for(name):
        def hook(module, args, out):
            k = keys[name].to(args[0].dtype)  # (K, in)
            return out + (args[0] @ k.T) @ factors[name].to(out.dtype).T  # (B, L, out)

        return hook

    def make_delta() -> Delta:
        return Delta(lora={f"{name}.weight": LoraFactors(A=keys[name].detach().float().clone(),  # (K, in)
                                                          B=factors[name].detach().float().clone(),  # (out, K)
                                                          scale=1.0, fan_in_fan_out=is_conv1d(modules[name]))
                           for name in modules})

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    try:
        yield list(factors.values()), make_delta
    finally:
        for h in handles:
            h.remove()


class Trainable(NamedTuple):
    """What `trainable` yields, for every method."""

    params: list[torch.Tensor]  # what the optimizer trains (weights, LoRA factors, ft-k's U)
    make_delta: Callable[[], Delta]  # the change so far, as a delta (call it inside `trainable`)
    original_weights: dict[str, torch.Tensor]  # {param name: weight before training}: full fine-tuning only
    edited: dict[str, torch.nn.Module]  # {module name: the module the change acts in} (LoRA: peft's layer)
    unedited: dict[str, torch.nn.Module]  # the same modules without the change (copies, or LoRA's base layer)


@contextmanager
def trainable(model: torch.nn.Module, method: Method, hp: EditHparams, keys: dict | None = None):
    """Make the method's parameters trainable; yields a `Trainable`.

    `only_at` uses `edited` and `unedited`; the norm constraint clamps to `original_weights`.
    On exit the model is exactly as before (the original weight tensors back in place, LoRA layers
    removed), whether training succeeded or raised. `make_delta()` must be called inside.
    ft-k needs the facts' `keys` ({module name: (K, in)}, editing/keys.py `fact_keys`).
    """
    modules = target_modules(model, hp)
    if method.along_keys:
        frozen = {name: copy.deepcopy(m) for name, m in modules.items()}
        with along_keys(modules, keys) as (params, make_delta):
            yield Trainable(params, make_delta, {}, modules, frozen)
        return
    if not method.low_rank:
        frozen = {name: copy.deepcopy(m) for name, m in modules.items()}
        params = {f"{name}.weight": m.weight for name, m in modules.items()}
        originals = {name: p.detach() for name, p in params.items()}  # kept as they are, never written:
        for p in params.values():  # training changes private copies, not the (memory-mapped, shared) base
            p.data = p.detach().clone()
            p.requires_grad_(True)

        def make_delta() -> Delta:
            return Delta(dense={n: (p.detach().float() - originals[n].float()) for n, p in params.items()})

        try:
            yield Trainable(list(params.values()), make_delta, originals, modules, frozen)
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.requires_grad_(False)
                    p.data = originals[name]
        return

    from peft import LoraConfig, get_peft_model

    conv = {is_conv1d(m) for m in modules.values()}
    if len(conv) > 1:
        raise ValueError("LoRA modules must be all Linear or all Conv1D")
    config = LoraConfig(
        r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=0.0, bias="none",
        target_modules=sorted(modules), fan_in_fan_out=conv.pop(),
    )
    with torch.random.fork_rng(devices=[]):  # LoRA's A is initialised at random: seeded, locally
        torch.manual_seed(hp.seed)
        peft_model = get_peft_model(model, config)
    try:
        lora_layers = {name: peft_model.base_model.model.get_submodule(name) for name in modules}
        params = [p for layer in lora_layers.values() for p in
                  (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]

        def make_delta() -> Delta:
            return Delta(lora={
                f"{name}.weight": LoraFactors(
                    A=layer.lora_A["default"].weight.detach().float().clone(),  # (r, in)
                    B=layer.lora_B["default"].weight.detach().float().clone(),  # (out, r)
                    scale=float(layer.scaling["default"]),
                    fan_in_fan_out=config.fan_in_fan_out,
                )
                for name, layer in lora_layers.items()
            })

        yield Trainable(params, make_delta, {}, lora_layers, {n: layer.base_layer for n, layer in lora_layers.items()})
    finally:
        peft_model.unload()  # puts the original modules back, unmerged
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(model):
                delattr(model, attr)
