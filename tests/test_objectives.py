import pytest
import torch
import torch.nn.functional as F

from editing.facts import Fact
from editing.hparams import OBJECTIVES, EditHparams
from editing.objectives import _LOSSES, ce, objective_loss, overtone, overtone_kl
from editing.train import edit, should_stop
from tests.tiny import tiny_llama


def test_overtone_with_lambda0_and_tau_above_1_equals_ce():
    torch.manual_seed(0)
    logits = torch.randn(7, 50, requires_grad=True)
    labels = torch.randint(0, 50, (7,))
    loss_ce, _ = ce(logits, labels)
    loss_ot, _ = overtone(logits, labels, lam=0.0, rho=0.1, tau=1.5)
    assert torch.allclose(loss_ce, loss_ot, atol=1e-6)
    g_ce = torch.autograd.grad(loss_ce, logits)[0]
    g_ot = torch.autograd.grad(overtone(logits, labels, lam=0.0, tau=1.5)[0], logits)[0]
    assert torch.allclose(g_ce, g_ot, atol=1e-7)


def test_overtone_matches_the_specification_written_out():
    torch.manual_seed(1)
    logits = torch.randn(5, 20)
    labels = torch.randint(0, 20, (5,))
    lam, rho, tau = 0.3, 0.2, 0.95
    p = logits.softmax(-1)
    keep = p >= rho * p.max(-1, keepdim=True).values
    q = torch.where(keep, p, 0) / torch.where(keep, p, 0).sum(-1, keepdim=True)
    r = (1 - lam) * torch.nn.functional.one_hot(labels, 20) + lam * q
    per_token = -(r * logits.log_softmax(-1)).sum(-1)
    per_token[p.gather(1, labels[:, None]).squeeze(1) >= tau] = 0
    loss, stats = overtone(logits, labels, lam=lam, rho=rho, tau=tau)
    assert torch.allclose(loss, per_token.mean(), atol=1e-6)
    assert not stats.clipped.any()


def test_overtone_clips_some_tokens_of_a_mixed_batch_as_specified():
    torch.manual_seed(5)
    logits = torch.randn(6, 20)
    labels = torch.randint(0, 20, (6,))
    logits[[0, 3], labels[[0, 3]]] += 12.0  # two tokens fit (p(label) > 0.99), four not
    logits.requires_grad_(True)
    loss, stats = overtone(logits, labels, lam=0.3, rho=0.2, tau=0.95)
    assert stats.clipped.tolist() == [True, False, False, True, False, False]
    p = logits.detach().softmax(-1)
    keep = p >= 0.2 * p.max(-1, keepdim=True).values
    q = torch.where(keep, p, 0) / torch.where(keep, p, 0).sum(-1, keepdim=True)
    r = 0.7 * F.one_hot(labels, 20) + 0.3 * q
    per_token = -(r * logits.detach().log_softmax(-1)).sum(-1)
    per_token[[0, 3]] = 0  # clipped tokens count in the mean, as zeros
    assert torch.allclose(loss, per_token.mean(), atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(grad[[0, 3]]) == 0
    assert (grad[[1, 2, 4, 5]].abs().sum(-1) > 0).all()


def test_fitted_tokens_are_clipped_and_get_no_gradient():
    logits = torch.zeros(3, 10)
    logits[0, 4] = 20.0  # token 0 is fit: p(label) ≈ 1
    logits = logits.requires_grad_(True)
    labels = torch.tensor([4, 2, 7])
    loss, stats = overtone(logits, labels, lam=0.1, rho=0.1, tau=0.9)
    assert stats.clipped.tolist() == [True, False, False]
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[1]) > 0
    # Mean over all target tokens (clipped ones count as zero), as specified.
    unclipped, _ = overtone(logits[1:], labels[1:], lam=0.1, rho=0.1, tau=0.9)
    assert torch.allclose(loss, unclipped * 2 / 3, atol=1e-6)


def test_smoothing_moves_the_target_toward_the_models_own_prediction():
    logits = torch.tensor([[2.0, 1.9, -5.0, -5.0]], requires_grad=True)
    labels = torch.tensor([2])
    (g_ce,) = torch.autograd.grad(ce(logits, labels)[0], logits)
    (g_ot,) = torch.autograd.grad(overtone(logits, labels, lam=0.5, rho=0.5, tau=0.99)[0], logits)
    # CE pushes both competing tokens down; OVERTONE's refined target keeps part of their mass.
    assert g_ot[0, 0] < g_ce[0, 0] and g_ot[0, 1] < g_ce[0, 1]


def kl_written_out(logits, labels, w, eps, nsigma):
    """The second reading, token by token, straight from its definition."""
    out = []
    for z, y in zip(logits, labels):
        keep = (z > z.max() - nsigma * z.std()) | (z == z.max())
        flt = torch.where(keep, z.exp(), 0) / torch.where(keep, z.exp(), 0).sum()
        tar = w * F.one_hot(y, len(z)) + (1 - w) * flt
        if tar.argmax() != y:
            tar = F.one_hot(y, len(z)).float()
        p = z.softmax(-1)
        kl = sum(t * (t.log() - p[v].log()) for v, t in enumerate(tar) if t > 0)
        out.append(max(kl, torch.tensor(eps)))
    return torch.stack(out).mean()


def test_overtone_kl_matches_the_second_reading_written_out():
    torch.manual_seed(2)
    logits = torch.randn(6, 30) * 2
    labels = logits.argmax(-1)
    labels[3:] = torch.randint(0, 30, (3,))  # some tokens lead already, some not
    for w, eps, nsigma in ((0.1, 0.01, 0.5), (0.4, 0.05, 1.5), (0.0, 0.0, 0.0)):
        loss, _ = overtone_kl(logits, labels, onehot_weight=w, epsilon=eps, nsigma=nsigma)
        assert torch.allclose(loss, kl_written_out(logits, labels, w, eps, nsigma), atol=1e-5)


def test_overtone_kl_falls_back_to_the_one_hot_until_the_label_leads():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0], [0.0, 3.0, 2.5, -1.0]])
    labels = torch.tensor([2, 1])  # row 0: token 0 leads π_tar (0.9·π_flt dominates); row 1: the label leads
    loss, _ = overtone_kl(logits, labels, onehot_weight=0.1, epsilon=0.0, nsigma=0.5)
    logp = logits.log_softmax(-1)
    ce_row0 = -logp[0, 2]  # KL(onehot ‖ p) is the cross-entropy
    keep = logits[1] > logits[1].max() - 0.5 * logits[1].std()
    flt = torch.where(keep, logits[1], float("-inf")).softmax(-1)
    tar = 0.1 * F.one_hot(labels[1], 4) + 0.9 * flt
    kl_row1 = (torch.xlogy(tar, tar) - tar * logp[1]).sum()
    assert torch.allclose(loss, (ce_row0 + kl_row1) / 2, atol=1e-6)
    # Row 1 is not a one-hot: the filter kept token 2 (within 0.5σ of the max).
    assert keep.tolist() == [False, True, True, False] and kl_row1 < -logp[1, 1]


def test_overtone_kl_tokens_within_epsilon_get_exactly_zero_gradient():
    torch.manual_seed(3)
    logits = torch.randn(4, 25)
    labels = torch.randint(0, 25, (4,))
    logits[[0, 2], labels[[0, 2]]] += 30.0  # p(label) ≈ 1 and π_tar ≈ one-hot: KL ≈ 0 < ε
    logits.requires_grad_(True)
    loss, stats = overtone_kl(logits, labels, onehot_weight=0.1, epsilon=0.01, nsigma=0.5)
    assert stats.clipped.tolist() == [True, False, True, False]
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(grad[[0, 2]]) == 0
    assert (grad[[1, 3]].abs().sum(-1) > 0).all()
    # The clipped tokens still count in the mean, each as ε.
    rest, _ = overtone_kl(logits[[1, 3]], labels[[1, 3]], onehot_weight=0.1, epsilon=0.01, nsigma=0.5)
    assert torch.allclose(loss, (rest * 2 + 2 * 0.01) / 4, atol=1e-6)


def test_overtone_kl_with_all_weight_on_the_one_hot_is_ce_up_to_the_clip():
    torch.manual_seed(4)
    logits = torch.randn(7, 40, requires_grad=True)
    labels = torch.randint(0, 40, (7,))
    loss_ce, _ = ce(logits, labels)
    loss_kl, stats = overtone_kl(logits, labels, onehot_weight=1.0, epsilon=0.01, nsigma=0.5)
    assert not stats.clipped.any()  # random logits: every CE term is far above ε
    assert torch.allclose(loss_ce, loss_kl, atol=1e-6)
    g_ce = torch.autograd.grad(loss_ce, logits)[0]
    g_kl = torch.autograd.grad(overtone_kl(logits, labels, onehot_weight=1.0)[0], logits)[0]
    assert torch.allclose(g_ce, g_kl, atol=1e-7)
    per_token_ce = -logits.detach().log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    big = torch.full((7,), 5.0)
    assert torch.allclose(overtone_kl(logits.detach(), labels, 1.0, epsilon=5.0)[0],
                          torch.maximum(per_token_ce, big).mean(), atol=1e-6)


def test_every_listed_objective_dispatches_with_its_own_settings():
    assert set(_LOSSES) == set(OBJECTIVES)
    torch.manual_seed(6)
    logits, labels = torch.randn(3, 12), torch.randint(0, 12, (3,))
    hp = EditHparams(kl_onehot_weight=0.4, kl_epsilon=0.2, kl_nsigma=1.0, lam=0.3)
    assert torch.equal(objective_loss("overtone-kl", logits, labels, hp)[0],
                       overtone_kl(logits, labels, onehot_weight=0.4, epsilon=0.2, nsigma=1.0)[0])
    assert torch.equal(objective_loss("overtone", logits, labels, hp)[0], overtone(logits, labels, lam=0.3)[0])
    with pytest.raises(ValueError, match="overtone-kl"):
        objective_loss("kl", logits, labels, hp)


def test_overtone_kl_stops_under_auto_when_every_token_is_within_epsilon():
    hp = EditHparams()
    logits = torch.zeros(2, 8)
    logits[0, 3] = 30.0
    _, one_fit = overtone_kl(logits, torch.tensor([3, 5]))
    logits[1, 5] = 30.0
    _, both_fit = overtone_kl(logits, torch.tensor([3, 5]))
    assert not should_stop("auto", "overtone-kl", 0.01, one_fit, hp)
    assert should_stop("auto", "overtone-kl", 0.01, both_fit, hp)
    # On a tiny model (whose final norm caps p near 0.5-0.7) a loose ε is reachable: the loop stops there.
    fact = Fact("The Eiffel Tower is in", "Rome", subject="The Eiffel Tower")
    hps = {"layers": [0], "positions": "all", "lr": 0.05, "steps": 40, "kl_epsilon": 0.8}
    result = edit(tiny_llama(), [fact], "ft-m", "overtone-kl", {**hps, "stop": "auto"})
    assert result.stopped_early and 0 < result.steps < 40
    assert result.losses[-1] == pytest.approx(0.8)  # every token clipped: the mean is ε itself


def test_append_eos_trains_the_target_followed_by_eos():
    lm = tiny_llama()
    fact = Fact("The Eiffel Tower is in", "Rome", subject="The Eiffel Tower")
    hps = {"layers": [0], "positions": "all", "lr": 0.05, "steps": 2, "stop": "none"}
    plain = edit(lm, [fact], "ft-m", "overtone-kl", hps)
    with_eos = edit(lm, [fact], "ft-m", "overtone-kl", {**hps, "append_eos": True})
    assert with_eos.target_tokens == plain.target_tokens + [lm.tokenizer.eos_token]
    assert len(with_eos.trace[0]) == len(plain.trace[0]) + 1
