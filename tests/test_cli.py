"""The command line: compare (isolated processes) writes the contract report; train, evaluate, export, generate."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import check_contract, wait_for_first_step
from transformers import LlamaForCausalLM

from vera_core.lab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vera_core", *args]


@pytest.mark.integration  # subprocesses and signals
@pytest.mark.parametrize("target", ["parent", "group"])
def test_a_signal_stops_the_cli_within_a_step_and_it_resumes(assets, tmp_path, target):
    """SIGTERM to the CLI alone, or SIGINT to its whole process group (Ctrl-C): the isolated child stops within a
    step, the adapter and a checkpoint are saved, report.json says stopped, one line says how to resume, the exit
    code is not 0, and no process is left behind. --resume then finishes the run."""
    out = tmp_path / "run"
    cmd = _cli("compare", "--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl"),
               "--methods", "vera,lora", "--steps", "3000", "--batch-size", "2", "--max-length", "16",
               "--vera-r", "16", "--lora-r", "4", "--eval-every", "3000", "--out", str(out))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_for_first_step(out, proc)
    family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    assert len(family) >= 2, "the run should be in its own (isolated) process"
    if target == "parent":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {"parent": 128 + signal.SIGTERM, "group": 128 + signal.SIGINT}[target], err[-2000:]
    assert "Traceback" not in err and f"--resume {out}" in err
    time.sleep(0.5)
    assert not [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] and [r["name"] for r in report["runs"]] == ["vera-r16"]
    steps = report["runs"][0]["steps"]
    assert 0 < steps < 3000 and report["runs"][0]["stopped"]
    assert (out / "train" / "vera-r16" / "checkpoints" / f"step-{steps:06d}").is_dir()
    assert (out / "adapters" / "vera-r16" / "adapter.safetensors").is_file()
    events = [json.loads(line)["type"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == "stopped" and "compare_done" not in events
    if target == "parent":  # resuming once is enough (3000 steps of two methods)
        done = subprocess.run(_cli("compare", "--resume", str(out)), cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        report = check_contract(out, "classification")
        assert [(r["name"], r["steps"], r["stopped"]) for r in report["runs"]] == [
            ("vera-r16", 3000, False), ("lora-r4", 3000, False)]


@pytest.mark.integration  # a CLI process and a child per method
def test_errors_in_an_isolated_child_are_one_line(assets, tmp_path):
    done = subprocess.run(_cli("train", "--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl"),
                               "--targets", "nope", "--steps", "2", "--out", str(tmp_path / "run")),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip() and "%|" not in line]
    assert lines[-1].startswith("error: no module matches target_modules=['nope']") and "Traceback" not in done.stderr
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "error" and "no module matches" in events[-1]["message"]


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-org/no-such-model"], "error: unknown model 'no-such-org/no-such-model'"),
    (["--device", "cuda"], "no CUDA device is available on this machine; choose device 'cpu'"),
    (["--max-length", "100000"], "max_length 100000 is longer than the model takes (max_position_embeddings = 128)"),
    (["--seeds", "1,1"], "seeds [1, 1] repeat a seed"),
    (["--seeds", "0,1", "--max-runs", "2"], "makes 5 runs (5 final, 0 tuning), more than the limit of 2; pass "
                                            "max_runs=5"),
])
def test_bad_settings_fail_before_anything_runs(assets, tmp_path, capsys, args, message):
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = ["compare", "--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl"), *args,
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


@pytest.mark.integration  # three Python processes (CLI, then one per method), each importing torch
def test_cli_compare_in_isolated_processes_matches_the_contract(assets, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vera_core", "compare", "--model", str(assets / "bert"), "--dataset",
           str(assets / "sentiment.jsonl"), "--methods", "vera,lora", "--steps", "2", "--batch-size", "4",
           "--max-length", "16", "--vera-r", "16", "--lora-r", "4", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = check_contract(out, "classification")
    assert report["memory_mode"] == "isolated"
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["vera-r16"]["trainable_params"] == 4 * (32 + 16) and runs["lora-r4"]["trainable_params"] == 1024
    assert runs["lora-r4"]["alpha"] == 8  # --lora-alpha defaults to 2 r
    assert "lora-r4 / vera-r16: 5.33x trainable parameters" in done.stdout
    assert "estimated memory" in done.stdout and "adapter_kib" in done.stdout


def test_cli_compare_with_seeds_and_tuning_prints_mean_std_and_the_pair(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl"),
                 "--methods", "vera,lora", "--steps", "1", "--batch-size", "4", "--max-length", "16", "--vera-r", "16",
                 "--lora-r", "4", "--in-process", "--seeds", "0,1", "--tune", "0.5,2", "--tune-steps", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    [pair] = report["pairs"]
    assert report["seeds"] == [0, 1] and [r["name"] for r in report["runs"]] == [
        "vera-r16-s0", "vera-r16-s1", "lora-r4-s0", "lora-r4-s1"]
    assert f"vera-r16 − lora-r4 = {pair['diff_mean']:+.1f} points [{pair['ci95'][0]:+.1f}, " in printed
    assert "mean ± std" in printed and "tuned learning rates" in printed and "vera-r16: lr " in printed
    assert sorted(report["tuning"]) == ["lora-r4", "vera-r16"]


def test_the_head_rate_and_head_onlys_own_grid_come_from_the_command_line(assets):
    from vera_core.lab.cli import _request, build_parser
    from vera_core.lab.tune import HEAD_LR_SCALES

    base = ["compare", "--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl")]

    def request(*extra):
        args = build_parser().parse_args([*base, *extra])
        return _request(args, args.methods.split(","))

    untuned = request("--methods", "vera,lora", "--head-lr", "0.05")
    assert untuned.head_rate() == 0.05 and untuned.tune is None
    assert untuned.rates(untuned.plan()[0]) == (untuned.rates(untuned.plan()[0])[0], 0.05)
    tuned = request("--methods", "head,vera", "--tune", "0.5,2")
    assert tuned.tune == {"lr_scale": [0.5, 2.0], "head_lr_scale": list(HEAD_LR_SCALES)}
    assert [s for spec, s in tuned.tuning_plan() if spec.method == "head"] == list(HEAD_LR_SCALES)
    own = request("--methods", "head,vera", "--tune", "1", "--head-tune", "1,10")
    assert own.tune == {"lr_scale": [1.0], "head_lr_scale": [1.0, 10.0]}
    assert request("--methods", "vera", "--tune", "1").tune == {"lr_scale": [1.0]}  # no head-only: no head grid
    with pytest.raises(ValueError, match="--head-tune sets head-only's grid within tuning; add --tune"):
        request("--methods", "head,vera", "--head-tune", "1,10")


def test_isolated_tuning_points_score_as_in_process_ones(assets, tmp_path):
    # By default every tuning point trains in its own process (an OOM kill ends the comparison, not the CLI); its
    # result must be the in-process one, seed for seed.
    args = ["compare", "--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl"), "--methods",
            "vera", "--steps", "1", "--batch-size", "4", "--max-length", "16", "--vera-r", "16", "--tune", "0.5,2",
            "--tune-steps", "2"]
    tuning = {}
    for mode in ("isolated", "in-process"):
        assert main([*args, "--out", str(tmp_path / mode)] + ["--in-process"] * (mode == "in-process")) == 0
        report = json.loads((tmp_path / mode / "report.json").read_text())
        assert report["memory_mode"] == mode
        tuning[mode] = report["tuning"]["vera-r16"]
    assert [p["val_loss"] for p in tuning["isolated"]["grid"]] == [p["val_loss"] for p in tuning["in-process"]["grid"]]
    assert tuning["isolated"]["tie"] == tuning["in-process"]["tie"] and tuning["isolated"]["tie"]["seed"] == 1


def test_cli_train_evaluate_export(assets, tmp_path, capsys):
    data = ["--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl")]
    assert main(["train", *data, "--method", "vera", "--vera-r", "16", "--steps", "2", "--batch-size", "4",
                 "--out", str(tmp_path / "t"), "--in-process"]) == 0
    adapter = tmp_path / "t" / "adapters" / "vera-r16"
    report = check_contract(tmp_path / "t", "classification")
    capsys.readouterr()
    assert main(["evaluate", *data, "--adapter", str(adapter), "--split", "test"]) == 0
    table = capsys.readouterr().out
    accuracy = report["runs"][0]["eval"]["accuracy"]
    assert f"{round(accuracy, 4):,}" in table  # the same adapter on the same split scores the same
    for fmt, name in (("peft", "adapter_config.json"), ("lora", "adapter_config.json"), ("native", None),
                      ("merged", "config.json")):
        out = tmp_path / fmt
        assert main(["export", "--model", str(assets / "bert"), "--adapter", str(adapter), "--format", fmt,
                     "--out", str(out)]) == 0
        assert (out / name).is_file() if name else any(out.iterdir())
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_cli_generate(assets, capsys):
    assert main(["generate", "--model", str(assets / "llama"), "--prompt", "hello", "--prompt", "colour?",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "prompt" in out and "answer" in out and "colour?" in out


@pytest.mark.integration
def test_cli_compare_on_minilm_and_rotten_tomatoes(tmp_path, capsys):
    assert main(["compare", "--model", "minilm-l6", "--dataset", "rotten-tomatoes", "--methods", "vera,lora",
                 "--max-rows", "16", "--steps", "3", "--batch-size", "8", "--max-length", "32", "--in-process",
                 "--out", str(tmp_path)]) == 0
    report = check_contract(tmp_path, "classification")
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["vera-r256"]["trainable_params"] == 7_680 and runs["lora-r8"]["trainable_params"] == 73_728
    assert runs["vera-r256"]["head_params"] == 384 * 2 + 2
    assert "9.60x" in capsys.readouterr().out


def test_cli_missing_adapter_is_one_error_line(assets, tmp_path, capsys):
    missing = str(tmp_path / "no-such-adapter")
    model = ["--model", str(assets / "llama"), "--adapter", missing]
    export = ["export", *model, "--format", "peft", "--out", str(tmp_path / "o")]
    for argv in (["generate", *model, "--prompt", "hi"], export):
        assert main(argv) == 2
        err = capsys.readouterr().err  # transformers' loading bar, then our one line
        assert err.endswith(f"\nerror: adapter directory {missing!r} does not exist; check the path.\n")
        assert err.count("error") == 1 and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["native", "merged"])
def test_cli_export_keeps_a_directory_it_did_not_write(assets, tmp_path, capsys, fmt):
    from vera_core import VeraConfig, add_adapter, save_adapter

    adapter = save_adapter(add_adapter(LlamaForCausalLM.from_pretrained(assets / "llama"),
                                       VeraConfig(r=8, target_modules=["q_proj"])), tmp_path / "adapter")
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.txt").write_text("chapter 1")
    argv = ["export", "--model", str(assets / "llama"), "--adapter", str(adapter), "--format", fmt, "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2  # refused before the model loads: nothing but the one line
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "thesis.txt" in err and "--overwrite" in err
    assert (out / "thesis.txt").read_text() == "chapter 1"
    assert main([*argv, "--overwrite"]) == 0
    written = "config.json" if fmt == "merged" else "adapter.safetensors"
    assert not (out / "thesis.txt").exists() and (out / written).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "thesis"]  # no temporary siblings left


def test_progress_shows_train_and_eval_loss_once():
    from vera_core.lab.cli import _Progress

    progress = _Progress()
    progress({"type": "start", "total": 4, "run": "vera-r16"})
    progress({"type": "step", "step": 2, "loss": 0.7041})
    progress({"type": "eval", "eval_loss": 0.6898})
    assert progress.bar.postfix == "loss=0.704, eval_loss=0.690"
    progress({"type": "done"})
