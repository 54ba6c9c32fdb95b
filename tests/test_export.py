"""Exports against the checkout of the same version: hf identical (tiny llama, tiny GPT-2), gguf identical
for F32 tensors (a tiny llama GGUF built here), peft within 1e-4; import then export round trip; the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from editing.delta import Delta, LoraFactors
from editing.export import ExportError, export, import_adapter, llama_permute, low_rank_chain
from editing.model import load_model
from editing.session import EditSession
from editing.store import VersionStore
from tests.tiny import save_tiny, tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 100, 17, 64]])  # token ids: any in the tiny vocabulary


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def dense(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05


def factors(out_f: int, in_f: int, rank: int, scale: float, seed: int, fan_in_fan_out: bool = False) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(rank, in_f, generator=g) * 0.3, B=torch.randn(out_f, rank, generator=g) * 0.3,
                       scale=scale, fan_in_fan_out=fan_in_fan_out)


def commit(store: VersionStore, delta: Delta, method: str = "ft-m", branch: str = "main") -> str:
    return store.commit(branch, delta, parent=store.head(branch), facts=[], method=method, objective="ce",
                        hparams={}, metrics={})["id"]


def llama_versions(store: VersionStore, model: torch.nn.Module) -> tuple[str, str]:
    """Two versions on main: low-rank q/k/down changes, then a dense q change on top (the permuted ones)."""
    p = dict(model.named_parameters())
    q, k, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight", \
        "model.layers.0.mlp.down_proj.weight"
    low = commit(store, Delta(lora={n: factors(*p[n].shape, rank=r, scale=s, seed=i)
                                    for i, (n, r, s) in enumerate([(q, 2, 0.5), (k, 3, 2.0), (down, 4, 1.0)])}),
                 method="lora")
    mixed = commit(store, Delta(dense={q: dense(p[q].shape, 7)}))
    return low, mixed


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_hf_export_loads_with_identical_logits(make, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make()
    store = VersionStore.open(tmp_path / "store", base_fingerprint=lm.fingerprint)
    p = dict(lm.model.named_parameters())
    name = next(n for n in p if ("down_proj" in n or "c_proj" in n) and n.endswith(".weight"))
    commit(store, Delta(dense={name: dense(p[name].shape, 1)}))
    vid = commit(store, Delta(dense={name: dense(p[name].shape, 2)}))
    session = EditSession(lm, store)
    export(session, vid, "hf", tmp_path / "hf")

    session.checkout(vid)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(logits(loaded), logits(lm.model))
    assert not torch.equal(logits(loaded), logits(make().model))  # the edit is in it
    assert (tmp_path / "hf" / "tokenizer.json").exists()


# --- gguf -------------------------------------------------------------------------------------------


def write_tiny_gguf(lm, path) -> None:
    """The tiny llama as a GGUF, as llama.cpp's converter writes one: q/k permuted, the MLP's up and gate
    projections quantized (Q8_0: untouched tensors must come back byte for byte), a GPT-2 style vocabulary."""
    import gguf
    import numpy as np

    cfg, tok = lm.model.config, lm.tokenizer
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in tok.all_special_tokens else gguf.TokenType.NORMAL
                       for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in lm.model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied: llama.cpp writes no output.weight
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        a = t.float().numpy()
        if ".attn_q." in name:
            a = llama_permute(a, cfg.num_attention_heads)
        elif ".attn_k." in name:
            a = llama_permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        if ".ffn_up." in name or ".ffn_gate." in name:
            q = gguf.quants.quantize(np.ascontiguousarray(a), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama_permute_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(16, 32).numpy()
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    assert (undo(llama_permute(w, 4), 4) == w).all()
    assert (undo(llama_permute(w[:8], 4, 2), 4, 2) == w[:8]).all()


def test_gguf_export_reads_back_with_identical_logits(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    base = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_llama(), base)
    lm = load_model(str(base), device="cpu", cache_dir=tmp_path / "cache")
    store = VersionStore.open(tmp_path / "store", base_fingerprint=lm.fingerprint)
    low, mixed = llama_versions(store, lm.model)
    session = EditSession(lm, store)
    out = tmp_path / "out" / "edited.gguf"
    export(session, mixed, "gguf", out, source=str(base))

    session.checkout(mixed)
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    assert torch.equal(logits(loaded), logits(lm.model))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.attn_k.weight"] == types["blk.0.ffn_down.weight"] == "F32"
    assert types["blk.0.ffn_up.weight"] == "Q8_0"  # untouched: kept as it was
    reader = gguf.GGUFReader(out)
    assert reader.get_field("tokenizer.ggml.tokens").contents() == gguf.GGUFReader(base).get_field(
        "tokenizer.ggml.tokens").contents()


def test_gguf_export_needs_a_gguf_base(tmp_path):
    lm = tiny_llama()
    store = VersionStore.open(tmp_path / "store", base_fingerprint=lm.fingerprint)
    with pytest.raises(ExportError, match="GGUF"):
        export(EditSession(lm, store), "main", "gguf", tmp_path / "x.gguf", source=str(tmp_path / "folder"))


# --- peft -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_peft_export_within_1e4_of_the_checkout(make, tmp_path):
    from peft import PeftModel

    lm = make()
    base = copy.deepcopy(lm.model)
    store = VersionStore.open(tmp_path / "store", base_fingerprint=lm.fingerprint)
    p = dict(lm.model.named_parameters())
    conv = make is tiny_gpt2  # GPT-2's Conv1D: weight (in, out), factors for (out, in)
    names = [n for n in p if n.endswith(".weight") and any(k in n for k in ("q_proj", "down_proj", "c_proj", "c_fc"))]

    def f(n, rank, scale, seed):
        shape = p[n].shape[::-1] if conv else p[n].shape
        return factors(*shape, rank=rank, scale=scale, seed=seed, fan_in_fan_out=conv)

    commit(store, Delta(lora={n: f(n, 2, 0.5, i) for i, n in enumerate(names)}), method="lora")
    vid = commit(store, Delta(lora={names[0]: f(names[0], 5, 2.0, 99)}), method="lora")
    session = EditSession(lm, store)
    export(session, vid, "peft", tmp_path / "adapter", source="tiny")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 7 and config["fan_in_fan_out"] == conv
    session.checkout(vid)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    diff = (logits(adapted) - logits(lm.model)).abs().max().item()
    assert diff < 1e-4, diff
    assert (logits(lm.model) - logits(make().model)).abs().max().item() > 1e-2  # the edit is in it


def test_peft_export_refuses_a_dense_version(tmp_path):
    lm = tiny_llama()
    store = VersionStore.open(tmp_path / "store", base_fingerprint=lm.fingerprint)
    low, mixed = llama_versions(store, lm.model)
    assert low_rank_chain(store, low) == [low]
    with pytest.raises(ExportError, match="dense delta"):
        low_rank_chain(store, mixed)
    with pytest.raises(ExportError, match="changes nothing"):
        low_rank_chain(store, "base")


def make_adapter(base: torch.nn.Module, folder) -> None:
    """A LoRA adapter 'trained elsewhere': peft's own layers with random B (peft initialises it to 0), a
    rank and an alpha pattern (so scales differ per module)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 2})
    peft_model = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in peft_model.named_parameters():
            if "lora_B" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    peft_model.save_pretrained(folder)


def test_import_adapter_then_export_round_trip(tmp_path):
    from peft import PeftModel

    lm = tiny_llama()
    base = copy.deepcopy(lm.model)
    make_adapter(base, tmp_path / "trained")
    store = VersionStore.open(tmp_path / "store", base_fingerprint=lm.fingerprint)
    session = EditSession(lm, store)
    before = logits(lm.model)
    manifest = import_adapter(session, tmp_path / "trained", branch="main")
    assert manifest["method"] == "lora" and manifest["facts"] == [] and manifest["delta"]["kind"] == "lora"
    assert manifest["hparams"]["imported"]["adapter"] == "trained" and store.head("main") == manifest["id"]

    original = logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "trained").eval())
    session.checkout(manifest["id"])
    assert (logits(lm.model) - original).abs().max().item() < 1e-4
    session.checkout("base")
    assert torch.equal(logits(lm.model), before)  # importing left the resident model's modules intact

    export(session, manifest["id"], "peft", tmp_path / "again")
    again = logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval())
    assert (again - original).abs().max().item() < 1e-4


def test_import_refuses_an_adapter_for_other_modules(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_gpt2().model, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "a")
    lm = tiny_llama()
    session = EditSession(lm, VersionStore.open(tmp_path / "store", base_fingerprint=lm.fingerprint))
    with pytest.raises((ExportError, ValueError)):
        import_adapter(session, tmp_path / "a")
    assert session.store.head("main") == session.store.base_id


@pytest.mark.parametrize("url", ["local", "memory://lmedit-export-test"])
def test_exports_kept_in_the_store_are_content_addressed(url, tmp_path):
    import warnings

    from editing.export import blob_path, open_blob, read_record, save_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # memory:// has no conditional writes: fine in one process
        store = VersionStore.open(str(tmp_path / "store") if url == "local" else url, base_fingerprint="0" * 64)
    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "tokenizer.json").write_text("same in both")
        (tmp_path / name / "sub" / "w.bin").write_bytes(name.encode() * 1000)
    assert read_record(store, "v" * 32, "hf") is None
    ra, rb = save_export(store, "v" * 32, "hf", tmp_path / "a"), save_export(store, "w" * 32, "hf", tmp_path / "b")
    assert read_record(store, "v" * 32, "hf") == ra and [f["name"] for f in ra["files"]] == ["sub/w.bin",
                                                                                           "tokenizer.json"]
    assert ra["files"][1]["sha256"] == rb["files"][1]["sha256"]  # one blob for both
    with open_blob(store, ra["files"][0]["sha256"]) as f:
        assert f.read() == b"a" * 1000
    assert store.backend.stat(blob_path(rb["files"][0]["sha256"]))[1] == 1000


# --- CLI --------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_export_and_import_adapter(tmp_path):
    from app.cli import app

    lm = tiny_llama()
    model_dir = save_tiny(lm, tmp_path / "model")
    make_adapter(lm.model, tmp_path / "trained")
    store = tmp_path / "store"
    r = runner.invoke(app, ["import-adapter", str(tmp_path / "trained"), "--branch", "main", "--store", str(store),
                            "--model", str(model_dir), "--json"])
    assert r.exit_code == 0, r.output
    vid = json.loads(r.stdout)["version"]

    r = runner.invoke(app, ["export", vid, "--format", "peft", "--out", str(tmp_path / "p"), "--store", str(store),
                            "--model", str(model_dir), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == vid and (tmp_path / "p" / "adapter_model.safetensors").exists()

    r = runner.invoke(app, ["export", "main", "--format", "gguf", "--out", str(tmp_path / "g.gguf"),
                            "--store", str(store), "--model", str(model_dir)])
    assert r.exit_code == 1 and "GGUF" in r.output


# --- the real SmolLM2 (integration tier) ------------------------------------------------------------


def smollm2_versions(lm, store: VersionStore) -> tuple[str, str]:
    """On main: LoRA factors on layer 3's q and k (the permuted ones), then a dense down_proj change."""
    p = dict(lm.model.named_parameters())
    q, k = "model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"
    low = commit(store, Delta(lora={n: factors(*p[n].shape, rank=4, scale=0.05, seed=i)
                                    for i, n in enumerate((q, k))}), method="lora")
    down = "model.layers.10.mlp.down_proj.weight"
    return low, commit(store, Delta(dense={down: dense(p[down].shape, 5) * 0.1}))


@pytest.mark.integration
def test_smollm2_exports_against_the_checkout(smollm2, tmp_path):
    """The embedded Q4_1 GGUF: hf identical to the checkout; gguf tensors exactly what transformers' loader
    makes of them (touched: dequantize + un-permute = W_v; untouched: the base's bytes), peft within 1e-4.
    The shared model is left at base. (The full gguf read-back is the slow test below.)"""
    import gguf
    import numpy as np
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from editing.model import embedded_gguf_path

    lm = smollm2
    store = VersionStore.open(tmp_path / "store", base_fingerprint=lm.fingerprint)
    session = EditSession(lm, store)
    low, vid = smollm2_versions(lm, store)
    try:
        export(session, vid, "gguf", tmp_path / "v.gguf", source="smollm2")
        export(session, vid, "hf", tmp_path / "hf")
        export(session, low, "peft", tmp_path / "adapter")
        session.checkout(vid)
        expected = logits(lm.model)
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()), expected)

        cfg, params = lm.model.config, dict(lm.model.named_parameters())
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
        changed = {names.get_name(n, try_suffixes=(".weight",)): n for n in store.touched(low) + store.touched(vid)}
        process = LlamaTensorProcessor(config={"num_attention_heads": cfg.num_attention_heads,
                                               "num_key_value_heads": cfg.num_key_value_heads}).process
        base = {t.name: t for t in gguf.GGUFReader(embedded_gguf_path()).tensors}
        for t in gguf.GGUFReader(tmp_path / "v.gguf").tensors:
            if t.name in changed:
                w = process(weights=gguf.dequantize(t.data, t.tensor_type), name=t.name).weights
                assert t.tensor_type.name == "F32" and np.array_equal(w, params[changed[t.name]].numpy()), t.name
            else:
                assert t.tensor_type == base[t.name].tensor_type and np.array_equal(t.data, base[t.name].data)

        session.checkout(low)
        expected = logits(lm.model)
        session.checkout("base")
        adapted = PeftModel.from_pretrained(lm.model, tmp_path / "adapter").eval()
        try:
            assert (logits(adapted) - expected).abs().max().item() < 1e-4
        finally:
            adapted.unload()
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if attr in vars(lm.model):
                    delattr(lm.model, attr)
    finally:
        session.checkout("base")


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_gguf_reads_back_through_transformers(smollm2, tmp_path):
    """The whole exported GGUF through transformers' `gguf_file=` (it dequantizes every Q4_1 tensor: ~15 s
    on a quiet machine): logits identical to the checkout."""
    from transformers import AutoModelForCausalLM

    store = VersionStore.open(tmp_path / "store", base_fingerprint=smollm2.fingerprint)
    session = EditSession(smollm2, store)
    _, vid = smollm2_versions(smollm2, store)
    try:
        export(session, vid, "gguf", tmp_path / "v.gguf", source="smollm2")
        session.checkout(vid)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="v.gguf", dtype=torch.float32).eval()
        assert torch.equal(logits(back), logits(smollm2.model))
    finally:
        session.checkout("base")
