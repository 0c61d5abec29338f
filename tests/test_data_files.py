"""Tests for curvmerge.data.files: user data files to model batches, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from curvmerge import GGNOperator, diagonal_fisher
from curvmerge.data.files import (
    DataBatches,
    DataFileError,
    DataFileNotFoundError,
    encode_table,
    load_data,
    load_splits,
    read_table,
    split_table,
)
from curvmerge.hf import load_model
from tests.test_hf import bert, save_bert, save_gpt2, word_tokenizer

TEXTS = [
    "the movie was great",
    "awful plot",
    "a very good film and a great cast",
    "boring",
    "the acting is not fun",
    "it was a bad story",
    "great fun",
]
LABELS = ["pos", "neg", "pos", "neg", "neg", "neg", "pos"]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "sentiment"
    return load_model(save_bert(folder, labels=["neg", "pos"], seed=0))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(save_gpt2(tmp_path_factory.mktemp("models") / "lm", seed=0))


def write(frame: pd.DataFrame, path, fmt):
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "disk":
        import datasets

        datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(path))
    return path


def expected_ids(tokenizer, texts, pairs=None):
    encoded = [
        tokenizer(t) if pairs is None else tokenizer(t, p)
        for t, p in zip(texts, pairs or [None] * len(texts))
    ]
    return [e["input_ids"] for e in encoded]


def unpadded(batches):
    """Each example's token ids without padding, and the padding-is-pad-id check."""
    rows = []
    for inputs, _ in batches:
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
            assert mask.sum() > 0 and torch.all(mask[: int(mask.sum())] == 1)  # right padding
            rows.append(ids[mask.bool()].tolist())
    return rows


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "disk"])
@pytest.mark.parametrize("labels", ["strings", "integers"])
def test_round_trip(tmp_path, sentiment, fmt, labels):
    values = LABELS if labels == "strings" else [sentiment.label2id[x] for x in LABELS]
    frame = pd.DataFrame({"id": range(len(TEXTS)), "text": TEXTS, "label": values})
    suffix = "" if fmt == "disk" else f".{fmt}"
    path = write(frame, tmp_path / f"data{suffix}", fmt)
    batches = load_data(path, sentiment, batch_size=3)
    assert isinstance(batches, DataBatches)
    assert len(batches) == 3 and batches.num_examples == len(TEXTS)
    assert [t.shape[0] for _, t in batches] == [3, 3, 1]
    assert batches.targets().tolist() == [sentiment.label2id[x] for x in LABELS]
    assert batches.label_names == ("neg", "pos") and batches.kind == "sequence_classification"
    assert batches.loss.name == "cross_entropy"
    assert unpadded(batches) == expected_ids(sentiment.tokenizer, TEXTS)
    inputs, _ = batches[0]
    assert (
        {"input_ids", "attention_mask"}
        <= set(inputs)
        <= {"input_ids", "attention_mask", "token_type_ids"}
    )
    assert all(v.dtype == torch.int64 for v in inputs.values())
    # padding="longest" pads each batch to its own longest example
    assert inputs["input_ids"].shape[1] == max(
        len(x) for x in expected_ids(sentiment.tokenizer, TEXTS[:3])
    )


def test_sentence_pairs_detected(tmp_path, sentiment):
    first, second = TEXTS[:4], TEXTS[3:7]
    frame = pd.DataFrame({"premise": first, "hypothesis": second, "label": [0, 1, 1, 0]})
    path = write(frame, tmp_path / "rte.jsonl", "jsonl")
    batches = load_data(path, sentiment, batch_size=4)
    assert unpadded(batches) == expected_ids(sentiment.tokenizer, first, second)
    inputs, targets = batches[0]
    assert targets.tolist() == [0, 1, 1, 0]
    assert inputs["token_type_ids"].max() == 1  # the second sentence is marked
    explicit = load_data(path, sentiment, text_column="premise", text_pair_column="hypothesis")
    assert torch.equal(explicit[0][0]["input_ids"], inputs["input_ids"])
    single = load_data(path, sentiment, text_column="premise")  # a pair column is optional
    assert single[0][0].get("token_type_ids", torch.zeros(1)).max() == 0


def test_label_strings_that_are_indices_and_label2id(tmp_path, sentiment):
    path = write(
        pd.DataFrame({"text": TEXTS[:3], "label": ["1", "0", "1"]}), tmp_path / "d.jsonl", "jsonl"
    )
    assert load_data(path, sentiment).targets().tolist() == [1, 0, 1]
    path = write(
        pd.DataFrame({"text": TEXTS[:3], "label": ["good", "bad", "good"]}),
        tmp_path / "e.csv",
        "csv",
    )
    batches = load_data(path, sentiment, label2id={"bad": 0, "good": 1})
    assert batches.targets().tolist() == [1, 0, 1] and batches.label_names == ("bad", "good")
    with pytest.raises(DataFileError, match="label2id must map onto the model's 2 classes"):
        load_data(path, sentiment, label2id={"bad": 0, "good": 2})


def test_dataset_dict_splits_and_split_table(tmp_path, sentiment):
    import datasets

    frame = pd.DataFrame({"sentence": TEXTS, "label": LABELS})
    full = datasets.Dataset.from_pandas(frame)
    datasets.DatasetDict({"train": full, "test": full.select([0, 1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataFileError, match="has the splits train, test; pass split="):
        read_table(tmp_path / "dd")
    with pytest.raises(DataFileError, match="no split 'dev'; its splits are train, test"):
        read_table(tmp_path / "dd", split="dev")
    assert load_data(tmp_path / "dd", sentiment, split="test").num_examples == 2
    parts = split_table(full, validation=2, test=0.3, seed=4)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"train": 3, "validation": 2, "test": 2}
    seen = [t for part in parts.values() for t in part["sentence"]]
    assert sorted(seen) == sorted(TEXTS)
    again = split_table(full, validation=2, test=0.3, seed=4)
    assert list(again["test"]["sentence"]) == list(parts["test"]["sentence"])
    other = split_table(full, validation=2, test=0.3, seed=5)
    assert list(other["train"]["sentence"]) != list(parts["train"]["sentence"])
    with pytest.raises(DataFileError, match="leave none to train on"):
        split_table(full, validation=4, test=3)
    path = write(frame, tmp_path / "d.csv", "csv")
    splits = load_splits(path, sentiment, validation=1, test=2, seed=0)
    assert {k: v.num_examples for k, v in splits.items()} == {
        "train": 4,
        "validation": 1,
        "test": 2,
    }
    with pytest.raises(DataFileError, match="split='train' selects a split"):
        read_table(path, split="train")


def test_limit_and_max_length(tmp_path, sentiment):
    path = write(pd.DataFrame({"text": TEXTS, "label": LABELS}), tmp_path / "d.csv", "csv")
    assert load_data(path, sentiment, limit=2).num_examples == 2
    short = load_data(path, sentiment, max_length=4, padding="max_length", batch_size=8)
    inputs, _ = short[0]
    assert inputs["input_ids"].shape == (7, 4)
    assert inputs["input_ids"][0].tolist()[-1] == sentiment.tokenizer.sep_token_id  # truncated
    with pytest.raises(DataFileError, match="exceeds the model's 32 positions"):
        load_data(path, sentiment, max_length=64)


# --------------------------------------------------------------------------- errors


def test_bad_inputs(tmp_path, sentiment):
    with pytest.raises(DataFileNotFoundError, match="does not exist") as err:
        load_data(tmp_path / "missing.csv", sentiment)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFileError, match=r"unknown data format .*'\.txt'"):
        load_data(tmp_path / "notes.txt", sentiment)
    with pytest.raises(DataFileError, match="unknown data format 'xlsx'"):
        load_data(tmp_path / "notes.txt", sentiment, format="xlsx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataFileError, match="neither a dataset saved with save_to_disk"):
        load_data(tmp_path / "folder", sentiment)
    for name, content in [
        ("empty.csv", ""),
        ("header.csv", "text,label\n"),
        ("empty.jsonl", ""),
        ("empty.tsv", ""),
    ]:
        (tmp_path / name).write_text(content)
        with pytest.raises(DataFileError, match="is empty"):
            load_data(tmp_path / name, sentiment)
    path = write(pd.DataFrame({"body": TEXTS, "stars": LABELS}), tmp_path / "d.csv", "csv")
    with pytest.raises(
        DataFileError, match="no text column found .*available columns: body, stars"
    ):
        load_data(path, sentiment)
    with pytest.raises(
        DataFileError, match="no label column found .*available columns: body, stars"
    ):
        load_data(path, sentiment, text_column="body")
    with pytest.raises(
        DataFileError, match="no label column 'label'; available columns: body, stars"
    ):
        load_data(path, sentiment, text_column="body", label_column="label")
    with pytest.raises(DataFileError, match="no text column 'text'"):
        load_data(path, sentiment, text_column="text", label_column="stars")
    bad = write(
        pd.DataFrame({"text": TEXTS[:3], "label": ["pos", "meh", "neg"]}),
        tmp_path / "bad.csv",
        "csv",
    )
    with pytest.raises(
        DataFileError,
        match="label 'meh' \\(data row 2, column 'label'\\) is not "
        "one of the model's labels: 'neg', 'pos'",
    ):
        load_data(bad, sentiment)
    out_of_range = write(
        pd.DataFrame({"text": TEXTS[:2], "label": [0, 2]}), tmp_path / "range.jsonl", "jsonl"
    )
    with pytest.raises(DataFileError, match="label 2 .* indices 0..1"):
        load_data(out_of_range, sentiment)
    missing = tmp_path / "missing_text.csv"
    missing.write_text("text,label\ngreat,pos\n,neg\n")
    with pytest.raises(DataFileError, match="data row 2 has no text in column 'text'"):
        load_data(missing, sentiment)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": "neg"}\n')
    with pytest.raises(DataFileError):
        load_data(mixed, sentiment)
    assert issubclass(DataFileError, ValueError)


def test_messages_are_one_line(tmp_path, sentiment):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError) as err:
        load_data(tmp_path / "broken.parquet", sentiment)
    assert "\n" not in str(err.value) and "could not be read as parquet" in str(err.value)


# --------------------------------------------------------------------------- causal LM


def test_causal_lm_targets_exclude_padding(tmp_path, lm):
    texts = ["the movie was great", "bad", "a very good film and a great cast", "it is fun"]
    path = write(pd.DataFrame({"text": texts}), tmp_path / "lm.jsonl", "jsonl")
    batches = load_data(path, lm, batch_size=4)
    assert lm.tokenizer.pad_token is None  # the model's own tokenizer is left as it was
    ((inputs, targets),) = batches
    lengths = [len(t.split()) for t in texts]
    assert inputs["attention_mask"].sum(1).tolist() == lengths
    assert set(inputs) == {"input_ids", "attention_mask"}
    ids = inputs["input_ids"]
    for b, n in enumerate(lengths):
        assert targets[b, : n - 1].tolist() == ids[b, 1:n].tolist()
        assert torch.all(targets[b, n - 1 :] == -100)
    assert int((targets != -100).sum()) == sum(n - 1 for n in lengths)
    assert batches.loss.classes_last is True and batches.label_names == ()
    with pytest.raises(ValueError, match="per token"):
        batches.targets()
    with pytest.raises(DataFileError, match="leave label_column unset"):
        load_data(path, lm, label_column="text")


def test_statistics_on_loaded_batches_ignore_padding(tmp_path, sentiment, lm):
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    path = write(frame, tmp_path / "d.parquet", "parquet")
    for hf, cols in ((sentiment, {}), (lm, {"label_column": None})):
        data = tmp_path / f"{hf.kind}.jsonl"
        write(frame if hf is sentiment else frame[["text"]], data, "jsonl")
        short = load_data(data, hf, batch_size=3, **cols)
        long = load_data(data, hf, batch_size=3, padding="max_length", max_length=16, **cols)
        assert long[0][0]["input_ids"].shape[1] == 16
        fisher = diagonal_fisher(hf.model, short.loss, short, params=hf.body_regex, progress=False)
        padded = diagonal_fisher(hf.model, long.loss, long, params=hf.body_regex, progress=False)
        assert fisher.num_examples == len(TEXTS)
        assert len(fisher.space.names) == len(hf.body_names)
        diag = fisher.diagonal()
        assert torch.isfinite(diag).all() and diag.sum() > 0
        torch.testing.assert_close(padded.diagonal(), diag, rtol=1e-4, atol=1e-9)
        G = GGNOperator(hf.model, short.loss, short, params=hf.body_regex)
        v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(0))
        Gv = G @ v
        assert Gv.shape == v.shape and torch.isfinite(Gv).all() and float(v @ Gv) >= 0
        Gp = GGNOperator(hf.model, long.loss, long, params=hf.body_regex)
        torch.testing.assert_close(Gp @ v, Gv, rtol=1e-4, atol=1e-6)
    assert read_table(path).num_rows == len(TEXTS)


# --------------------------------------------------------------------------- other kinds


def test_token_classification(tmp_path):
    from transformers import BertForTokenClassification

    folder = tmp_path / "ner"
    model = bert(labels=["O", "ACT"], cls=BertForTokenClassification)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    hf = load_model(folder)
    rows = [
        {"tokens": ["the", "cast", "was", "great"], "tags": ["O", "ACT", "O", "O"]},
        {"tokens": ["boring", "acting"], "tags": ["O", "ACT"]},
    ]
    path = tmp_path / "ner.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    batches = load_data(path, hf)
    ((inputs, targets),) = batches
    assert targets.tolist() == [[-100, 0, 1, 0, 0, -100], [-100, 0, 1, -100, -100, -100]]
    assert batches.loss.classes_last is True
    fisher = diagonal_fisher(hf.model, batches.loss, batches, progress=False)
    assert torch.isfinite(fisher.diagonal()).all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["the", "cast"], "tags": ["O"]}))
    with pytest.raises(DataFileError, match="has 2 words but 1 labels"):
        load_data(bad, hf)


def test_regression_targets(tmp_path):
    folder = tmp_path / "reg"
    model = bert(num_labels=1)
    model.config.problem_type = "regression"
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    hf = load_model(folder)
    path = write(
        pd.DataFrame({"text": TEXTS[:3], "label": [0.5, 1.0, -2.0]}), tmp_path / "r.csv", "csv"
    )
    batches = load_data(path, hf)
    assert batches.loss.name == "mse" and batches.targets().tolist() == [[0.5], [1.0], [-2.0]]


def test_images_from_a_folder_and_a_table(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # transformers 4: the slow processor is PIL based
        from transformers import ViTImageProcessor as Processor

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label={0: "cat", 1: "dog"},
        label2id={"cat": 0, "dog": 1},
    )
    torch.manual_seed(0)
    folder = tmp_path / "vit"
    ViTForImageClassification(config).save_pretrained(folder)
    Processor(size={"height": 8, "width": 8}).save_pretrained(folder)
    hf = load_model(folder)
    assert hf.kind == "image_classification" and hf.image_processor is not None
    assert hf.head_names == ("classifier.weight", "classifier.bias")
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for label, n in (("cat", 3), ("dog", 2)):
        (images / label).mkdir(parents=True)
        for i in range(n):
            mode = "L" if i == 0 else "RGB"  # grey images are converted
            shape = (10, 12) if mode == "L" else (10, 12, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
                images / label / f"{i}.png"
            )
    batches = load_data(images, hf, batch_size=4)
    assert [x["pixel_values"].shape for x, _ in batches] == [(4, 3, 8, 8), (1, 3, 8, 8)]
    assert batches.targets().tolist() == [0, 0, 0, 1, 1]
    fisher = diagonal_fisher(hf.model, batches.loss, batches, params=hf.body_regex, progress=False)
    assert torch.isfinite(fisher.diagonal()).all()
    table = pd.DataFrame({"file": ["cat/0.png", "dog/1.png"], "label": ["cat", "dog"]})
    csv = write(table, images / "index.csv", "csv")
    from_table = load_data(csv, hf, image_column="file")
    assert torch.equal(from_table[0][0]["pixel_values"][0], batches[0][0]["pixel_values"][0])
    table.loc[1, "file"] = "dog/none.png"
    write(table, images / "broken.csv", "csv")
    with pytest.raises(DataFileError, match="none.png .*does not exist"):
        load_data(images / "broken.csv", hf, image_column="file")


def test_encode_table_directly(sentiment):
    import datasets

    table = datasets.Dataset.from_dict({"text": TEXTS[:2], "label": ["pos", "neg"]})
    batches = encode_table(table, sentiment, batch_size=1, source="memory")
    assert len(batches) == 2 and batches.source == "memory"
    no_tokenizer = dataclasses.replace(sentiment, tokenizer=None)
    with pytest.raises(DataFileError, match="has no tokenizer"):
        encode_table(table, no_tokenizer)


def test_messages_name_the_keyword_arguments(tmp_path, sentiment):
    """Library messages name the Python arguments that fix them (the command turns them into
    its flags)."""
    path = write(pd.DataFrame({"body": TEXTS, "stars": LABELS}), tmp_path / "d.csv", "csv")
    with pytest.raises(DataFileError, match="no label column found .*pass label_column="):
        load_data(path, sentiment, text_column="body")
    with pytest.raises(DataFileError, match="no text column found .*pass text_column="):
        load_data(path, sentiment)
    path = write(
        pd.DataFrame({"text": TEXTS[:2], "label": ["good", "bad"]}), tmp_path / "e.csv", "csv"
    )
    with pytest.raises(DataFileError, match="pass label2id= to map the file's labels"):
        load_data(path, sentiment)
