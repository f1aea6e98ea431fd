"""The command line: compare (isolated processes) writes the contract report; train, evaluate, export, generate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BAD, GOOD, check_contract, tiny_bert, tiny_llama
from transformers import LlamaForCausalLM

from vera_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    """A tiny BERT classifier folder, a tiny Llama folder and a sentiment .jsonl file."""
    root = tmp_path_factory.mktemp("cli")
    tiny_bert(tokenizer=tokenizer, num_labels=2).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    tiny_llama(tokenizer=tokenizer).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    rows = [{"text": t, "label": 1} for t in GOOD * 2] + [{"text": t, "label": 0} for t in BAD * 2]
    (root / "sentiment.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


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
    assert f"{accuracy:,.1f}" in table  # the same adapter on the same split scores the same
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
    from vera_core.cli import _Progress

    progress = _Progress()
    progress({"type": "start", "total": 4, "run": "vera-r16"})
    progress({"type": "step", "step": 2, "loss": 0.7041})
    progress({"type": "eval", "eval_loss": 0.6898})
    assert progress.bar.postfix == "loss=0.704, eval_loss=0.690"
    progress({"type": "done"})
