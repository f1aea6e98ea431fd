"""Sweeps and run history in the library: grids, run names, repeated settings, list parsing, the time estimate,
the sweep figures, and list_runs on finished, stopped, failed, running and unreadable directories."""
import json
import os
import time

import pytest
from helpers import sentiment, tiny_bert

from vera_core import LoraConfig, TrainConfig, VeraConfig, list_runs, lora_grid, vera_grid
from vera_core.lab.parse import float_list, int_list
from vera_core.lab.cli import build_parser
from vera_core.lab.request import RunRequest


@pytest.fixture(scope="module")
def pair(tokenizer):
    return tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer


def test_vera_grid_varies_r_slowest_and_shares_the_rest():
    grid = vera_grid(r=[16, 256], d_init=[0.1, 1.0], target_modules=["query"], projection_seed=3)
    assert [(c.r, c.d_init) for c in grid] == [(16, 0.1), (16, 1.0), (256, 0.1), (256, 1.0)]
    assert all(c == VeraConfig(r=c.r, d_init=c.d_init, target_modules=["query"], projection_seed=3) for c in grid)
    assert [c.d_init for c in vera_grid(r=8)] == [0.1]  # a bare number is a list of one
    with pytest.raises(ValueError, match="the d_init list is empty"):
        vera_grid(r=[8], d_init=[])
    with pytest.raises(ValueError, match="d_init must not be 0"):
        vera_grid(r=[8], d_init=[0.1, 0])


def test_lora_grid_alpha_is_2r_unless_given():
    assert [(c.r, c.alpha) for c in lora_grid(r=[4, 8, 16])] == [(4, 8), (8, 16), (16, 32)]
    assert [c.alpha for c in lora_grid(r=[4, 8], alpha=16)] == [16, 16]
    assert [c.alpha for c in lora_grid(r=[4, 8], alpha=[4, 8])] == [4, 8]
    with pytest.raises(ValueError, match=r"one LoRA alpha per rank \(3 ranks \[4, 8, 16\], 2 alphas"):
        lora_grid(r=[4, 8, 16], alpha=[8, 16])


def test_run_names_show_only_what_varies(pair):
    def names(**kw):
        return [s.name for s in RunRequest(pair, sentiment(), **kw).plan()]

    assert names(methods=["vera", "lora"], vera=vera_grid(r=[8, 16]), lora=lora_grid(r=[4, 8])) == [
        "vera-r8", "vera-r16", "lora-r4", "lora-r8"]
    assert names(methods=["vera"], vera=vera_grid(r=[8], d_init=[0.1, 1])) == ["vera-r8-d0.1", "vera-r8-d1"]
    assert names(methods=["lora"], lora=[LoraConfig(r=8, alpha=16), LoraConfig(r=8, alpha=32)]) == [
        "lora-r8-a16", "lora-r8-a32"]
    assert names(methods=["lora"], lora=lora_grid(r=[4, 8], alpha=16)) == ["lora-r4-a16", "lora-r8-a16"]


def test_a_request_reads_no_file_until_prepare_and_plans_once(tmp_path, monkeypatch):
    from vera_core.lab import request as request_module

    path = tmp_path / "reviews.csv"
    path.write_bytes(b"text,label\ncaf\xe9,0\n")  # Latin-1, not UTF-8
    loads = []
    monkeypatch.setattr(request_module, "load_dataset", lambda *a, **kw: loads.append(a) or sentiment())
    request = RunRequest("minilm-l6", str(path), ["vera", "lora"], seeds=[0, 1],
                         train=TrainConfig(steps=None, epochs=1))
    assert loads == [] and [s.name for s in request.plan()] == ["vera-r256-s0", "vera-r256-s1", "lora-r8-s0",
                                                                  "lora-r8-s1"]
    with pytest.raises(RuntimeError, match=r"reviews\.csv' is not loaded yet; call request.prepare\(\) first"):
        request.steps_per_run()
    monkeypatch.setattr(RunRequest, "_make_plan", lambda self: pytest.fail("the plan is made once, in the constructor"))
    assert request.prepare() is request and request.prepare() is request and len(loads) == 1
    assert request.run_count() == 4 and request.dataset.name == sentiment().name
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"reviews\.csv is not UTF-8 text \(byte 0xe9") as err:
        RunRequest("minilm-l6", str(path), ["vera"]).prepare()
    assert "\n" not in str(err.value)


def test_the_run_cap_is_one_check_and_none_lifts_it(pair):
    from vera_core.lab.request import TooManyRuns

    with pytest.raises(TooManyRuns, match=r"makes 6 runs \(6 final, 0 tuning\), more than the limit of 5") as err:
        RunRequest(pair, sentiment(), ["vera", "lora"], seeds=[0, 1, 2], max_runs=5)
    assert (err.value.runs, err.value.limit) == (6, 5)
    assert RunRequest(pair, sentiment(), ["vera", "lora"], seeds=range(40), max_runs=None).run_count() == 80


def test_duplicate_settings_are_refused_with_a_clear_message(pair):
    with pytest.raises(ValueError, match=r"duplicate settings: LoraConfig\(r=8, alpha=16.*listed twice"):
        RunRequest(pair, sentiment(), ["lora"], lora=[LoraConfig(r=8), LoraConfig(r=8, alpha=16)])
    with pytest.raises(ValueError, match="duplicate settings: VeraConfig"):
        RunRequest(pair, sentiment(), ["vera"], vera=vera_grid(r=[8, 8]))
    with pytest.raises(ValueError, match="lora LoraConfig"):
        RunRequest(pair, sentiment(), ["lora"], lora=[VeraConfig()])


@pytest.mark.parametrize("text, message", [
    ("256,,x", "VeRA r has an empty item in '256,,x'"),
    ("", "VeRA r is empty"),
    ("256,x", "VeRA r must be comma-separated integers such as 8,64; got '256,x'"),
    ("8,0", "VeRA r must be positive integers"),
])
def test_malformed_lists_name_the_field(text, message):
    with pytest.raises(ValueError, match=message):
        int_list(text, "VeRA r")


def test_lists_parse_with_spaces_and_floats_refuse_nan():
    assert int_list(" 16, 256 ", "r") == [16, 256] and float_list("0.1, 1e-7", "d") == [0.1, 1e-7]
    with pytest.raises(ValueError, match="must be finite numbers"):
        float_list("0.1,nan", "d_init")


def test_cli_lora_ranks_pair_with_alphas():
    parse = build_parser().parse_args
    args = parse(["compare", "--lora-r", "4,8,16", "--lora-alpha", "8,8,8"])
    assert args.lora_r == [4, 8, 16] and args.lora_alpha == [8.0, 8.0, 8.0]
    assert [c.alpha for c in lora_grid(r=args.lora_r, alpha=args.lora_alpha)] == [8, 8, 8]
    assert parse(["compare", "--lora-r", "4,8"]).lora_alpha is None  # -> 2r each
    with pytest.raises(SystemExit):
        parse(["compare", "--lora-r", "4,,8"])


def test_time_estimate_uses_measured_step_times_and_interpolates_by_size(pair):
    request = RunRequest(pair, sentiment(), ["base", "vera", "lora"], vera=vera_grid(r=[8, 16, 32]),
                         lora=lora_grid(r=[2]), train=TrainConfig(steps=10))
    sizes = {row["run"]: row["trainable"] for row in request.estimate()}
    estimate = request.time_estimate({"vera-r8": 0.1, "vera-r32": 0.3, "lora-r2": 0.2})
    middle = 0.1 + 0.2 * (sizes["vera-r16"] - sizes["vera-r8"]) / (sizes["vera-r32"] - sizes["vera-r8"])
    assert estimate["runs"] == pytest.approx({"base": 0.0, "vera-r8": 1.0, "vera-r16": 10 * middle, "vera-r32": 3.0,
                                              "lora-r2": 2.0})
    assert estimate["total_s"] == pytest.approx(sum(estimate["runs"].values()))
    assert "5 runs of 10 steps, x the step time measured on this device" in estimate["based_on"]
    with pytest.raises(ValueError, match="no measured step time for a lora run"):
        request.time_estimate({"vera-r8": 0.1})


def test_tradeoff_figure_draws_error_bars_only_when_rows_carry_them():
    from vera_core.lab.plots import dinit_figure, tradeoff_figure

    rows = [{"method": "vera", "r": 16, "d_init": 0.1, "trainable_params": 200, "accuracy": 70.0, "accuracy_err": 2.0},
            {"method": "vera", "r": 256, "d_init": 0.1, "trainable_params": 3000, "accuracy": 75.0,
             "accuracy_err": 1.5},
            {"method": "lora", "r": 8, "trainable_params": 30000, "accuracy": 76.0},
            {"method": "base", "r": None, "trainable_params": 0, "accuracy": 50.0}]
    ax = tradeoff_figure(rows).axes[0]
    assert len(ax.containers) == 1  # VeRA's error bars; LoRA has none
    bars = ax.containers[0]
    assert bars.get_label() == "vera" and list(bars.lines[0].get_ydata()) == [70.0, 75.0]
    segments = bars.lines[2][0].get_segments()
    assert [(s[0][1], s[1][1]) for s in segments] == [(68.0, 72.0), (73.5, 76.5)]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_label() for line in dashed] == ["base (baseline)"]

    grid = [{"method": "vera", "r": r, "d_init": d, "accuracy": r / 10 + d} for r in (16, 256) for d in (1.0, 0.1)]
    ax = dinit_figure(grid + rows[2:]).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"r=16", "r=256"} and ax.get_xscale() == "log"
    assert list(lines["r=256"].get_xdata()) == [0.1, 1.0]
    assert list(lines["r=256"].get_ydata()) == pytest.approx([25.7, 26.6])


def _run_dir(root, name, ending, started, report=True, **report_fields):
    path = root / name
    path.mkdir()
    config = {"started": started, "model": "minilm-l6", "dataset": "rotten-tomatoes", "methods": ["base", "vera-r8"],
              "adapters": {"vera-r8": VeraConfig(r=8).to_dict()}}
    (path / "config.json").write_text(json.dumps(config))
    events = [{"type": "run_start", "run": "base"}] + ([{"type": ending}] if ending else [])
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if report:
        runs = [{"name": "base", "method": "base", "eval": {"loss": 0.7, "accuracy": 50.0}, "wall_s": 1.0},
                {"name": "vera-r8", "method": "vera", "eval": {"loss": 0.6, "accuracy": 62.5}, "wall_s": 2.5}]
        (path / "report.json").write_text(json.dumps({"runs": runs, **report_fields}))
    return path


def test_list_runs_reads_every_status_newest_first_and_skips_unreadable_folders(tmp_path):
    _run_dir(tmp_path, "a-finished", "compare_done", "2026-11-30 10:00:00")
    _run_dir(tmp_path, "b-stopped", "stopped", "2026-11-30 11:00:00", stopped=True)
    _run_dir(tmp_path, "c-failed", "error", "2026-11-30 12:00:00", error="no module matches")
    _run_dir(tmp_path, "d-running", None, "2026-11-30 13:00:00", report=False)
    (tmp_path / "e-foreign").mkdir()  # someone else's folder
    (tmp_path / "e-foreign" / "notes.txt").write_text("mine")
    half = _run_dir(tmp_path, "f-half-written", "compare_done", "2026-11-30 09:00:00")
    (half / "report.json").write_text('{"runs": [')
    (tmp_path / "loose-file.txt").write_text("not a folder")
    (tmp_path / ".many-uploads" / "adapter-1").mkdir(parents=True)  # the lab's uploads: hidden, not a run, no warning

    with pytest.warns(UserWarning) as caught:
        runs = list_runs(tmp_path)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "e-foreign: not a readable run directory" in messages[0]
    assert "f-half-written: not a readable run directory (JSONDecodeError" in messages[1]
    assert [os.path.basename(r["run_dir"]) for r in runs] == ["d-running", "c-failed", "b-stopped", "a-finished"]
    assert [r["status"] for r in runs] == ["running", "failed", "stopped", "finished"]
    finished = runs[-1]
    assert set(finished) >= {"run_dir", "model", "dataset", "methods", "settings", "best", "started", "status",
                             "wall_s"}
    assert finished["methods"] == ["base", "vera"] and finished["best"] == {"base": 50.0, "vera": 62.5}
    assert finished["settings"] == {"base": {}, "vera-r8": {"r": 8, "d_init": 0.1, "target_modules": None}}
    assert finished["wall_s"] == 3.5 and finished["started"] == "2026-11-30 10:00:00"
    assert runs[0]["best"] == {} and runs[0]["wall_s"] is None


def test_list_runs_of_a_real_comparison_is_finished(pair, tmp_path):
    from vera_core import compare

    compare(pair, sentiment(), ["vera", "lora"], vera=vera_grid(r=[8]), lora=lora_grid(r=[2, 4]),
            train=TrainConfig(steps=2, batch_size=4, max_length=16), out_dir=tmp_path / "run", progress=False)
    (run,) = list_runs(tmp_path)
    assert run["status"] == "finished" and run["methods"] == ["vera", "lora"]
    assert list(run["settings"]) == ["vera-r8", "lora-r2", "lora-r4"]
    assert run["settings"]["lora-r4"] == {"r": 4, "alpha": 8, "target_modules": None}
    assert time.strptime(run["started"], "%Y-%m-%d %H:%M:%S") and set(run["best"]) == {"vera", "lora"}
