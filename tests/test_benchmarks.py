"""benchmarks/: the README's results table is the records' (summary.py --check), its rows read the records in the
right units, the results pages keep their hand-written notes, and the harness is the one place that starts
processes."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their shared harness as a sibling
import harness  # noqa: E402
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
        {**smol, "method": "vera", "r": 256, "measured_peak_bytes": 3 * 2**30, "predicted_peak_bytes": 3 * 2**30},
        {**smol, "method": "lora", "r": 8, "measured_peak_bytes": 2 * 2**30, "predicted_peak_bytes": 2.04 * 2**30}]}
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
    assert "VeRA r=256 3,072.0 MiB, LoRA r=8 2,048.0 MiB: VeRA 1.50x LoRA's" in text
    assert "largest error +2.00% over 2 configurations" in text
    assert "PEFT LoRA's mixed batch 3.00x; PEFT VeRA, grouped by adapter not measured" in text
    # adapters held: MB is 10**6 bytes, MiB 2**20; the target is serve.py's 1 GB (10**9 bytes)
    assert ("VeRA r=256 1,250.0 MB (10^6 bytes) = 1,192 MiB, measured (RSS); target 1 GB (10^9 bytes): missed by "
            "25.0%. LoRA r=8 9,000.0 MB (10^6 bytes) = 8,583 MiB, computed from its shapes") in text
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + 8


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
