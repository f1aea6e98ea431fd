"""Data sets: built-ins, file readers, leak-free seeded splits, previews and the error messages of bad input."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from vera_core.lab.data import (

    BUILTIN_DATASETS,

    MR_INSTRUCTION,

    TextDataset,

    format_preview,

    load_dataset,

    mr_prompt,

    preview,

    synthetic_restaurants,

)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _groups(rows: list[dict]) -> set[str]:
    return {r["group"] for r in rows}


# ---------------------------------------------------------------------------------------------- built-ins

def test_rotten_tomatoes_split_is_stratified_and_complete():
    d = load_dataset("rotten-tomatoes")
    assert (d.name, d.task, d.labels) == ("rotten-tomatoes", "classification", ["rotten", "fresh"])
    assert d.source.endswith("rotten_tomatoes_corpus.csv.bz2")
    assert (len(d.train), len(d.validation), len(d.test)) == (3892, 487, 487)
    everything = d.train + d.validation + d.test
    assert Counter(r["label"] for r in everything) == {0: 2411, 1: 2455}
    assert len({r["text"] for r in d.validation} & {r["text"] for r in d.test}) <= 1  # a few reviews repeat
    for split in (d.train, d.validation, d.test):
        fresh_share = sum(r["label"] for r in split) / len(split)
        assert abs(fresh_share - 2455 / 4866) < 0.01


def test_rotten_tomatoes_is_deterministic_per_seed():
    a, b, c = load_dataset("rotten-tomatoes", seed=3), load_dataset("rotten-tomatoes", seed=3), load_dataset(
        "rotten-tomatoes", seed=4)
    assert a.test == b.test and a.train[:20] == b.train[:20]
    assert a.test != c.test


def test_synthetic_restaurants_groups_never_cross_splits():
    d = load_dataset("synthetic-restaurants", seed=1)
    assert d.task == "causal-lm" and "synthetic" in d.source and d.labels is None
    rows = d.train + d.validation + d.test
    assert len(rows) == 600
    train, val, test = _groups(d.train), _groups(d.validation), _groups(d.test)
    assert not (train & val) and not (train & test) and not (val & test)
    n_groups = len(train | val | test)
    assert len(val) == round(n_groups * 0.1) and len(test) == round(n_groups * 0.1)
    per_group = Counter(r["group"] for r in rows)
    assert max(per_group.values()) >= 2  # several references for some MRs
    for r in rows:
        assert r["prompt"] == MR_INSTRUCTION + r["group"]
        assert r["group"].startswith("name[")
        assert r["response"].endswith(".")


def test_synthetic_responses_mention_every_attribute():
    rows = synthetic_restaurants(seed=7, n_rows=50)
    assert len(rows) == 50
    assert rows == synthetic_restaurants(seed=7, n_rows=50)
    assert rows != synthetic_restaurants(seed=8, n_rows=50)
    for r in rows:
        attrs = dict(part[:-1].split("[", 1) for part in r["group"].split(", "))
        assert attrs["name"] in r["response"]
        if "near" in attrs:
            assert attrs["near"] in r["response"]
        if "eatType" in attrs:
            assert attrs["eatType"] in r["response"]
        if "food" in attrs:
            assert attrs["food"].lower() in r["response"].lower()


def test_max_rows_caps_each_split_deterministically():
    d = load_dataset("rotten-tomatoes", max_rows=25)
    assert (len(d.train), len(d.validation), len(d.test)) == (25, 25, 25)
    assert d.train == load_dataset("rotten-tomatoes").train[:25]


# ---------------------------------------------------------------------------------------------- files

def test_jsonl_classification_with_string_labels(tmp_path):
    rows = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    d = load_dataset(_write_jsonl(tmp_path / "reviews.jsonl", rows))
    assert (d.name, d.task, d.labels) == ("reviews", "classification", ["neg", "pos"])
    assert (len(d.train), len(d.validation), len(d.test)) == (32, 4, 4)
    texts = {r["text"]: r["label"] for r in d.train + d.validation + d.test}
    assert texts["review 3"] == 1 and texts["review 4"] == 0
    assert Counter(r["label"] for r in d.test) == {0: 2, 1: 2}


@pytest.mark.parametrize("keys", [("instruction", "response"), ("prompt", "completion"), ("prompt", "response")])
def test_jsonl_causal_layouts(tmp_path, keys):
    rows = [{keys[0]: f"question {i % 10}", keys[1]: f"answer {i}"} for i in range(30)]
    d = load_dataset(_write_jsonl(tmp_path / "qa.jsonl", rows), seed=2)
    assert d.task == "causal-lm"
    assert not (_groups(d.train) & _groups(d.test)) and not (_groups(d.train) & _groups(d.validation))
    assert (len(_groups(d.train)), len(_groups(d.validation)), len(_groups(d.test))) == (8, 1, 1)
    assert all(r["group"] == r["prompt"] and r["prompt"].startswith("question") for r in d.train)


def test_csv_e2e_layout_groups_by_mr(tmp_path):
    mrs = [f"name[Place {i}], food[Thai]" for i in range(10)]
    path = _write_csv(tmp_path / "e2e.csv", ["mr", "ref"], [[mr, f"Ref {j} for {mr}"] for mr in mrs for j in range(3)])
    d = load_dataset(path)
    assert d.task == "causal-lm"
    assert (len(d.train), len(d.validation), len(d.test)) == (24, 3, 3)
    assert len(_groups(d.test)) == 1
    row = d.test[0]
    assert row["prompt"] == mr_prompt(row["group"]) and row["response"].endswith(row["group"])


def test_tsv_glue_labels_keep_numeric_names(tmp_path):
    path = _write_csv(tmp_path / "dev.tsv", ["label", "sentence"],
                      [[i % 2, f"a sentence, number {i}"] for i in range(20)], delimiter="\t")
    d = load_dataset(path, "classification", val_fraction=0.2, test_fraction=0.2)
    assert d.labels == ["0", "1"]
    assert (len(d.train), len(d.validation), len(d.test)) == (12, 4, 4)
    assert {r["text"]: r["label"] for r in d.train + d.validation + d.test}["a sentence, number 7"] == 1


@pytest.mark.skipif(not (SHARED / "sst2" / "dev.tsv").is_file(), reason="../shared/data/sst2/dev.tsv is absent")
def test_shared_sst2_dev_reads():
    d = load_dataset(SHARED / "sst2" / "dev.tsv")
    assert d.task == "classification" and d.labels == ["0", "1"]
    assert len(d.train) + len(d.validation) + len(d.test) == 872


@pytest.mark.skipif(not (SHARED / "e2e" / "devset.csv").is_file(), reason="../shared/data/e2e/devset.csv is absent")
def test_shared_e2e_devset_reads():
    d = load_dataset(SHARED / "e2e" / "devset.csv")
    assert len(d.train) + len(d.validation) + len(d.test) == 4672
    assert len(_groups(d.train) | _groups(d.validation) | _groups(d.test)) == 547
    assert not (_groups(d.train) & _groups(d.test))


# ---------------------------------------------------------------------------------------------- previews

def test_preview_classification_and_causal():
    d = TextDataset("tiny", "classification", [{"text": "good", "label": 1}, {"text": "bad", "label": 0},
                                                {"text": "fine", "label": 1}], [], [], ["neg", "pos"], "test")
    p = preview(d, n=2)
    assert p["rows"] == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    assert p["counts"] == {"train": 3, "validation": 0, "test": 0}
    assert p["label_balance"] == {"neg": 1, "pos": 2}
    assert "pos" in format_preview(d) and "train 3 | validation 0 | test 0" in format_preview(d)

    c = TextDataset("lm", "causal-lm", [{"prompt": "ab", "response": "xyz", "group": "ab"},
                                        {"prompt": "abcd", "response": "x", "group": "abcd"}], [], [])
    stats = preview(c)["length_stats"]
    assert stats == {"prompt_chars": {"min": 2, "mean": 3.0, "max": 4},
                     "response_chars": {"min": 1, "mean": 2.0, "max": 3}}
    assert "prompt_chars: min 2, mean 3.0, max 4" in format_preview(c)


# ---------------------------------------------------------------------------------------------- bad input

def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: not valid JSON"):
        load_dataset(path)


def test_missing_value_line_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "gap.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c"}])
    with pytest.raises(ValueError, match=r"gap\.jsonl line 3: missing value for 'label'"):
        load_dataset(path)


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\nfine,1\ntoo,many,fields\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ragged\.csv line 3: expected 2 fields \(text, label\), found 3"):
        load_dataset(path)


def test_missing_columns_lists_found_and_expected(tmp_path):
    path = _write_csv(tmp_path / "cols.csv", ["body", "stars"], [["x", 1]])
    with pytest.raises(ValueError) as info:
        load_dataset(path)
    message = str(info.value)
    assert "columns found ['body', 'stars']" in message
    assert "text+label" in message and "mr+ref" in message and "prompt+response" in message


def test_task_forced_against_columns(tmp_path):
    path = _write_csv(tmp_path / "cls.csv", ["text", "label"], [["x", 1]])
    expected = r"columns found \['text', 'label'\]; expected one of causal-lm: prompt\+response"
    with pytest.raises(ValueError, match=expected):
        load_dataset(path, "causal-lm")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.csv contains no rows"):
        load_dataset(path)


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(ValueError, match="data file not found"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "x.parquet").write_text("?")
    with pytest.raises(ValueError, match=r"unsupported data file .*x\.parquet; accepted formats: \.jsonl"):
        load_dataset(tmp_path / "x.parquet")


def test_unknown_builtin_like_name_lists_choices():
    with pytest.raises(ValueError, match=r"did you mean 'rotten-tomatoes'\? Built-in data sets: rotten-tomatoes, "
                                         r"synthetic-restaurants"):
        load_dataset("rotten-tomatos")


def test_hub_name_without_hub_access_explains_choices(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):  # whether or not `datasets` is installed, behave as if it were not
        if name == "datasets":
            raise ImportError("no datasets here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError) as info:
        load_dataset("someone/imdb-like")
    message = str(info.value)
    assert "`datasets` package" in message and ", ".join(BUILTIN_DATASETS) in message and ".jsonl" in message


@pytest.mark.parametrize("kwargs, pattern", [
    ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\), got -0.1"),
    ({"test_fraction": 1.0}, r"test_fraction must be in \[0, 1\), got 1.0"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be < 1"),
    ({"max_rows": 0}, r"max_rows must be a positive integer"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_dataset("rotten-tomatoes", **kwargs)


def test_unknown_task_and_wrong_task_for_builtin():
    with pytest.raises(ValueError, match=r"unknown task 'regression'"):
        load_dataset("rotten-tomatoes", "regression")
    with pytest.raises(ValueError, match=r"'rotten-tomatoes' is a classification set, not causal-lm"):
        load_dataset("rotten-tomatoes", "causal-lm")


def test_too_few_rows_to_split(tmp_path):
    path = _write_jsonl(tmp_path / "two.jsonl", [{"prompt": "p", "response": "a"}, {"prompt": "q", "response": "b"}])
    with pytest.raises(ValueError, match=r"'two' has too few groups \(2\) to split"):
        load_dataset(path)
    d = load_dataset(path, val_fraction=0.0, test_fraction=0.3)
    assert (len(d.train), len(d.validation), len(d.test)) == (1, 0, 1)


# ---------------------------------------------------------------------------------------------- classes and encodings

def test_one_label_only_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "happy.jsonl", [{"text": f"great {i}", "label": "pos"} for i in range(20)])
    with pytest.raises(ValueError, match=r"data set 'happy' \(.*happy\.jsonl\): its training split holds one label "
                                         r"only \('pos'\); a classifier needs at least two classes"):
        load_dataset(path)


def test_a_split_without_a_class_warns(tmp_path):
    rows = [[f"good {i}", "pos"] for i in range(18)] + [["bad", "neg"], ["awful", "neg"]]
    path = _write_csv(tmp_path / "rare.csv", ["text", "label"], rows)
    with pytest.warns(UserWarning) as caught:
        d = load_dataset(path)
    assert {r["label"] for r in d.train} == {0, 1}  # both "neg" rows cannot also fill validation and test
    messages = [str(w.message) for w in caught]
    assert any(f"the {split} split has no rows labelled 'neg'" in m for m in messages for split in ("validation", "test"))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_files_with_a_byte_order_mark_load(tmp_path, encoding):
    rows = [[f"café {i} ☕", "pos" if i % 2 else "neg"] for i in range(20)]
    text = "text,label\r\n" + "".join(f"{t},{label}\r\n" for t, label in rows)
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # the explicit-endian codec writes no BOM; Notepad's "UTF-16 BE" does
    (tmp_path / "bom.csv").write_bytes(data)
    d = load_dataset(tmp_path / "bom.csv")
    assert d.labels == ["neg", "pos"] and sorted(r["text"] for r in d.train + d.validation + d.test) == sorted(
        t for t, _ in rows)


def test_latin1_file_names_the_file_and_says_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "déjà vu", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jsonl is not UTF-8 text \(byte 0xe9 at offset 11 cannot be "
                                         r"decoded\); save it as UTF-8"):
        load_dataset(path)
