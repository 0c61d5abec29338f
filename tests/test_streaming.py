"""Streaming merges of sharded safetensors checkpoints (curvmerge.streaming)."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from curvmerge import merge
from curvmerge.fisher import load_fisher, save_fisher
from curvmerge.io import (
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    load_params,
)
from curvmerge.merging.methods import dare, slerp, task_arithmetic, ties
from curvmerge.merging.spectral import iso_c, iso_cts, tsv_merge
from curvmerge.merging.spherical import slerp_sequential, spherical_barycenter
from curvmerge.streaming import (
    STREAM_METHODS,
    open_checkpoint,
    parse_size,
    stream_merge,
    tensor_seed,
)


# ---------------------------------------------------------------------------------- helpers
def write_sharded(tensors: dict[str, torch.Tensor], folder: Path, per_shard: int) -> Path:
    """Hugging Face's sharded layout, written here without curvmerge: ``per_shard`` tensors
    per shard and ``model.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    chunks = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        file = f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def make_models(shapes, T=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    models = [
        {
            n: b + 0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64)
            for n, b in base.items()
        }
        for _ in range(T)
    ]
    cast = lambda d: {n: v.to(dtype) for n, v in d.items()}  # noqa: E731
    return [cast(m) for m in models], cast(base)


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {n: ckpt.get(n) for n in ckpt.names}


SHAPES = {
    **{f"layer{i}.weight": (12 + i, 9) for i in range(8)},
    **{f"layer{i}.bias": (12 + i,) for i in range(8)},
    "norm.weight": (9,),
    "scalar": (),
    "conv.weight": (4, 3, 2, 2),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three models and a base, sharded 5 tensors a shard; total size is far above 20x the
    largest tensor."""
    d = tmp_path_factory.mktemp("ckpts")
    models, base = make_models(SHAPES)
    paths = [write_sharded(m, d / f"m{i}", 5) for i, m in enumerate(models)]
    base_path = write_sharded(base, d / "base", 5)
    largest = max(v.numel() for v in base.values())
    total = sum(v.numel() for m in models for v in m.values())
    assert total >= 20 * largest
    return models, base, paths, base_path


def assert_same(streamed: dict, expected: dict, exact: bool = True):
    for name, value in expected.items():
        got = streamed[name]
        assert got.dtype == value.dtype and got.shape == value.shape, name
        if exact:
            assert torch.equal(got, value), name
        else:
            torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------- identity
CASES = {
    "average": (dict(weights=[0.2, 0.3, 0.5]), lambda m, b: merge(m, weights=[0.2, 0.3, 0.5])),
    "task_arithmetic": (
        dict(scaling=0.7, weights=[1.0, 0.5, 2.0]),
        lambda m, b: task_arithmetic(m, b, scaling=0.7, weights=[1.0, 0.5, 2.0]),
    ),
    "ties": (dict(density=0.3, scaling=0.9), lambda m, b: ties(m, b, density=0.3, scaling=0.9)),
    "slerp_sequential": ({}, lambda m, b: slerp_sequential(m, base=b)),
    "spherical_barycenter": (
        dict(weights=[1.0, 2.0, 3.0]),
        lambda m, b: spherical_barycenter(m, base=b, weights=[1.0, 2.0, 3.0]),
    ),
    "tsv_merge": ({}, lambda m, b: tsv_merge(m, b)),
    "iso_c": (dict(scaling=0.5), lambda m, b: iso_c(m, b, scaling=0.5)),
    "iso_cts": (dict(common_fraction=0.5), lambda m, b: iso_cts(m, b, common_fraction=0.5)),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_streaming_merge_equals_the_in_memory_merge(ckpts, method, tmp_path):
    models, base, paths, base_path = ckpts
    options, reference = CASES[method]
    report = stream_merge(
        paths,
        tmp_path / "out",
        method=method,
        base=base_path if STREAM_METHODS[method] or "sph" in method or "slerp" in method else None,
        max_shard_size=2000,
        **options,
    )
    expected = reference(models, base).params
    out = read_all(tmp_path / "out")
    assert set(out) == set(SHAPES) and report.merged == list(models[0])
    assert_same(out, expected)
    assert len(report.files) > 1 and report.largest_shard_bytes <= 2000 + 12 * 9 * 4
    if method == "ties":  # the global threshold: two radix passes over float32 task vectors
        assert report.passes == 3
        tau = torch.cat([(models[0][n] - base[n]).reshape(-1) for n in SHAPES])
        k = math.ceil(0.3 * tau.numel())
        assert report.details["thresholds"][0] == float(tau.abs().sort(descending=True)[0][k - 1])


def test_ties_global_trim_differs_from_a_per_tensor_trim(ckpts, tmp_path):
    """The streamed TIES is the paper's (one threshold over all parameters): it equals the
    in-memory ties on all tensors at once, not ties applied tensor by tensor."""
    models, base, paths, base_path = ckpts
    stream_merge(paths, tmp_path / "o", method="ties", base=base_path, density=0.2)
    out = read_all(tmp_path / "o")
    per_tensor = {
        n: ties([{n: m[n]} for m in models], {n: base[n]}, density=0.2).params[n] for n in SHAPES
    }
    assert any(not torch.equal(out[n], per_tensor[n]) for n in SHAPES)
    assert_same(out, ties(models, base, density=0.2).params)


def test_ties_float64_thresholds_take_four_passes(tmp_path):
    models, base = make_models({"a": (30, 7), "b": (11,)}, dtype=torch.float64)
    paths = [write_sharded(m, tmp_path / f"m{i}", 1) for i, m in enumerate(models)]
    b = write_sharded(base, tmp_path / "b", 1)
    report = stream_merge(paths, tmp_path / "o", method="ties", base=b, density=0.1)
    assert report.passes == 5
    assert_same(read_all(tmp_path / "o"), ties(models, base, density=0.1).params)


def test_slerp_of_two_sharded_models(ckpts, tmp_path):
    models, base, paths, base_path = ckpts
    stream_merge(paths[:2], tmp_path / "o", method="slerp", t=0.3, base=base_path)
    assert_same(read_all(tmp_path / "o"), slerp(models[:2], t=0.3, base=base).params)


def test_dare_is_seeded_per_tensor(ckpts, tmp_path):
    """Streamed DARE equals the in-memory DARE of each tensor alone with its tensor seed,
    whatever the sharding (a single file gives the same output)."""
    models, base, paths, base_path = ckpts
    stream_merge(paths, tmp_path / "a", method="dare", base=base_path, drop_rate=0.5, seed=3)
    out = read_all(tmp_path / "a")
    for n in SHAPES:
        one = dare([{n: m[n]} for m in models], {n: base[n]}, drop_rate=0.5, seed=tensor_seed(3, n))
        assert torch.equal(out[n], one.params[n]), n
    single = tmp_path / "single.safetensors"
    save_file(models[0], single)
    reordered = [single, *paths[1:]]
    stream_merge(reordered, tmp_path / "b", method="dare", base=base_path, drop_rate=0.5, seed=3)
    assert_same(read_all(tmp_path / "b"), out)
    stream_merge(paths, tmp_path / "c", method="dare", base=base_path, drop_rate=0.0)
    assert_same(read_all(tmp_path / "c"), task_arithmetic(models, base).params)
    with pytest.raises(ValueError, match="combine"):
        stream_merge(paths, tmp_path / "d", method="dare", base=base_path, combine="ties")


@pytest.mark.parametrize("damping", [1e-2, 0.0])
def test_diagonal_fisher_merge_from_fisher_files(ckpts, damping, tmp_path):
    """Fisher files (one of them sharded) give the closed form of merge() with the loaded
    diagonal Fishers; tensors the Fishers do not cover are copied from the first model."""
    models, base, paths, base_path = ckpts
    g = torch.Generator().manual_seed(5)
    body = [n for n in SHAPES if n.startswith("layer")]
    fisher_paths = []
    for i in range(3):
        diag = {n: torch.rand(SHAPES[n], generator=g) ** 3 for n in body}
        if i == 1:
            diag["layer0.weight"][0] = 0.0  # entries some Fisher does not see
            fisher_paths.append(write_sharded(diag, tmp_path / f"f{i}", 4))
        else:
            save_fisher(tmp_path / f"f{i}.safetensors", diag, kind="empirical", num_examples=8)
            fisher_paths.append(tmp_path / f"f{i}.safetensors")
    w = [0.5, 0.3, 0.2]
    report = stream_merge(
        paths,
        tmp_path / "o",
        method="fisher_diagonal",
        fishers=fisher_paths,
        weights=w,
        damping=damping,
    )
    curv = [load_fisher(p) if str(p).endswith(".safetensors") else None for p in fisher_paths]
    sharded = read_all(fisher_paths[1])
    curv[1] = load_fisher(_as_fisher_file(sharded, tmp_path / "f1.safetensors"))
    expected = merge([{n: m[n] for n in body} for m in models], curv, weights=w, damping=damping)
    out = read_all(tmp_path / "o")
    assert sorted(report.merged) == sorted(body)
    assert_same(out, expected.params, exact=damping == 0)
    for n in SHAPES:
        if n not in body:
            assert torch.equal(out[n], models[0][n])
    if damping:
        assert report.details["damping_scale"] == pytest.approx(
            expected.report.damping_scale, rel=1e-12
        )


def _as_fisher_file(tensors, path):
    save_fisher(path, tensors, kind="empirical", num_examples=8)
    return path


# ---------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_half_precision_is_merged_in_float32_and_written_back(method, dtype, tmp_path):
    """bf16/fp16 models merge with float32 accumulation and one rounding: the output is the
    float32 merge of the same (upcast) values rounded to the half dtype, within bf16/fp16
    precision of it, and closer than merging in half precision."""
    models, base = make_models({"w": (64, 48), "b": (64,)}, dtype=dtype)
    paths = [write_sharded(m, tmp_path / f"m{i}", 1) for i, m in enumerate(models)]
    b = write_sharded(base, tmp_path / "b", 1)
    opts, ref = CASES[method]
    if method == "ties":
        opts, ref = {"density": 0.5}, lambda m, b: ties(m, b, density=0.5)
    stream_merge(paths, tmp_path / "o", method=method, base=b, **opts)
    out = read_all(tmp_path / "o")
    up = lambda d: {n: v.float() for n, v in d.items()}  # noqa: E731
    ref32 = ref([up(m) for m in models], up(base)).params
    eps = torch.finfo(dtype).eps
    for n, value in ref32.items():
        assert out[n].dtype == dtype
        assert torch.equal(out[n], value.to(dtype)), n  # one rounding of the float32 merge
        torch.testing.assert_close(out[n].float(), value, rtol=eps, atol=eps * 1e-2)
    if method == "average":  # the same average accumulated in half precision is worse
        half = 0.2 * models[0]["w"] + 0.3 * models[1]["w"] + 0.5 * models[2]["w"]
        err_half = (half.float() - ref32["w"]).abs().max()
        err_out = (out["w"].float() - ref32["w"]).abs().max()
        assert err_out < err_half


def test_half_precision_fisher_merge(tmp_path):
    """bf16 models with float32 Fisher files: the closed form in float32, one rounding."""
    models, base = make_models({"w": (32, 16), "b": (32,)}, dtype=torch.bfloat16)
    paths = [write_sharded(m, tmp_path / f"m{i}", 1) for i, m in enumerate(models)]
    g = torch.Generator().manual_seed(1)
    fishers = []
    for i in range(3):
        diag = {n: torch.rand(v.shape, generator=g) for n, v in models[0].items()}
        save_fisher(tmp_path / f"f{i}.safetensors", diag, kind="exact", num_examples=4)
        fishers.append(tmp_path / f"f{i}.safetensors")
    stream_merge(paths, tmp_path / "o", method="fisher_diagonal", fishers=fishers, damping=0.0)
    out = read_all(tmp_path / "o")
    up = [{n: v.float() for n, v in m.items()} for m in models]
    ref32 = merge(up, [load_fisher(f) for f in fishers], damping=0.0).params
    for n, value in ref32.items():
        assert out[n].dtype == torch.bfloat16 and torch.equal(out[n], value.to(torch.bfloat16))


def test_params_select_like_the_in_memory_methods_and_the_rest_is_copied(ckpts, tmp_path):
    models, base, paths, base_path = ckpts
    regex = r"^layer\d\.weight"
    report = stream_merge(
        paths, tmp_path / "o", method="task_arithmetic", base=base_path, params=regex
    )
    out = read_all(tmp_path / "o")
    expected = task_arithmetic(models, base, params=regex).params
    assert sorted(report.merged) == sorted(expected) and len(report.copied) == 11
    assert_same(out, expected)
    for n in report.copied:
        assert torch.equal(out[n], models[0][n])


def test_integer_tensors_are_copied_from_the_first_model(tmp_path):
    models, base = make_models({"w": (4, 3)})
    for i, m in enumerate(models):
        m["position_ids"] = torch.arange(5) + i
    paths = [write_sharded(m, tmp_path / f"m{i}", 1) for i, m in enumerate(models)]
    report = stream_merge(paths, tmp_path / "o", method="average")
    out = read_all(tmp_path / "o")
    assert report.copied == ["position_ids"] and torch.equal(out["position_ids"], torch.arange(5))
    assert out["position_ids"].dtype == torch.int64
    with pytest.raises(CheckpointMismatchError, match="'position_ids'.* not floating point"):
        stream_merge(paths, tmp_path / "p", method="average", params=["w", "position_ids"])
    _no_output(tmp_path, "p")


# ---------------------------------------------------------------------------------- layout
def test_output_index_and_shards_are_valid(ckpts, tmp_path):
    models, base, paths, base_path = ckpts
    report = stream_merge(paths, tmp_path / "o", method="average", max_shard_size="3KB")
    folder = tmp_path / "o"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert [f.name for f in report.files] == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(SHAPES)
    total = 0
    for f in files:
        with safe_open(str(folder / f), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                assert index["weight_map"][k] == f
                total += fh.get_tensor(k).numel() * 4
    assert index["metadata"]["total_size"] == total
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*files, index and "model.safetensors.index.json"]
    )
    # one shard: a plain model.safetensors, no index
    stream_merge(paths, tmp_path / "one", method="average")
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["model.safetensors"]
    assert_same(load_params(tmp_path / "one" / "model.safetensors"), read_all(folder))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    for bad in ("5 parsecs", 0, "-1KB"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.slow  # importing transformers alone takes seconds
def test_hugging_face_folder_merges_to_a_loadable_folder(tmp_path):
    """Two tiny sharded BERT folders stream-merge into a folder ``from_pretrained`` loads,
    with the in-memory average."""
    transformers = pytest.importorskip("transformers")
    from tests.fisher_cases import tiny_bert

    folders, states = [], []
    for seed in (1, 2):
        model = tiny_bert(seed=seed, num_labels=2)
        folder = tmp_path / f"bert{seed}"
        model.save_pretrained(folder, max_shard_size="5KB", safe_serialization=True)
        assert (folder / "model.safetensors.index.json").is_file()
        folders.append(folder)
        states.append(load_sharded_state(folder))
    stream_merge(folders, tmp_path / "merged", method="average", max_shard_size="4KB")
    assert (tmp_path / "merged" / "config.json").is_file()
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    own = loaded.state_dict()
    expected = merge(states).params
    for name, value in expected.items():
        if name in own:
            assert torch.equal(own[name], value), name


def load_sharded_state(folder):
    return read_all(folder)


# ---------------------------------------------------------------------------------- errors
def _no_output(tmp_path, name="o"):
    assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(f".{name}.*"))


def test_missing_tensor_in_one_model_names_it_and_writes_nothing(ckpts, tmp_path):
    models, base, paths, base_path = ckpts
    short = {n: v for n, v in models[1].items() if n != "layer3.bias"}
    p = write_sharded(short, tmp_path / "short", 5)
    with pytest.raises(CheckpointMismatchError, match=r"model 1 .*'layer3\.bias'"):
        stream_merge([paths[0], p, paths[2]], tmp_path / "o", method="average")
    _no_output(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(ckpts, tmp_path):
    models, base, paths, base_path = ckpts
    bad = dict(base)
    bad["conv.weight"] = torch.zeros(4, 3, 2, 1)
    b = write_sharded(bad, tmp_path / "badbase", 5)
    with pytest.raises(CheckpointMismatchError, match=r"'conv\.weight'.*\(4, 3, 2, 1\)"):
        stream_merge(paths, tmp_path / "o", method="task_arithmetic", base=b)
    _no_output(tmp_path)


def test_missing_index_or_shard_is_named(ckpts, tmp_path):
    models, base, paths, base_path = ckpts
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors.index.json"):
        stream_merge([paths[0], empty], tmp_path / "o")
    p = write_sharded(models[1], tmp_path / "broken", 5)
    (p / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00004"):
        stream_merge([paths[0], p], tmp_path / "o")
    _no_output(tmp_path)


def test_error_during_the_merge_leaves_no_output(ckpts, tmp_path):
    """NaN found while merging (after shards were written): the temporary folder goes."""
    models, base, paths, base_path = ckpts
    nan = dict(models[2])
    nan["layer7.bias"] = torch.full((19,), float("nan"))
    p = write_sharded(nan, tmp_path / "nan", 5)
    with pytest.raises(ValueError, match="NaN"):
        stream_merge([paths[0], paths[1], p], tmp_path / "o", max_shard_size=500)
    _no_output(tmp_path)


def test_existing_output_needs_force(ckpts, tmp_path):
    models, base, paths, base_path = ckpts
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointExistsError):
        stream_merge(paths, tmp_path / "o")
    stream_merge(paths, tmp_path / "o", force=True)
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_bad_method_and_options(ckpts, tmp_path):
    models, base, paths, base_path = ckpts
    with pytest.raises(ValueError, match="regmean"):
        stream_merge(paths, tmp_path / "o", method="regmean")
    with pytest.raises(ValueError, match="density"):
        stream_merge(paths, tmp_path / "o", method="task_arithmetic", base=base_path, density=1)
    with pytest.raises(ValueError, match="base"):
        stream_merge(paths, tmp_path / "o", method="ties")
    _no_output(tmp_path)


# ---------------------------------------------------------------------------------- memory
def _proc_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """Three models and a base of 32 float32 tensors of 1 MiB, 4 tensors a shard, written
    one shard at a time (never held whole)."""
    d = tmp_path_factory.mktemp("large")
    shapes = {f"w{i}": (256, 1024) for i in range(32)}
    g = torch.Generator().manual_seed(0)
    paths = []
    for t in range(4):
        folder = d / f"m{t}"
        folder.mkdir()
        for s in range(8):
            names = list(shapes)[4 * s : 4 * s + 4]
            chunk = {n: torch.randn(shapes[n], generator=g) for n in names}
            save_file(chunk, folder / f"s{s}.safetensors")
            del chunk
        index = {n: f"s{i // 4}.safetensors" for i, n in enumerate(shapes)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
        paths.append(folder)
    return paths, shapes


@pytest.mark.parametrize(
    "method", ["task_arithmetic", pytest.param("ties", marks=pytest.mark.slow)]
)
def test_peak_memory_stays_near_a_few_tensors(large, method, tmp_path):
    """Peak resident memory of a merge, measured in this process: the kernel's high-water
    mark of the resident set (VmHWM), reset just before the merge (``/proc/self/clear_refs``
    ``5``), minus the resident set at that moment. tracemalloc does not see torch's
    allocations; the resident set sees everything (torch, safetensors' memory maps, the
    allocator's retained free memory), so the bound is on what the process really holds.

    The merge runs twice and the second run is measured: the first pays one-time process
    costs (intra-op thread pools, per-thread allocator arenas, lazily initialised kernels)
    that do not grow with the models.

    Stated bound: ``4 (T + 2)`` largest tensors (the models' tensors, the base, the merged
    tensor, each with float32 working copies: stacked rows, task vectors) plus two output
    shards (the shard being filled and its serialised copy) plus 8 MiB of allocator slack:
    32 MiB here, against 96 MiB of model input (128 MiB with the base). A merge that held
    the models, or read through shards kept mapped, breaks it."""
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    paths, shapes = large
    T, mib = 3, 2**20
    largest, shard = 1 * mib, 2 * mib
    total_input = T * len(shapes) * mib
    bound = 4 * (T + 2) * largest + 2 * shard + 8 * mib
    assert total_input >= 20 * largest and bound < total_input / 2

    def run(out):
        return stream_merge(paths[:T], out, method=method, base=paths[T], max_shard_size=shard)

    run(tmp_path / "warm")
    gc.collect()
    try:
        clear.write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak resident set here")
    before = _proc_kib("VmRSS") * 1024
    report = run(tmp_path / "out")
    peak = _proc_kib("VmHWM") * 1024 - before
    assert len(report.files) == 16 and report.largest_tensor_bytes == largest
    print(f"{method}: peak {peak / mib:.1f} MiB, bound {bound / mib:.1f} MiB")
    assert peak < bound, f"peak {peak / mib:.1f} MiB >= bound {bound / mib:.1f} MiB"


# ---------------------------------------------------------------------------------- command
def test_merge_command_streams_sharded_folders(ckpts, tmp_path, capsys):
    from curvmerge.cli import main

    models, base, paths, base_path = ckpts
    args = ["merge", *map(str, paths), "--stream", "-m", "ties", "--base", str(base_path)]
    args += ["--option", "density=0.3", "--max-shard-size", "2KB", "-o", str(tmp_path / "o")]
    assert main(args) == 0
    assert "streaming ties merge of 3 models" in capsys.readouterr().out
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()
    assert_same(read_all(tmp_path / "o"), ties(models, base, density=0.3).params)
    bad = ["merge", *map(str, paths), "--stream", "-m", "regmean", "-o", str(tmp_path / "p")]
    assert main(bad) == 2 and "--stream merges with" in capsys.readouterr().err
    missing = ["merge", str(paths[0]), str(tmp_path), "--stream", "-o", str(tmp_path / "p")]
    assert main(missing) != 0 and "model.safetensors" in capsys.readouterr().err
    _no_output(tmp_path, "p")
