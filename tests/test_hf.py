"""Tests for curvmerge.hf: Hugging Face folders in (load, kinds, heads, checks) and out."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from curvmerge import models
from curvmerge.hf import (
    ArchitectureMismatchError,
    HFModel,
    ModelLoadError,
    TokenizerMismatchError,
    check_same_architecture,
    check_tokenizer,
    load_model,
    save_merged,
    wrap_model,
)
from curvmerge.io import CheckpointExistsError

WORDS = (
    "the a movie film good bad great awful plot was is not very fun boring acting it and story cast"
).split()


def word_tokenizer(words=WORDS, *, bert=True):
    """The tests' tiny offline tokenizer (:func:`curvmerge.models.word_tokenizer`)."""
    return models.word_tokenizer(words, bert=bert)


def bert(num_labels=2, *, seed=0, labels=None, hidden=8, vocab=32, act="gelu", cls=None):
    """A tiny BERT (sequence classifier by default) with named labels."""
    from transformers import BertConfig, BertForSequenceClassification

    labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        hidden_act=act,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    return (cls or BertForSequenceClassification)(config).eval()


def save_bert(folder, *, tokenizer=True, **kwargs):
    """Save a tiny BERT (and the word tokenizer) like ``save_pretrained`` users do."""
    model = bert(**kwargs)
    model.save_pretrained(folder)
    if tokenizer:
        word_tokenizer().save_pretrained(folder)
    return str(folder)


def gpt2(*, seed=0, tie=True, vocab=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = vocab or len(word_tokenizer(bert=False))
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=8,
        n_layer=1,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=tie,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def save_gpt2(folder, **kwargs):
    gpt2(**kwargs).save_pretrained(folder)
    word_tokenizer(bert=False).save_pretrained(folder)
    return str(folder)


def _quiet_save(model, folder):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(folder)


# --------------------------------------------------------------------------- models in


def test_load_bert_folder(tmp_path):
    folder = save_bert(tmp_path / "sentiment", labels=["neg", "pos"], seed=1)
    hf = load_model(folder)
    assert isinstance(hf, HFModel)
    assert hf.kind == "sequence_classification"
    assert hf.head_names == ("classifier.weight", "classifier.bias")
    assert hf.body_regex == r"^bert\."
    assert hf.body_names and all(n.startswith("bert.") for n in hf.body_names)
    assert hf.label2id == {"neg": 0, "pos": 1} and hf.id2label == {0: "neg", 1: "pos"}
    assert hf.num_labels == 2 and hf.newly_initialized == () and hf.tied == {}
    assert not hf.model.training
    assert hf.model.config._attn_implementation == "eager"
    assert hf.tokenizer is not None and len(hf.tokenizer) == len(WORDS) + 5 == 25
    reference = bert(labels=["neg", "pos"], seed=1)
    for name, p in reference.named_parameters():
        assert torch.equal(dict(hf.model.named_parameters())[name], p)
    assert set(hf.body_params()) | set(hf.head_params()) == set(dict(hf.model.named_parameters()))


def test_num_labels_gives_a_new_head(tmp_path):
    folder = save_bert(tmp_path / "m", num_labels=2)
    hf = load_model(folder, num_labels=4)
    assert hf.num_labels == 4 and hf.model.classifier.weight.shape == (4, 8)
    assert set(hf.newly_initialized) == {"classifier.weight", "classifier.bias"}
    same = load_model(folder, num_labels=2)
    assert same.newly_initialized == ()


def test_pytorch_model_bin_folder(tmp_path):
    model = bert(seed=3)
    folder = tmp_path / "legacy"
    folder.mkdir()
    model.config.architectures = ["BertForSequenceClassification"]
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    hf = load_model(folder)
    assert hf.tokenizer is None
    assert torch.equal(
        hf.model.bert.embeddings.word_embeddings.weight,
        model.bert.embeddings.word_embeddings.weight,
    )


def test_kind_from_architectures_or_given(tmp_path):
    from transformers import BertForMaskedLM, BertModel

    base = tmp_path / "base"
    _quiet_save(bert(cls=BertModel), base)
    with pytest.raises(ModelLoadError, match="BertModel.*pass kind="):
        load_model(base)
    hf = load_model(base, kind="text-classification", num_labels=3)
    assert hf.kind == "sequence_classification" and hf.num_labels == 3
    assert set(hf.newly_initialized) >= {"classifier.weight", "classifier.bias"}
    mlm = tmp_path / "mlm"
    _quiet_save(bert(cls=BertForMaskedLM), mlm)
    with pytest.raises(ModelLoadError, match="BertForMaskedLM"):
        load_model(mlm)
    with pytest.raises(ModelLoadError, match="unknown model kind 'regression'"):
        load_model(base, kind="regression")


def test_token_classification_kind(tmp_path):
    from transformers import BertForTokenClassification

    folder = tmp_path / "ner"
    _quiet_save(bert(labels=["O", "B", "I"], cls=BertForTokenClassification), folder)
    hf = load_model(folder)
    assert hf.kind == "token_classification" and hf.head_names == (
        "classifier.weight",
        "classifier.bias",
    )


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a Hugging Face model folder"):
        load_model(tmp_path / "weights.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path / "empty")
    bert().config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(tmp_path / "config_only")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="neither a model folder nor a model id"):
        load_model("curvmerge-no-such-org/no-such-model")
    assert issubclass(ModelLoadError, ValueError)


def test_causal_lm_heads_tied_and_untied(tmp_path):
    tied = load_model(save_gpt2(tmp_path / "tied"))
    assert tied.kind == "causal_lm" and tied.num_labels is None and tied.label2id == {}
    assert tied.head_names == ()
    assert tied.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert tied.body_regex == r"^transformer\."
    assert "transformer.wte.weight" in tied.body_names
    untied = load_model(save_gpt2(tmp_path / "untied", tie=False))
    assert untied.head_names == ("lm_head.weight",) and untied.tied == {}


def test_wrap_in_memory_model():
    hf = wrap_model(bert(num_labels=3))
    assert hf.kind == "sequence_classification" and hf.num_labels == 3 and hf.source == ""
    assert hf.describe() == "BertForSequenceClassification"


# --------------------------------------------------------------------------- checks


def test_same_architecture_accepts_different_heads(tmp_path):
    check_same_architecture([bert(num_labels=2), bert(num_labels=5, seed=1)])
    check_same_architecture([wrap_model(bert()), bert(seed=2)])


@pytest.mark.parametrize(
    "other, field",
    [
        (lambda: bert(hidden=16), "'hidden_size' is 8 in model 0"),
        (lambda: bert(vocab=40), "'vocab_size' is 32 in model 0"),
        (lambda: gpt2(vocab=32), "'model_type' is 'bert' in model 0"),
        (lambda: bert(act="relu"), "'hidden_act' is 'gelu' in model 0"),
    ],
)
def test_architecture_mismatch_names_the_field(other, field):
    with pytest.raises(ArchitectureMismatchError, match=field + r".* in model 1 \("):
        check_same_architecture([bert(), other()])


def test_architecture_mismatch_names_the_parameter():
    from transformers import BertForTokenClassification

    token = bert(cls=BertForTokenClassification)  # no pooler
    with pytest.raises(
        ArchitectureMismatchError, match="body parameter 'bert.pooler.dense.weight' of model 0"
    ):
        check_same_architecture([bert(), token])
    with pytest.raises(
        ArchitectureMismatchError,
        match="'bert.pooler.dense.weight' of model 1 .* is missing in model 0",
    ):
        check_same_architecture([token, bert()])
    assert issubclass(ArchitectureMismatchError, ValueError)


def test_tokenizer_mismatch(tmp_path):
    small = bert(vocab=10)  # the word tokenizer has 25 tokens
    with pytest.raises(TokenizerMismatchError, match="25 tokens .* has 10 rows"):
        check_tokenizer(small, word_tokenizer())
    folder = tmp_path / "small"
    _quiet_save(small, folder)
    word_tokenizer().save_pretrained(folder)
    with pytest.raises(TokenizerMismatchError, match="does not belong to this model"):
        load_model(folder)
    check_tokenizer(bert(vocab=32), word_tokenizer())  # a larger embedding is fine
    bare = save_bert(tmp_path / "bare", vocab=10, tokenizer=False)
    assert load_model(bare).tokenizer is None
    with_tokenizer = save_bert(tmp_path / "with_tokenizer")
    with pytest.raises(TokenizerMismatchError):
        load_model(bare, tokenizer=with_tokenizer)  # a tokenizer from elsewhere is checked too


# --------------------------------------------------------------------------- models out


def _averaged_body(hfs):
    bodies = [hf.body_params() for hf in hfs]
    return {n: sum(b[n] for b in bodies) / len(bodies) for n in bodies[0]}


def _state(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_save_merged_writes_one_folder_per_task(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    a = load_model(save_bert(tmp_path / "in" / "sst", labels=["neg", "pos"], seed=0))
    b = load_model(save_bert(tmp_path / "in" / "nli", labels=["yes", "no", "maybe"], seed=1))
    merged = _averaged_body([a, b])
    out = tmp_path / "out" / "merged"  # the parent is created
    folders = save_merged([a, b], merged, out)
    assert folders == [out / "sst", out / "nli"]
    assert sorted(os.listdir(out)) == ["nli", "sst"]
    for hf, folder in zip([a, b], folders):
        loaded = AutoModelForSequenceClassification.from_pretrained(folder)
        params = dict(loaded.named_parameters())
        for name, value in merged.items():
            assert torch.equal(params[name], value), name
        for name, value in hf.head_params().items():
            assert torch.equal(params[name], value), name
        assert loaded.config.id2label == hf.id2label
        assert len(AutoTokenizer.from_pretrained(folder)) == 25
    reloaded = load_model(folders[1])
    assert reloaded.label2id == {"yes": 0, "no": 1, "maybe": 2}


def test_save_merged_accepts_a_result_object_and_names(tmp_path):
    a, b = wrap_model(bert(seed=0)), wrap_model(bert(num_labels=3, seed=1))

    class Result:
        params = _averaged_body([a, b])

    folders = save_merged([a, b], Result(), tmp_path / "out", names=["x", "y"])
    assert folders == [tmp_path / "out" / "x", tmp_path / "out" / "y"]
    with pytest.raises(ValueError, match="distinct folder names"):
        save_merged([a, b], Result.params, tmp_path / "o2", names=["x", "x"])
    # in-memory models without a source get task_0, task_1
    assert save_merged([a, b], Result.params, tmp_path / "o3")[0].name == "task_0"


def test_save_merged_one_folder_for_shared_heads(tmp_path):
    from transformers import AutoModelForCausalLM

    a = load_model(save_gpt2(tmp_path / "a", seed=0))
    b = load_model(save_gpt2(tmp_path / "b", seed=1))
    merged = _averaged_body([a, b])
    assert "transformer.wte.weight" in merged
    folders = save_merged([a, b], merged, tmp_path / "lm")
    assert folders == [tmp_path / "lm"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    for name, value in merged.items():
        assert torch.equal(dict(loaded.named_parameters())[name], value), name
    assert torch.equal(loaded.lm_head.weight, merged["transformer.wte.weight"])
    assert (tmp_path / "lm" / "tokenizer.json").is_file()
    # untied LM heads stay each model's own unless they are merged too
    c = load_model(save_gpt2(tmp_path / "c", seed=0, tie=False))
    d = load_model(save_gpt2(tmp_path / "d", seed=1, tie=False))
    body = _averaged_body([c, d])
    assert len(save_merged([c, d], body, tmp_path / "two")) == 2
    everything = {**body, "lm_head.weight": (c.model.lm_head.weight + d.model.lm_head.weight) / 2}
    assert save_merged([c, d], everything, tmp_path / "one") == [tmp_path / "one"]
    state = _state(tmp_path / "one")
    assert torch.equal(state["lm_head.weight"], everything["lm_head.weight"])


def test_save_merged_refuses_existing_output(tmp_path):
    a, b = wrap_model(bert(seed=0)), wrap_model(bert(seed=1, num_labels=3))
    merged = _averaged_body([a, b])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointExistsError, match="force"):
        save_merged([a, b], merged, out)
    assert os.listdir(out) == ["keep.txt"]
    save_merged([a, b], merged, out, force=True)
    assert sorted(os.listdir(out)) == ["task_0", "task_1"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_merged_is_atomic(tmp_path, monkeypatch):
    a, b = wrap_model(bert(seed=0)), wrap_model(bert(seed=1, num_labels=3))
    merged = _averaged_body([a, b])
    calls = []
    real = type(b.model).save_pretrained

    def failing(self, folder, **kwargs):
        calls.append(folder)
        if len(calls) == 2:  # the first task's folder is complete, the second half written
            real(self, folder, **kwargs)
            raise RuntimeError("killed mid-write")
        return real(self, folder, **kwargs)

    monkeypatch.setattr(type(b.model), "save_pretrained", failing)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        save_merged([a, b], merged, tmp_path / "out")
    assert os.listdir(tmp_path) == []  # neither the output nor a temporary folder
    # an existing output survives a failed forced rewrite untouched
    monkeypatch.undo()
    save_merged([a, b], merged, tmp_path / "out")
    before = _state(tmp_path / "out" / "task_0")
    calls.clear()
    monkeypatch.setattr(type(b.model), "save_pretrained", failing)
    with pytest.raises(RuntimeError):
        save_merged([a, b], {n: v + 1 for n, v in merged.items()}, tmp_path / "out", force=True)
    assert os.listdir(tmp_path) == ["out"]
    after = _state(tmp_path / "out" / "task_0")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_merged_checks_before_writing(tmp_path):
    a, b = wrap_model(bert(seed=0)), wrap_model(bert(seed=1))
    with pytest.raises(ArchitectureMismatchError, match="'nope' is not a parameter"):
        save_merged([a, b], {"nope": torch.zeros(1)}, tmp_path / "out")
    with pytest.raises(ArchitectureMismatchError, match="has shape \\(3,\\)"):
        save_merged([a, b], {"bert.pooler.dense.bias": torch.zeros(3)}, tmp_path / "out")
    with pytest.raises(ArchitectureMismatchError, match="hidden_size"):
        save_merged([a, wrap_model(bert(hidden=16))], {}, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_save_merged_keeps_per_task_buffers(tmp_path):
    from transformers import AutoModelForImageClassification, ResNetConfig
    from transformers import ResNetForImageClassification as ResNet

    config = ResNetConfig(embedding_size=4, hidden_sizes=[4], depths=[1], num_labels=2)
    torch.manual_seed(0)
    a, b = ResNet(config).eval(), ResNet(config).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # same parameters and head, other batch-norm statistics
        b.resnet.embedder.embedder.normalization.running_mean += 1.0
    hfs = [wrap_model(a), wrap_model(b)]
    assert hfs[0].kind == "image_classification"
    assert hfs[0].head_names == ("classifier.1.weight", "classifier.1.bias")
    merged = _averaged_body(hfs)
    folders = save_merged(hfs, merged, tmp_path / "out")
    assert len(folders) == 2  # one folder would lose the second model's statistics
    for model, folder in zip((a, b), folders):
        loaded = AutoModelForImageClassification.from_pretrained(folder)
        name = "resnet.embedder.embedder.normalization.running_mean"
        assert torch.equal(loaded.state_dict()[name], model.state_dict()[name])
    assert save_merged(hfs[:1] * 2, merged, tmp_path / "same") == [tmp_path / "same"]


# --------------------------------------------------------------------------- base models


def test_load_base_headless_and_other_heads(tmp_path):
    """A base model provides body parameters only: a headless ``BertModel`` folder (as
    sentence-transformers saves them), or another task's model, loads without a kind, with
    the task models' body names and the base's own values."""
    from transformers import BertForMaskedLM, BertModel

    from curvmerge.hf import load_base

    task = load_model(save_bert(tmp_path / "task", labels=["a", "b", "c"], seed=1))
    plain = bert(seed=5)
    headless = BertModel(plain.config).eval()
    headless.load_state_dict(plain.bert.state_dict())
    _quiet_save(headless, tmp_path / "headless")
    word_tokenizer().save_pretrained(tmp_path / "headless")
    with pytest.raises(ModelLoadError, match="task kind"):
        load_model(tmp_path / "headless")  # a task model needs a kind
    base = load_base(tmp_path / "headless", task)
    assert base.body_names == task.body_names
    theirs = dict(plain.named_parameters())
    for name, value in base.body_params().items():
        assert torch.equal(value, theirs[name]), name
    check_same_architecture([task, base])
    # a pre-trained masked LM (bert-base-uncased's architecture) serves as well; saved by
    # transformers it has no pooler, so it serves merges of the other body parameters
    _quiet_save(bert(seed=6, cls=BertForMaskedLM), tmp_path / "mlm")
    with pytest.raises(ModelLoadError, match=r"'bert\.pooler\.dense\.bias'.*--params"):
        load_base(tmp_path / "mlm", task)
    mlm = load_base(tmp_path / "mlm", task, params=r"^bert\.(?!pooler)")
    assert mlm.body_names[:2] == task.body_names[:2]


def test_load_base_refuses_missing_body_parameters(tmp_path):
    """A base without some body parameter (a BertModel saved without its pooler) would give
    it random values: refused, naming it."""
    from transformers import BertModel

    from curvmerge.hf import load_base

    task = load_model(save_bert(tmp_path / "task", seed=1))
    _quiet_save(BertModel(bert().config, add_pooling_layer=False), tmp_path / "nopool")
    with pytest.raises(ModelLoadError, match=r"bert\.pooler\.dense\.(weight|bias)"):
        load_base(tmp_path / "nopool", task)


def test_a_head_missing_from_the_folder_is_warned_about(tmp_path):
    """A classifier folder whose head weights are missing loads with a random head: say so."""
    from safetensors.torch import load_file, save_file

    from curvmerge.hf import RandomInitWarning, load_model
    from curvmerge.models import tiny_bert

    model = tiny_bert(2, vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, max_length=12)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier")}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.warns(RandomInitWarning, match="classifier"):
        load_model(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        load_model(tmp_path / "m", num_labels=3)  # a new head was asked for


def test_labels_follow_id2label_when_label2id_is_stale():
    """transformers leaves label2id at LABEL_0, LABEL_1 when only id2label is set."""
    from curvmerge.hf import wrap_model
    from curvmerge.models import tiny_bert

    model = tiny_bert(2, vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, max_length=12)
    model.config.id2label = {0: "neg", 1: "pos"}
    hf = wrap_model(model)
    assert hf.label2id == {"neg": 0, "pos": 1}
    assert hf.id2label == {0: "neg", 1: "pos"}
