"""benchmarks/ablations.py: the quick smoke run's record (every variant paired against default, the rank sweep, the
per-layer picture), the direction column read from the intervals, and a rerun that keeps finished groups."""
import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vera_core.lab.stats import CI_SEEDS_AND_EXAMPLES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their shared harness as a sibling
_spec = importlib.util.spec_from_file_location("ablations", ROOT / "benchmarks" / "ablations.py")
ablations = importlib.util.module_from_spec(_spec)
sys.modules["ablations"] = ablations
_spec.loader.exec_module(ablations)


def test_direction_reads_the_interval_against_the_papers_sign():
    assert ablations.direction(-1, [-3.0, -0.5]) == "reproduces"
    assert ablations.direction(-1, [0.2, 2.0]) == "opposite"
    assert ablations.direction(1, [0.2, 2.0]) == "reproduces"
    assert ablations.direction(-1, [-1.0, 0.4]) == "cannot tell"
    assert ablations.direction(-1, [-1.0, 0.0]) == "cannot tell"  # 0 on the edge is not excluded
    assert ablations.direction(0, [0.5, 1.0]) == "paper: no direction; lab: higher"
    assert ablations.direction(-1, None) == "not run yet"


def test_the_papers_direction_is_the_sign_both_its_tasks_agree_on():
    signs = {v: ablations.paper_sign(v) for v in ablations.VARIANTS if v != "default"}
    # MRPC and RTE both fall for these; d_init 1e-7 moves +0.3 / -1.1 and unique +0.7 / 0.0 (against Table 7).
    assert signs == {"only_d": -1, "only_b": -1, "unique": 0, "init_kaiming_normal": -1, "init_uniform": -1,
                     "d_init_1e-07": 0, "d_init_1.0": -1}
    assert ablations.paper_cell("init_uniform") == "MRPC 68.9 ± 1.3 (-21.6), RTE 53.1 ± 0.8 (-32.7)"


def _quality(path: Path, vera_head: float, lora_head: float, comparison: float | None) -> Path:
    """A quality.json with the two centre rows of rotten-tomatoes' qv comparison, their heads at these rates, and
    the comparison's one head rate at top level when `comparison` is given (as the head-rate rerun writes it)."""
    rows = [{"name": "vera-r256-qv", "lr": 0.02, "tuned_lr": 0.02, "head_lr": vera_head,
             "run_dir": "benchmarks/results/rerun/repro/rotten-tomatoes/qv"},
            {"name": "lora-r8-qv", "lr": 5e-4, "tuned_lr": 5e-4, "head_lr": lora_head,
             "run_dir": "benchmarks/results/rerun/repro/rotten-tomatoes/qv"}]
    quality = {"tasks": {"rotten-tomatoes": rows}}
    if comparison is not None:
        quality["head_lr"] = {"rotten-tomatoes": {"qv": comparison}}
    path.write_text(json.dumps(quality))
    return path


def test_every_group_trains_its_head_at_the_comparisons_one_rate(tmp_path):
    one = _quality(tmp_path / "one.json", 0.128, 0.128, 0.128)
    assert ablations.centre_rates(one, "rotten-tomatoes") == {"vera": (0.02, 0.128), "lora": (5e-4, 0.128)}
    assert ablations.centre_rates(one, "rotten-tomatoes", head_lr=0.01) == {"vera": (0.02, 0.01),
                                                                            "lora": (5e-4, 0.01)}
    # The top-level per-comparison rate wins over a row's own (it is what every run of the comparison used).
    top = _quality(tmp_path / "top.json", 0.002, 0.001, 0.064)
    assert ablations.centre_rates(top, "rotten-tomatoes")["lora"] == (5e-4, 0.064)


def test_the_record_says_what_ran_beside_it_and_its_cpu_hours_apart_from_wall_hours(tmp_path):
    log = tmp_path / "ablations" / "beside.log"
    log.parent.mkdir()
    log.write_text("2026-12-05 21:00:00 load 2.1 | reproduce.py --task e2e (95.0%);\n"
                   "2026-12-05 21:05:00 load 1.0 |\n")
    seen = ablations.beside(argparse.Namespace(out=str(tmp_path)))
    assert seen == {"samples": 2, "busy": 1, "log": "ablations/beside.log"}
    line = ablations.pace({"cpu_h": 1.5, "wall_h": 4.25, "threads": 1, "nice": 19, "beside": seen,
                           "load_average": [2.0, 2.1, 2.2]})
    assert line.startswith("1.50 CPU hours in the runs' own processes, 4.25 h wall at 1 thread(s) and nice 19")
    assert "beside it, 1 of 2 five-minute samples saw other processes over 20% CPU (ablations/beside.log" in line
    assert ablations.beside(argparse.Namespace(out=str(tmp_path / "none"))) is None


def test_figure_3s_pattern_is_read_from_the_trained_adapter_per_module_and_depth():
    def layer(i, module, d):
        return {"layer": i, "module": module, "d_norm": d, "mean_abs_b": 0.1, "mean_abs_d": 0.1, "delta_ratio": 0.01}

    # query 1, 1, 3, 3 (mean 2) against value 1, 1, 1, 1; layers 2-3 mean 2 against layers 0-1 mean 1
    layers = [layer(i, "query", 1.0 if i < 2 else 3.0) for i in range(4)] + [layer(i, "value", 1.0) for i in range(4)]
    (line,) = ablations.figure3_lines(layers)
    assert "query 2 against value 1 (query larger, as in the paper)" in line
    assert "layers 2–3 2 against layers 0–1 1 (later larger, as in the paper)" in line
    flipped = [{**r, "d_norm": 4.0 - r["d_norm"]} for r in layers]  # query 3, 3, 1, 1 against value 3, ...
    (line,) = ablations.figure3_lines(flipped)
    assert "(value larger, unlike the paper)" in line and "(earlier larger, unlike the paper)" in line
    level = [{**r, "d_norm": 1.0 + 0.01 * (r["module"] == "value")} for r in layers]  # 1% apart: no order
    assert "query 1 against value 1.01 (about equal, within 2%)" in ablations.figure3_lines(level)[0]
    assert ablations.figure3_lines(None) == [] and ablations.layer_lines(layers)[-1] == ablations.figure3_lines(
        layers)[0]


def test_a_record_from_before_one_head_rate_per_comparison_is_refused(tmp_path):
    old = _quality(tmp_path / "old.json", 0.002, 0.001, None)  # the heads scaled with each adapter's rate
    with pytest.raises(SystemExit) as refused:
        ablations.centre_rates(old, "rotten-tomatoes")
    message = str(refused.value)
    assert "\n" not in message and "0.002" in message and "0.001" in message
    assert "head-rate rerun" in message and "--head-lr" in message
    # --head-lr settles it by hand: one rate for both.
    assert ablations.centre_rates(old, "rotten-tomatoes", head_lr=0.05) == {"vera": (0.02, 0.05),
                                                                            "lora": (5e-4, 0.05)}
    # The committed record is such a record on both tasks, until the rerun replaces it.
    committed = ROOT / "benchmarks" / "results" / "quality.json"
    if "head_lr" not in json.loads(committed.read_text()):
        with pytest.raises(SystemExit, match="--head-lr"):
            ablations.centre_rates(committed, "sst2")


def _run(assets: Path, out: Path, *extra: str, code: int = 0) -> str:
    command = [sys.executable, str(ROOT / "benchmarks" / "ablations.py"), "--quick", "--task", "rotten-tomatoes",
               "--model", str(assets / "bert"), "--out", str(out),
               "--rates-from", str(_quality(out.parent / "quality.json", 0.002, 0.001, 0.01)), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.integration
def test_quick_run_writes_a_well_formed_record_and_a_rerun_trains_only_what_is_missing(assets, tmp_path):
    out = tmp_path / "abl"
    _run(assets, out)
    record = json.loads((out / "ablations.json").read_text())
    assert (record["task"], record["model"], record["quick"]) == ("rotten-tomatoes", str(assets / "bert"), True)
    rows = record["rows"]
    assert [r["variant"] for r in rows] == list(ablations.VARIANTS)
    layers = record["layers"]
    assert len(layers) == 4 and {r["module"] for r in layers} == {"query", "value"}  # 2 blocks x query, value
    width = layers[0]["out"]
    for row in rows:
        assert row["seeds"] == [0, 1] and len(row["values"]) == 2
        assert row["ci95"][0] <= row["metric_mean"] <= row["ci95"][1]
        assert [p["scale"] for p in row["lr_grid"]] == [0.5, 2.0] and row["tuned_scale"] in (0.5, 2.0)
        assert row["lr"] == pytest.approx(record["centre_rates"]["vera"][0] * row["tuned_scale"])
        assert row["head_lr"] == record["head_lr"] == 0.01  # tuning moves the adapter's rate, never the head's
        # only_d trains d alone (r per layer), only_b b alone (out per layer), the rest both
        per_layer = {"only_d": 256, "only_b": width}.get(row["variant"], width + 256)
        assert row["trainable_params"] == len(layers) * per_layer
        if row["variant"] == "default":
            assert row["diff"] is None and row["direction"] is None
            continue
        assert row["ci_method"] == CI_SEEDS_AND_EXAMPLES and row["paired_seeds"] == [0, 1]
        assert row["diff_ci95"][0] <= row["diff"] <= row["diff_ci95"][1]
        assert row["diff"] == pytest.approx(row["metric_mean"] - rows[0]["metric_mean"])
        assert row["direction"] == ablations.direction(ablations.paper_sign(row["variant"]), row["diff_ci95"])
    sweep = {(r["method"], r["r"]): r for r in record["rank_sweep"]}
    assert set(sweep) == {("vera", 1), ("vera", 16), ("vera", 256), ("lora", 1), ("lora", 2)}
    for (method, r), row in sweep.items():
        assert row["trainable_params"] == len(layers) * ((width + r) if method == "vera" else r * 2 * width)
        assert row["seeds"] == [0, 1] and row["head_lr"] == 0.01
    assert sweep[("vera", 256)]["values"] == rows[0]["values"]  # r=256 is the default variant's runs
    for layer in layers:
        assert layer["delta_ratio"] > 0 and layer["mean_abs_b"] > 0 and layer["d_norm"] > 0

    page = (out / "ablations.md").read_text()
    for row in rows[1:]:
        line = next(x for x in page.splitlines() if x.startswith(f"| {row['variant']} |"))
        assert line.split(" | ")[5] == row["direction"]
    assert "trains its classifier head at one rate, 0.01 (the per-comparison head rate of" in page
    assert "Kopiczko" in page and "(-32.7)" in page and "Rank sweep" in page
    assert record["cpu_h"] > 0 and f"{record['cpu_h']:.2f} CPU hours in the runs' own processes" in page
    assert record["beside"] is None  # the sampler writes its first line after 5 minutes
    assert (out / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A killed run: one sweep group never ran. The rerun trains it alone and keeps every finished group as it was.
    default_log = (out / "ablations" / "default" / "metrics.jsonl").read_bytes()
    shutil.rmtree(out / "ablations" / "sweep" / "lora-r2")
    text = _run(assets, out)
    assert "sweep/lora-r2: finished" in text
    assert text.count("done earlier, kept") == len(ablations.VARIANTS) + 3  # vera r1, r16, lora r1
    # --phase sweep (a second process on a second core) touches only the sweep's groups ...
    shutil.rmtree(out / "ablations" / "sweep" / "lora-r2")
    text = _run(assets, out, "--phase", "sweep")
    assert "sweep/lora-r2: finished" in text and "== variants" not in text
    assert text.count("done earlier, kept") == 3
    # ... and, before default's tuning exists, refuses with the reason instead of starting a child that fails.
    refused = _run(assets, tmp_path / "fresh", "--phase", "sweep", code=1)
    assert "tuning.json is missing" in refused and "run the variants first" in refused and "== sweep" not in refused
    assert (out / "ablations" / "default" / "metrics.jsonl").read_bytes() == default_log
    assert json.loads((out / "ablations.json").read_text())["rows"] == rows


@pytest.mark.integration
def test_sigterm_stops_the_run_at_a_step_and_leaves_nothing_running(assets, tmp_path):
    """kill -TERM on the process group (a session's end): the child checkpoints and exits, the parent writes the
    record, stops its sampler and exits STOPPED; a rerun goes on from there."""
    out = tmp_path / "abl"
    command = [sys.executable, str(ROOT / "benchmarks" / "ablations.py"), "--quick", "--task", "rotten-tomatoes",
               "--model", str(assets / "bert"), "--out", str(out),
               "--rates-from", str(_quality(tmp_path / "quality.json", 0.002, 0.001, 0.01))]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "ablations").glob("*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)  # until the first group trains
    os.killpg(proc.pid, signal.SIGTERM)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == ablations.STOPPED, text[-3000:]
    assert "stopped (SIGTERM)" in text and (out / "ablations.json").is_file()
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert left == "", left  # no sampler, no child left behind
    _run(assets, out)  # the rerun finishes what the stop left
    record = json.loads((out / "ablations.json").read_text())
    assert [r["variant"] for r in record["rows"]] == list(ablations.VARIANTS) and record["errors"] == []
