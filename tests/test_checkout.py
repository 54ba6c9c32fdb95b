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


# --- keyframes: a cold checkout reads at most one keyframe and fewer than K deltas -------------------------

def counting(st: VersionStore, monkeypatch) -> dict[str, list[str]]:
    """Record every delta and keyframe the store hands out (its public reads)."""
    reads: dict[str, list[str]] = {"deltas": [], "keyframes": []}
    load_delta, load_keyframe = st.load_delta, st.load_keyframe

    def delta(v):
        reads["deltas"].append(v)
        return load_delta(v)

    def keyframe(v):
        sums = load_keyframe(v)
        if sums is not None:
            reads["keyframes"].append(v)
        return sums

    monkeypatch.setattr(st, "load_delta", delta)
    monkeypatch.setattr(st, "load_keyframe", keyframe)
    return reads


@pytest.fixture
def deep(tmp_path: Path, llama):
    """main: 30 versions, dense and LoRA, over three tensors (a version deeper than K = 8)."""
    st = VersionStore.open(tmp_path / "store", base_fingerprint=llama.fingerprint, durable=False)
    params = dict(llama.model.named_parameters())
    chain = []
    for i in range(30):
        delta = lora(params, [Q1], 100 + i) if i % 7 == 3 else change(params, [DOWN0] if i % 3 else [DOWN0, UP1], i)
        chain.append(add(st, "main", delta))
    return st, chain


def test_a_deep_cold_checkout_reads_one_keyframe_and_fewer_than_k_deltas(deep, llama, monkeypatch):
    st, chain = deep
    references = {depth: fresh(llama) for depth in (30, 24, 17, 5)}
    for depth, model in references.items():
        materialize(model, st, chain[depth - 1])  # the definition: every delta, no keyframe
    reference = references[30]
    assert st.keyframes() == []
    first = fresh(llama)
    ResidentModel(first, st, cache_bytes=0, keyframe_every=8).checkout(chain[-1])  # writes positions 8, 16, 24
    assert_same(first, reference)
    assert st.keyframes() == sorted(chain[p - 1] for p in (8, 16, 24))
    assert [st.keyframe(chain[p - 1])["position"] for p in (8, 16, 24)] == [8, 16, 24]

    reads = counting(st, monkeypatch)
    cold = fresh(llama)
    resident = ResidentModel(cold, st, cache_bytes=0, keyframe_every=8)
    resident.checkout(chain[-1])  # position 30: keyframe 24, then the deltas of 25..30 that touch something
    assert reads["keyframes"] == [chain[23]]
    assert len(reads["deltas"]) == 6 and reads["deltas"] == chain[24:]
    assert_same(cold, reference)
    for depth in (24, 17, 5):  # at a keyframe, just past one, before the first
        reads["keyframes"].clear()
        reads["deltas"].clear()
        resident.checkout(chain[depth - 1])
        assert_same(cold, references[depth])
        assert len(reads["keyframes"]) == (depth >= 8) and len(reads["deltas"]) == depth % 8
    assert st.fsck().ok


def test_keyframes_do_not_change_a_bit_and_stay_off_the_warm_path(deep, llama, monkeypatch):
    st, chain = deep
    with_kf, without = fresh(llama), fresh(llama)
    a = ResidentModel(with_kf, st, keyframe_every=4)
    b = ResidentModel(without, st, keyframe_every=0)
    for target in (chain[-1], chain[11], "base", chain[29], chain[3]):
        a.checkout(target)
        b.checkout(target)
        assert_same(with_kf, without)
    reads = counting(st, monkeypatch)
    a.checkout(chain[-1])  # the sum is cached: no blob at all
    assert reads == {"deltas": [], "keyframes": []}


def test_a_rebase_version_restarts_the_keyframe_positions(tmp_path: Path, llama, monkeypatch):
    st = VersionStore.open(tmp_path / "store", base_fingerprint=llama.fingerprint, durable=False)
    params = dict(llama.model.named_parameters())
    for i in range(5):
        add(st, "main", change(params, [DOWN0], i))
    root = st.commit("main", change(params, [DOWN0, UP1], 50), parent=st.head("main"), facts=[], method="alphaedit",
                     objective="ce", hparams={}, metrics={}, rebase={"op": "consolidate", "kept": []})["id"]
    after = [add(st, "main", change(params, [UP1], 60 + i)) for i in range(9)]
    assert st.weights_chain("main") == [root, *after]
    model = fresh(llama)
    ResidentModel(model, st, cache_bytes=0, keyframe_every=4).checkout("main")
    assert st.keyframes() == sorted([after[3], after[7]])  # positions 4 and 8 from the rebase root
    materialize(reference := fresh(llama), st, "main")
    assert_same(model, reference)
    reads = counting(st, monkeypatch)
    ResidentModel(cold := fresh(llama), st, cache_bytes=0, keyframe_every=4).checkout("main")
    assert reads == {"deltas": [after[8]], "keyframes": [after[7]]}
    assert_same(cold, reference)


def test_a_damaged_or_unwritable_keyframe_only_costs_speed(deep, llama, tmp_path: Path, monkeypatch):
    st, chain = deep
    reference = fresh(llama)
    materialize(reference, st, chain[-1])
    create = st.backend.create
    monkeypatch.setattr(st.backend, "create", lambda rel, data: (_ for _ in ()).throw(OSError("disk full"))
                        if rel.startswith("keyframes/") else create(rel, data))
    ResidentModel(model := fresh(llama), st, cache_bytes=0, keyframe_every=8).checkout(chain[-1])
    assert_same(model, reference)
    assert st.keyframes() == []  # the blobs were written, no record names them: gc's orphans
    report = st.fsck()
    assert report.ok and any("no manifest names" in n for n in report.notes)
    monkeypatch.setattr(st.backend, "create", create)

    ResidentModel(fresh(llama), st, cache_bytes=0, keyframe_every=8).checkout(chain[-1])
    sha = st.keyframe(chain[23])["object"]
    blob = tmp_path / "store" / "objects" / sha[:2] / sha
    good = blob.read_bytes()

    def damage() -> None:
        data = bytearray(good)
        data[-5] ^= 0x10
        blob.write_bytes(bytes(data))

    damage()
    assert [p.kind for p in st.fsck().problems] == ["corrupt-keyframe"]
    reads = counting(st, monkeypatch)
    ResidentModel(model := fresh(llama), st, cache_bytes=0, keyframe_every=8).checkout(chain[-1])
    assert_same(model, reference)  # summed from keyframe 16 and the deltas after it instead
    assert reads["keyframes"] == [chain[15]] and reads["deltas"] == chain[16:]
    assert blob.read_bytes() == good and st.fsck().ok  # and the same exact sum written again
    damage()
    assert st.fsck(repair=True).repaired and st.fsck().ok
    assert chain[23] not in st.keyframes()
