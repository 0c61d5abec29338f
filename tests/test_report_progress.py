"""Progress a person can read: one bar per CG solve, and what a product of the sum costs."""

from __future__ import annotations

from curvmerge import merge
from curvmerge.merging.report import MergeCosts, MergeReport
from curvmerge.operators.ggn import GGNOperator
from tests.test_ggn import make_problem


def _ggn_merge(progress: bool, num: int = 3):
    thetas, ops = [], []
    for seed in range(num):
        model, loss_fn, data = make_problem("ce", seed)
        ops.append(GGNOperator(model, loss_fn, data, params=r"^0\.", progress=progress))
        thetas.append(model)
    return merge(thetas, ops, damping=1e-2, rtol=1e-8, progress=progress), ops


def test_a_ggn_merge_with_progress_shows_one_solve_bar(capsys):
    result, ops = _ggn_merge(progress=True)
    err = capsys.readouterr().err
    assert result.report.method == "cg" and result.report.iterations > 1
    assert err.count("GGN product (first)") >= 1  # the statistic pass of each model
    assert "GGN product (cached)" not in err and "GGN product:" not in err
    assert "CG solve" in err
    assert "residual" in err  # the outcome is written on the bar
    # per-model products counted by the operators equal the report's
    assert sum(F.products for F in ops) == result.report.costs.per_model_products


def test_without_progress_a_merge_prints_nothing(capsys):
    _ggn_merge(progress=False)
    assert capsys.readouterr().err == ""


def test_per_model_products_are_products_of_the_sum_times_models():
    result, _ = _ggn_merge(progress=False, num=3)
    c = result.report.costs
    assert c.curvatures == 3
    assert c.sum_products == c.cg_products + c.warm_start_products + c.sketch_products > 0
    assert c.per_model_products == c.sum_products * 3 + c.rhs_products + c.scale_products
    assert c.seconds_per_product > 0
    text = str(result.report)
    assert f"/ {c.sum_products} products of the sum = {c.sum_products * 3} per-model" in text


def test_zero_weights_do_not_count():
    report = MergeReport(
        method="cg", num_models=3, weights=[0.5, 0.0, 0.5], damping=0.1, prior="mean"
    )
    assert report.costs.curvatures == 2
    report.costs.cg_products, report.costs.cg_seconds = 10, 5.0
    assert report.costs.per_model_products == 20
    assert report.costs.seconds_per_product == 0.5


def test_costs_add_keeps_the_curvature_count():
    a = MergeCosts(cg_products=3, curvatures=2)
    b = MergeCosts(rhs_products=2)
    assert (a + b).curvatures == 2
    assert (a + b).per_model_products == 3 * 2 + 2


def test_a_damping_grid_counts_each_column_of_its_true_residual_block():
    # the multi-shift run's true residuals are one [P, S] block: S products, as the GGN
    # operators count them (a product is one column times one operator)
    from curvmerge.merging.prepared import PreparedMerge

    thetas, ops = [], []
    for seed in range(3):
        model, loss_fn, data = make_problem("ce", seed)
        ops.append(GGNOperator(model, loss_fn, data, params=r"^0\."))
        thetas.append(model)
    prepared = PreparedMerge(thetas, ops, params=r"^0\.", rtol=1e-8)
    before = sum(F.products for F in ops)
    grid = prepared.merge_dampings(dampings=[1e-1, 1e-2, 1e-3])
    assert grid.shared and all(r.report.converged for r in grid)
    assert sum(F.products for F in ops) - before == 3 * grid.products  # no rhs: cached
