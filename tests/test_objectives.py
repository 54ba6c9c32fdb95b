import torch

from editing.objectives import ce, overtone


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
