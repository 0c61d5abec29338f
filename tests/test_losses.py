"""Loss conventions: closed-form output Hessians, their square roots, gradients, sampling."""

import pytest
import torch
from torch import nn

from curvmerge.losses import (
    LossSpec,
    causal_lm_targets,
    flatten_rows,
    output_grad,
    output_hessian_matmul,
    output_hessian_sqrt,
    resolve_loss,
    sample_targets,
)

LOSSES = ["cross_entropy", "mse", "bce"]


def _row_loss(name, f, y):
    spec = LossSpec(name, "sum")
    return spec.module()(f.unsqueeze(0), y.unsqueeze(0))


def _targets(name, f):
    if name == "cross_entropy":
        return torch.tensor(1)
    return torch.rand(f.shape, dtype=f.dtype)


@pytest.mark.parametrize("name", LOSSES)
def test_output_hessian_matches_autograd(name):
    torch.manual_seed(0)
    f = torch.randn(4, dtype=torch.float64)
    y = _targets(name, f)
    H = torch.autograd.functional.hessian(lambda z: _row_loss(name, z, y), f)
    spec = LossSpec(name)
    V = torch.randn(1, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(output_hessian_matmul(spec, f[None], V)[0], H @ V[0])
    S = output_hessian_sqrt(spec, f[None])[0]
    torch.testing.assert_close(S @ S.T, H)


@pytest.mark.parametrize("name", LOSSES)
def test_output_grad_matches_autograd(name):
    torch.manual_seed(1)
    f = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = _targets(name, f.detach())
    (g,) = torch.autograd.grad(_row_loss(name, f, y), f)
    torch.testing.assert_close(output_grad(LossSpec(name), f.detach()[None], y[None])[0], g)


@pytest.mark.parametrize("name", LOSSES)
def test_sampled_scores_have_the_hessian_as_covariance(name):
    """E[g g^T] over sampled targets equals H; the tolerance follows from the sample count."""
    torch.manual_seed(2)
    spec = LossSpec(name)
    f = torch.randn(1, 3, dtype=torch.float64)
    S = 40_000
    y = sample_targets(spec, f, S, torch.Generator().manual_seed(0))
    grads = torch.stack([output_grad(spec, f, y[s])[0] for s in range(S)])
    emp = grads.T @ grads / S
    H = output_hessian_matmul(spec, f, torch.eye(3, dtype=torch.float64)[None])[0]
    # entries of g g^T are bounded by 4 (CE, BCE) or have 4th moment ~ 3*(2)^2 (MSE)
    tol = 6 * 4.0 / S**0.5
    assert (emp - H).abs().max() < tol


def test_sampling_is_reproducible():
    f = torch.randn(6, 4)
    a = sample_targets(LossSpec("cross_entropy"), f, 3, torch.Generator().manual_seed(5))
    b = sample_targets(LossSpec("cross_entropy"), f, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_resolve_loss_accepts_modules_and_names_and_refuses_others():
    assert resolve_loss(nn.CrossEntropyLoss(reduction="sum")) == LossSpec("cross_entropy", "sum")
    assert resolve_loss("MSE") == LossSpec("mse")
    with pytest.raises(ValueError, match="unsupported loss"):
        resolve_loss(nn.L1Loss())
    with pytest.raises(ValueError, match="label smoothing"):
        resolve_loss(nn.CrossEntropyLoss(label_smoothing=0.1))


def test_flatten_rows_drops_padding_and_tracks_examples():
    spec = LossSpec("cross_entropy")
    out = torch.randn(2, 3, 5)
    tgt = torch.tensor([[1, 2, -100], [0, -100, -100]])
    f, y, ex = flatten_rows(spec, out, tgt)
    assert f.shape == (3, 5)
    assert y.tolist() == [1, 2, 0]
    assert ex.tolist() == [0, 0, 1]


def test_causal_lm_targets_shift_and_mask_padding():
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert causal_lm_targets(ids, mask).tolist() == [[6, 7, -100, -100]]


def test_ambiguous_cross_entropy_layout_is_refused_unless_declared():
    """[B, T, C] with T == C also fits torch's [B, C, T]: never read silently."""
    from curvmerge import GGNOperator, diagonal_fisher

    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 3, generator=g)
    y = torch.randint(0, 3, (2, 3), generator=g)
    with pytest.raises(ValueError, match="ambiguous cross-entropy layout"):
        flatten_rows(LossSpec("cross_entropy"), out, y)
    f, _, example = flatten_rows(LossSpec("cross_entropy", classes_last=True), out, y)
    assert f.shape == (6, 3) and example.tolist() == [0, 0, 0, 1, 1, 1]
    flatten_rows(LossSpec("cross_entropy"), torch.randn(2, 4, 3), torch.zeros(2, 4).long())
    with pytest.raises(ValueError, match="movedim"):
        LossSpec("cross_entropy", classes_last=False)

    model = torch.nn.Linear(3, 3)
    data = [(torch.randn(2, 3, 3, generator=g), y)]
    with pytest.raises(ValueError, match="ambiguous"):
        diagonal_fisher(model, torch.nn.CrossEntropyLoss(), data, progress=False)
    with pytest.raises(ValueError, match="ambiguous"):
        GGNOperator(model, "cross_entropy", data) @ torch.zeros(12)
    declared = LossSpec("cross_entropy", classes_last=True)
    F = diagonal_fisher(model, declared, data, progress=False)
    G = GGNOperator(model, declared, data)
    torch.testing.assert_close(F.diagonal(), G.diagonal())


def test_causal_lm_targets_exclude_left_and_right_padding():
    from curvmerge.losses import causal_lm_targets

    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert causal_lm_targets(ids, mask).tolist() == [
        [-100, -100, 6, 7, -100],
        [6, 7, -100, -100, -100],
    ]
