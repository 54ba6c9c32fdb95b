"""Locate-then-edit (memit, alphaedit), the fact ledger, consolidate and revert, on tiny models."""

from __future__ import annotations

import pytest
import torch

from editing.checkout import ResidentModel, materialize
from editing.facts import Fact
from editing.hparams import DEFAULT_METHOD, FALLBACK_METHOD, choose_method, choose_objective, resolve_hparams
from editing.keys import module_inputs, second_moment, source_passages
from editing.ledger import ledger_of
from editing.locate import RowNormalizedGD, read_keys_and_top, solve_update
from editing.methods import target_modules
from editing.session import EditSession
from editing.train import edit
from tests.tiny import tiny_llama

FAST = {"context_prefixes": 1, "steps": 5}


def test_closed_form_writes_each_key_to_its_value():
    torch.manual_seed(0)
    keys, residuals = torch.randn(3, 64), torch.randn(3, 32)  # (F, in), (F, out)
    u = torch.linalg.qr(torch.randn(64, 64)).Q
    c0 = u @ torch.diag(torch.cat([torch.ones(32), torch.zeros(32)])) @ u.T  # half the directions unused
    for form, hp in [("memit", {"mom2_weight": 1e-6}), ("alphaedit", {"l2": 1e-6})]:
        f = solve_update(form, keys, residuals, c0, resolve_hparams(form, hp))
        written = keys @ f.dense().T  # (F, out) = ΔW k for each key
        assert torch.allclose(written, residuals, atol=1e-3), form


def test_key_weights_decide_where_two_conflicting_keys_meet():
    """Two facts asking one key for different values: the fit lands at their weighted mean, w² each."""
    torch.manual_seed(0)
    key = torch.randn(1, 64)
    keys, residuals = torch.cat([key, key]), torch.randn(2, 32)  # (F, in), (F, out): the same key twice
    u = torch.linalg.qr(torch.randn(64, 64)).Q
    half = u @ torch.diag(torch.cat([torch.ones(32), torch.zeros(32)])) @ u.T  # alphaedit writes in the rest
    for form, hp, c0 in [("memit", {"mom2_weight": 1e-6}, torch.eye(64)), ("alphaedit", {"l2": 1e-6}, half)]:
        for w in (1.0, 0.5, 3.0):
            weights = torch.tensor([w, 1.0])
            f = solve_update(form, keys, residuals, c0, resolve_hparams(form, hp), weights=weights)
            written = key @ f.dense().T  # (1, out)
            expected = (w**2 * residuals[0] + residuals[1]) / (w**2 + 1)
            assert torch.allclose(written[0], expected, atol=1e-3), (form, w)


def test_the_normalized_value_step_follows_each_facts_gradient_with_adams_first_step_length():
    """Each row of δ moves lr·√H along its own gradient, however the rows' losses are scaled. Adam's first
    step moves every coordinate by lr: where the loss asks for one coordinate and the gradient holds a
    little of everything else, Adam's δ is mostly that little."""
    torch.manual_seed(0)
    target = torch.zeros(2, 16)
    target[0, 3], target[1, 7] = 1.0, -2.0  # (F, H): each fact's loss asks for one coordinate
    noise = torch.randn(2, 16) * 1e-4  # (F, H): a gradient's small share in every other direction
    stepped = {}
    for name, make in [("normalized", lambda p: RowNormalizedGD(p, lr=0.05)),
                       ("adam", lambda p: torch.optim.Adam(p, lr=0.05))]:
        delta = torch.zeros(2, 16, requires_grad=True)
        optimizer = make([delta])
        ((delta - target) ** 2 * torch.tensor([[1.0], [0.01]])).sum().backward()  # rows scaled 100× apart
        delta.grad += noise
        gradient = delta.grad.clone()
        optimizer.step()
        stepped[name] = delta.detach()
    expected = -gradient / gradient.norm(dim=-1, keepdim=True) * 0.05 * 16**0.5  # (F, H)
    assert torch.allclose(stepped["normalized"], expected)
    assert torch.allclose(stepped["adam"].abs(), torch.full((2, 16), 0.05), rtol=1e-3)  # every coordinate by lr
    asked = torch.zeros(2, 16, dtype=torch.bool)
    asked[0, 3] = asked[1, 7] = True
    off = {name: float(d[~asked].norm() / d.norm()) for name, d in stepped.items()}  # share outside the asked
    assert off["normalized"] < 0.01 and off["adam"] > 0.9, off


def test_generic_weight_holds_the_generic_energy_left_in_the_null_space():
    """C₀'s null space drops only its large eigenvalues; `generic_weight` keeps the small rest still too."""
    from editing.locate import kept_in_place

    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 64)).Q
    spectrum = torch.cat([torch.ones(16), torch.full((16,), 5e-3), torch.zeros(32)])  # large, small, unused
    c0 = u @ torch.diag(spectrum) @ u.T  # (in, in)
    key = torch.randn(1, 64)  # (F, in): a fact's key, partly in the directions generic text uses a little
    residual = torch.randn(1, 32)  # (F, out)
    moved, written = {}, {}
    for weight in (0.0, 1e4):
        hp = resolve_hparams("alphaedit", {"l2": 1e-3, "generic_weight": weight})
        kept = kept_in_place(None, {"m": c0}, hp)
        assert ("m" in kept) == (weight > 0)
        delta = solve_update("alphaedit", key, residual, c0, hp, kept.get("m")).dense()  # (out, in)
        moved[weight] = float(torch.trace(delta @ c0 @ delta.T))  # E‖ΔW k₀‖² over generic keys
        written[weight] = float((key @ delta.T - residual).norm() / residual.norm())
    assert moved[1e4] < 0.01 * moved[0.0], moved
    assert written[1e4] < 0.05, written  # the unused directions still carry the fact


def test_alphaedit_leaves_generic_keys_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path))
    lm = tiny_llama(layers=4)
    fact = Fact("The capital of Japan is", "Rome", subject="Japan")
    # 40 generic tokens in a 64-dimensional key space: C₀ has a true null space, as a real
    # model's wide MLP has over its generic text; those 40 keys are the preserved set.
    hp = {**FAST, "c0_tokens": 40, "l2": 1e-3, "nullspace_threshold": 1e-6}
    result = edit(lm, [fact], method="alphaedit", hparams=hp)
    modules = target_modules(lm.model, result.hparams)
    second_moment(lm, modules, max_tokens=40)
    passages = source_passages("builtin")
    enc = lm.tokenizer(passages[:16], return_tensors="pt", padding=True, truncation=True, max_length=128)
    keys = module_inputs(lm.model, modules, enc.input_ids, enc.attention_mask, enc.attention_mask.bool())
    keys = {n: k[:40] for n, k in keys.items()}
    moved = False
    for name, k0 in keys.items():  # (T, in)
        w = modules[name].weight.detach()  # (out, in)
        change = result.delta.change(f"{name}.weight")
        ratio = (k0 @ change.T).norm(dim=-1) / (k0 @ w.T).norm(dim=-1)
        assert ratio.max() <= 1e-3, (name, float(ratio.max()))
        moved = moved or change.abs().max() > 0
    assert moved  # the edit did change the weights, just not along generic keys


def test_reading_keys_from_a_cached_block_input_equals_a_full_run():
    """The closed form runs each pass from the block below which nothing changed since the last one."""
    from editing.tokens import pair_batch

    lm = tiny_llama(layers=4)
    facts = [("The capital of Japan is", "Rome", "Japan"), ("Toko Yasuda plays the", "piano", "Toko Yasuda")]
    batch = pair_batch(lm.tokenizer, [(p, t) for p, t, _ in facts] * 3, subjects=[s for *_, s in facts] * 3,
                       subject_last=True)
    mlp = {i: lm.model.model.layers[i].mlp.down_proj for i in range(4)}
    full = read_keys_and_top(lm.model, mlp[1], 3, batch, 2, chunk=4, capture=1)
    assert len(full.inputs) == 2  # one block input per chunk of 4 rows
    alone = read_keys_and_top(lm.model, mlp[1], 3, pair_batch(lm.tokenizer, [facts[1][:2]], subjects=[facts[1][2]],
                                                               subject_last=True), 1)
    assert torch.allclose(full.own_keys[1], alone.keys[0], atol=1e-6)  # the own prompt's key, unaveraged
    part = read_keys_and_top(lm.model, mlp[2], 3, batch, 2, chunk=4, start=1, inputs=full.inputs)
    assert torch.equal(part.top, full.top)
    assert torch.equal(part.keys, read_keys_and_top(lm.model, mlp[2], 3, batch, 2, chunk=4).keys)
    with torch.no_grad():  # a change at block 1 shows from its cached input on, as in a full run
        mlp[1].weight.add_(0.05)
    part = read_keys_and_top(lm.model, mlp[2], 3, batch, 2, chunk=4, start=1, inputs=full.inputs)
    again = read_keys_and_top(lm.model, mlp[2], 3, batch, 2, chunk=4)
    assert torch.equal(part.keys, again.keys) and torch.equal(part.top, again.top)
    assert torch.equal(part.own_keys, again.own_keys)


def test_keys_read_from_rows_cut_after_the_subject_equal_those_of_whole_rows():
    """A read sorts each chunk's rows by where their subject ends and stops at the last one (attention is
    causal), and the contexts' rows stop at the module: the keys and block outputs at the subjects are those
    of the whole prompt + target rows, in the facts' order."""
    from editing.keys import module_inputs
    from editing.tokens import pair_batch

    lm = tiny_llama(layers=4)
    facts = [("As everyone who has been there knows, the capital city of Japan is", "Rome on the Tiber", "Japan"),
             ("Toko Yasuda plays the", "piano", "Toko Yasuda"),
             ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux")]
    batch = pair_batch(lm.tokenizer, [(p, t) for p, t, _ in facts] * 2, subjects=[s for *_, s in facts] * 2,
                       subject_last=True)
    mlp = lm.model.model.layers[1].mlp.down_proj
    read = read_keys_and_top(lm.model, mlp, 2, batch, 3, chunk=2, capture=1)
    assert max(x.shape[1] for x in read.inputs) < batch.input_ids.shape[1]  # the rows were cut
    with torch.no_grad():
        whole = module_inputs(lm.model, {"m": mlp}, batch.input_ids, batch.attention_mask, batch.subject_mask)["m"]
        hidden = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          output_hidden_states=True).hidden_states[3]  # block 2's output (B, L, H)
    assert torch.allclose(read.own_keys, whole[:3], atol=1e-5)
    assert torch.allclose(read.keys, (whole[:3] + whole[3:]) / 2, atol=1e-5)
    assert torch.allclose(read.top, hidden[:3][batch.subject_mask[:3]], atol=1e-5)


def test_later_passes_write_what_one_pass_left_missing(tmp_path, monkeypatch):
    """Where the closed form has room for only part of each layer's share (here: a strong ridge), a second
    and third bottom-to-top pass write more of the rest; the facts' stored keys are those of the first."""
    from editing.delta import apply_delta, revert
    from editing.locate import closed_form_delta
    from editing.tokens import pair_batch

    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path))
    lm = tiny_llama(layers=4)
    facts = [("The capital of Japan is", "Rome", "Japan"), ("Toko Yasuda plays the", "piano", "Toko Yasuda")]
    batch = pair_batch(lm.tokenizer, [(p, t) for p, t, _ in facts], subjects=[s for *_, s in facts],
                       subject_last=True)
    hp = resolve_hparams("alphaedit", {"layers": [1, 2], "c0_tokens": 40, "neighbour_weight": 0})
    modules = target_modules(lm.model, hp)
    before = read_keys_and_top(lm.model, modules["model.layers.1.mlp.down_proj"], 2, batch, 2)
    torch.manual_seed(0)
    z = before.top + 2 * torch.randn_like(before.top)  # (F, H): where block 2's output should go
    hp = hp.model_copy(update={"l2": float(before.keys.norm(dim=-1).max() ** 2)})  # room for part of it
    missing, stored = {}, {}
    for passes in (1, 3):
        delta, memory = closed_form_delta(lm, "alphaedit", hp.model_copy(update={"passes": passes}), batch, 2, z)
        originals = apply_delta(lm.model, delta)
        after = read_keys_and_top(lm.model, modules["model.layers.1.mlp.down_proj"], 2, batch, 2)
        revert(lm.model, originals)
        missing[passes] = float(((z - after.top).norm(dim=-1) / (z - before.top).norm(dim=-1)).mean())
        stored[passes] = memory.keys
        assert max(f.A.shape[0] for f in delta.lora.values()) == 2 * passes  # each pass adds its factors
    assert missing[1] > 0.3 and missing[3] < 0.8 * missing[1], missing
    assert all(torch.equal(stored[1][n], stored[3][n]) for n in stored[1])

    # passes_until: a later pass runs only while at least that share of the values' residual is left
    for until, runs in ((missing[1] * 1.02, 1), (missing[1] * 0.98, 2)):
        progress = []
        delta, _ = closed_form_delta(lm, "alphaedit", hp.model_copy(update={"passes": 3, "passes_until": until}),
                                     batch, 2, z, on_layer=lambda *a, sink=progress: sink.append(a))
        assert max(f.A.shape[0] for f in delta.lora.values()) == 2 * runs, (until, missing)
        assert progress[-1] == (6, 6) and len(progress) == 2 * runs + 1  # each module it ran, then complete


def _session(tmp_path, monkeypatch) -> EditSession:
    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return EditSession(tiny_llama(layers=4), str(tmp_path / "store"))


def test_ledger_supersede_consolidate_revert(tmp_path, monkeypatch):
    s = _session(tmp_path, monkeypatch)
    rome = s.edit([Fact("The capital of Japan is", "Rome", subject="Japan")], method="memit", hparams=FAST)
    s.edit([Fact("Madrid is in", "England", subject="Madrid")], method="alphaedit", hparams=FAST)
    paris = s.edit([Fact("The  capital of JAPAN is", "Paris", subject="Japan")], method="alphaedit", hparams=FAST)
    s.edit([Fact("Toko Yasuda plays the", "violin")], method="ft-m", hparams={"steps": 3})
    ledger = ledger_of(s.store, "main").to_dict()
    assert [f["target_new"] for f in ledger["facts"]] == ["England", "Paris", "violin"]
    assert [(f["target_new"], f["superseded_by"]) for f in ledger["superseded"]] == [
        ("Rome", f"{paris.version[:12]}-0")]

    progress = []
    consolidated = s.rebase("main", method="alphaedit", hparams=FAST, on_progress=lambda *a: progress.append(a))
    manifest = consolidated.manifest
    assert manifest["hparams"]["passes"] == 3 and manifest["hparams"]["passes_until"] == 0.05  # REBASE_DEFAULTS
    layers = len(target_modules(s.lm.model, resolve_hparams("alphaedit")))
    done = [p[1] for p in progress if p == ("closed form", p[1], 3 * layers)]  # every report counts 3 passes
    ran = done if done[-1] == len(done) - 1 else done[:-1]  # a pass rule that ends early jumps to complete
    assert done[-1] == 3 * layers and ran == list(range(len(ran))) and len(ran) - 1 in (layers, 2 * layers, 3 * layers)
    assert manifest["rebase"] is True and manifest["ledger"]["op"] == "consolidate"
    assert manifest["ledger"]["kept"] == [ledger["facts"][2]["version"]]  # no subject: its delta is kept
    assert consolidated.metrics["reused_values"] == 2
    after = ledger_of(s.store, "main").to_dict()
    assert after["facts"] == ledger["facts"] and s.store.weights_chain("main") == [consolidated.version]

    reverted = s.rebase("main", method="alphaedit", hparams=FAST, revert=[f"{paris.version[:12]}-0"])
    final = ledger_of(s.store, "main").to_dict()
    assert [f["target_new"] for f in final["facts"]] == ["Rome", "England", "violin"]  # Rome is back
    assert final["facts"][0]["fact_id"] == f"{rome.version[:12]}-0"
    assert [(f["target_new"], f["reverted_by"]) for f in final["reverted"]] == [("Paris", reverted.version)]
    # Both values are reused: Rome's from its edit, England's from the consolidate's memory, which
    # records the layers it solved at (a rebase that recorded none had every older value trained again).
    assert manifest["hparams"]["layers"] == rome.manifest["hparams"]["layers"] is not None
    assert reverted.metrics["reused_values"] == 2
    assert len(s.store.ancestry("main")) == 7  # history kept: base, four edits, two rebases


def test_consolidate_trains_again_at_base_the_values_stacked_edits_trained_on_the_head(tmp_path, monkeypatch):
    """A stacked edit trains its value on the branch's head; a consolidate solves from base, so with
    `values_at_base` it trains that value again at base (the value an edit made at base would train) and
    reuses the others; by default it reuses every stored value."""
    from editing.memory import memory_of

    s = _session(tmp_path, monkeypatch)
    japan, madrid = Fact("The capital of Japan is", "Rome", subject="Japan"), Fact("Madrid is in", "England",
                                                                                     subject="Madrid")
    first = s.edit([japan], method="alphaedit", hparams=FAST)
    assert memory_of(s.store, first.version).on_head is None  # made at base: its value is base's
    stacked = s.edit([madrid], method="alphaedit", hparams=FAST)
    on_head = memory_of(s.store, stacked.version)
    assert on_head.on_head.tolist() == [True]

    consolidated = s.rebase("main", method="alphaedit", hparams={**FAST, "values_at_base": True})
    written = memory_of(s.store, consolidated.version)  # rows in the order of the solved facts
    assert consolidated.metrics["reused_values"] == 1 and written.on_head is None
    s.checkout("base")
    at_base = edit(s.lm, [madrid], method="alphaedit", hparams=resolve_hparams("alphaedit", FAST), solve=False)
    assert set(at_base.delta.memory) == {"values"} and not at_base.delta.names()  # values only, no ΔW
    assert torch.equal(written.values[0], memory_of(s.store, first.version).values[0])
    assert torch.allclose(written.values[1], at_base.delta.memory["values"][0], atol=1e-5)
    assert not torch.allclose(written.values[1], on_head.values[0], atol=1e-4)  # Japan's edit moved the head
    again = s.rebase("main", method="alphaedit", hparams={**FAST, "values_at_base": True})  # all base's now
    assert again.metrics["reused_values"] == 2
    s.edit([Fact("Paris is in", "Spain", subject="Paris")], method="alphaedit", hparams=FAST)
    kept = s.rebase("main", method="alphaedit", hparams=FAST)  # the default: Paris's head value reused
    assert kept.metrics["reused_values"] == 3


def test_rebase_checks_out_bit_identical_from_any_version(tmp_path, monkeypatch):
    s = _session(tmp_path, monkeypatch)
    versions = [s.edit([Fact(p, t, subject=subj)], method="memit", hparams=FAST).version
                for p, t, subj in [("The capital of Japan is", "Rome", "Japan"), ("Madrid is in", "England", "Madrid")]]
    versions.append(s.rebase("main", method="memit", hparams=FAST).version)
    fresh = tiny_llama(layers=4)
    materialize(fresh.model, s.store, versions[-1])
    expected = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    for start in ["base", *versions]:
        lm = tiny_llama(layers=4)
        resident = ResidentModel(lm.model, s.store, fingerprint=lm.fingerprint)
        resident.checkout(start)
        resident.checkout(versions[-1])
        for n, p in lm.model.named_parameters():
            assert torch.equal(p, expected[n]), (start, n)


def test_the_default_method_needs_a_subject_and_falls_back_without_one():
    assert choose_method(None, ["Japan"]) == (DEFAULT_METHOD, None)
    method, note = choose_method(None, ["Japan", None])
    assert method == FALLBACK_METHOD != DEFAULT_METHOD and "1 fact(s) without a subject" in note
    assert choose_method("ft-m", [None]) == ("ft-m", None)
    with pytest.raises(ValueError, match="needs each fact's subject"):
        choose_method("alphaedit", [None])


def test_an_edit_that_names_no_objective_trains_with_its_methods():
    """Locate-then-edit values train with ce (its loss rule ends them), fine-tuning with overtone."""
    assert choose_objective("alphaedit") == choose_objective("memit") == "ce"
    assert choose_objective("ft-m") == choose_objective(FALLBACK_METHOD) == "overtone"
    assert choose_objective("alphaedit", "overtone") == "overtone"
    with pytest.raises(ValueError, match="unknown objective"):
        choose_objective("ft-m", "kl")


def test_the_protected_keys_gram_kept_up_to_date_equals_one_formed_from_scratch():
    """editing/protected.py adds new facts' terms and subtracts superseded ones between edits."""
    from editing.protected import ProtectedKeys

    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32)).Q[:, :20].contiguous()  # (in, r)
    keys = {f"f{i}": torch.randn(2, 32) for i in range(30)}

    def scratch(live):
        return ProtectedKeys({"m": {f: keys[f] for f in live}}).gram("m", basis)

    live = [f"f{i}" for i in range(20)]
    for step in range(5):  # each edit: one fact added, one superseded
        got = ProtectedKeys({"m": {f: keys[f] for f in live}}, scope="store-a").gram("m", basis)
        assert torch.allclose(got, scratch(live), atol=1e-9)
        live = live[1:] + [f"f{20 + step}"]
    assert ProtectedKeys({"m": {}}, scope="store-a").gram("m", basis) is None
    assert ProtectedKeys({"m": {f: keys[f] for f in live}}, scope="store-a").gram("other", basis) is None


def test_sequential_locality_is_measured_against_base_after_a_rebase(tmp_path, monkeypatch):
    """A rebase leaves the session at the new version; the Measurer still reads base's answers."""
    from editing import metrics
    from editing.facts import Probe
    from editing.sequential import Measurer

    s = _session(tmp_path, monkeypatch)
    prompt = "The capital of Japan is"
    fact = Fact(prompt, "Rome", subject="Japan", locality_prompts=[Probe(prompt, " Rome")])
    # The probe is the fact's own prompt: its neighbour keys (the prompt's other positions) are not kept.
    # The edit's null space (threshold 0.01), also for the rebase: on this tiny model the rebase's wider
    # default (0.03) leaves too little room for the fact to move its own prompt's answer.
    # Adam's value: no value fits on this random model (p(Rome) stays near 0.003), and the normalized one's
    # smaller change leaves the probe's top-1 where it was; Adam's moves it, which is all this test needs.
    hp = {**FAST, "steps": 20, "neighbour_weight": 0, "nullspace_threshold": 0.01, "value_optimizer": "adam"}
    s.edit([fact], method="alphaedit", hparams=hp)
    made = s.rebase("main", method="alphaedit", hparams=hp)
    edited = metrics.snapshot(s.lm, [fact]).predicted  # the session holds the rebase
    base = metrics.snapshot(tiny_llama(layers=4), [fact]).predicted
    assert edited != base  # the probe does move: a snapshot taken at the rebase would differ from base

    measurer = Measurer(s, [fact])
    assert measurer.before.predicted == base
    point = measurer.measure(s, made.version, [fact], [])
    assert point.locality < 1.0  # measured at the rebase, against base


def test_fact_keys_choose_the_keys_each_fact_is_written_along(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path))
    lm = tiny_llama(layers=4)
    fact = Fact("The capital of Japan is", "Rome", subject="Japan")
    memory = {mode: edit(lm, [fact], method="alphaedit", hparams={**FAST, "fact_keys": mode}).delta.memory
              for mode in ("both", "own", "context")}
    bottom = sorted(k for k in memory["both"] if k.startswith("keys:"))[0].split(":", 1)[1]
    assert any(k.startswith("own_keys:") for k in memory["both"])
    for mode in ("own", "context"):  # one key per fact: nothing else to keep in place on a branch
        assert not any(k.startswith("own_keys:") for k in memory[mode])
    # the bottom block's keys are read on the unedited model: the same in every mode
    assert torch.equal(memory["own"][f"keys:{bottom}"], memory["both"][f"own_keys:{bottom}"])
    assert torch.equal(memory["context"][f"keys:{bottom}"], memory["both"][f"keys:{bottom}"])
    assert not torch.equal(memory["own"][f"keys:{bottom}"], memory["context"][f"keys:{bottom}"])


def test_a_resumed_sequential_run_measures_the_checkpoints_it_missed(tmp_path, monkeypatch):
    """A run stopped after edit 3 never measured edit 2's checkpoint: resumed with catch_up, it
    measures it on the version edit 2 made, then goes on; without catch_up it does not."""
    from editing.sequential import run_sequential

    s = _session(tmp_path, monkeypatch)
    facts = [Fact(f"The capital of {c} is", t, subject=c)
             for c, t in [("Japan", "Rome"), ("France", "Oslo"), ("Peru", "Cairo"), ("Chile", "Lima")]]
    hp = {**FAST, "steps": 3}
    for i, fact in enumerate(facts[:3]):  # three edits, as a run would make them, and no checkpoint
        s.edit([fact], method="ft-m", hparams=hp, job_id=f"seq-{i}")
    second = s.store.find_job(None, "seq-1")["id"]

    points = list(run_sequential(s, facts, 2, "ft-m", "overtone", hp, catch_up=lambda edits: True))
    assert [p.edits for p in points] == [2, 4]
    assert points[0].version == second and points[0].seconds_per_edit is None
    assert points[1].version == s.store.head("main") != second
    assert [p.edits for p in run_sequential(s, facts, 2, "ft-m", "overtone", hp)] == [4]  # done: measured once


def test_a_run_stopped_right_after_a_due_edit_measures_it_on_resume(tmp_path, monkeypatch):
    """Edit 2 committed, its checkpoint never measured: the resumed run measures it first."""
    from editing.sequential import run_sequential

    s = _session(tmp_path, monkeypatch)
    facts = [Fact(f"The capital of {c} is", t, subject=c) for c, t in [("Japan", "Rome"), ("France", "Oslo"),
                                                                      ("Peru", "Cairo")]]
    hp = {**FAST, "steps": 3}
    for i, fact in enumerate(facts[:2]):
        s.edit([fact], method="ft-m", hparams=hp, job_id=f"seq-{i}")
    head = s.store.head("main")

    points = list(run_sequential(s, facts, 2, "ft-m", "overtone", hp, catch_up=lambda edits: True))
    assert [(p.edits, p.version == head) for p in points] == [(2, True), (3, False)]


def test_a_sequential_run_consolidates_every_n_edits_as_a_worker_would(tmp_path, monkeypatch):
    """consolidate_every (LMEDIT_AUTO_CONSOLIDATE_AFTER's rule): the edit that makes N versions stack on the
    last rebase also consolidates; the checkpoint measures that rebase version, the ledger is unchanged."""
    from editing.ledger import ledger_of
    from editing.sequential import run_sequential

    s = _session(tmp_path, monkeypatch)
    facts = [Fact(f"The capital of {c} is", t, subject=c) for c, t in [("Japan", "Rome"), ("France", "Oslo"),
                                                                      ("Peru", "Cairo")]]
    points = list(run_sequential(s, facts, 2, "memit", "overtone", FAST, consolidate_every=2))
    assert [p.edits for p in points] == [2, 3]
    consolidated = s.store.get(points[0].version)
    assert consolidated["rebase"] is True and s.store.get(consolidated["parent"])["job_id"] == "seq-1"
    assert s.store.edits_since_rebase(s.store.head("main")) == 1  # the third edit, stacked on the rebase
    assert [f.fact["subject"] for f in ledger_of(s.store, s.store.head("main")).live] == ["Japan", "France", "Peru"]


def test_a_text_source_reads_prose_lines_up_to_its_cap_and_its_tag_follows_the_files(tmp_path):
    from editing.keys import source_tag

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    prose = "The river runs through the old town and past the market square before it meets the sea"
    (corpus / "a.txt").write_text(f" = Heading = \nshort line\n{prose} 3 @.@ 5 km .\n{prose}, twice.\n")
    (corpus / "b.txt").write_text(f"{prose}, in the second file.\n")
    (corpus / "notes.md").write_text(f"{prose}, not a .txt file.\n")
    tag, passages = source_tag(str(corpus)), source_passages(str(corpus))
    assert passages == [f"{prose} 3.5 km .", f"{prose}, twice.", f"{prose}, in the second file."]
    assert source_passages(str(corpus), max_chars=len(prose) + 5) == passages[:1]  # stops at the cap
    assert source_tag(str(corpus)) == tag and source_tag("builtin") == "builtin"
    (corpus / "b.txt").write_text(f"{prose}, in the second file, changed.\n")
    assert source_tag(str(corpus)) != tag  # a changed file is another C₀
    with pytest.raises(FileNotFoundError, match="no such text file"):
        source_passages(str(tmp_path / "missing"))
