"""Per-model curvature statistics, computed once and shared by every method and sweep.

:class:`StatisticsStore` computes, on first request, one diagonal Fisher per model
(:func:`curvmerge.fisher.diagonal_fisher`), one matrix-free GGN/Fisher operator per model
(the registry's operator class, normally :class:`curvmerge.GGNOperator`), one K-FAC Fisher
per model (:func:`curvmerge.statistics.kfac_factors` of the Fisher kind, as a
:class:`~curvmerge.operators.KroneckerOperator`) and one set of layer input Gram matrices per
model (:func:`curvmerge.statistics.input_grams`, RegMean), all on the same statistics
batches, and hands the same objects to every method that needs them: a method, a second
method of the same kind and a coefficient sweep never recompute them. A GGN operator caches
its own diagonal, so the damping scale and warm starts of several exact merges cost one
diagonal pass per model.

With ``fisher_dir``, each diagonal Fisher is also saved as a Fisher file
(:func:`curvmerge.fisher.save_fisher`) and a later run loads it instead of computing it.
A file is reused only if its key matches: a SHA-256 over everything the Fisher depends on,
i.e. every parameter and buffer of the model (names, dtypes, shapes, values), every tensor of
the statistics batches, the loss, the kind, the number of Monte-Carlo samples, their seed and
the selected parameter names. Any other file at that path is recomputed and replaced.

Under :mod:`torch.distributed` (``docs/distributed.md``) every process holds the same models
and all of the statistics batches; each computes on its shard of them
(:func:`curvmerge.distributed.shard`: every ``world_size``-th batch; for the GGN operators,
of the first batches holding ``exact_examples``) and the computers sum over the processes, so
every process holds the statistics of all the batches (the ``"mc"`` kind draws other labels
on the other processes). The ``"data"`` statistics (for methods that run the models on data
and sum nothing over processes) are all the batches on every process. Keys are computed from
all the batches; a Fisher file is loaded only where every process can load it, and only
rank 0 writes one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge.batches import iterate_batches, model_device, model_outputs, move_batch
from curvmerge.distributed import all_reduce_sum, on_main_process, shard, world_size
from curvmerge.fisher import diagonal_fisher, load_fisher, save_fisher
from curvmerge.losses import LossSpec, flatten_rows, resolve_loss
from curvmerge.operators import KroneckerOperator, LinearOperator
from curvmerge.space import ParamSpace
from curvmerge.statistics import input_grams, kfac_factors

__all__ = ["StatisticsStore", "statistics_key", "KEY_FORMAT", "KINDS"]

#: The statistics a store computes (the registry's kinds that are computed, not ``"data"``).
KINDS = ("diagonal_fisher", "exact_ggn", "kfac", "input_gram")

#: Prefix of the keys stored in Fisher files (also keeps them from parsing as JSON numbers).
KEY_FORMAT = "sha256:v1:"


def _tensors(obj, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key], f"{prefix}.{key}")
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]")


def _update(h, name: str, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def statistics_key(model: nn.Module, batches: Sequence, settings: Mapping[str, Any]) -> str:
    """The key of a statistic: a SHA-256 over the model's parameters and buffers, the
    batches' tensors and ``settings`` (JSON), prefixed with :data:`KEY_FORMAT`."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    for name, t in model.named_parameters(remove_duplicate=False):
        _update(h, f"param:{name}", t)
    for name, t in model.named_buffers(remove_duplicate=False):
        _update(h, f"buffer:{name}", t)
    for i, batch in enumerate(batches):
        for name, t in _tensors(batch, f"batch{i}"):
            _update(h, name, t)
    return KEY_FORMAT + h.hexdigest()


def _loss_key(spec: LossSpec) -> str | dict[str, Any]:
    """What a Fisher depends on of its loss: the name, and the reduction and
    ``ignore_index`` when not the defaults (``classes_last`` only declares a layout)."""
    if spec.reduction == "mean" and spec.ignore_index == -100:
        return spec.name
    return {"name": spec.name, "reduction": spec.reduction, "ignore_index": spec.ignore_index}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


class StatisticsStore:
    """The curvature statistics of an experiment's models, each computed at most once.

    Args:
        models: The task models (not modified).
        batches: Per model, its ``(inputs, targets)`` statistics batches (all of them, the
            same on every process under torch.distributed: the store shards them).
        losses: Per model, its loss: a :class:`~curvmerge.losses.LossSpec` (handed as it is
            to the Fisher and the operators: ``classes_last=True`` reaches them) or a name.
        params: The selected (merged) parameter names.
        names: Per model, a name (Fisher file names).
        fisher_kind: Kind of the diagonal Fisher: ``"exact"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Samples per example for ``"mc"``.
        seed: Seed of the Monte-Carlo labels.
        exact_examples: Examples per model for the GGN operators (the first batches holding
            at least that many; ``None``: all).
        fisher_dir: Folder of Fisher files to reuse and write (``None``: none).
        progress: Progress bars while computing.
        log: Called with one line per statistic computed or loaded.

    Attributes:
        computed: ``{kind: n}`` for each kind of :data:`KINDS`: statistics computed (not
            loaded).
        loaded: Diagonal Fishers read from Fisher files.
        seconds: ``{kind: [per model]}``; a loaded Fisher counts the seconds recorded in its
            file.
        notes: Lines worth reading (stale files replaced).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        batches: Sequence[Sequence],
        losses: Sequence[LossSpec | str],
        params: Sequence[str],
        *,
        names: Sequence[str] | None = None,
        fisher_kind: str = "exact",
        mc_samples: int = 1,
        seed: int = 0,
        exact_examples: int | None = 256,
        fisher_dir: str | os.PathLike | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        if not (len(models) == len(batches) == len(losses)):
            raise ValueError("one batch list and one loss per model")
        self.models = list(models)
        self.batches = [list(b) for b in batches]
        self.losses = [resolve_loss(loss) for loss in losses]
        self.params = list(params)
        self.names = (
            list(names) if names is not None else [f"model_{i}" for i in range(len(models))]
        )
        self.fisher_kind = fisher_kind
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.exact_examples = exact_examples
        self.fisher_dir = Path(fisher_dir) if fisher_dir is not None else None
        self.progress = progress
        self.log = log
        self.computed = dict.fromkeys(KINDS, 0)
        self.loaded = 0
        self.seconds: dict[str, list[float]] = {k: [] for k in KINDS}
        self.paths: list[Path] = []
        self.notes: list[str] = []
        self._fishers: list | None = None
        self._operators: dict[type, list[LinearOperator]] = {}
        self._kfac: list[KroneckerOperator] | None = None
        self._grams: list | None = None
        self._pass_seconds: float | None = None

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    # ------------------------------------------------------------------ requests
    def get(self, statistics: str, operator_class: type | None = None) -> list | None:
        """The statistics a registry row names: ``"none"`` (``None``), ``"diagonal_fisher"``,
        ``"exact_ggn"`` (built with ``operator_class``), ``"kfac"``, ``"input_gram"`` or
        ``"data"`` (the statistics batches themselves)."""
        if statistics == "none":
            return None
        if statistics == "data":
            return self.batches
        if statistics == "kfac":
            return self.kfac_operators()
        if statistics == "input_gram":
            return self.input_grams()
        if statistics == "diagonal_fisher":
            return self.diagonal_fishers()
        if statistics == "exact_ggn":
            if operator_class is None:
                raise ValueError("exact_ggn statistics need the operator class")
            return self.operators(operator_class)
        raise ValueError(f"unknown statistics {statistics!r}")

    def fisher_settings(self, k: int) -> dict[str, Any]:
        """Everything model ``k``'s diagonal Fisher depends on besides model and data (the
        ``"mc"`` kind's labels also on the number of processes: each draws its own)."""
        settings = {
            "statistic": "diagonal_fisher",
            "kind": self.fisher_kind,
            "mc_samples": self.mc_samples if self.fisher_kind == "mc" else None,
            "seed": self.seed,
            "loss": _loss_key(self.losses[k]),
            "params": self.params,
        }
        if self.fisher_kind == "mc" and world_size() > 1:  # one process's keys stay as they were
            settings["processes"] = world_size()
        return settings

    def fisher_path(self, k: int) -> Path | None:
        """Where model ``k``'s Fisher file lives (``None`` without ``fisher_dir``)."""
        if self.fisher_dir is None:
            return None
        return self.fisher_dir / f"{k}_{_safe(self.names[k])}.{self.fisher_kind}.safetensors"

    def diagonal_fishers(self) -> list:
        """One diagonal Fisher per model, computed (or loaded) on the first call only."""
        if self._fishers is None:
            self._fishers = [self._fisher(k) for k in range(len(self.models))]
        return self._fishers

    def _fisher(self, k: int):
        from curvmerge.io import read_metadata

        path = self.fisher_path(k)
        key = None
        if path is not None:
            key = statistics_key(self.models[k], self.batches[k], self.fisher_settings(k))
            F, meta = None, {}
            if path.is_file():
                try:
                    meta = read_metadata(path)
                except ValueError:
                    meta = {}
                if meta.get("key") == key:
                    F = load_fisher(path, self.models[k])
                    if list(F.space.names) != self.params:
                        F = None
            if world_size() > 1:  # one decision on every process: load where all can
                votes = all_reduce_sum(torch.tensor([int(F is not None)]))
                if int(votes) < world_size():
                    F = None
            if F is not None:
                self.loaded += 1
                seconds = float(meta.get("seconds", 0.0) or 0.0)
                self.seconds["diagonal_fisher"].append(seconds)
                self.paths.append(path)
                self._say(f"diagonal Fisher of {self.names[k]}: reused {path}")
                return F
            if path.is_file():
                self.notes.append(
                    f"{path}: computed for another model, data or setting; recomputed"
                )
        start = time.perf_counter()
        F = diagonal_fisher(
            self.models[k],
            self.losses[k],
            shard(self.batches[k]),
            params=self.params,
            kind=self.fisher_kind,
            mc_samples=self.mc_samples,
            seed=self.seed,
            progress=self.progress,
        )
        seconds = time.perf_counter() - start
        self.computed["diagonal_fisher"] += 1
        self.seconds["diagonal_fisher"].append(seconds)
        self._say(f"diagonal Fisher ({self.fisher_kind}) of {self.names[k]}: {seconds:.2f} s")
        if path is not None:

            def write() -> None:  # every process holds the same Fisher: rank 0 writes it
                path.parent.mkdir(parents=True, exist_ok=True)
                save_fisher(
                    path,
                    F,
                    metadata={"key": key, "seconds": f"{seconds:.6f}", "model": self.names[k]},
                )

            on_main_process(write)
            self.paths.append(path)
        return F

    def operators(self, operator_class: type) -> list[LinearOperator]:
        """One GGN/Fisher operator per model (kind ``"exact"``), built on the first call
        only; its products and diagonal are computed lazily by the methods that use it."""
        if operator_class not in self._operators:
            from curvmerge.experiment.pools import first_examples

            def compute(k, model):
                batches = shard(first_examples(self.batches[k], self.exact_examples))
                return operator_class(
                    model, self.losses[k], batches, params=self.params, kind="exact",
                    progress=False,
                )  # fmt: skip

            ops = self._each_model("exact_ggn", None, compute)
            self._operators[operator_class] = ops
            self._say(f"exact GGN operators of {len(ops)} models built")
        return self._operators[operator_class]

    def _each_model(self, kind: str, what: str | None, compute: Callable) -> list:
        """``compute(k, model)`` for every model, timed and counted under ``kind``; one log
        line per model (``what`` of ``name``: seconds) unless ``what`` is ``None``."""
        out = []
        for k, model in enumerate(self.models):
            start = time.perf_counter()
            out.append(compute(k, model))
            seconds = time.perf_counter() - start
            self.computed[kind] += 1
            self.seconds[kind].append(seconds)
            if what is not None:
                self._say(f"{what} of {self.names[k]}: {seconds:.2f} s")
        return out

    def kfac_operators(self) -> list[KroneckerOperator]:
        """One K-FAC Fisher per model (the store's Fisher kind, its Monte-Carlo samples and
        seed, all statistics batches), computed on the first call only."""

        def compute(k, model):
            factors = kfac_factors(
                model,
                self.losses[k],
                shard(self.batches[k]),
                kind=self.fisher_kind,
                mc_samples=self.mc_samples,
                seed=self.seed,
                params=self.params,
                progress=self.progress,
            )
            return KroneckerOperator.from_kfac(ParamSpace.from_module(model, self.params), factors)

        if self._kfac is None:
            self._kfac = self._each_model("kfac", f"K-FAC factors ({self.fisher_kind})", compute)
        return self._kfac

    def input_grams(self) -> list:
        """One :class:`~curvmerge.statistics.LayerGrams` per model (all statistics batches),
        computed on the first call only."""

        def compute(k, model):
            return input_grams(
                model, shard(self.batches[k]), params=self.params, progress=self.progress
            )

        if self._grams is None:
            self._grams = self._each_model("input_gram", "input Gram matrices", compute)
        return self._grams

    # ------------------------------------------------------------------ costs
    def gradient_pass_seconds(self) -> float | None:
        """The unit of the costs' gradient-pass equivalents: seconds of one gradient pass
        (forward, loss, backward to the selected parameters) over one model's statistics
        batches, the mean over the models; measured once, after one warm-up batch.
        ``None`` when it cannot be measured (no batches, or no selected parameter that
        requires a gradient): the reports then leave the unit out."""
        if self._pass_seconds is None:
            times = []
            for k, model in enumerate(self.models):
                named = dict(model.named_parameters())
                params = [named[n] for n in self.params if n in named and named[n].requires_grad]
                batches = list(iterate_batches(self.batches[k]))
                if not params or not batches:
                    return None
                fn, device = self.losses[k].module(), model_device(model)

                def grad(inputs, targets, k=k, model=model, params=params, fn=fn, dev=device):
                    with torch.enable_grad():
                        out = model_outputs(model, move_batch(inputs, dev))
                        f, y, _ = flatten_rows(self.losses[k], out, move_batch(targets, dev))
                        torch.autograd.grad(fn(f, y), params, allow_unused=True)

                if k == 0:
                    grad(*batches[0])  # warm-up
                start = time.perf_counter()
                for inputs, targets in batches:
                    grad(inputs, targets)
                times.append(time.perf_counter() - start)
            self._pass_seconds = sum(times) / len(times)
        return self._pass_seconds

    def costs(self) -> dict[str, Any]:
        """Computed and loaded statistics, their seconds and the operators' data passes."""
        ops = [op for group in self._operators.values() for op in group]
        return {
            "diagonal_fisher": {
                "kind": self.fisher_kind,
                "computed": self.computed["diagonal_fisher"],
                "loaded": self.loaded,
                "seconds": list(self.seconds["diagonal_fisher"]),
                "examples": [getattr(F, "num_examples", None) for F in self._fishers or []],
                "files": [str(p) for p in self.paths],
            },
            "exact_ggn": {
                "built": self.computed["exact_ggn"],
                "seconds": list(self.seconds["exact_ggn"]),
                "data_passes": sum(int(getattr(op, "passes", 0)) for op in ops),
                "diagonal_passes": sum(int(getattr(op, "diagonal_passes", 0)) for op in ops),
            },
            "kfac": {"computed": self.computed["kfac"], "seconds": list(self.seconds["kfac"])},
            "input_gram": {
                "computed": self.computed["input_gram"],
                "seconds": list(self.seconds["input_gram"]),
            },
        }
