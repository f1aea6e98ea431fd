"""The "Many adapters" tab through its API (gradio_client): run adapters and an uploaded zip served as one mixed
batch on the offline MiniLM, beside one adapter at a time; every bad input is a clear message and the lab keeps
serving."""
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import free_port

import vera_core
from app import build_app, launch
from vera_core.lab.models import load_model

TARGETS = ["query", "value"]


def make_run(runs_dir: Path, name: str, adapters: dict, seed: int = 0, model: str = "minilm-l6") -> Path:
    """A run directory as compare writes it, as far as the tab reads it: config.json, report.json, adapters/."""
    run_dir = runs_dir / name
    (run_dir / "adapters").mkdir(parents=True)
    for i, (adapter, config) in enumerate(adapters.items()):
        torch.manual_seed(seed)
        base, _ = load_model("minilm-l6", task="classification")
        vera_core.add_adapter(base, config, name=adapter.replace(".", "-"))
        with torch.no_grad():  # b = 0 / lora_B = 0 at init: give each adapter its own non-zero update
            for key, p in base.named_parameters():
                if "lambda_b" in key or "lora_B" in key or "modules_to_save" in key:
                    p.add_(0.5 * (i + 1) * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        vera_core.save_adapter(base, run_dir / "adapters" / adapter)
    (run_dir / "config.json").write_text(json.dumps({
        "model": model, "dataset": "rotten-tomatoes", "task": "classification", "train": {"seed": seed},
        "labels": ["neg", "pos"], "methods": list(adapters),
        "adapters": {a: config.to_dict() for a, config in adapters.items()}}))
    (run_dir / "report.json").write_text(json.dumps({"model": model, "dataset": "rotten-tomatoes",
                                                     "runs": [{"name": a, "method": config.method}
                                                              for a, config in adapters.items()]}))
    return run_dir


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    vera = lambda seed=0: vera_core.VeraConfig(r=16, target_modules=TARGETS, projection_seed=seed)  # noqa: E731
    make_run(runs, "20260101-000000-minilm-l6", {"vera-a": vera(), "vera-b": vera()})
    make_run(runs, "20260101-000001-minilm-l6", {"vera-seed7": vera(7)})
    make_run(runs, "20260101-000002-minilm-l6", {"lora-r2": vera_core.LoraConfig(r=2, target_modules=TARGETS)})
    make_run(runs, "20260101-000003-other", {"vera-c": vera()}, model="bert-other")
    demo = build_app(runs, max_batch_rows=8)
    launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    client = Client(demo.local_url, verbose=False)
    yield demo, client, runs
    demo.close()


def call(client, picked, prompts, assignment="", every=False, uploads=None, base="minilm-l6"):
    return client.predict(picked, uploads or [], base, prompts, assignment, every, 8, api_name="/many_adapters")


A, B = "20260101-000000-minilm-l6/vera-a", "20260101-000000-minilm-l6/vera-b"


@pytest.mark.integration
def test_every_adapter_times_every_prompt_in_one_batch(many):
    _, client, _ = many
    table, summary = call(client, [A, B], "a great film\na dull film", every=True)
    rows = [dict(zip(table["headers"], row)) for row in table["data"]]
    assert [(r["prompt"], r["adapter"]) for r in rows] == [("a great film", A), ("a great film", B),
                                                          ("a dull film", A), ("a dull film", B)]
    assert all(r["output"].startswith("neg ") and ", pos " in r["output"] for r in rows)
    assert rows[0]["output"] != rows[1]["output"], "two adapters on one prompt must answer differently"
    assert "One mixed batch**: 4 rows" in summary and "one adapter at a time" in summary
    assert "same outputs both ways: 4/4 rows" in summary
    # 6 layers x (query, value) x (384 + 16) fp32 numbers per adapter, plus its head copy.
    assert "2 adapters" in summary and "shared A and B" in summary


@pytest.mark.integration
def test_assignment_per_prompt_base_rows_and_an_uploaded_zip(many, tmp_path):
    _, client, runs = many
    archive = shutil.make_archive(str(tmp_path / "mine"), "zip", root_dir=runs / A.split("/")[0] / "adapters" / "vera-b")
    table, summary = call(client, [A], "one\ntwo\nthree", "vera-a\nbase\nupload:mine", uploads=[handle_file(archive)])
    assert [row[1] for row in table["data"]] == [A, "__base__", "upload:mine"]
    assert "same outputs both ways: 3/3 rows" in summary
    # Uploads alone run on the chosen base model.
    table, _ = call(client, [], "one\ntwo", uploads=[handle_file(archive)])
    assert [row[1] for row in table["data"]] == ["upload:mine", "upload:mine"]


@pytest.mark.integration
@pytest.mark.parametrize("picked, prompts, assignment, every, message", [
    ([A, "20260101-000001-minilm-l6/vera-seed7"], "hi", "", False, r"projection_seed"),
    ([A, "20260101-000002-minilm-l6/lora-r2"], "hi", "", False, r"is VeRA and adapter .* is LoRA"),
    ([A, "20260101-000003-other/vera-c"], "hi", "", False, r"trained on minilm-l6 but .* on bert-other"),
    ([A], "  \n ", "", False, r"enter at least one prompt"),
    ([], "hi", "", False, r"choose at least one adapter"),
    ([A, B], "1\n2\n3\n4\n5", "", True, r"10 rows is more than this lab serves in one batch \(8\)"),
    ([A], "1\n2", "vera-a", False, r"2 prompts but 1 adapter lines"),
    ([A], "1", "nobody", False, r"unknown adapter 'nobody'"),
    (["../../etc/vera"], "1", "", False, r"is not an adapter of a run"),
])
def test_bad_input_is_a_clear_message_and_the_tab_keeps_serving(many, picked, prompts, assignment, every, message):
    _, client, _ = many
    with pytest.raises(AppError, match=message):
        call(client, picked, prompts, assignment, every)
    table, _ = call(client, [A, B], "still here")
    assert len(table["data"]) == 1


@pytest.mark.integration
def test_a_bad_zip_is_refused(many, tmp_path):
    _, client, _ = many
    bad = tmp_path / "bad.zip"
    bad.write_text("not a zip")
    with pytest.raises(AppError, match="is not a zip file"):
        call(client, [A], "hi", uploads=[handle_file(str(bad))])


def test_rows_from_prompts_and_assignment():
    from app.many_tab import assign_rows

    adapters = ["run1/vera-a", "run2/vera-b"]
    assert assign_rows(["p", "q", "r"], adapters, "", False, 8) == [("p", adapters[0]), ("q", adapters[1]),
                                                                    ("r", adapters[0])]
    assert assign_rows(["p"], adapters, "", True, 8) == [("p", adapters[0]), ("p", adapters[1])]
    assert assign_rows(["p", "q"], adapters, "vera-b\nbase", False, 8) == [("p", adapters[1]), ("q", "__base__")]
    with pytest.raises(ValueError, match="more than one adapter has that name"):
        assign_rows(["p"], ["run1/vera", "run2/vera"], "vera", False, 8)


def test_a_zip_entry_outside_the_folder_is_refused(tmp_path):
    from app.many_tab import unzip_adapter

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(ValueError, match="points outside the folder"):
        unzip_adapter(archive, tmp_path / "into" / "evil")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "into").exists()


def _refused(archive: Path, target: Path, message: str) -> None:
    """unzip_adapter refuses `archive` with one line matching `message` and leaves nothing on disk."""
    from app.many_tab import unzip_adapter

    with pytest.raises(ValueError, match=message) as err:
        unzip_adapter(archive, target)
    assert "\n" not in str(err.value)
    assert not target.parent.exists() or list(target.parent.iterdir()) == [], "a refusal must leave nothing behind"


def _adapter_zip(path: Path, extra: dict[str, bytes] | None = None, compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("adapter/vera_lab_adapter.json", "{}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def test_an_adapter_zip_within_the_limits_unpacks_complete(tmp_path):
    from app.many_tab import unzip_adapter

    weights = os.urandom(5000)
    archive = _adapter_zip(tmp_path / "ok.zip", {"adapter/weights.bin": weights}, zipfile.ZIP_DEFLATED)
    found = unzip_adapter(archive, tmp_path / "uploads" / "ok")
    assert found == tmp_path / "uploads" / "ok" / "adapter" and (found / "weights.bin").read_bytes() == weights
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == ["ok"]  # no partial folder beside it


def test_a_zip_with_too_many_entries_is_refused_before_writing(tmp_path, monkeypatch):
    from app import many_tab

    monkeypatch.setattr(many_tab, "MAX_ZIP_ENTRIES", 4)
    archive = _adapter_zip(tmp_path / "many.zip", {f"adapter/{i}.txt": b"x" for i in range(5)})
    _refused(archive, tmp_path / "uploads" / "many", r"many\.zip has 6 entries, more than the limit of 4;")


def test_a_zip_that_unpacks_past_the_size_limit_is_refused(tmp_path, monkeypatch):
    from app import many_tab

    monkeypatch.setattr(many_tab, "MAX_UNZIPPED_BYTES", 4000)
    archive = _adapter_zip(tmp_path / "big.zip", {"adapter/weights.bin": os.urandom(4001)})
    _refused(archive, tmp_path / "uploads" / "big",
             r"big\.zip unpacks to 4,003 bytes, more than the limit of 4,000 bytes\.")


def test_a_zip_bomb_is_refused_by_its_compression_ratio(tmp_path):
    archive = _adapter_zip(tmp_path / "bomb.zip", {"adapter/zeros.bin": bytes(8 * 2**20)}, zipfile.ZIP_DEFLATED)
    ratio = 8 * 2**20 / archive.stat().st_size
    assert ratio > 500  # zeros deflate about 1000x
    _refused(archive, tmp_path / "uploads" / "bomb",
             rf"bomb\.zip is compressed {ratio:,.0f}x \({archive.stat().st_size:,} bytes unpacking to 8\.0 MiB\), "
             r"more than the limit of 100x")


def test_a_zip_whose_header_understates_a_size_is_cut_at_the_declared_size_and_refused(tmp_path):
    """The central directory says 100 bytes; the entry holds 64 KiB. Nothing beyond the declared size is written
    and the upload is refused, leaving nothing."""
    data = os.urandom(64 * 1024)
    archive = _adapter_zip(tmp_path / "liar.zip", {"adapter/weights.bin": data})
    raw = bytearray(archive.read_bytes())
    central = raw.rindex(b"PK\x01\x02")  # the last central-directory entry: weights.bin
    assert raw[central + 46:central + 46 + 19] == b"adapter/weights.bin"
    raw[central + 24:central + 28] = (100).to_bytes(4, "little")  # its uncompressed size
    archive.write_bytes(bytes(raw))
    assert zipfile.ZipFile(archive).getinfo("adapter/weights.bin").file_size == 100  # the lie is what is read
    _refused(archive, tmp_path / "uploads" / "liar", r"liar\.zip is not a readable zip file \(Bad CRC-32")


def test_a_zip_without_an_adapter_leaves_nothing(tmp_path):
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes.txt", "hello")
    _refused(archive, tmp_path / "uploads" / "notes", "notes.zip holds no adapter")
