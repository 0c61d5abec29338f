"""Markdown report with PNG plots of a :class:`~curvmerge.verify.VerificationResult`.

:func:`write_report` writes ``report.md``, ``results.json`` and the figures
(``spectra.png``, ``diagonal_scatter.png``, ``layer_share.png``, ``merges.png``,
``cg_history.png``) into a folder. Every file is written to a temporary name in the same
folder and renamed into place, so a reader never sees a half-written file. Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from curvmerge._optional import require
from curvmerge.verify.run import VerificationResult

__all__ = [
    "write_report",
    "render_markdown",
    "FIGURES",
    "plot_spectra",
    "plot_diagonal_scatter",
    "plot_layer_share",
    "plot_merges",
    "plot_cg_history",
]

FIGURES = (
    "spectra.png",
    "diagonal_scatter.png",
    "layer_share.png",
    "merges.png",
    "cg_history.png",
)


# ---------------------------------------------------------------------------- atomic files
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_savefig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _atomic_write_bytes(path, buf.getvalue())


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


# ---------------------------------------------------------------------------- figures
def _plt():
    require("matplotlib", "the verification report's figures")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(result: VerificationResult):
    """Top eigenvalues of each task's Fisher and of the merge's weighted sum (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in result.tasks:
        lam = t.spectrum.eigenvalues.clamp_min(1e-30).numpy()
        ax.semilogy(range(1, len(lam) + 1), lam, "o-", ms=3, label=t.name)
    if result.merge_spectrum is not None:
        lam = result.merge_spectrum.eigenvalues.clamp_min(1e-30).numpy()
        ax.semilogy(range(1, len(lam) + 1), lam, "k--", lw=1.5, label=r"$\sum_t w_t F_t$")
    damping = result.config.get("damping")
    if damping:
        ax.axhline(damping, color="grey", lw=0.8, ls=":", label=f"damping {damping:g}")
    ax.set_xlabel("index i")
    ax.set_ylabel(r"eigenvalue $\lambda_i$")
    ax.set_title("Top eigenvalues of the exact Fisher (Lanczos)")
    ax.legend(fontsize=8)
    return fig


def plot_diagonal_scatter(result: VerificationResult, task: int = 0, max_points: int = 4000):
    """Each diagonal against the exact diagonal of one task (log-log), with the identity."""
    plt = _plt()
    tv = result.tasks[task]
    exact = tv.diagonals["exact"]
    names = [n for n in tv.diagonals if n != "exact" and not n.endswith("_se")]
    cols = max(len(names), 1)
    fig, axes = plt.subplots(1, cols, figsize=(3.0 * cols, 3.2), squeeze=False)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(exact.numel(), generator=g)[:max_points]
    x = exact[idx]
    lo = float(x[x > 0].min()) if bool((x > 0).any()) else 1e-12
    hi = float(x.max())
    for ax, name in zip(axes[0], names, strict=False):
        y = tv.diagonals[name][idx]
        pos = y > 0
        ax.loglog(x[pos].numpy(), y[pos].numpy(), ".", ms=1.5, alpha=0.4)
        if int((~pos).sum()):
            ax.loglog(x[~pos].numpy(), torch.full_like(x[~pos], lo).numpy(), "r.", ms=1.5)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        comp = next((c for c in tv.comparisons if c.name.startswith(name)), None)
        title = name if comp is None else f"{name}\nrel. err {comp.relative_error:.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("exact diagonal", fontsize=8)
    axes[0][0].set_ylabel("compared diagonal (red: <= 0)", fontsize=8)
    fig.suptitle(f"Diagonal vs exact diagonal, task {tv.name}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_layer_share(result: VerificationResult):
    """Off-diagonal share per layer and task (left) and the diagonal's part of the squared
    Frobenius norm, :math:`1 - s^2`, on a log scale (right), with error bars."""
    plt = _plt()
    layers = list(result.space.names)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(layers) + 3), 4))
    T = len(result.tasks)
    width = 0.8 / max(T, 1)
    for i, tv in enumerate(result.tasks):
        xs = [j + (i - (T - 1) / 2) * width for j in range(len(layers))]
        vals = [tv.share.per_layer.get(n, math.nan) for n in layers]
        errs = [tv.share.layer_error_bar(n, result.z) for n in layers]
        axes[0].bar(xs, vals, width, yerr=errs, capsize=2, label=tv.name)
        frac = [tv.share.per_layer_fraction.get(n, math.nan) for n in layers]
        ferr = [tv.share.fraction_error_bar(n, result.z) for n in layers]
        lower = [min(e, f * (1 - 1e-9)) for f, e in zip(frac, ferr, strict=True)]
        axes[1].bar(xs, frac, width, yerr=[lower, ferr], capsize=2, label=tv.name)
    for ax in axes:
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel(r"$s_R = \|(F-D)_{R,:}\|_F / \|F_{R,:}\|_F$")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("off-diagonal share per layer")
    axes[1].set_yscale("log")
    axes[1].set_ylabel(r"$f_R = 1 - s_R^2 = \|D_R\|_F^2 / \|F_{R,:}\|_F^2$")
    axes[1].set_title("diagonal's part of the Frobenius mass")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"How diagonal is the Fisher? (error bars: {result.z:g} s.e.)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_merges(result: VerificationResult):
    """Accuracy of each merge on each task."""
    plt = _plt()
    mc = result.merges
    fig, ax = plt.subplots(figsize=(7, 4))
    M = len(mc.methods)
    width = 0.8 / max(M, 1)
    for i, m in enumerate(mc.methods):
        vals = [m.per_task[t]["accuracy"] for t in mc.tasks]
        xs = [j + (i - (M - 1) / 2) * width for j in range(len(mc.tasks))]
        ax.bar(xs, vals, width, label=f"{m.name} (mean {m.mean_accuracy:.3f})")
    ax.set_xticks(range(len(mc.tasks)))
    ax.set_xticklabels(mc.tasks, fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.0)
    ax.set_title("Per-task accuracy of the merged body (each task keeps its head)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_cg_history(result: VerificationResult):
    """Relative residual of CG for every merge solved iteratively."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, hist in result.merges.residual_history.items():
        if len(hist) > 1:
            ax.semilogy(range(len(hist)), hist, label=name)
    ax.set_xlabel("CG iteration")
    ax.set_ylabel(r"$\|b - Ax\| / \|b\|$")
    ax.set_title("CG history of the exact-Fisher merge")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------- markdown
def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) < 10**-(digits) or abs(x) >= 1e5):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(result: VerificationResult, title: str = "Diagonal vs exact Fisher") -> str:
    """The report's Markdown text (figures referenced by file name)."""
    cfg, z = result.config, result.z
    out = [f"# {title}", ""]
    out.append(
        f"{len(result.tasks)} tasks, P = {result.space.size:,} merged parameters in "
        f"{len(result.space)} layers; curvature `{cfg.get('curvature')}` (exact GGN = Fisher "
        f"for cross-entropy); damping λ = {cfg.get('damping')}; error bars are {z:g} standard "
        f"errors (Student-t for scalars); total time {result.seconds.get('total', 0):.0f} s wall, "
        f"{result.seconds.get('cpu_total', 0):.0f} s CPU."
    )
    out += ["", "## Diagonals compared with the exact diagonal", ""]
    out.append(
        "Relative error ‖d̂ − d‖/‖d‖; for stochastic estimators the error bar is "
        f"{z:g}·√(Σ se²)/‖d‖ and *covered* says whether the true error lies within it."
    )
    rows = []
    for tv in result.tasks:
        for c in tv.comparisons:
            rows.append(
                [
                    tv.name,
                    c.name,
                    _f(c.relative_error),
                    _f(c.error_bar),
                    _f(c.within_error_bar),
                    _f(c.cosine),
                    _f(c.log_correlation),
                    _f(c.median_ratio),
                    str(c.num_products or "–"),
                ]
            )
    out.append(
        _table(
            [
                "task",
                "diagonal",
                "rel. error",
                "error bar",
                "covered",
                "cosine",
                "log-corr.",
                "median ratio",
                "products",
            ],
            rows,
        )
    )
    out += ["", "![diagonal scatter](diagonal_scatter.png)", ""]

    out += ["## How much of the Fisher the diagonal captures", ""]
    out.append(
        "Off-diagonal share s = ‖F − diag F‖_F / ‖F‖_F (0: diagonal; 1: the diagonal holds "
        "none of the Frobenius mass) and the diagonal's part f = ‖D‖²_F/‖F‖²_F = 1 − s², from "
        "the exact diagonal and ‖F‖²_F = E‖Fz‖² estimated with Rademacher probes. Per layer "
        "R (rows of the layer's block): f_R = ‖D_R‖²/‖F_{R,:}‖²_F."
    )
    layers = list(result.space.names)
    rows = []
    for tv in result.tasks:
        sh = tv.share
        f_bar = 2 * sh.share * sh.error_bar(z)
        rows.append(
            [
                tv.name,
                f"{_f(sh.share, 4)} ± {_f(sh.error_bar(z), 2)}",
                f"{sh.diagonal_fraction:.2e} ± {f_bar:.1e}",
            ]
            + [
                f"{sh.per_layer_fraction[n]:.2e} ± {sh.fraction_error_bar(n, z):.1e}"
                for n in layers
            ]
        )
    out.append(_table(["task", "share s", "f", *[f"f: {n}" for n in layers]], rows))
    out += ["", "![per-layer share](layer_share.png)", ""]

    out += ["## Spectra, trace and effective rank", ""]
    out.append(
        "Top eigenvalues by Lanczos (`eigsh` on `to_scipy()`); trace = sum of the exact "
        "diagonal; intrinsic dimension tr F / λ_max (Tropp 2015)."
    )
    rows = []
    specs = [(tv.name, tv.spectrum) for tv in result.tasks]
    if result.merge_spectrum is not None:
        specs.append(("Σ w_t F_t", result.merge_spectrum))
    for name, sp in specs:
        top = ", ".join(_f(float(v)) for v in sp.eigenvalues[:5])
        rows.append(
            [
                name,
                _f(sp.lambda_max),
                top,
                _f(float(sp.eigenvalues[-1])),
                _f(sp.trace.value),
                _f(sp.intrinsic_dimension.value, 2),
                str(sp.num_products),
            ]
        )
    out.append(
        _table(["curvature", "λ_max", "top 5", "λ_k", "trace", "tr/λ_max", "products"], rows)
    )
    out += ["", "![spectra](spectra.png)", ""]

    out += ["## Task vectors in directions the Fishers barely see", ""]
    out.append(
        "Δ_t = θ_t − θ_0 (θ_0 = "
        + ("the base model" if cfg.get("base") == "given" else "the average of the models")
        + "). Rayleigh share ΔᵀFΔ/(λ_max‖Δ‖²); alignment ΔᵀFΔ/‖Δ‖² ÷ (tr F/P), 1 for a "
        "random direction; captured = share of ‖Δ‖² in the span of the top-k eigenvectors; "
        "unseen = share of ‖Δ‖² on eigenvalues below the damping (≤: an upper bound, the "
        "Lanczos pairs did not reach below it); prior share ρ = λΔᵀ(F+λI)⁻¹Δ/‖Δ‖², the soft "
        "version that the merge hands back to the prior (by CG, for Σ w F); diag. view "
        "ΔᵀDΔ/ΔᵀFΔ (1 is right)."
    )
    rows = []
    for tv in result.tasks:
        for label, d in (("own F_t", tv.directions_own), ("Σ w F", tv.directions_merge)):
            if d is None:
                continue
            rows.append(
                [
                    tv.name,
                    label,
                    _f(d.delta_norm),
                    _f(d.rayleigh_share, 4),
                    _f(d.alignment),
                    _f(d.captured_topk, 4),
                    ("≤ " if d.unseen_is_bound else "") + _f(d.unseen_fraction, 4),
                    _f(d.prior_share, 4),
                    _f(d.diagonal_ratio),
                ]
            )
    out.append(
        _table(
            [
                "task",
                "curvature",
                "‖Δ‖",
                "Rayleigh share",
                "alignment",
                "captured (top-k)",
                "unseen",
                "prior share ρ",
                "diag. view",
            ],
            rows,
        )
    )

    if result.merges is not None:
        mc = result.merges
        out += ["", "## Merges", ""]
        out.append(
            "Each merged body is evaluated on every task with that task's own head "
            "(`task` = the unmerged fine-tuned models). Accuracy / mean cross-entropy on "
            "the test split."
        )
        rows = []
        for m in mc.methods:
            rep = m.report or {}
            rows.append(
                [m.name]
                + [
                    f"{m.per_task[t]['accuracy']:.3f} / {m.per_task[t]['loss']:.3f}"
                    for t in mc.tasks
                ]
                + [
                    f"{m.mean_accuracy:.3f}",
                    str(rep.get("method", "–")),
                    str(rep.get("iterations", "–")),
                    _f(rep.get("relative_residual")) if rep else "–",
                    f"{m.seconds:.1f}",
                ]
            )
        out.append(
            _table(
                ["method", *mc.tasks, "mean acc.", "solver", "CG iters", "rel. residual", "s"],
                rows,
            )
        )
        out += ["", "![merges](merges.png)", ""]
        names = list(mc.distances)
        rows = [[a] + [_f(mc.distances[a][b]) for b in names] for a in names]
        out.append(
            f"Distances ‖θ_a − θ_b‖ between merged points (spread of the task models around "
            f"their average: {_f(mc.spread)}):"
        )
        out += ["", _table(["", *names], rows), ""]
        rows = [[a] + [_f(mc.distance_to_tasks[a][t]) for t in mc.tasks] for a in names]
        out += ["Distance to each task model:", "", _table(["", *mc.tasks], rows), ""]
        out += ["![CG history](cg_history.png)", ""]

    out += ["## Settings and timings", "", "```", json.dumps(cfg, indent=1), "```", ""]
    out += [
        "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()),
        "",
    ]
    return "\n".join(out)


def write_report(
    result: VerificationResult, out_dir: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Write ``report.md``, ``results.json`` and the PNG figures into ``out_dir``.

    Returns:
        The path of ``report.md``.
    """
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "spectra.png": plot_spectra,
        "diagonal_scatter.png": plot_diagonal_scatter,
        "layer_share.png": plot_layer_share,
    }
    if result.merges is not None:
        figures["merges.png"] = plot_merges
        figures["cg_history.png"] = plot_cg_history
    for name, make in figures.items():
        fig = make(result)
        try:
            _atomic_savefig(fig, out / name)
        finally:
            plt.close(fig)
    data = json.dumps(result.to_dict(), indent=1, default=_json_default, allow_nan=True)
    _atomic_write_text(out / "results.json", data)
    text = render_markdown(result, title or "Diagonal vs exact Fisher")
    path = out / "report.md"
    _atomic_write_text(path, text)
    return path
