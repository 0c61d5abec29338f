"""Tests for curvmerge.train: seeded fine-tuning on tensors and HF batch dicts, evaluation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from curvmerge.batches import model_outputs
from curvmerge.data import TensorSplit, TextSplit, digit_subset_tasks
from curvmerge.models import make_cnn, make_mlp, tiny_bert
from curvmerge.train import (
    as_examples,
    evaluate,
    finetune,
    iter_batches,
    num_examples,
    predict,
)


@pytest.fixture
def blobs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads and slow down badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_finetune_learns_and_returns_eval_mode(blobs):
    model = make_mlp(6, 3, seed=0)
    before = evaluate(model, blobs)
    out = finetune(model, blobs, epochs=20, lr=2e-2, batch_size=16, progress=False)
    assert out is model and not model.training
    after = evaluate(model, blobs)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.9
    assert after["n"] == 120


def test_finetune_is_seeded(blobs):
    runs = [
        _params(finetune(make_mlp(6, 3, seed=0), blobs, steps=15, seed=s, progress=False))
        for s in (1, 1, 2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))


def test_finetune_dropout_is_seeded_and_rng_restored(blobs):
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 3)
        )

    a, b = build(), build()
    torch.manual_seed(99)
    expected = torch.rand(1)
    torch.manual_seed(99)
    finetune(a, blobs, steps=5, seed=3, progress=False)
    assert torch.equal(torch.rand(1), expected)
    finetune(b, blobs, steps=5, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(_params(a), _params(b), strict=True))


def test_steps_epochs_and_callback(blobs):
    seen = []
    finetune(
        make_mlp(6, 3),
        blobs,
        steps=17,
        batch_size=50,
        progress=False,
        callback=lambda step, loss: seen.append((step, loss)),
    )
    assert [s for s, _ in seen] == list(range(1, 18))
    seen.clear()
    finetune(
        make_mlp(6, 3),
        blobs,
        epochs=2,
        batch_size=50,
        progress=False,
        callback=lambda step, loss: seen.append(step),
    )
    assert seen == list(range(1, 7))  # 3 batches per epoch
    with pytest.raises(ValueError, match="not both"):
        finetune(make_mlp(6, 3), blobs, epochs=1, steps=1)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_other_optimizers_and_schedule(blobs, opt):
    model = finetune(
        make_mlp(6, 3),
        blobs,
        steps=60,
        lr=5e-2,
        optimizer=opt,
        schedule="linear",
        max_grad_norm=1.0,
        progress=False,
    )
    assert evaluate(model, blobs)["accuracy"] > 0.8
    with pytest.raises(ValueError, match="optimizer"):
        finetune(make_mlp(6, 3), blobs, steps=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="schedule"):
        finetune(make_mlp(6, 3), blobs, steps=1, schedule="cosine")


def test_train_mode_false_keeps_eval(blobs):
    modes = []
    model = make_mlp(6, 3)
    model.register_forward_hook(lambda m, i, o: modes.append(m.training))
    finetune(model, blobs, steps=2, train_mode=False, progress=False)
    assert modes == [False, False]


def test_evaluate_matches_manual(blobs):
    x, y = blobs
    model = make_mlp(6, 3, seed=5)
    result = evaluate(model, TensorSplit(x, y), batch_size=7)
    with torch.no_grad():
        logits = model(x)
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert torch.allclose(predict(model, x, batch_size=11), logits, atol=1e-6)


def test_finetune_cnn_on_digit_task():
    task = digit_subset_tasks("digits", [(0, 1), (2, 3)])[0]
    model = make_cnn(2, image_size=8, seed=0)
    finetune(model, task.train, epochs=4, lr=1e-2, batch_size=32, progress=False)
    assert evaluate(model, task.test)["accuracy"] > 0.9


# --------------------------------------------------------------------------- HF dict batches


@pytest.fixture
def token_data():
    gen = torch.Generator().manual_seed(1)
    n, length = 48, 12
    lengths = torch.randint(3, 9, (n,), generator=gen)
    ids = torch.randint(5, 50, (n, length), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = (ids[:, 1] > 27).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_finetune_hf_dict(token_data):
    model = tiny_bert(2, vocab_size=60, seed=0)
    before = evaluate(model, token_data)
    finetune(model, token_data, epochs=15, lr=3e-3, batch_size=16, progress=False)
    after = evaluate(model, token_data)
    assert not model.training
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.85
    again = finetune(
        tiny_bert(2, vocab_size=60, seed=0),
        token_data,
        epochs=15,
        lr=3e-3,
        batch_size=16,
        progress=False,
    )
    assert torch.equal(again.classifier.weight, model.classifier.weight)


def test_padding_trim_does_not_change_logits(token_data):
    model = tiny_bert(2, vocab_size=60, seed=0)
    batches = list(iter_batches(token_data, 16))
    assert all(b["input_ids"].shape[1] <= 8 for b, _ in batches)
    full = list(iter_batches(token_data, 16, trim_padding=False))
    assert full[0][0]["input_ids"].shape[1] == 12
    with torch.no_grad():
        for (a, _), (b, _) in zip(batches, full, strict=True):
            assert torch.allclose(model_outputs(model, a), model_outputs(model, b), atol=1e-5)


def test_data_forms_and_errors(token_data, blobs):
    inputs, labels = as_examples(token_data)
    assert "labels" not in inputs and labels.shape == (48,)
    assert num_examples(token_data) == 48 == num_examples({**token_data})
    assert num_examples(TensorSplit(*blobs)) == 120
    with pytest.raises(TypeError, match="tokenis"):
        finetune(make_mlp(6, 3), TextSplit(["a"], [0]), steps=1)
    with pytest.raises(ValueError, match="'labels'"):
        evaluate(tiny_bert(2), {"input_ids": token_data["input_ids"]})
    with pytest.raises(ValueError, match="inputs but"):
        as_examples((blobs[0], blobs[1][:3]))
    with pytest.raises(TypeError, match="expected a TensorSplit"):
        as_examples([1, 2, 3])
    logits = predict(
        tiny_bert(2, vocab_size=60), {k: v for k, v in token_data.items() if k != "labels"}
    )
    assert logits.shape == (48, 2)


@pytest.mark.slow
def test_minilm_finetune_rotten_tomatoes(_one_thread):
    from curvmerge.data import rotten_tomatoes_task, tokenize
    from curvmerge.models import load_minilm, load_minilm_tokenizer

    torch.set_num_threads(_one_thread)  # a 22M-parameter model does use the threads
    task = rotten_tomatoes_task(n_train=320, n_val=50, n_test=200, seed=0)
    tok = load_minilm_tokenizer()
    train, test = tokenize(task.train, tok), tokenize(task.test, tok)
    model = load_minilm(2, seed=0)
    before = evaluate(model, test, batch_size=64)
    finetune(model, train, steps=40, lr=1e-4, batch_size=16, progress=False)
    result = evaluate(model, test, batch_size=64)
    assert result["loss"] < before["loss"]
    assert result["accuracy"] > 0.65


# ---------------------------------------------------------------------------------- metrics
def test_macro_f1_hand_computed_and_sklearn():
    from sklearn.metrics import f1_score

    from curvmerge.train import macro_f1

    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    p = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0, 2, 2])
    # class 0: TP 2, FP 1, FN 1 -> 4/6; class 1: TP 1, FP 1, FN 1 -> 2/4;
    # class 2: TP 4, FP 1, FN 1 -> 8/10
    assert macro_f1(p, y) == pytest.approx((4 / 6 + 2 / 4 + 8 / 10) / 3)
    # a class only predicted (3) counts with F1 0, a class never predicted too
    p2 = torch.tensor([3, 3, 0, 1, 1, 2, 2, 2, 2, 2])
    expected = f1_score(y.numpy(), p2.numpy(), average="macro")
    assert macro_f1(p2, y) == pytest.approx(expected)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        y, p = torch.randint(0, 4, (50,), generator=gen), torch.randint(0, 5, (50,), generator=gen)
        assert macro_f1(p, y) == pytest.approx(f1_score(y.numpy(), p.numpy(), average="macro"))
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([1, 1])) == 1.0
    with pytest.raises(ValueError, match="predictions but"):
        macro_f1(torch.tensor([1]), torch.tensor([1, 2]))


class _Constant(torch.nn.Module):
    """Predicts class ``k`` of ``C`` for every input."""

    def __init__(self, k: int, C: int):
        super().__init__()
        self.k, self.C, self.w = k, C, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.C) + 0 * self.w
        out[:, self.k] = 1.0
        return out


def test_evaluate_reports_macro_f1_and_one_class_warning(blobs):
    import warnings

    from curvmerge.train import OneClassWarning, check_one_class

    x, y = blobs
    result = evaluate(_Constant(1, 3), (x, y))
    assert result["predicted_share"] == 1.0 and result["predicted_class"] == 1
    share1 = float((y == 1).float().mean())
    assert result["accuracy"] == pytest.approx(share1)
    assert result["macro_f1"] == pytest.approx((2 * share1 / (1 + share1)) / 3)
    with pytest.warns(OneClassWarning, match="predicts class 1 for 100.0%"):
        assert check_one_class(result, what="constant")
    good = finetune(make_mlp(6, 3, seed=0), blobs, epochs=20, lr=2e-2, batch_size=16,
                    progress=False)  # fmt: skip
    metrics = evaluate(good, (x, y))
    assert metrics["macro_f1"] > 0.7 and metrics["predicted_share"] < 0.95
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_one_class(metrics)
    # labels as skewed as the predictions: no warning
    skewed = evaluate(_Constant(0, 3), (x, torch.zeros_like(y)))
    assert skewed["label_share"] == 1.0 and not check_one_class(skewed, warn=False)


def test_evaluate_regression_and_token_level():
    x = torch.randn(20, 3)
    model = torch.nn.Linear(3, 1)
    targets = torch.randn(20)
    with torch.no_grad():
        mse = float(((model(x).squeeze(1) - targets) ** 2).mean())
    out = evaluate(model, (x, targets), loss="mse")
    assert set(out) == {"mse", "loss", "n"} and out["mse"] == pytest.approx(mse, rel=1e-5)
    # token-level logits [N, T, C]; -100 targets are excluded
    logits = torch.randn(4, 5, 7)
    labels = logits.argmax(-1)
    labels[:, 3:] = -100
    labels[0, 0] = (labels[0, 0] + 1) % 7
    out = evaluate(lambda_model(logits), (torch.arange(4), labels))
    assert out["accuracy"] == pytest.approx(11 / 12)  # 4 x 3 kept tokens, one wrong
    with pytest.raises(ValueError, match="loss must be one of"):
        evaluate(model, (x, targets), loss="hinge")


def lambda_model(logits):
    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(logits.clone())

        def forward(self, idx):
            return self.table[idx]

    return Lookup()


def test_evaluate_batches_equals_data(blobs):
    from curvmerge.train import is_batches

    x, y = blobs
    model = make_mlp(6, 3, seed=3)
    whole = evaluate(model, (x, y), batch_size=16)
    batches = list(iter_batches((x, y), 25))
    assert is_batches(batches) and not is_batches((x, y)) and not is_batches(TensorSplit(x, y))
    parts = evaluate(model, batches)
    assert parts.keys() == whole.keys()
    for k in whole:
        assert parts[k] == pytest.approx(whole[k], rel=1e-6)
    assert evaluate(model, iter(batches))["n"] == 120  # any iterable of batches
