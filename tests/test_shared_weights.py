"""Shared base weights: a model loaded from its fp32 safetensors folder keeps the base tensors memory-mapped
from that file (one copy in the page cache for every worker on the machine), a version's tensors become
private copies when first changed (copy-on-write), and nothing ever writes into the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from editing.checkout import materialize
from editing.delta import Delta, apply_delta, revert
from editing.facts import Fact
from editing.model import fingerprint, load_model
from editing.session import EditSession
from editing.store import VersionStore
from tests.service import TINY_HPARAMS
from tests.tiny import save_tiny, tiny_llama

DOWN0 = "model.layers.0.mlp.down_proj.weight"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_mapped(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path` (/proc/self/maps)."""
    ranges, target = [], str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def in_file(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= t.data_ptr() < b for a, b in ranges)


@pytest.fixture
def folder(tmp_path) -> Path:
    torch.set_num_threads(1)
    return save_tiny(tiny_llama(), tmp_path / "tiny")


def test_a_loaded_model_maps_its_weights_and_an_edit_copies_only_what_it_changes(folder, tmp_path):
    weights = folder / "model.safetensors"
    digest = sha256(weights)
    lm = load_model(str(folder), device="cpu")
    base = fingerprint(lm.model)
    ranges = file_mapped(weights)
    params = dict(lm.model.named_parameters())
    assert ranges and all(in_file(p, ranges) for p in params.values())  # held once: the file's pages

    session = EditSession(lm, str(tmp_path / "store"))
    outcome = session.edit([Fact("The Eiffel Tower is in", "Rome")], hparams=TINY_HPARAMS)
    touched = set(session.store.touched(outcome.version))
    assert touched and session.resident.version == outcome.version
    for name, p in params.items():  # at the new version: only what it touches is private
        assert in_file(p, ranges) == (name not in touched), name
    for name in touched:  # and the pristine base of those is still the mapped tensor, not a copy
        assert in_file(session.resident._pristine[name], ranges), name

    assert sha256(weights) == digest  # training, preview and checkout wrote nothing into the file
    assert load_model(str(folder), device="cpu").fingerprint == base  # a fresh load is the base
    session.checkout("base")
    assert fingerprint(lm.model) == base


def test_apply_delta_and_materialize_leave_the_file_as_it_was(folder, tmp_path):
    weights = folder / "model.safetensors"
    digest = sha256(weights)
    lm = load_model(str(folder), device="cpu")
    base = fingerprint(lm.model)
    params = dict(lm.model.named_parameters())
    delta = Delta(dense={DOWN0: torch.randn(params[DOWN0].shape, generator=torch.Generator().manual_seed(0))})
    originals = apply_delta(lm.model, delta)
    assert not in_file(params[DOWN0], file_mapped(weights)) and fingerprint(lm.model) != base
    revert(lm.model, originals)
    assert fingerprint(lm.model) == base

    store = VersionStore.open(tmp_path / "store", base_fingerprint=base)
    v = store.commit("main", delta, parent=store.head("main"), facts=[], method="ft-m", objective="ce", hparams={},
                     metrics={})["id"]
    fresh = load_model(str(folder), device="cpu")
    materialize(fresh.model, store, v)
    assert torch.equal(dict(fresh.model.named_parameters())[DOWN0], params[DOWN0] + delta.change(DOWN0))
    assert sha256(weights) == digest and load_model(str(folder), device="cpu").fingerprint == base


@pytest.mark.integration
def test_smollm2_cache_file_unchanged_by_a_checkout(tmp_path):
    """The real model cache: a version changing two layers, checked out and back; the cache file's bytes
    stay the same and a fresh load is the base."""
    lm = load_model("smollm2", device="cpu")
    from editing.model import resolve_source

    weights = resolve_source("smollm2") / "model.safetensors"
    digest = sha256(weights)
    ranges = file_mapped(weights)
    params = dict(lm.model.named_parameters())
    names = ["model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"]
    assert all(in_file(params[n], ranges) for n in names)
    g = torch.Generator().manual_seed(0)
    delta = Delta(dense={n: torch.randn(params[n].shape, generator=g) * 1e-3 for n in names})
    session = EditSession(lm, str(tmp_path / "store"))
    v = session.store.commit("main", delta, parent=session.store.head("main"), facts=[], method="ft-m",
                             objective="ce", hparams={}, metrics={})["id"]
    session.checkout(v)
    assert not any(in_file(params[n], ranges) for n in names)
    assert sum(in_file(p, ranges) for p in params.values()) == len(params) - len(names)
    session.checkout("base")
    assert sha256(weights) == digest
    assert load_model("smollm2", device="cpu").fingerprint == lm.fingerprint == fingerprint(lm.model)
