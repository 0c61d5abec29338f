"""Tests for curvmerge.io: round trips, atomic writes, overwrite refusal, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from curvmerge import io as cio
from curvmerge.io import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    check_compatible,
    load_checkpoint,
    load_hf_model,
    load_params,
    read_metadata,
    save_checkpoint,
    save_hf_model,
    save_params,
)
from curvmerge.models import make_cnn, make_mlp, tiny_bert


@pytest.fixture
def params():
    gen = torch.Generator().manual_seed(0)
    return {
        "body.weight": torch.randn(5, 3, generator=gen),
        "body.bias": torch.randn(5, generator=gen, dtype=torch.float64),
        "head.weight": torch.randn(2, 5, generator=gen).to(torch.bfloat16),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }


def _listing(folder):
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------- parameter dicts


def test_round_trip_exact(tmp_path, params):
    path = save_params(params, tmp_path / "m.safetensors", metadata={"task": "a", "n": [1, 2]})
    loaded = load_params(path)
    assert list(loaded) == sorted(params) or set(loaded) == set(params)
    for name, value in params.items():
        assert loaded[name].dtype == value.dtype
        assert torch.equal(loaded[name], value)
    assert read_metadata(path) == {"task": "a", "n": [1, 2]}
    assert _listing(tmp_path) == ["m.safetensors"]


def test_shared_and_noncontiguous_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    path = save_params({"a": base, "b": base, "t": base.t()}, tmp_path / "s.safetensors")
    loaded = load_params(path)
    assert torch.equal(loaded["a"], base) and torch.equal(loaded["t"], base.t())


def test_refuses_overwrite_without_force(tmp_path, params):
    path = tmp_path / "m.safetensors"
    save_params(params, path)
    with pytest.raises(CheckpointExistsError, match="force=True"):
        save_params({"x": torch.zeros(1)}, path)
    assert torch.equal(load_params(path)["body.weight"], params["body.weight"])
    save_params({"x": torch.zeros(1)}, path, force=True)
    assert list(load_params(path)) == ["x"]
    assert issubclass(CheckpointExistsError, FileExistsError)


def test_atomic_write_failure_leaves_previous_file(tmp_path, params, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_params(params, path)
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(cio.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_params({"x": torch.zeros(1000)}, path, force=True)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["m.safetensors"]  # no temporary file left behind


def test_atomic_write_failure_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(cio.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_params({"x": torch.zeros(3)}, tmp_path / "new.safetensors")
    assert _listing(tmp_path) == []


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_params(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="is a folder"):
        load_params(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="output folder"):
        save_params({"x": torch.zeros(1)}, tmp_path / "no" / "such" / "m.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 40, 0.5, -1])
def test_truncated_file_clear_error(tmp_path, params, keep):
    path = save_params(params, tmp_path / "m.safetensors")
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:cut])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt") as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CheckpointError)


def test_garbage_file_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_text("this is not a checkpoint at all")
    with pytest.raises(CorruptCheckpointError):
        load_params(path)
    with pytest.raises(CorruptCheckpointError):
        read_metadata(path)


def test_torch_state_dict_weights_only(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save(sd, tmp_path / "a.pt")
    assert torch.equal(load_params(tmp_path / "a.pt")["w"], sd["w"])
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "b.pth")
    assert set(load_params(tmp_path / "b.pth")) == {"w"}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"w": torch.ones(1), "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CorruptCheckpointError, match="weights-only"):
        load_params(tmp_path / "evil.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CorruptCheckpointError, match="dict of named tensors"):
        load_params(tmp_path / "list.pt")


# --------------------------------------------------------------------------- modules


def test_checkpoint_round_trip(tmp_path):
    model = make_cnn(3, image_size=8, seed=1)
    path = save_checkpoint(model, tmp_path / "cnn.safetensors", metadata={"num_classes": 3})
    other = make_cnn(3, image_size=8, seed=2)
    load_checkpoint(other, path)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert not other.training
    assert read_metadata(path) == {"format": "curvmerge-state-dict", "num_classes": 3}


def test_shape_mismatch_names_parameter(tmp_path):
    path = save_checkpoint(make_cnn(3, image_size=8), tmp_path / "cnn.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"'head\.weight' has shape \(3, 24\)"):
        load_checkpoint(make_cnn(5, image_size=8), path)


def test_name_mismatch(tmp_path):
    path = save_checkpoint(make_cnn(3, image_size=8), tmp_path / "cnn.safetensors")
    with pytest.raises(CheckpointMismatchError, match="missing .* unexpected"):
        load_checkpoint(make_mlp(64, 3, hidden=(24,)), path)
    partial = tmp_path / "body.safetensors"
    body = {k: v for k, v in make_cnn(3, image_size=8, seed=7).state_dict().items() if "body" in k}
    save_params(body, partial)
    model = make_cnn(3, image_size=8, seed=0)
    head = model.head.weight.clone()
    with pytest.raises(CheckpointMismatchError, match="missing 2 parameter"):
        load_checkpoint(model, partial)
    load_checkpoint(model, partial, strict=False)
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.body[0].weight, body["body.0.weight"])


def test_check_compatible_shapes_only():
    check_compatible({"a": (2, 3)}, {"a": torch.zeros(2, 3)})
    with pytest.raises(CheckpointMismatchError, match="'a' has shape"):
        check_compatible({"a": (2, 3)}, {"a": (3, 2)}, source="x.safetensors")
    check_compatible({"a": (1,), "b": (1,)}, {"a": (1,)}, allow_missing=True)


# --------------------------------------------------------------------------- Hugging Face folders


def test_hf_folder_round_trip(tmp_path):
    model = tiny_bert(3, seed=4)
    folder = save_hf_model(model, tmp_path / "bert")
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    loaded = load_hf_model(folder)
    assert loaded.config._attn_implementation == "eager"
    assert not loaded.training
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert [p for p in os.listdir(tmp_path)] == ["bert"]


def test_hf_folder_overwrite_and_atomicity(tmp_path, monkeypatch):
    folder = save_hf_model(tiny_bert(2, seed=0), tmp_path / "bert")
    with pytest.raises(CheckpointExistsError):
        save_hf_model(tiny_bert(2, seed=1), folder)
    new = tiny_bert(2, seed=1)

    def broken(self, *args, **kwargs):
        raise RuntimeError("crash while saving (simulated)")

    monkeypatch.setattr(type(new), "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        save_hf_model(new, folder, force=True)
    assert os.listdir(tmp_path) == ["bert"]
    monkeypatch.undo()
    reloaded = load_hf_model(folder)
    assert torch.equal(reloaded.classifier.weight, tiny_bert(2, seed=0).classifier.weight)
    save_hf_model(new, folder, force=True)
    assert torch.equal(load_hf_model(folder).classifier.weight, new.classifier.weight)
    assert os.listdir(tmp_path) == ["bert"]


def test_hf_folder_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_hf_model(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_hf_model(tmp_path / "empty")
    folder = save_hf_model(tiny_bert(2), tmp_path / "bert")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        load_hf_model(folder)
