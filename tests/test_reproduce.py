"""benchmarks/reproduce.py: the skip when data is absent, leak-free splits of the real data, the quality.json rows."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
sys.modules["reproduce"] = reproduce  # dataclasses look their module up while the file executes
_spec.loader.exec_module(reproduce)

DATA = reproduce.data_dir(None)
needs_sst2 = pytest.mark.skipif(reproduce.missing_data("sst2", DATA) is not None,
                                reason=f"SST-2 not found under {DATA} (../shared/data/sst2)")
needs_e2e = pytest.mark.skipif(reproduce.missing_data("e2e", DATA) is not None,
                               reason=f"E2E devset not found under {DATA} (../shared/data/e2e)")
ROW_KEYS = {"name", "method", "r", "targets", "lr", "steps", "trainable_params", "head_params", "eval", "task",
            "metric_name", "metric", "wall_s", "model", "device", "subset"}


def test_absent_data_skips_with_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VERA_REPRO_DATA", str(tmp_path / "nowhere"))
    assert reproduce.main(["--task", "all", "--quick", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for task, hub in (("sst2", "glue/sst2"), ("e2e", "e2e_nlg")):
        assert f"SKIP {task}:" in out and hub in out and str(tmp_path / "nowhere") in out
    assert not (tmp_path / "out" / "quality.json").exists()


@needs_e2e
def test_e2e_split_keeps_every_mr_in_one_split():
    ds = reproduce.e2e_dataset(DATA, seed=0, train_groups=None, val_groups=None, test_groups=None)
    mrs = [{r["group"] for r in split} for split in (ds.train, ds.validation, ds.test)]
    assert not (mrs[0] & mrs[1]) and not (mrs[0] & mrs[2]) and not (mrs[1] & mrs[2])
    assert sum(map(len, mrs)) == 547 and len(ds.train) + len(ds.validation) + len(ds.test) == 4672
    capped = reproduce.e2e_dataset(DATA, seed=0, train_groups=10, val_groups=3, test_groups=4)
    assert len({r["group"] for r in capped.test}) == 4
    # a capped MR keeps all of its references
    assert sum(r["group"] == capped.test[0]["group"] for r in capped.test) == \
        sum(r["group"] == capped.test[0]["group"] for r in ds.test)


@needs_sst2
def test_sst2_test_split_is_exactly_the_dev_set():
    ds = reproduce.sst2_dataset(DATA, seed=0, train_rows=None, val_rows=None)
    with open(DATA / "sst2" / "dev.tsv", encoding="utf-8", newline="") as f:
        dev = [(r["content"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t")]
    assert sorted((r["text"], r["label"]) for r in ds.test) == sorted(dev)
    assert len(ds.test) == 872 and ds.labels == ["0", "1"]
    assert len(ds.train) + len(ds.validation) == 67349


@needs_sst2
@pytest.mark.integration
def test_quick_run_writes_quality_rows(tmp_path):
    """The smoke run end to end on SST-2 (real MiniLM, 3 steps): rows carry the report.json run plus task and metric,
    and a second call resumes (skips the finished runs)."""
    out = tmp_path / "out"
    assert reproduce.main(["--task", "sst2", "--quick", "--out", str(out)]) == 0
    quality = json.loads((out / "quality.json").read_text())
    rows = quality["tasks"]["sst2"]
    assert {r["name"] for r in rows} == {"head", "lora-r8-qv", "vera-r256-qv", "vera-r1024-qv", "lora-r8-all",
                                         "vera-r256-all"}
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["task"] == "sst2" and row["metric_name"] == "accuracy"
        assert row["metric"] == row["eval"]["accuracy"] and 0 <= row["metric"] <= 100
    by_name = {r["name"]: r for r in rows}
    assert by_name["lora-r8-qv"]["trainable_params"] == 73_728 and by_name["vera-r256-qv"]["trainable_params"] == 7_680
    assert by_name["head"]["trainable_params"] == 0 and by_name["head"]["head_params"] > 0
    assert "9.6x fewer" in (out / "quality.md").read_text()
    stamp = (out / "repro" / "sst2" / "vera-r256-qv" / "report.json").stat().st_mtime_ns
    reproduce.main(["--task", "sst2", "--quick", "--out", str(out)])
    assert (out / "repro" / "sst2" / "vera-r256-qv" / "report.json").stat().st_mtime_ns == stamp


@needs_sst2
@pytest.mark.integration
def test_tune_scores_on_validation_only_and_runs_the_best_on_test(tmp_path):
    out = tmp_path / "out"
    assert reproduce.main(["--task", "sst2", "--quick", "--tune", "--out", str(out)]) == 0
    task_dir = out / "repro" / "sst2"
    tuning = json.loads((task_dir / "tuning.json").read_text())
    assert tuning["run"] == "vera-r256-qv" and tuning["split"] == "validation"
    assert [(g["lr"], g["d_init"]) for g in tuning["grid"]] == reproduce.TUNE_GRID
    assert tuning["best"] == max(tuning["grid"], key=lambda g: g["validation"])
    assert all(g["validation"] == g["validation_eval"]["accuracy"] and "loss" in g["validation_eval"]
               for g in tuning["grid"])
    assert tuning["minutes"] == round(sum(g["wall_s"] for g in tuning["grid"]) / 60, 1)
    for grid_dir in (task_dir / "tune").iterdir():  # every tuning run was scored on the 8 validation rows
        config = json.loads((grid_dir / "config.json").read_text())
        assert config["splits"]["test"] == config["splits"]["validation"] == 8
    rows = {r["name"]: r for r in json.loads((out / "quality.json").read_text())["tasks"]["sst2"]}
    tuned = rows["vera-r256-qv-tuned"]
    assert (tuned["lr"], tuned["d_init"]) == (tuning["best"]["lr"], tuning["best"]["d_init"])
    assert json.loads((task_dir / "vera-r256-qv-tuned" / "config.json").read_text())["splits"]["test"] == 8
    assert "vera-r256-qv-tuned vs lora-r8-qv" in (out / "quality.md").read_text()


@needs_sst2
@pytest.mark.integration
def test_running_tune_again_resumes_within_the_same_budget(tmp_path):
    """The tuning budget is spent by the finished grid runs' own time, so a second invocation (a resume) starts no
    new grid run once the first has used the budget up."""
    # --runs names no main run ("head" is an extra of lora-r8-qv, not a run), so only the tuning grid trains.
    args = ["--task", "sst2", "--quick", "--tune", "--runs", "head", "--budget-min", "0.0001", "--out",
            str(tmp_path / "out")]
    grid_dirs = lambda: sorted(p.name for p in (tmp_path / "out" / "repro" / "sst2" / "tune").iterdir())
    assert reproduce.main(args) == 0
    first = grid_dirs()
    assert len(first) == 1  # the first grid run always starts; it spends the budget
    assert reproduce.main(args) == 0
    assert grid_dirs() == first
    tuning = json.loads((tmp_path / "out" / "repro" / "sst2" / "tuning.json").read_text())
    assert len(tuning["grid"]) == 1 and tuning["minutes"] == round(tuning["grid"][0]["wall_s"] / 60, 1)
