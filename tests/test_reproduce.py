"""benchmarks/reproduce.py: the skip when data is absent, leak-free splits of the real data, the quality.json rows."""
import argparse
import csv
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from vera_core.lab.stats import verdict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their shared harness as a sibling
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
    for task in ("sst2", "e2e"):  # Rotten Tomatoes is built in: it never skips
        assert reproduce.main(["--task", task, "--quick", "--out", str(tmp_path / "out")]) == 0
    assert reproduce.missing_data("rotten-tomatoes", tmp_path / "nowhere") is None
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
def test_quick_run_tunes_every_method_runs_two_seeds_and_writes_pairs(tmp_path, capsys):
    """The smoke run end to end on SST-2 (real MiniLM, 3 steps, seeds 0 and 1, lr scales 0.5 and 2): one row per
    setting with its seeds' mean, std, interval and tuned rate; one pair per VeRA/LoRA pair; a second call resumes
    (trains nothing)."""
    out = tmp_path / "out"
    assert reproduce.main(["--task", "sst2", "--quick", "--out", str(out)]) == 0
    quality = json.loads((out / "quality.json").read_text())
    rows = {r["name"]: r for r in quality["tasks"]["sst2"]}
    assert set(rows) == {"head", "lora-r8-qv", "vera-r256-qv", "vera-r1024-qv", "lora-r8-all", "vera-r256-all"}
    for row in rows.values():
        assert ROW_KEYS | {"seeds", "metric_mean", "metric_std", "ci95", "tuned_lr"} <= set(row)
        assert row["task"] == "sst2" and row["metric_name"] == "accuracy" and row["seeds"] == [0, 1]
        assert row["metric"] == row["metric_mean"] and 0 <= row["metric_mean"] <= 100
        grid = reproduce.QUICK["head_scales" if row["name"] == "head" else "scales"]
        assert [p["scale"] for p in row["lr_grid"]] == grid and row["tuned_lr"] == row["lr"]
        assert row["ci95"][0] <= row["metric_mean"] <= row["ci95"][1]
    centre = {"lora-r8-qv": 5e-4, "vera-r256-qv": 1e-2}
    for name, lr in centre.items():
        assert rows[name]["tuned_lr"] in (pytest.approx(lr * 0.5), pytest.approx(lr * 2))
    assert rows["head"]["tuned_lr"] in (pytest.approx(1e-3), pytest.approx(8e-3))
    # every head of the task trains at head-only's choice: the qv comparison tunes it, every linear layer's reuses it
    assert quality["head_lr"]["sst2"] == {"qv": rows["head"]["tuned_lr"], "all": rows["head"]["tuned_lr"]}
    assert {rows[n]["head_lr"] for n in ("head", "lora-r8-qv", "vera-r1024-qv", "lora-r8-all", "vera-r256-all")} == {
        rows["head"]["tuned_lr"]}
    assert (f"head rate, sst2 all ({out}/repro/sst2/all): {rows['head']['tuned_lr']:.2g} for every method (head-only's "
            "tuned rate in the qv comparison)") in (out / "quality.md").read_text()
    assert rows["lora-r8-qv"]["trainable_params"] == 73_728 and rows["vera-r256-qv"]["trainable_params"] == 7_680
    assert rows["head"]["trainable_params"] == 0 and rows["head"]["head_params"] > 0
    pairs = {(p["vera"], p["lora"]): p for p in quality["pairs"]["sst2"]}
    assert set(pairs) == {("vera-r256-qv", "lora-r8-qv"), ("vera-r1024-qv", "lora-r8-qv"),
                          ("vera-r256-all", "lora-r8-all")}
    pair = pairs[("vera-r256-qv", "lora-r8-qv")]
    assert pair["diff_mean"] == pytest.approx(rows["vera-r256-qv"]["metric_mean"] - rows["lora-r8-qv"]["metric_mean"])
    assert pair["param_ratio"] == 73_728 / 7_680 and pair["seeds"] == [0, 1]
    assert f"vera-r256-qv − lora-r8-qv = {pair['diff_mean']:+.1f} points" in (out / "quality.md").read_text()
    stamp = (out / "repro" / "sst2" / "qv" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    reproduce.main(["--task", "sst2", "--quick", "--out", str(out)])
    assert (out / "repro" / "sst2" / "qv" / "report.json").stat().st_mtime_ns == stamp
    assert "qv: done earlier, kept" in capsys.readouterr().out


@needs_sst2
def test_every_linear_layers_comparison_waits_for_the_head_rate_the_qv_comparison_tunes(tmp_path, capsys):
    assert reproduce.main(["--task", "sst2", "--group", "all", "--quick", "--out", str(tmp_path)]) == 0
    assert ("all: waits for the head rate head-only tunes in sst2's other comparison; run that one first"
            in capsys.readouterr().out)
    assert not (tmp_path / "repro" / "sst2" / "all").exists()  # nothing trained, no folder made


def test_the_bar_line_judges_the_mean_and_the_ratio_apart_from_the_intervals_verdict():
    pair = {"vera": "vera-r256-qv", "lora": "lora-r8-qv", "metric": "accuracy", "seeds": [0, 1, 2],
            "diff_mean": -1.3, "ci95": [-2.5, -0.2], "verdict": "cannot tell", "param_ratio": 9.6}
    line = reproduce.bar_line(pair)
    assert line.startswith("vera-r256-qv − lora-r8-qv = -1.3 points [-2.5, -0.2]") and "cannot tell" in line
    assert line.endswith("bar: mean -1.3 vs -1 point: MISSED, 9.6x vs 8x fewer parameters: met")
    assert reproduce.bar_line({**pair, "diff_mean": -0.2, "param_ratio": 4.4}).endswith(
        "mean -0.2 vs -1 point: met, 4.4x vs 8x fewer parameters: MISSED")


def test_rotten_tomatoes_is_the_quality_bar_rerun_with_tuning_and_seeds():
    args = argparse.Namespace(d_init=0.1, steps=None, batch_size=None, max_length=None, quick=False, full=False)
    [group] = reproduce.plan("rotten-tomatoes", args)
    assert (group.name, group.methods) == ("qv", ("head", "lora", "vera"))
    assert [(c.r, c.target_modules) for c in group.vera] == [(256, None)] and group.lora[0].r == 8
    assert reproduce.budgets("rotten-tomatoes", args) == {"train": None, "val": 500, "test": None, "steps": 400,
                                                          "batch_size": 16, "max_length": 64}


def test_each_task_tunes_on_its_own_default_grid_unless_the_flags_say_otherwise():
    args = argparse.Namespace(quick=False, tune=None, tune_steps=None)
    assert reproduce.tuning("sst2", args, 300) == ([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], None)  # every point: full budget
    # E2E: x2..x16 (both methods chose x8 at half the budget), every grid point at the full budget.
    assert reproduce.tuning("e2e", args, 300) == ([2.0, 4.0, 8.0, 16.0], None)
    assert reproduce.tuning("e2e", args, 1000)[1] is None
    flags = argparse.Namespace(quick=False, tune=[1.0, 4.0], tune_steps=40)
    assert reproduce.tuning("e2e", flags, 300) == ([1.0, 4.0], 40)
    assert reproduce.tuning("e2e", argparse.Namespace(quick=True, tune=[1.0], tune_steps=9), 3) == ([0.5, 2.0], 2)


def test_head_only_has_its_own_wider_grid_and_the_minilm_tasks_five_seeds():
    args = argparse.Namespace(d_init=0.1, quick=False, no_tune=False, head_tune=None)
    rt, = reproduce.plan("rotten-tomatoes", args)
    qv, every = reproduce.plan("sst2", args)
    # head-only chose the top of the grid at 8e-3 and again at 6.4e-2: its grid now reaches x1024 of 1e-3
    assert reproduce.tune_grids(rt, [1.0, 2.0], args) == {"lr_scale": [1.0, 2.0], "head_lr_scale": [
        0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]}
    assert reproduce.tune_grids(every, [1.0], args) == {"lr_scale": [1.0]}  # no head-only: no head grid
    assert reproduce.tune_grids(qv, [1.0], argparse.Namespace(**{**vars(args), "head_tune": [4.0]}))[
        "head_lr_scale"] == [4.0]
    assert reproduce.tune_grids(qv, [1.0], argparse.Namespace(**{**vars(args), "no_tune": True})) is None
    assert reproduce.SEEDS == {"sst2": [0, 1, 2, 3, 4], "rotten-tomatoes": [0, 1, 2, 3, 4], "e2e": [0, 1, 2]}


@pytest.mark.integration
def test_quick_rotten_tomatoes_records_one_head_rate_per_comparison(tmp_path, monkeypatch, capsys):
    """The smoke run on the built-in set: head-only tuned on its own grid first; its choice is the head rate of
    every run in report.json and the comparison's head rate in quality.json, whose rows say where they come from.
    A SIGTERM in the middle of the first seed run stops it at a step, checkpointed; the next start resumes it."""
    out = tmp_path / "out"
    real = reproduce.compare

    def interrupted(*args, **kwargs):  # SIGTERM at the first seed run's first step (after tuning)
        def on_event(event):
            if event["type"] == "step" and event.get("phase") != "tune" and event["step"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, on_event=on_event, **kwargs)

    monkeypatch.setattr(reproduce, "compare", interrupted)
    with pytest.raises(SystemExit) as stopped:
        reproduce.main(["--task", "rotten-tomatoes", "--quick", "--out", str(out)])
    assert stopped.value.code == reproduce.STOPPED
    assert "qv: stopped (SIGTERM) at a step, checkpointed: run again to resume it" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was the script's alone
    run_dir = out / "repro" / "rotten-tomatoes" / "qv"
    tuned = {p: p.stat().st_mtime_ns for p in (run_dir / "tune").rglob("tune.json")}
    (checkpoint,) = run_dir.glob("train/*/checkpoints/step-*")  # the stopped run's, at the step it reached
    assert tuned and not (out / "quality.json").exists()
    monkeypatch.setattr(reproduce, "compare", real)
    assert reproduce.main(["--task", "rotten-tomatoes", "--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in tuned} == tuned  # the tuning was kept, not trained again
    stopped_run = checkpoint.parents[1].name
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    firsts = [e for e in log if e["type"] == "step" and e.get("run") == stopped_run and e["step"] == 1]
    assert len(firsts) == 1  # resumed from its checkpoint: its first step was not trained again
    report = json.loads((run_dir / "report.json").read_text())
    head = report["tuning"]["head"]
    assert list(report["tuning"]) == ["head", "lora-r8", "vera-r256"]
    assert [p["scale"] for p in head["grid"]] == [1.0, 8.0] and report["head_lr"] == pytest.approx(1e-3 * head["scale"])
    assert {r["head_lr"] for r in report["runs"]} == {report["head_lr"]} and len(report["runs"]) == 6
    assert {p["head_lr"] for s in ("lora-r8", "vera-r256") for p in report["tuning"][s]["grid"]} == {report["head_lr"]}
    quality = json.loads((out / "quality.json").read_text())
    assert quality["head_lr"] == {"rotten-tomatoes": {"qv": report["head_lr"]}}
    for row in quality["tasks"]["rotten-tomatoes"]:
        assert (row["run_dir"], row["head_rule"], row["comparison_head_lr"]) == (
            str(out / "repro" / "rotten-tomatoes" / "qv"), "one rate per comparison", report["head_lr"])
    assert (f"- head rate, rotten-tomatoes qv ({out / 'repro' / 'rotten-tomatoes' / 'qv'}): "
            f"{report['head_lr']:.2g} for every method (head-only's tuned rate)") in (out / "quality.md").read_text()


def test_the_committed_records_are_the_two_level_intervals_of_the_saved_predictions():
    """quality.json's pairs recompute from repro/*/*/predictions (seeds and test examples resampled) and say so;
    each row says its interval covers the seeds only."""
    quality = json.loads((reproduce.RESULTS / "quality.json").read_text())
    args = argparse.Namespace(d_init=0.1)
    for task in ("sst2", "rotten-tomatoes", "e2e"):
        rows, pairs = reproduce.task_rows(task, reproduce.RESULTS / "repro" / task, reproduce.plan(task, args))
        assert pairs == quality["pairs"][task]
        assert all(p["ci_method"] == "bootstrap over seeds and test examples" and len(p["seeds"]) == 3 for p in pairs)
        assert all(p["verdict"] == verdict(*p["ci95"]) for p in pairs)
        assert all(r["ci_kind"].startswith("t over seeds (seed-to-seed spread only")
                   for r in rows if len(r["seeds"]) > 1)
    rt = quality["pairs"]["rotten-tomatoes"][0]  # wider than the examples-only [-2.26, +1.16] it replaced
    assert rt["ci95"][0] < -2.5 and rt["ci95"][1] > 1.5 and rt["verdict"] == "cannot tell"


def test_a_tie_line_compares_the_grid_gap_with_the_seed_spread():
    row = {"task": "sst2", "name": "vera-r256-all", "val_loss_seeds": [0.30, 0.32, 0.31],  # std 0.01
           "lr_grid": [{"scale": 1.0, "val_loss": 0.40}, {"scale": 2.0, "val_loss": 0.350},
                       {"scale": 4.0, "val_loss": 0.355}, {"scale": 8.0, "val_loss": None}]}
    assert reproduce.tie_line(row) == ("- sst2 vera-r256-all: x2 0.3500 chosen over x4 0.3550 (gap 0.0050 < seed "
                                       "spread 0.0100): near-tie")
    clear = {**row, "lr_grid": [{"scale": 2.0, "val_loss": 0.35}, {"scale": 4.0, "val_loss": 0.37}]}
    assert reproduce.tie_line(clear).endswith("(gap 0.0200 >= seed spread 0.0100): clear")
    assert reproduce.tie_line({**row, "val_loss_seeds": [0.3]}) is None  # one seed: no spread to compare with


def test_a_row_tuned_with_the_second_seed_check_reports_that_check():
    grid = [{"scale": 2.0, "lr": 2e-3, "val_loss": 0.50}, {"scale": 4.0, "lr": 4e-3, "val_loss": 0.49},
            {"scale": 8.0, "lr": 8e-3, "val_loss": 0.60}]
    tie = {"seed": 1, "spread": 0.02, "near": [2.0],
           "val_loss_second_seed": [{"scale": 4.0, "val_loss": 0.52}, {"scale": 2.0, "val_loss": 0.48}]}
    row = {"task": "sst2", "name": "lora-r8-qv", "lr_grid": grid, "tuned_lr": 2e-3, "tie": tie,
           "val_loss_seeds": [0.3, 0.9]}  # the seed runs' spread is not what a checked row is read against
    assert reproduce.tie_line(row) == (
        "- sst2 lora-r8-qv: x4 0.4900 first, runner-up x2 0.5000; seed 1 spread 0.0200; near-tie with x2: two-seed "
        "means x4 0.5050, x2 0.4900; x2 chosen")
    clear = {**row, "tuned_lr": 4e-3,
             "tie": {**tie, "near": [], "val_loss_second_seed": tie["val_loss_second_seed"][:1]}}
    assert reproduce.tie_line(clear).endswith("x4 0.4900 first, runner-up x2 0.5000; seed 1 spread 0.0200: clear")
    page = reproduce.markdown({"tasks": {"sst2": [{**row, "metric_name": "accuracy", "metric": 90.0,
                                                    "trainable_params": 73728, "lr": 2e-3}]}})
    assert "tuned before that check" not in page and "lower two-seed mean then wins" in page


def test_scored_grid_points_make_the_rate_sensitivity_table():
    grid = [{"scale": 4.0, "lr": 4e-2, "val_loss": 1.2189, "test": {"loss": 1.3, "bleu": 66.21, "rougeL": 71.2}},
            {"scale": 8.0, "lr": 8e-2, "val_loss": 1.2090, "test": {"loss": 1.4, "bleu": 59.3, "rougeL": None}}]
    row = {"task": "e2e", "name": "vera-r256-all", "lr_grid": grid, "tuned_lr": 8e-2}
    lines = reproduce.sensitivity_lines([row, {"task": "e2e", "name": "base", "lr_grid": None}])
    assert lines[4] == "| task | setting | scale | lr | validation loss | test bleu | test rougeL |"
    assert lines[6:8] == ["| e2e | vera-r256-all | x4 | 0.04 | 1.2189 | 66.2 | 71.2 |",
                          "| e2e | vera-r256-all | x8 (chosen) | 0.08 | 1.2090 | 59.3 | - |"]
    assert reproduce.sensitivity_lines([{**row, "lr_grid": [{k: v for k, v in p.items() if k != "test"}
                                                            for p in grid]}]) == []  # unscored: no table


def test_the_previous_record_is_kept_and_each_pair_says_what_changed(tmp_path):
    def row(name, mean, lr, head):
        return {"name": name, "metric_mean": mean, "tuned_lr": lr, "head_lr": head}

    def pair(diff, ci, seeds, verdict="cannot tell"):
        return {"vera": "vera-r256-qv", "lora": "lora-r8-qv", "metric": "accuracy", "seeds": seeds,
                "diff_mean": diff, "ci95": ci, "verdict": verdict}

    old = {"tasks": {"rotten-tomatoes": [row("vera-r256-qv", 74.9, 2e-2, 2e-3),
                                         row("lora-r8-qv", 75.6, 5e-4, 1e-3)], "e2e": []},
           "pairs": {"rotten-tomatoes": [pair(-0.6, [-3.0, 2.2], [0, 1, 2])],
                     "e2e": [{**pair(0.9, [0.4, 1.3], [0, 1, 2], "matches within 1 point"), "vera": "vera-r256-all",
                              "lora": "lora-r8-all"}]}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    now = {"tasks": {"rotten-tomatoes": [row("vera-r256-qv", 76.84, 4e-2, 0.128),
                                         row("lora-r8-qv", 76.76, 2e-3, 0.128)]},
           "pairs": {"rotten-tomatoes": [pair(0.08, [-1.8, 2.0], [0, 1, 2, 3, 4])]}}
    (tmp_path / "quality.json").write_text(json.dumps(now))
    reproduce.keep_previous(tmp_path, str(tmp_path / "old.json"))
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert quality["tasks"] == now["tasks"] and quality["previous"]["from"] == str(tmp_path / "old.json")
    lines = reproduce.change_lines(quality)
    assert lines[4] == ("- rotten-tomatoes vera-r256-qv − lora-r8-qv: was -0.6 [-3.0, +2.2] cannot tell (3 seeds; "
                        "VeRA 74.9 at lr 0.02; LoRA 75.6 at lr 0.0005; heads 0.002 (VeRA) vs 0.001 (LoRA)); now +0.1 "
                        "[-1.8, +2.0] cannot tell (5 seeds; VeRA 76.8 at lr 0.04; LoRA 76.8 at lr 0.002; one head "
                        "rate 0.13)")
    assert lines[5] == ("- e2e vera-r256-all − lora-r8-all: was +0.9 [+0.4, +1.3] matches within 1 point "
                        "(vera-r256-all ahead: the whole interval is above 0) (3 seeds); now not in this record")
    assert reproduce.change_lines(now) == []
    with pytest.raises(SystemExit, match="neither a file nor a commit"):
        reproduce.keep_previous(tmp_path, "no-such-commit")
