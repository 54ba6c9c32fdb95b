"""A version's weights for other engines (hf, gguf, peft), and a PEFT adapter imported as a version.

Formats (W_v = base + S_v exactly as editing/checkout.py materialises it; the model handed to the
writers is already checked out at v):
- hf:   merged safetensors checkpoint + config + tokenizer: plain transformers loads it with logits
        identical (fp32) to the checkout. `save_pretrained` refuses GGUF-loaded models, so the state
        dict, config and tokenizer are written separately (as editing/model.py writes its fp32 cache).
- gguf: the base GGUF the model came from, metadata and tokenizer copied, with every tensor some
        version of the chain touched rewritten as F32 (llama's q/k permuted back to llama.cpp's
        layout) and every other tensor copied byte for byte in its original type. lmedit's base *is*
        the dequantized GGUF, so transformers' `gguf_file=` reads back exactly the checkout's weights.
- peft: the chain as one LoRA adapter, where every delta is low rank: per module the factors are
        stacked (A's concatenated, B's concatenated with their scales folded in, zero-padded to one
        rank r with lora_alpha = r, so scaling is exactly 1 and vLLM / LoRAX, which take a single r,
        accept it). LoRA computes Wx + B(Ax), not (W + BA)x: equal up to float rounding.

Exports kept in the store (written by a worker, streamed by the API; both torch-free here):

    exports/<version>/<format>.json     the record: {version, format, files: [{name, sha256, bytes}]}
    exports/blobs/<sha[:2]>/<sha256>    each file, named by the sha256 of its bytes

Files are written first, the record last: a record exists only once all its files do. A version is
immutable, so its record is reused forever.

This module imports neither torch nor numpy at import time (the API reads records without them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from editing.delta import Delta
    from editing.session import EditSession
    from editing.store import VersionStore

FORMATS = ("hf", "gguf", "peft")
FOLDER_FORMATS = ("hf", "peft")  # several files: streamed over HTTP as a tar
RECORD_FORMAT = "lmedit-export/1"
GGUF_NAME = "model.gguf"
# transformers' GGUF loader: the llama processor un-permutes q/k (undone here); an architecture with any
# other processor or conversion changes tensors on load in ways this writer does not undo, and is refused.
_PERMUTED_ARCHS = ("llama",)


class ExportError(Exception):
    """This version cannot be exported in this format (a dense delta as peft, a base that is not a GGUF as
    gguf, an architecture the writer does not know). The API answers 409 with this message."""


# --- which deltas make a version ----------------------------------------------------------------


def delta_chain(store: VersionStore, version: str) -> list[str]:
    """The ids of the versions whose deltas sum to S_v (ancestry order, base and empty ones left out): from
    the last rebase version (consolidate, revert: S = its own delta)."""
    return [v for v in store.weights_chain(version) if store.get(v)["delta"] is not None]


def low_rank_chain(store: VersionStore, version: str) -> list[str]:
    """`delta_chain`, or ExportError if a delta of it is not all LoRA factors (manifests only: torch-free)."""
    chain = delta_chain(store, version)
    dense = [v for v in chain if store.get(v)["delta"].get("kind") != "lora"]
    if dense:
        m = store.get(dense[0])
        raise ExportError(
            f"version {store.resolve(version)} cannot be a LoRA adapter: its ancestor {dense[0]} "
            f"({m['method']}) has a {m['delta'].get('kind')} delta (export it as hf or gguf instead)"
        )
    if not chain:
        raise ExportError(f"version {store.resolve(version)} changes nothing: there is no adapter to write")
    return chain


def touched(store: VersionStore, version: str) -> set[str]:
    """Parameter names that any version of the chain changes."""
    return {n for v in delta_chain(store, version) for n in store.touched(v)}


# --- hf ---------------------------------------------------------------------------------------------


def write_hf(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    """The model's current weights as an HF folder: safetensors (sharded above 5 GB), config, tokenizer."""
    from huggingface_hub import save_torch_state_dict

    out.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied weights share storage: stored once, tied again on load
            continue
        seen.add(t.data_ptr())
        state[name] = t.detach().cpu()
    save_torch_state_dict(state, out, metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-loaded config describes the file it came from
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- gguf -------------------------------------------------------------------------------------------


def base_gguf(source: str | None) -> Path:
    """The GGUF file a model source names: the embedded SmolLM2's, or a .gguf path. ExportError otherwise."""
    from editing.model import EMBEDDED, embedded_gguf_path

    if source in (None, "", EMBEDDED):
        return embedded_gguf_path()
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise ExportError(f"gguf export copies the base model's GGUF file, and the model {source!r} was not loaded "
                      "from one (export hf and convert it with llama.cpp's convert_hf_to_gguf.py)")


def llama_permute(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py, LlamaModel.permute); transformers undoes it on
    load (LlamaTensorProcessor._reverse_permute_weights). w: (n_head * head_dim, in), numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_gguf_arch(arch: str) -> None:
    try:
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:  # older transformers: no per-architecture conversions
        GGUF_ARCHS = {}
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    if arch in GGUF_ARCHS or (arch in TENSOR_PROCESSORS and arch not in _PERMUTED_ARCHS):
        raise ExportError(f"gguf export of architecture {arch!r} is not supported: transformers rewrites its "
                          "tensors on load in ways this writer does not undo (export hf instead)")


def _gguf_tensors(model: torch.nn.Module, arch: str, names: Iterable[str]) -> dict[str, Any]:
    """{GGUF tensor name: F32 numpy array in llama.cpp's layout} for the HF parameters `names`."""
    import gguf

    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise ExportError(f"the gguf package does not know architecture {arch!r}")
    name_map = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    params = dict(model.named_parameters())
    out = {}
    for hf_name in sorted(names):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF tensor name for {hf_name!r} ({arch})")
        w = params[hf_name].detach().float().cpu().numpy()  # (out, in): numpy order, the writer reverses it
        if arch in _PERMUTED_ARCHS and ".attn_q." in gguf_name:
            w = llama_permute(w, model.config.num_attention_heads)
        elif arch in _PERMUTED_ARCHS and ".attn_k." in gguf_name:
            w = llama_permute(w, model.config.num_attention_heads, model.config.num_key_value_heads)
        out[gguf_name] = w.copy()
    return out


def write_gguf(model: torch.nn.Module, base: Path, out: Path, changed: Iterable[str]) -> None:
    """`base` with the tensors of `changed` (HF parameter names) replaced by the model's, as F32.

    Metadata (tokenizer, chat template, hyperparameters) is copied field by field, as gguf's own
    gguf_new_metadata.py does; untouched tensors keep their bytes and quantization type."""
    import gguf

    reader = gguf.GGUFReader(base, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    _check_gguf_arch(arch)
    new = _gguf_tensors(model, arch, changed)
    missing = sorted(set(new) - {t.name for t in reader.tensors})
    if missing:
        raise ExportError(f"the base GGUF has no tensor {missing[0]!r} to replace")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    for t in reader.tensors:
        if t.name in new:
            w = new[t.name]
            writer.add_tensor_info(t.name, w.shape, w.dtype, w.nbytes, gguf.GGMLQuantizationType.F32)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        if t.name in new:
            writer.write_tensor_data(new[t.name])
        else:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


# --- peft -------------------------------------------------------------------------------------------


def stack_lora(deltas: list[Delta]) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """{parameter: (A (R, in), B (out, R), fan_in_fan_out)} with B @ A = Σ scale_i · B_i @ A_i over the
    deltas' factors of that parameter, and R the largest stacked rank (smaller stacks are zero-padded)."""
    import torch

    parts: dict[str, list] = {}
    for delta in deltas:
        for name, f in delta.lora.items():
            parts.setdefault(name, []).append(f)
    stacked = {}
    for name, factors in parts.items():
        if len({f.fan_in_fan_out for f in factors}) > 1:
            raise ExportError(f"the factors of {name} disagree on fan_in_fan_out")
        a = torch.cat([f.A.float() for f in factors], dim=0)  # (R_name, in)
        b = torch.cat([f.B.float() * f.scale for f in factors], dim=1)  # (out, R_name)
        stacked[name] = (a, b, factors[0].fan_in_fan_out)
    rank = max(a.shape[0] for a, _, _ in stacked.values())
    for name, (a, b, fan) in stacked.items():  # zero rows/columns add exact zeros: the product is unchanged
        pad = rank - a.shape[0]
        stacked[name] = (torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad)), fan)
    return stacked


def write_peft(store: VersionStore, version: str, out: Path, base_model: str | None = None) -> None:
    """The version's chain as a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    stacked = stack_lora([store.load_delta(v) for v in low_rank_chain(store, version)])
    if len({fan for _, _, fan in stacked.values()}) > 1:
        raise ExportError("a LoRA adapter has one fan_in_fan_out: these deltas mix Linear and Conv1D modules")
    rank = next(iter(stacked.values()))[0].shape[0]
    tensors = {}
    for name, (a, b, _) in stacked.items():
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",  # scaling = alpha / r = 1
        target_modules=sorted(n.removesuffix(".weight") for n in stacked),
        fan_in_fan_out=next(iter(stacked.values()))[2], base_model_name_or_path=base_model,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})


# --- one entry point --------------------------------------------------------------------------------


def export(session: EditSession, version: str, fmt: str, out: Path, source: str | None = None) -> str:
    """Write version `version` of the session's store in format `fmt` to `out` (a folder for hf and peft,
    the file for gguf). `source`: the model source the session's model was loaded from (gguf: the base
    file; peft: recorded as base_model_name_or_path). Returns the version id."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    store = session.store
    vid = store.resolve(version)
    if fmt == "peft":
        write_peft(store, vid, out, base_model=source)
        return vid
    base = base_gguf(source) if fmt == "gguf" else None  # refused before the checkout, not after
    session.checkout(vid)
    if fmt == "hf":
        write_hf(session.lm.model, session.lm.tokenizer, out)
    else:
        write_gguf(session.lm.model, base, out, touched(store, vid))
    return vid


# --- import -----------------------------------------------------------------------------------------


def _check_adapter_config(config: Any) -> None:
    problems = []
    if str(getattr(config, "peft_type", "")) not in ("LORA", "PeftType.LORA"):
        problems.append(f"peft_type is {config.peft_type}, not LORA")
    if getattr(config, "use_dora", False):
        problems.append("DoRA adapters rescale the weight's norm: not a sum of factors")
    if getattr(config, "bias", "none") != "none":
        problems.append(f"bias={config.bias!r} trains biases too")
    if getattr(config, "modules_to_save", None):
        problems.append(f"modules_to_save {config.modules_to_save} replaces whole modules")
    if problems:
        raise ExportError("cannot import this adapter as LoRA factors: " + "; ".join(problems))


def read_adapter(model: torch.nn.Module, path: Path) -> Delta:
    """A PEFT LoRA adapter folder as a Delta of LoraFactors on `model`'s parameters (scales as peft computes
    them: rank_pattern, alpha_pattern, rsLoRA). The model is left exactly as it was."""
    import torch
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights

    from editing.delta import Delta, LoraFactors

    path = Path(path)
    _check_adapter_config(PeftConfig.from_pretrained(path))
    weights = load_peft_weights(str(path), device="cpu")
    peft_model = PeftModel.from_pretrained(model, path)
    try:
        lora = {}
        for name, layer in peft_model.base_model.model.named_modules():
            if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
                continue
            if not isinstance(layer.lora_A["default"], torch.nn.Linear):
                raise ExportError(f"module {name}: only LoRA on Linear / Conv1D weights can be imported")
            lora[f"{name}.weight"] = LoraFactors(
                A=layer.lora_A["default"].weight.detach().float().cpu().clone(),  # (r, in)
                B=layer.lora_B["default"].weight.detach().float().cpu().clone(),  # (out, r)
                scale=float(layer.scaling["default"]), fan_in_fan_out=bool(layer.fan_in_fan_out),
            )
    finally:
        peft_model.unload()  # puts the original modules back, unmerged
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(model):
                delattr(model, attr)
    # Every tensor of the file must have landed in a layer (peft only warns about keys it could not place).
    placed = {f"base_model.model.{n.removesuffix('.weight')}.lora_{k}.weight": getattr(f, k)
              for n, f in lora.items() for k in ("A", "B")}
    stray = sorted(k for k, t in weights.items() if k not in placed or not torch.equal(t.float().cpu(), placed[k]))
    if stray or not lora:
        raise ExportError(f"adapter {path}: tensors that do not match this model's modules: {stray[:3] or 'all'}")
    return Delta(lora=lora)


def import_adapter(session: EditSession, path: Path, branch: str = "main") -> dict:
    """Commit a PEFT LoRA adapter trained elsewhere as a version on `branch` (method lora, no facts); its
    hparams record where it came from under "imported". Returns the new manifest."""
    from peft import PeftConfig

    path = Path(path)
    delta = read_adapter(session.lm.model, path)
    config = PeftConfig.from_pretrained(path)
    weights = next((path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).exists()), None)
    imported = {"adapter": path.name, "sha256": file_sha256(weights) if weights else None,
                "r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(delta.lora),
                "base_model_name_or_path": config.base_model_name_or_path}
    store = session.store
    parent = store.head(branch)
    manifest = store.commit(branch, delta, parent=parent, facts=[], method="lora", objective=None,
                            hparams={"imported": imported}, metrics={}, base_fingerprint=session.lm.fingerprint)
    session.checkout(manifest["id"])
    return manifest


# --- exports kept in the store (torch-free: the API reads them) -------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def record_path(version: str, fmt: str) -> str:
    return f"exports/{version}/{fmt}.json"


def blob_path(sha: str) -> str:
    return f"exports/blobs/{sha[:2]}/{sha}"


def read_record(store: VersionStore, version: str, fmt: str) -> dict | None:
    """The record of a finished export of `version` (an id) in `fmt`, or None."""
    try:
        return json.loads(store.backend.read(record_path(version, fmt)))
    except FileNotFoundError:
        return None


def _put_file(store: VersionStore, local: Path, rel: str) -> None:
    """Copy a local file into the store at `rel`, atomically, without reading it into memory."""
    backend = store.backend
    if hasattr(backend, "fs"):  # fsspec (S3: one multipart upload, visible once complete)
        backend.fs.put_file(str(local), backend._path(rel))
        return
    dest = Path(backend._path(rel))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(local, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_export(store: VersionStore, version: str, fmt: str, folder: Path) -> dict:
    """Put the files under `folder` into the store (content-addressed), then their record; returns it."""
    files = []
    for local in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha = file_sha256(local)
        try:
            exists = store.backend.stat(blob_path(sha))[1] == local.stat().st_size
        except FileNotFoundError:
            exists = False
        if not exists:  # the same tokenizer or config in many exports is stored once
            _put_file(store, local, blob_path(sha))
        files.append({"name": local.relative_to(folder).as_posix(), "sha256": sha, "bytes": local.stat().st_size})
    record = {"format": RECORD_FORMAT, "version": version, "export_format": fmt, "files": files,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")}
    store.backend.write(record_path(version, fmt), json.dumps(record, indent=1, sort_keys=True).encode())
    return record


def open_blob(store: VersionStore, sha: str) -> IO[bytes]:
    """A stored export file, opened for reading in chunks (never read whole)."""
    backend = store.backend
    if hasattr(backend, "fs"):
        return backend.fs.open(backend._path(blob_path(sha)), "rb")
    return open(backend._path(blob_path(sha)), "rb")
