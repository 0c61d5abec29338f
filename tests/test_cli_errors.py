"""Bad input to the command: one line ``curvmerge: error: ...``, exit status 2, no
traceback and no partial output (Hugging Face models and data files)."""

from __future__ import annotations

import pytest

from tests.test_cli_support import (
    WORDS,
    run_main,
    run_script,
    save_bert,
    save_gpt2,
    word_tokenizer,
    write_text_csv,
)

pytest.importorskip("transformers")

LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    save_bert(d / "a", LABELS, seed=1)
    save_bert(d / "b", LABELS, seed=2)
    write_text_csv(d / "a.csv", LABELS, n=16)
    return d


def _error(folder, *args) -> str:
    """Run the command; check status 2, one line, and that it wrote nothing."""
    before = sorted(p.name for p in folder.iterdir())
    status, out, err = run_main(*args)
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvmerge: error: "), err
    assert sorted(p.name for p in folder.iterdir()) == before  # no (partial) output
    return lines[0]


def test_missing_column(d):
    err = _error(d, "fisher", d / "a", "--data", d / "a.csv", "--label-column", "stars",
                 "-o", d / "f.safetensors")  # fmt: skip
    assert "no label column 'stars'" in err and "available columns: text, label" in err
    (d / "nolabel.csv").write_text("text\nthe movie\n")
    err = _error(d, "fisher", d / "a", "--data", d / "nolabel.csv", "-o", d / "f.safetensors")
    assert "no label column found" in err
    (d / "nolabel.csv").unlink()


def test_label_outside_the_models_labels(d):
    (d / "bad.csv").write_text("text,label\nthe movie,neg\nthe plot,great\n")
    err = _error(d, "eval", d / "a", "--data", d / "bad.csv")
    assert "label 'great'" in err and "data row 2" in err and "'neg', 'pos'" in err
    (d / "bad.csv").write_text("text,label\nthe movie,7\n")
    err = _error(d, "eval", d / "a", "--data", d / "bad.csv")
    assert "label 7" in err
    (d / "bad.csv").unlink()


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file(d, content):
    (d / "empty.csv").write_text(content)
    err = _error(d, "fisher", d / "a", "--data", d / "empty.csv", "-o", d / "f.safetensors")
    assert "empty.csv is empty" in err
    (d / "empty.csv").unlink()


def test_different_architectures(d, tmp_path):
    from curvmerge.models import tiny_bert

    model = tiny_bert(2, vocab_size=len(word_tokenizer()), hidden_size=12, num_layers=1)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(tmp_path / "wide")
    word_tokenizer().save_pretrained(tmp_path / "wide")
    err = _error(tmp_path, "merge", d / "a", tmp_path / "wide", "-o", tmp_path / "m")
    assert "different architectures" in err and "'hidden_size' is 8" in err and "12" in err
    save_gpt2(tmp_path / "lm", seed=0)
    err = _error(tmp_path, "merge", d / "a", tmp_path / "lm", "-o", tmp_path / "m")
    assert "'model_type' is 'bert'" in err and "'gpt2'" in err


def test_different_vocabularies(d, tmp_path):
    bigger = word_tokenizer([*WORDS, "extra"])
    save_bert(tmp_path / "more", LABELS, seed=3, tokenizer=bigger)
    err = _error(tmp_path, "merge", d / "a", tmp_path / "more", "-o", tmp_path / "m")
    assert "'vocab_size'" in err
    # the same size, other tokens: the tokenizers disagree on what an id means
    other = word_tokenizer([w.upper() + "x" for w in WORDS])
    save_bert(tmp_path / "other", LABELS, seed=3, tokenizer=other)
    err = _error(tmp_path, "merge", d / "a", tmp_path / "other", "-o", tmp_path / "m")
    assert "different vocabularies" in err and "tokenizers" in err


def test_tokenizer_that_does_not_match_the_model(tmp_path):
    save_bert(tmp_path / "small", LABELS, seed=1, vocab_size=12)  # 29-token tokenizer
    write_text_csv(tmp_path / "a.csv", LABELS, n=8)
    err = _error(tmp_path, "eval", tmp_path / "small", "--data", tmp_path / "a.csv")
    assert "tokenizer has 29 tokens" in err and "12 rows" in err


def test_existing_output_folder_needs_force(d, tmp_path):
    out = tmp_path / "merged"
    status, _, err = run_main("merge", d / "a", d / "b", "-o", out, "-q")
    assert status == 0, err
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    err = _error(tmp_path, "merge", d / "a", d / "b", "-o", out)
    assert "already exists" in err and "--force" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    status, _, err = run_main("merge", d / "a", d / "b", "-o", out, "--force", "-w", "1", "3")
    assert status == 0, err


def test_files_that_are_not_models(d, tmp_path):
    err = _error(d, "eval", d / "a.csv", "--data", d / "a.csv")
    assert "a.csv is not a model" in err
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04junk")
    err = _error(tmp_path, "eval", tmp_path / "weights.bin")
    assert "is not a model" in err and "never unpickles" in err
    (tmp_path / "folder").mkdir()
    err = _error(tmp_path, "eval", tmp_path / "folder", "--data", d / "a.csv")
    assert "no config.json" in err
    status, _, _ = run_main(
        "fisher", d / "a", "--data", d / "a.csv", "-q", "-o", tmp_path / "f.safetensors"
    )
    assert status == 0
    err = _error(tmp_path, "merge", tmp_path / "f.safetensors", d / "a", "-o", tmp_path / "m")
    assert "was not written by 'curvmerge finetune'" in err


def test_hugging_face_model_needs_data(d):
    err = _error(d, "fisher", d / "a", "-o", d / "f.safetensors")
    assert "give its data with --data" in err
    err = _error(d, "eval", d / "a", d / "b", "--data", d / "a.csv", d / "a.csv", d / "a.csv")
    assert "3 --data files for 2 models" in err


def test_checkpoints_merge_into_a_file_not_a_folder(tmp_path):
    args = ["--model", "mlp", "--hidden", "8", "--steps", "1", "-q"]
    status, _, err = run_main(
        "finetune", "--task", "digits:0,1", *args, "-o", tmp_path / "c.safetensors"
    )
    assert status == 0, err
    err = _error(tmp_path, "merge", tmp_path / "c.safetensors", tmp_path / "c.safetensors",
                 "-o", tmp_path / "folder")  # fmt: skip
    assert "FILE.safetensors" in err


def test_bad_experiment_config(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "models: {finetuned: {a: a.safetensors}}\nfisher: {kin: 1}\n"
    )
    err = _error(tmp_path, "run", tmp_path / "bad.yaml")
    assert "fisher" in err and "unknown key 'kin'" in err


def test_console_script_prints_one_line(d):
    r = run_script("merge", d / "a", d / "a.csv", "-o", d / "m", cwd=d)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"curvmerge: error: {d / 'a.csv'} is not a model: give a checkpoint written by "
        "'curvmerge finetune' (.safetensors) or a Hugging Face model folder (config.json and "
        "weights)"
    ]
    assert not (d / "m").exists()


def test_fisher_writes_no_file_when_a_later_model_fails(tmp_path):
    """The second model's data has no loss terms (one-word texts: no next token); the first
    model's Fisher must not be left behind, and the message names the file."""
    import csv

    from tests.test_cli_support import write_lm_csv

    save_gpt2(tmp_path / "lm_a", seed=1)
    save_gpt2(tmp_path / "lm_b", seed=2)
    write_lm_csv(tmp_path / "a.csv", n=8)
    with open(tmp_path / "short.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text"])
        for word in WORDS[:8]:
            w.writerow([word])
    outs = [tmp_path / "a.fisher.safetensors", tmp_path / "b.fisher.safetensors"]
    code, _, err = run_main(
        "fisher", str(tmp_path / "lm_a"), str(tmp_path / "lm_b"),
        "--data", str(tmp_path / "a.csv"), str(tmp_path / "short.csv"),
        "-o", *map(str, outs), "-q",
    )  # fmt: skip
    assert code == 2 and "short.csv" in err
    assert not any(p.exists() for p in outs)
