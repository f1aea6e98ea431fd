"""benchmarks/: the README's results table is the records' (summary.py --check), its rows read the records in the
right units, the results pages keep their hand-written notes, and the harness is the one place that starts
processes."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their shared harness as a sibling
import harness  # noqa: E402
import memory  # noqa: E402
import speed  # noqa: E402
import summary  # noqa: E402


def test_the_readme_table_is_what_the_records_say(capsys):
    assert summary.main(["--check"]) == 0, capsys.readouterr().out


def test_check_fails_and_shows_the_line_when_a_number_was_typed_over(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    edited = readme.replace(" fewer | [reproduction.md]", " fewer (typed) | [reproduction.md]", 1)
    assert edited != readme
    (tmp_path / "README.md").write_text(edited)
    assert summary.main(["--check", "--readme", str(tmp_path / "README.md")]) == 1
    out = capsys.readouterr().out
    assert "differs from the records" in out and "-| Trainable parameters" in out and "(typed)" in out
    assert (tmp_path / "README.md").read_text() == edited  # --check changes nothing
    assert summary.main(["--readme", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "README.md").read_text() == readme


def test_a_readme_without_the_markers_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("# no table here\n")
    with pytest.raises(SystemExit, match="summary:start"):
        summary.main(["--check", "--readme", str(tmp_path / "README.md")])


def made_up_records() -> dict:
    """Small records with numbers checked by hand."""
    targets = list(harness.TARGETS)
    run = {"model": harness.SMOLLM2, "targets": targets, "device": "cpu"}
    quality = {"tasks": {"e2e": [{**run, "name": "vera-r256-all", "trainable_params": 1_000},
                                 {**run, "name": "lora-r8-all", "trainable_params": 12_500}]},
        "pairs": {"e2e": [{"vera": "vera-r256-all", "lora": "lora-r8-all", "metric": "bleu", "seeds": [0, 1, 2],
                           "diff_mean": -0.5, "ci95": [-1.5, 0.5], "verdict": "cannot tell", "param_ratio": 12.5}]}}
    speed = {"machine": "m", "date": "d", "summary": {"ratios": {
        "vera_r256_step_ours_over_peft": 0.9, "vera_r1024_step_ours_over_peft": 0.8,
        "vera_r256_seq512_step_ours_over_peft": 0.7, "merged_over_base_latency": 1.0}}}
    smol = {"model": harness.SMOLLM2, "targets": "all-linear", "batch_size": 4, "seq_len": 128, "dtype": "float32",
            "grad_checkpointing": False, "quantization": None, "estimate_kind": "fake step"}
    memory = {"device": "m", "date": "d", "rows": [
        {**smol, "method": "vera", "r": 256, "measured_peak_bytes": 3 * 2**30, "predicted_peak_bytes": 3 * 2**30,
         "profiler_peak_bytes": 3 * 2**30 + 2**20, "fold_estimates": {"keep": 4 * 2**30, "rebuild": 3 * 2**30}},
        {**smol, "method": "lora", "r": 8, "measured_peak_bytes": 2 * 2**30, "predicted_peak_bytes": 2.04 * 2**30,
         "profiler_peak_bytes": None}]}
    serve = {"device": "m", "date": "d", "mode": "full", "settings": {"prompts": 64, "tokens": 32},
             "rows": [{"impl": "ours-vera", "K": 64, "tokens_per_s": 120.0},
                      {"impl": "peft-lora", "K": 64, "tokens_per_s": 40.0}],
             "bank_1000_bytes": {"vera": 1_250_000_000, "lora": 9_000_000_000}}
    return {"quality": quality, "speed": speed, "memory": memory, "serve": serve}


def test_rows_read_the_records_in_the_stated_units():
    text = summary.table(made_up_records())
    assert "| Trainable parameters, SmolLM2-135M-Instruct, all 7 projections | vera-r256-all 1,000 vs lora-r8-all " \
           "12,500: 12.5x fewer |" in text
    assert "vera-r256-all − lora-r8-all = -0.5 points [-1.5, +0.5] (bleu, 3 seeds; 12.5x fewer parameters): " \
           "cannot tell" in text
    assert "4 x 128 tokens: r=256 0.90x, r=1024 0.80x; 4 x 512: r=256 0.70x, r=1024 not measured" in text
    assert "merged 1.00x; unmerged: ours not measured, PEFT not measured" in text
    # bytes -> MiB is 2**20: 3 GiB is 3,072.0 MiB
    assert "VeRA r=256 3,072.0 MiB, LoRA r=8 2,048.0 MiB: VeRA 1.50x LoRA's (keeping its folded weights for " \
           "backward, prefer=\"speed\": 4,096.0 MiB estimated, 2.00x) |" in text
    # 3 GiB against 3 GiB + 1 MiB: 3,072 / 3,073 - 1 = -0.03%; the row without a profiler figure is left out
    assert "largest error +2.00% over 2 configurations; tracker vs profiler: largest difference -0.03% over 1 " \
           "configurations (smollm2-135m-instruct; vera) |" in text
    assert "PEFT LoRA's mixed batch 3.00x; PEFT VeRA, grouped by adapter not measured" in text
    # adapters held: MB is 10**6 bytes, MiB 2**20; the target is serve.py's 1 GB (10**9 bytes)
    assert ("VeRA r=256 1,250.0 MB (10^6 bytes) = 1,192 MiB, measured (RSS); target 1 GB (10^9 bytes): missed by "
            "25.0%. LoRA r=8 9,000.0 MB (10^6 bytes) = 8,583 MiB, computed from its shapes") in text
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + 8
    # A record that replaced another (reproduce.py --previous) says what the earlier one told, when it differs.
    records = made_up_records()
    old = {**records["quality"]["pairs"]["e2e"][0], "diff_mean": -1.3, "ci95": [-3.2, 0.5],
           "vera_head_lr": 4e-3, "lora_head_lr": 2e-3}
    records["quality"]["previous"] = {"from": "commit abc", "pairs": {"e2e": [old]}}
    assert ("cannot tell; the previous record: -1.3 [-3.2, +0.5], 3 seeds, heads at two rates | "
            in summary.table(records))
    records["quality"]["previous"]["pairs"]["e2e"] = [records["quality"]["pairs"]["e2e"][0]]  # unchanged: no note
    assert "the previous record" not in summary.table(records)


def test_a_scored_tuning_grid_gives_a_rate_sensitivity_row():
    records = made_up_records()
    grid = [{"scale": 2.0, "lr": 2e-2, "val_loss": 1.22, "test": {"loss": 1.3, "bleu": 66.2, "rougeL": 71.0}},
            {"scale": 4.0, "lr": 4e-2, "val_loss": 1.21, "test": {"loss": 1.4, "bleu": 59.3, "rougeL": None}}]
    vera = records["quality"]["tasks"]["e2e"][0]
    vera.update(method="vera", metric_name="bleu", lr_grid=grid, tuned_lr=4e-2)
    text = summary.table(records)
    assert ("| Rate sensitivity, E2E NLG: test bleu at each rate of the tuning grid (first seed, full budget; * chosen "
            "on validation loss) | vera-r256-all: 0.02 66.2, 0.04* 59.3 |") in text
    del grid[0]["test"]  # a grid scored only in part (a record from before scoring): no row
    assert "Rate sensitivity" not in summary.table(records)


def test_adapters_held_just_over_or_under_the_target_say_so_instead_of_rounding_to_it():
    records = made_up_records()
    records["serve"]["bank_1000_bytes"]["vera"] = 1_001_721_856  # the 2026-11-30 record: "1.00 GB" when rounded
    assert "1,001.7 MB (10^6 bytes) = 955 MiB, measured (RSS); target 1 GB (10^9 bytes): missed by 0.2%." in \
        summary.table(records)
    records["serve"]["bank_1000_bytes"]["vera"] = 950_000_000
    assert "950.0 MB (10^6 bytes) = 906 MiB, measured (RSS); target 1 GB (10^9 bytes): met, 5.0% under." in \
        summary.table(records)


def test_a_rewritten_results_page_keeps_its_hand_written_notes(tmp_path):
    page = tmp_path / "speed.md"
    harness.write_page(page, "# record 1\n")
    assert page.read_text() == "# record 1\n"
    page.write_text(page.read_text() + f"\n{harness.NOTES_MARKER}\n\nWhat the record meant.\n")
    harness.write_page(page, "# record 2\n| a | 1 |\n")
    assert page.read_text() == f"# record 2\n| a | 1 |\n\n{harness.NOTES_MARKER}\n\nWhat the record meant.\n"


def test_the_harness_is_the_only_benchmark_module_that_starts_processes():
    starters = {"subprocess", "multiprocessing", "os.system", "os.popen", "os.spawnv", "os.fork", "pty"}
    found = {}
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [f"{node.value.id}.{node.attr}"] if isinstance(node, ast.Attribute)
                     and isinstance(node.value, ast.Name) else [])
            for name in names:
                if name in starters or name.split(".")[0] in starters - {"os"}:
                    found.setdefault(path.name, set()).add(name)
    assert set(found) == {"harness.py"}, found


@pytest.mark.integration
def test_run_child_returns_every_result_line_and_raises_with_the_error_on_failure(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import json, sys\ncfg = json.loads(sys.argv[2])\nprint('loading...')\n"
                      "for i in range(cfg['n']): print(json.dumps({'i': i}), flush=True)\n"
                      "if cfg.get('fail'): sys.exit('boom: ' + cfg['fail'])\n")
    seen = []
    assert harness.run_child(script, {"n": 2}, seen.append) == [{"i": 0}, {"i": 1}] == seen
    with pytest.raises(harness.ChildFailed, match="boom: bad input") as failed:
        harness.run_child(script, {"n": 1, "fail": "bad input"}, seen.append)
    assert failed.value.returncode == 1 and seen[-1] == {"i": 0}  # the row before the failure was delivered
    with pytest.raises(harness.ChildFailed, match="exit code 0, no output"):
        harness.run_child(script, {"n": 0})


class _Event:
    def __init__(self, name: str, start_ns: int, nbytes: int):
        self._name, self._start, self._bytes = name, start_ns, nbytes

    def name(self) -> str:
        return self._name

    def start_ns(self) -> int:
        return self._start

    def nbytes(self) -> int:
        return self._bytes


def test_the_profiler_peak_is_the_highest_running_sum_of_its_allocator_events_in_time_order():
    events = [_Event("[memory]", 3, -100), _Event("[memory]", 1, 100), _Event("aten::mm", 2, 10**9),
              _Event("[memory]", 2, 50), _Event("[memory]", 4, 30)]
    prof = type("Prof", (), {"profiler": type("P", (), {"kineto_results": type("K", (), {
        "events": staticmethod(lambda: events)})})})
    assert memory.profiled_peak(prof) == 150  # +100, +50 (150), -100, +30: operator events are not allocations


def test_the_memory_page_shows_predicted_tracker_and_profiler_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "RESULTS", tmp_path)
    row = {"model": "minilm-l6", "method": "vera", "r": 256, "targets": "query,value", "batch_size": 8,
           "seq_len": 64, "dtype": "float32", "grad_checkpointing": False, "quantization": None,
           "predicted_peak_bytes": 100 * 2**20, "measured_peak_bytes": 100 * 2**20, "peak_rss_bytes": 400 * 2**20,
           "estimate_kind": "fake step", "estimate_s": 1.0, "tracker_overhead": 1.1, "date": "2026-12-05",
           "key": "a", "breakdown": {}, "predicted_breakdown": {}}
    rows = [{**row, "profiler_peak_bytes": 104 * 2**20}, {**row, "key": "b", "date": "2026-11-30"}]
    memory.write_report({"rows": rows, "device": "cpu", "date": "2026-12-05", "load_avg": [1, 1, 1], "lab": {}})
    page = (tmp_path / "memory.md").read_text()
    assert "| predicted MiB | tracker MiB | error | profiler MiB | tracker vs profiler |" in page
    # 100 / 104 - 1 = -3.85%: outside the 3% tolerance, flagged; the row without a profiler figure shows dashes
    assert "| 100.0 | 100.0 | +0.00% | 104.0 | -3.85% **miss** | 400.0 |" in page
    assert "| 100.0 | 100.0 | +0.00% | - | - | 400.0 |" in page and "| 2026-11-30 |" in page
    assert "1 rows, largest difference -3.85% **miss** (a); tolerance 3%." in page
    assert "default did" not in page  # no row carries the fold estimates


def test_the_memory_page_says_what_the_default_did_with_veras_folded_weights_and_what_either_way_costs(
        tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "RESULTS", tmp_path)
    row = {"model": harness.SMOLLM2, "method": "vera", "r": 256, "targets": "all-linear", "batch_size": 4,
           "seq_len": 128, "dtype": "float32", "grad_checkpointing": False, "quantization": None,
           "predicted_peak_bytes": 100 * 2**20, "measured_peak_bytes": 100 * 2**20, "peak_rss_bytes": 400 * 2**20,
           "estimate_kind": "fake step", "estimate_s": 1.0, "tracker_overhead": 1.1, "date": "2026-12-05",
           "key": "v", "fold_estimates": {"keep": 130 * 2**20, "rebuild": 100 * 2**20, "keep_saving": 0.02}}
    lora = {**row, "method": "lora", "r": 8, "key": "l", "measured_peak_bytes": 125 * 2**20, "fold_estimates": None}
    kept = {**row, "r": 1024, "key": "k", "predicted_peak_bytes": 130 * 2**20, "measured_peak_bytes": 130 * 2**20}
    memory.write_report({"rows": [row, kept, lora], "device": "cpu", "date": "d", "load_avg": [1, 1, 1], "lab": {}})
    page = (tmp_path / "memory.md").read_text()
    # the default's prediction equals the rebuild estimate: it rebuilt; 100 / 125 = 0.80x LoRA's
    assert "| float32 | off | rebuilt W' | 100.0 | 130.0 | 100.0 | 125.0 | 0.80x |" in page
    assert "| float32 | off | kept W' | 130.0 | 130.0 | 100.0 | 125.0 | 1.04x |" in page


def test_the_memory_record_checks_the_tracker_against_the_profiler_and_vera_is_leaner_at_the_lab_default():
    record = json.loads((harness.RESULTS / "memory.json").read_text())
    profiled = [r for r in record["rows"] if r.get("profiler_peak_bytes")]
    covered = {(r["model"], r["method"], r["batch_size"] * r["seq_len"]) for r in profiled}
    for model in ("minilm-l6", harness.SMOLLM2):
        for method in ("vera", "lora"):
            assert len({tokens for m, me, tokens in covered if (m, me) == (model, method)}) >= 2, (model, method)
    for row in profiled:
        assert row["measured_peak_bytes"] == pytest.approx(row["profiler_peak_bytes"], rel=memory.PROFILER_TOLERANCE)
    vera, lora = summary._memory_row(record["rows"], "vera", 256), summary._memory_row(record["rows"], "lora", 8)
    assert vera["measured_peak_bytes"] <= lora["measured_peak_bytes"]
    alone = {m: record["lab"][f"lab-order/{m}"]["peaks"][m] for m in ("vera", "lora")}
    assert alone["vera"] <= alone["lora"]


def test_the_old_fold_policy_kept_every_smollm2_layer_at_4_x_128_where_the_default_rebuilds_at_r_256():
    assert speed.old_default_keep(512, 576, 576, 256)  # 4·576·576 = 1,327,104 > 512·1,152 = 589,824
    assert not speed.old_default_keep(2048, 576, 576, 256)  # 2048·1,152 = 2,359,296
    assert speed.layers_keeping(128, 256) == {"default": 0, "old_default": 210, "folded": 210}
    assert speed.layers_keeping(128, 1024) == {"default": 0, "old_default": 210, "folded": 210}
    assert speed.layers_keeping(512, 256) == {"default": 0, "old_default": 0, "folded": 210}


def test_the_beside_sampler_logs_other_processes_and_leaves_out_its_own_group(tmp_path):
    # benchmarks/beside.sh with its 5-minute wait cut to none: one sample, a busy process in another group listed
    script = (ROOT / "benchmarks" / "beside.sh").read_text().replace("while sleep 300", "for once in 1")
    (tmp_path / "beside.sh").write_text(script)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        subprocess.run(["sleep", "2"])  # its %CPU (an average since it started) climbs to ~100
        subprocess.run(["bash", str(tmp_path / "beside.sh"), str(tmp_path / "log")], check=True, timeout=60)
        own = subprocess.run(["bash", str(tmp_path / "beside.sh"), str(tmp_path / "own"), str(busy.pid)],
                             check=True, timeout=60)
    finally:
        busy.kill()
    assert own.returncode == 0
    (line,) = (tmp_path / "log").read_text().splitlines()
    assert " load " in line and "while True: pass" in line and line.endswith("%);")
    assert "while True: pass" not in (tmp_path / "own").read_text()  # its own group (here: the busy one) left out
