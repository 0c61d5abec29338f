"""Half-precision models: curvature statistics are float32 sums (trust rule: statistics
accumulate in at least float32 whatever the model dtype).

Two kinds of check. A bf16 model's diagonal Fisher equals the float32 model's (same bf16
weights and inputs) to bf16 *forward* precision. And, the point of this file, on a problem
whose bf16 forward and backward passes are exact (inputs, weights, targets and every
intermediate are short binary fractions), one large square followed by thousands of small
ones: a bf16 running sum stops taking the small ones (each batch adds less than half a bf16
ulp of the sum), a float32 one keeps them. The library's diagonal Fisher, input Grams and
K-FAC factors must then equal the float64 sums to float32 precision, while the same sums
accumulated in bf16 (computed here, batch by batch) are off by far more.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvmerge.fisher import diagonal_fisher
from curvmerge.statistics import input_grams, kfac_factors

BF16 = torch.bfloat16
F64 = torch.float64
BATCH = 4
#: float32 precision of a sum of a few thousand float32 terms (relative, per entry)
F32_RTOL = 1e-5
#: a bf16 accumulation is off by at least this much (relative, every entry) on these
#: problems: far above F32_RTOL and above bf16 forward precision
BF16_LOSS = 0.1


def exact_problem(scale: float, n_small: int = 4095, seed: int = 0):
    """A ``Linear(4, 2)`` and MSE data on which bf16 arithmetic is exact: weights in
    multiples of 1/2 in [-1, 1], inputs in multiples of 1/2 in [-1.5, 1.5], targets in
    multiples of 1/4 in [-2, 2], bias (0.5, -1). Example 0 has its input times ``scale``
    (a power of two), so that its squares dwarf each of the ``n_small`` others."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randint(-2, 3, (2, 4), generator=g, dtype=F64) / 2
    b = torch.tensor([0.5, -1.0], dtype=F64)
    x = torch.randint(-3, 4, (n_small + 1, 4), generator=g).to(F64) / 2
    x[0] = torch.tensor([1.5, -1.5, 1.0, 1.5], dtype=F64) * scale
    y = torch.randint(-8, 9, (n_small + 1, 2), generator=g).to(F64) / 4
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(W)
        model.bias.copy_(b)
    low = model.to(BF16).eval()
    data = [(x[i : i + BATCH].to(BF16), y[i : i + BATCH].to(BF16)) for i in range(0, len(x), BATCH)]
    # preconditions: everything is exact in bf16, including the forward pass
    assert torch.equal(x.to(BF16).to(F64), x) and torch.equal(y.to(BF16).to(F64), y)
    with torch.no_grad():
        f = torch.cat([low(xb) for xb, _ in data]).to(F64)
    assert torch.equal(f, x @ W.T + b)
    return low, data, x, f - y


def per_batch(values: torch.Tensor) -> list[torch.Tensor]:
    """Per-example float64 values ``[N, ...]`` summed per batch of ``BATCH``."""
    return [values[i : i + BATCH].sum(0) for i in range(0, len(values), BATCH)]


def bf16_running_sum(increments: list[torch.Tensor]) -> torch.Tensor:
    """What a bf16 accumulator holds after adding each batch's (exact) sum in turn."""
    acc = torch.zeros_like(increments[0], dtype=BF16)
    for inc in increments:
        acc = acc + inc.to(BF16)
    return acc.to(F64)


def rel(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative error of every entry."""
    return (a.to(F64) - ref).abs() / ref.abs()


def test_bf16_diagonal_fisher_matches_float32_model_to_forward_precision():
    """A Tanh MLP on cross-entropy: the bf16 model's Fisher (float32 sums) against the
    float32 model with the same bf16-rounded weights and inputs. The difference is the bf16
    forward and backward rounding (about 2^-8 per operation): tolerance 3e-2 relative in
    norm, per kind; the results differ (bf16 does round), so the comparison is not vacuous."""
    torch.manual_seed(0)
    low = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(BF16).eval()
    high = copy.deepcopy(low).float()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 6, generator=g).to(BF16)
    y = torch.randint(0, 3, (256,), generator=g)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    for kind in ("exact", "empirical"):
        F_low = diagonal_fisher(low, "cross_entropy", batches, kind=kind, progress=False)
        F_high = diagonal_fisher(
            high, "cross_entropy", [(a.float(), t) for a, t in batches], kind=kind, progress=False
        )
        assert F_low.dtype == torch.float32 and F_high.dtype == torch.float32
        d_low, d_high = F_low.diagonal().double(), F_high.diagonal().double()
        rel = float((d_low - d_high).norm() / d_high.norm())
        assert 0 < rel < 3e-2, (kind, rel)


@pytest.mark.parametrize(
    "kind, scale",
    # the empirical squares grow as scale^4 (input and residual), the exact ones as scale^2
    [("empirical", 8.0), ("exact", 64.0)],
)
def test_bf16_diagonal_fisher_keeps_small_squares_after_a_large_one(kind, scale):
    low, data, x, r = exact_problem(scale)
    # float64 per-example squares, by hand (MSE, reduction "sum": c = 1): the empirical
    # gradient of example n is 2 r_n [x_n; 1]^T, the exact kind is 2 [x_n; 1]^2 per output
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)  # [N, 5]
    if kind == "empirical":
        sq = (2 * r).square()[:, :, None] * xa.square()[:, None, :]  # [N, 2, 5]
    else:
        sq = 2 * xa.square()[:, None, :].expand(-1, 2, -1)
    flat = lambda s: torch.cat([s[..., :4].reshape(*s.shape[:-2], -1), s[..., 4]], -1)  # noqa: E731
    ref = flat(sq.sum(0))  # weight [2, 4] then bias [2], the space's order
    lost = bf16_running_sum([flat(s) for s in per_batch(sq)])
    assert rel(lost, ref).min() > BF16_LOSS  # bf16 accumulation visibly loses them, everywhere

    F = diagonal_fisher(low, nn.MSELoss(reduction="sum"), data, kind=kind, progress=False)
    assert F.dtype == torch.float32
    assert rel(F.diagonal(), ref).max() < F32_RTOL


def test_bf16_input_grams_and_kfac_factors_keep_small_rows_after_a_large_one():
    """Grams and K-FAC's input factor A sum [x; 1][x; 1]^T over rows; the empirical K-FAC
    output factor B sums (2 r)(2 r)^T. Both are float32 for a bf16 model and equal the
    float64 sums to float32 precision (every entry, zeros exactly) where a bf16 running sum
    would lose the small rows (shown on the diagonals, the squares; off the diagonal the
    terms cancel)."""
    low, data, x, r = exact_problem(64.0)
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
    outer = xa[:, :, None] * xa[:, None, :]
    G_ref = outer.sum(0)
    assert rel(bf16_running_sum(per_batch(outer)), G_ref).diagonal().min() > BF16_LOSS
    grams = input_grams(low, data)
    assert grams.grams[""].dtype == torch.float32 and grams.num_rows[""] == len(x)
    torch.testing.assert_close(grams.grams[""].to(F64), G_ref, rtol=F32_RTOL, atol=0)

    low, data, x, r = exact_problem(8.0)  # B grows with the residual: a smaller scale
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
    A_ref = (xa[:, :, None] * xa[:, None, :]).sum(0) / len(x)
    gg = (2 * r)[:, :, None] * (2 * r)[:, None, :]
    B_ref = gg.sum(0)
    assert rel(bf16_running_sum(per_batch(gg)), B_ref).diagonal().min() > BF16_LOSS
    K = kfac_factors(low, nn.MSELoss(reduction="sum"), data, kind="empirical")
    assert K.A[""].dtype == torch.float32 and K.B[""].dtype == torch.float32
    torch.testing.assert_close(K.A[""].to(F64), A_ref, rtol=F32_RTOL, atol=0)
    torch.testing.assert_close(K.B[""].to(F64), B_ref, rtol=F32_RTOL, atol=0)
