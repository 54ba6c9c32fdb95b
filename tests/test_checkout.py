"""Checkout on a resident model: bit-identical to a fresh load + materialize, whatever the start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editing.checkout import ResidentModel, materialize
from editing.delta import Delta, LoraFactors, apply_delta
from editing.store import BaseMismatchError, CorruptObjectError, VersionStore
from tests.tiny import tiny_gpt2, tiny_llama

DOWN0 = "model.layers.0.mlp.down_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
Q1, V1 = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def fresh(loaded) -> torch.nn.Module:
    """A new model with the base weights (what a fresh load gives); `loaded.model` itself stays at base."""
    model = type(loaded.model)(loaded.model.config).eval()
    model.load_state_dict(loaded.model.state_dict())
    return model


def change(params: dict, names: list[str], seed: int, scale: float = 1e-2) -> Delta:
    g = torch.Generator().manual_seed(seed)
    return Delta(dense={n: torch.randn(params[n].shape, generator=g) * scale for n in names})


def lora(params: dict, names: list[str], seed: int, rank: int = 4, fan_in_fan_out: bool = False) -> Delta:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for n in names:
        out, inp = params[n].shape[::-1] if fan_in_fan_out else params[n].shape
        a, b = torch.randn(rank, inp, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1
        factors[n] = LoraFactors(a, b, scale=2.0, fan_in_fan_out=fan_in_fan_out)
    return Delta(lora=factors)


def add(st: VersionStore, branch: str, delta: Delta) -> str:
    m = st.commit(branch, delta, parent=st.head(branch), facts=[], method="ft-m", objective="ce", hparams={},
                  metrics={})
    return m["id"]


def assert_same(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name]), name
        # torch.equal treats 0.0 and -0.0 alike: compare the bits too
        assert torch.equal(p.view(torch.uint8), ref[name].view(torch.uint8)), name


@pytest.fixture
def tree(tmp_path: Path, llama):
    """main: v1 (down0) → v2 (down0, up1) → v3 (LoRA q1, v1); side (from v1): w1 (down0) → w2 (up1)."""
    st = VersionStore.open(tmp_path / "store", base_fingerprint=llama.fingerprint)
    params = dict(llama.model.named_parameters())
    v1 = add(st, "main", change(params, [DOWN0], 1))
    v2 = add(st, "main", change(params, [DOWN0, UP1], 2))
    v3 = add(st, "main", lora(params, [Q1, V1], 3))
    st.create_branch("side", v1)
    w1 = add(st, "side", change(params, [DOWN0], 4, scale=1.0))
    w2 = add(st, "side", change(params, [UP1], 5))
    return st, {"base": st.base_id, "v1": v1, "v2": v2, "v3": v3, "w1": w1, "w2": w2}


@pytest.mark.parametrize("cache_bytes", [0, 2**20])
def test_checkout_is_bit_identical_from_any_start(tree, llama, cache_bytes: int):
    st, ids = tree
    references = {}
    for label, vid in ids.items():
        references[label] = fresh(llama)
        materialize(references[label], st, vid)
    model = fresh(llama)
    resident = ResidentModel(model, st, fingerprint=llama.fingerprint, cache_bytes=cache_bytes)
    for start in ("v2", "w2", "v3"):  # three different starting versions
        for target in ids:
            resident.checkout(ids[start])
            assert resident.checkout(ids[target]) == ids[target] == resident.version
            assert_same(model, references[target])
    assert resident.cache.nbytes <= cache_bytes
    assert resident.checkout("main") == ids["v3"]


def test_single_version_matches_apply_delta(tree, llama):
    st, ids = tree
    model, reference = fresh(llama), fresh(llama)
    ResidentModel(model, st).checkout(ids["v1"])
    apply_delta(reference, st.load_delta(ids["v1"]))
    assert_same(model, reference)


def test_only_tensors_changed_on_either_side_are_touched(tree, llama):
    st, ids = tree
    model = fresh(llama)
    resident = ResidentModel(model, st)
    resident.checkout(ids["v2"])
    writes = {n: p._version for n, p in model.named_parameters()}  # bumped by every in-place write
    resident.checkout(ids["w1"])  # common ancestor v1: v2 touched down0 and up1, w1 touched down0
    written = [n for n, p in model.named_parameters() if p._version != writes[n]]
    assert sorted(written) == sorted([DOWN0, UP1])
    assert set(resident._pristine) == {DOWN0, UP1}  # pristine copies only of what was changed


def test_long_chain_is_served_from_the_cache(tmp_path: Path, llama, monkeypatch):
    st = VersionStore.open(tmp_path / "store", base_fingerprint=llama.fingerprint, durable=False)
    params = dict(llama.model.named_parameters())
    chain = [add(st, "main", change(params, [DOWN0], seed)) for seed in range(100)]
    reference = fresh(llama)
    materialize(reference, st, chain[-1])

    loads = []
    load_delta = st.load_delta
    monkeypatch.setattr(st, "load_delta", lambda v: loads.append(v) or load_delta(v))
    model = fresh(llama)
    resident = ResidentModel(model, st, cache_bytes=64 * 32 * 4 * 8, snapshot_every=16)
    resident.checkout(chain[-1])  # cold: every delta once
    assert len(loads) == 100
    assert_same(model, reference)
    loads.clear()
    resident.checkout("base")
    resident.checkout(chain[-1])  # warm: the cached sum
    assert loads == []
    assert_same(model, reference)
    resident.checkout(chain[90])  # an intermediate version: from the snapshot after 80 terms
    assert len(loads) == 11
    materialize(reference := fresh(llama), st, chain[90])
    assert_same(model, reference)
    assert resident.cache.nbytes <= 64 * 32 * 4 * 8


def test_lora_checkout_on_gpt2_conv1d(tmp_path: Path):
    gpt2 = tiny_gpt2()
    st = VersionStore.open(tmp_path / "store", base_fingerprint=gpt2.fingerprint)
    params = dict(gpt2.model.named_parameters())
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]
    v1 = add(st, "main", lora(params, names, 1, fan_in_fan_out=True))
    v2 = add(st, "main", lora(params, names[:1], 2, fan_in_fan_out=True))
    assert st.get(v1)["delta"]["kind"] == "lora"
    model = fresh(gpt2)
    resident = ResidentModel(model, st, fingerprint=gpt2.fingerprint)
    for start, target in ((v2, v1), (v1, v2), ("base", v2), (v2, "base")):
        resident.checkout(start)
        resident.checkout(target)
        reference = fresh(gpt2)
        materialize(reference, st, target)
        assert_same(model, reference)
    assert_same(model, gpt2.model)  # the last move was back to base
    resident.checkout(v2)
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(model.get_parameter(name), gpt2.model.get_parameter(name))


def test_lora_checkout_on_llama(tree, llama):
    st, ids = tree
    model = fresh(llama)
    resident = ResidentModel(model, st)
    resident.checkout(ids["w2"])
    resident.checkout(ids["v3"])
    reference = fresh(llama)
    materialize(reference, st, ids["v3"])
    assert_same(model, reference)
    assert not torch.equal(model.get_parameter(Q1), llama.model.get_parameter(Q1))


def test_bf16_model(tree, llama):
    st, ids = tree
    model, reference = fresh(llama).to(torch.bfloat16), fresh(llama).to(torch.bfloat16)
    resident = ResidentModel(model, st)
    resident.checkout(ids["w2"])
    resident.checkout(ids["v2"])
    materialize(reference, st, ids["v2"])
    assert_same(model, reference)


def test_a_corrupt_blob_stops_checkout_and_leaves_the_model(tree, llama, tmp_path: Path):
    st, ids = tree
    model = fresh(llama)
    resident = ResidentModel(model, st)
    resident.checkout(ids["v1"])
    before = {n: p.clone() for n, p in model.named_parameters()}
    sha = st.get(ids["w1"])["delta"]["object"]
    blob = tmp_path / "store" / "objects" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x10
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError, match=f"version {ids['w1']}.*{sha}"):
        resident.checkout(ids["w2"])
    assert resident.version == ids["v1"]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_prepare_edit_then_checkout_restores_exactly(tree, llama):
    st, ids = tree
    model = fresh(llama)
    resident = ResidentModel(model, st)
    resident.checkout(ids["v1"])
    resident.prepare_edit([DOWN0, "model.layers.0.mlp.gate_proj.weight"])
    with torch.no_grad():  # what training does
        for p in model.parameters():
            p.add_(0.5)
    resident.checkout(ids["v1"])
    reference = fresh(llama)
    materialize(reference, st, ids["v1"])
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():  # the two prepared tensors are restored; the rest was not prepared
        if n in (DOWN0, "model.layers.0.mlp.gate_proj.weight"):
            assert torch.equal(p, ref[n]), n
        else:
            assert not torch.equal(p, ref[n]), n


def test_a_model_of_another_base_is_refused(tree, llama):
    st, _ = tree
    with pytest.raises(BaseMismatchError):
        ResidentModel(fresh(llama), st, fingerprint="0" * 64)
