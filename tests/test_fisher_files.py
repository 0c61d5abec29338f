"""Fisher files: exact round trips, metadata, atomic writes and clear mismatch errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from curvmerge import ParamSpace, SpaceMismatchError
from curvmerge.fisher import DiagonalFisher, diagonal_fisher, load_fisher, save_fisher
from tests.fisher_cases import mlp, tensor_batches, text_batches, tiny_bert


@pytest.fixture(scope="module")
def fisher_and_model():
    model = tiny_bert().eval()
    F = diagonal_fisher(
        model,
        nn.CrossEntropyLoss(),
        text_batches(),
        params=r"^bert\.",
        kind="mc",
        mc_samples=2,
        progress=False,
    )
    return F, model


def test_round_trip_is_exact(tmp_path, fisher_and_model):
    F, model = fisher_and_model
    path = tmp_path / "f.safetensors"
    save_fisher(path, F, metadata={"task": "demo"})
    G = load_fisher(path, model)
    assert isinstance(G, DiagonalFisher)
    assert G.space == F.space
    assert torch.equal(G.diagonal(), F.diagonal())
    assert (G.kind, G.num_examples, G.loss, G.reduction, G.mc_samples) == (
        "mc",
        6,
        "cross_entropy",
        "mean",
        2,
    )
    assert load_fisher(path, F.space).space == F.space
    assert torch.equal(load_fisher(path).diagonal(), F.diagonal())


def test_metadata_and_no_temporary_left(tmp_path, fisher_and_model):
    from safetensors import safe_open

    F, _ = fisher_and_model
    path = tmp_path / "f.safetensors"
    save_fisher(path, F)
    save_fisher(path, F)  # overwriting is atomic too
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        assert json.loads(meta["names"]) == list(F.space.names)
        assert meta["kind"] == "mc" and meta["num_examples"] == "6"
        assert fh.get_tensor(F.space.names[0]).shape == F.space.shapes[0]
    assert os.listdir(tmp_path) == ["f.safetensors"]


def test_dict_and_plain_diagonal(tmp_path):
    space = ParamSpace(("a", "b"), ((2, 2), (3,)))
    d = {"a": torch.rand(2, 2, dtype=torch.float64), "b": torch.rand(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="kind"):
        save_fisher(tmp_path / "x.safetensors", d, num_examples=3)
    with pytest.raises(ValueError, match="num_examples"):
        save_fisher(tmp_path / "x.safetensors", d, kind="exact")
    save_fisher(tmp_path / "x.safetensors", d, kind="empirical", num_examples=3)
    G = load_fisher(tmp_path / "x.safetensors", space, dtype=torch.float32)
    assert G.dtype == torch.float32 and G.kind == "empirical"
    assert torch.equal(G.as_dict()["b"], d["b"].float())
    assert not os.path.exists(tmp_path / "x.safetensors.tmp")


def test_mismatching_model_fails_naming_the_parameter(tmp_path):
    model = mlp().double().eval()
    F = diagonal_fisher(model, nn.CrossEntropyLoss(), tensor_batches((5,)), progress=False)
    path = tmp_path / "f.safetensors"
    save_fisher(path, F)
    other = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    with pytest.raises(SpaceMismatchError, match=r"'0\.weight' has shape \(8, 5\)"):
        load_fisher(path, other)
    renamed = {("x." + n): p for n, p in model.named_parameters()}
    with pytest.raises(SpaceMismatchError, match=r"'0\.weight'.*does not have"):
        load_fisher(path, renamed)
    space = ParamSpace.from_module(model).select(["0.weight", "0.bias"])
    with pytest.raises(SpaceMismatchError):
        load_fisher(path, space)
    # a model with extra parameters (task heads) is fine
    extra = dict(model.named_parameters()) | {"head.weight": torch.zeros(2)}
    assert load_fisher(path, extra).space == F.space


def test_not_a_fisher_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="not a curvmerge Fisher file"):
        load_fisher(tmp_path / "w.safetensors")


def test_truncated_and_missing_files_get_clear_errors(tmp_path):
    path = tmp_path / "f.safetensors"
    save_fisher(path, {"w": torch.ones(100)}, kind="exact", num_examples=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_fisher(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fisher(tmp_path / "missing.safetensors")
