"""The comparison runner on tiny models: report.json contract, numbers that agree with the files, stop, estimates."""
import json
import threading
import warnings

import pytest
from helpers import check_contract, colours, sentiment, tiny_bert, tiny_llama

from vera_core.lab.compare import compare
from vera_core.adapters.config import LoraConfig, VeraConfig
from vera_core.adapters.count import estimate_parameters
from vera_core.lab.data import TextDataset
from vera_core.lab.memory import estimate_memory
from vera_core.lab.report import load_run
from vera_core.lab.request import RunRequest
from vera_core.lab.train import DEFAULT_LR, TrainConfig


def test_classification_comparison_writes_a_consistent_run_directory(tokenizer, tmp_path):
    events = []
    bert = tiny_bert(tokenizer=tokenizer, num_labels=2)
    report = compare((bert, tokenizer), sentiment(), methods=("base", "head", "vera", "lora"),
                     vera=VeraConfig(r=16), lora=LoraConfig(r=4), out_dir=tmp_path, on_event=events.append,
                     train=TrainConfig(steps=3, batch_size=4, max_length=16), samples=2)
    data = check_contract(tmp_path, "classification")
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == ["base", "head", "vera-r16", "lora-r4"]
    # query + value on 2 layers of width 32: VeRA sum(out + r), LoRA sum(r (in + out)); the head is 32*2 + 2
    assert runs["vera-r16"]["trainable_params"] == 4 * (32 + 16)
    assert runs["lora-r4"]["trainable_params"] == 4 * 4 * (32 + 32)
    assert runs["vera-r16"]["head_params"] == runs["head"]["head_params"] == 66
    assert runs["base"]["trainable_params"] == 0 and runs["base"]["steps"] is None
    assert runs["base"]["peak_memory_bytes"] is None and runs["base"]["peak_memory_kind"] is None
    assert runs["vera-r16"]["peak_memory_kind"] == "tensors" and runs["vera-r16"]["steps"] == 3
    assert runs["vera-r16"]["memory_breakdown"]["total"] == runs["vera-r16"]["peak_memory_bytes"]
    assert runs["vera-r16"]["targets"] == ["query", "value"] and runs["vera-r16"]["d_init"] == 0.1
    assert runs["lora-r4"]["alpha"] == 16 and runs["lora-r4"]["d_init"] is None
    assert runs["vera-r16"]["lr"] == DEFAULT_LR["vera"][0] and runs["lora-r4"]["lr"] == DEFAULT_LR["lora"][0]
    assert all(0 <= r["eval"]["accuracy"] <= 100 for r in runs.values())
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(sum(s["vera-r16"]) == pytest.approx(1, abs=1e-3) for s in samples)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == events and logged[-1]["type"] == "compare_done"
    assert {e["method"] for e in logged if e["type"] == "step"} == {"head", "vera", "lora"}
    assert [e["run"] for e in logged if e["type"] == "run_done"] == list(runs)
    assert {p.name for p in tmp_path.glob("*.png")} == {"loss.png", "params.png", "memory.png", "metric.png"}
    assert "isolated" not in data["memory_mode"] and "in-process" in (tmp_path / "report.md").read_text()
    loaded, histories = load_run(tmp_path)
    assert loaded == data and len([e for e in histories["lora-r4"] if e["type"] == "step"]) == 3
    assert report.run("vera-r16").trainable_params == 64 * 3


def test_generation_comparison_scores_bleu_against_all_references(tokenizer, tmp_path):
    llama = tiny_llama(tokenizer=tokenizer)
    vera = [VeraConfig(r=8, d_init=0.1), VeraConfig(r=8, d_init=1.0)]
    compare((llama, tokenizer), colours(), methods=("base", "vera"), vera=vera, out_dir=tmp_path,
            train=TrainConfig(steps=2, batch_size=2, max_length=24), eval_generate=2, samples=2)
    data = check_contract(tmp_path, "causal-lm")
    assert [r["name"] for r in data["runs"]] == ["base", "vera-r8-d0.1", "vera-r8-d1"]
    assert all(0 <= r["eval"]["bleu"] <= 100 and 0 <= r["eval"]["rougeL"] <= 100 for r in data["runs"])
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples[1]["reference"] == ["item 7 is green.", "it is green."]
    assert all(isinstance(s["vera-r8-d1"], str) for s in samples) and all(r["head_params"] is None for r in data["runs"])


def test_stop_mid_comparison_leaves_a_consistent_directory(tokenizer, tmp_path):
    stop = threading.Event()

    def on_event(event):
        if event["type"] == "step" and event["run"] == "vera-r16" and event["step"] == 2:
            stop.set()

    bert = tiny_bert(tokenizer=tokenizer, num_labels=2)
    report = compare((bert, tokenizer), sentiment(), methods=("base", "vera", "lora"),
                     vera=VeraConfig(r=16), out_dir=tmp_path, on_event=on_event, stop=stop,
                     train=TrainConfig(steps=50, batch_size=4, max_length=16))
    data = check_contract(tmp_path, "classification")
    assert report.stopped and data["stopped"]
    assert [r["name"] for r in data["runs"]] == ["base", "vera-r16"]  # LoRA was skipped
    vera = data["runs"][1]
    assert vera["stopped"] and vera["steps"] == 2 and vera["eval"] is None
    assert not (tmp_path / "adapters" / "lora-r8").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["type"] == "stopped"
    assert "stopped early" in (tmp_path / "report.md").read_text()


def test_stopped_comparison_resumes_onto_the_uninterrupted_curve(tokenizer, tmp_path):
    """A stop saves the adapter and a checkpoint; exists="resume" keeps the finished runs and continues the stopped
    one onto exactly the loss curve of a run that was never interrupted."""
    settings = dict(methods=("base", "vera", "lora"), vera=VeraConfig(r=16), lora=LoraConfig(r=4),
                    train=TrainConfig(steps=6, batch_size=4, max_length=16), samples=2)
    pair = (tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer)
    whole = compare(pair, sentiment(), out_dir=tmp_path / "whole", **settings)

    stop = threading.Event()

    def stop_at_step_3(event):
        if event["type"] == "step" and event["run"] == "vera-r16" and event["step"] == 3:
            stop.set()

    cut = tmp_path / "cut"
    first = compare(pair, sentiment(), out_dir=cut, on_event=stop_at_step_3, stop=stop, **settings)
    assert first.stopped and first.run("vera-r16").steps == 3
    assert (cut / "train" / "vera-r16" / "checkpoints" / "step-000003").is_dir()
    assert (cut / "adapters" / "vera-r16" / "adapter.safetensors").is_file()

    resumed = compare(pair, sentiment(), out_dir=cut, exists="resume", **settings)
    assert not resumed.stopped and [r.name for r in resumed.runs] == ["base", "vera-r16", "lora-r4"]
    for name in ("vera-r16", "lora-r4"):
        losses = [[e["loss"] for e in report.run(name).history if e["type"] == "step"] for report in (whole, resumed)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-6) and len(losses[1]) == 6
        assert resumed.run(name).eval["loss"] == pytest.approx(whole.run(name).eval["loss"], abs=1e-6)
    assert resumed.run("base").eval == whole.run("base").eval  # kept from the first call, not rerun
    events = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    ends = [e["type"] for e in events if "run_dir" in e]  # one closing event per compare call
    assert ends == ["stopped", "compare_done"]
    samples = [json.loads(line) for line in (cut / "samples.jsonl").read_text().splitlines()]
    assert all({"base", "vera-r16", "lora-r4"} <= set(row) for row in samples)


def test_a_run_directory_is_refused_overwritten_or_resumed_only_on_purpose(tokenizer, tmp_path):
    pair = (tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer)
    quick = dict(methods=("vera",), vera=VeraConfig(r=8), train=TrainConfig(steps=2, batch_size=4, max_length=16),
                 samples=0, out_dir=tmp_path)
    compare(pair, sentiment(), **quick)
    before = {name: (tmp_path / name).read_bytes() for name in ("report.json", "config.json", "metrics.jsonl")}
    for bad in (VeraConfig(r=8, target_modules=["nope"]), VeraConfig(r=8)):  # a failing run and a good one
        with pytest.raises(ValueError, match="already holds a run; choose another output directory"):
            compare(pair, sentiment(), **{**quick, "vera": bad})
    assert before == {name: (tmp_path / name).read_bytes() for name in before}, "a refused run changed the directory"

    (tmp_path / "notes.txt").write_text("mine")
    report = compare(pair, sentiment(), **{**quick, "vera": VeraConfig(r=4)}, exists="overwrite")
    assert [r.name for r in report.runs] == ["vera-r4"] and (tmp_path / "notes.txt").read_text() == "mine"
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {e["run"] for e in events if e["type"] == "step"} == {"vera-r4"}, "metrics.jsonl mixes two runs"
    with pytest.raises(ValueError, match="holds no run to resume"):
        compare(pair, sentiment(), **{**quick, "out_dir": tmp_path / "empty"}, exists="resume")


def test_a_failed_comparison_ends_its_log_with_an_error(tokenizer, tmp_path):
    pair = (tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer)
    with pytest.raises(ValueError, match="no module matches target_modules"):
        compare(pair, sentiment(), methods=("base", "vera"), vera=VeraConfig(r=8, target_modules=["nope"]),
                train=TrainConfig(steps=2, batch_size=4, max_length=16), out_dir=tmp_path)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["type"] == "error" and "no module matches" in last["message"] and last["runs"] == ["base"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["stopped"] and "no module matches" in report["error"] and len(report["runs"]) == 1


def test_run_request_plans_names_and_refuses_bad_plans(tokenizer):
    rows = [{"prompt": "say hi", "response": "hi"}] * 4
    causal = TextDataset("tiny", "causal-lm", rows, rows, rows, None, "test")
    pair = (tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer)
    request = RunRequest(pair, causal, "base,vera,lora,full", [VeraConfig(r=256), VeraConfig(r=1024)], LoraConfig(r=8))
    assert [s.name for s in request.plan()] == ["base", "vera-r256", "vera-r1024", "lora-r8", "full"]
    with pytest.raises(ValueError, match="needs a classification data set"):
        RunRequest(pair, causal, ["head"])
    with pytest.raises(ValueError, match="unknown methods"):
        RunRequest(pair, sentiment(), ["dora"])
    with pytest.raises(ValueError, match="duplicate settings: VeraConfig"):
        RunRequest(pair, sentiment(), ["vera"], [VeraConfig(r=8), VeraConfig(r=8)])
    with pytest.raises(ValueError, match="share a name"):  # different settings that names do not show
        RunRequest(pair, sentiment(), ["vera"], [VeraConfig(r=8), VeraConfig(r=8, dropout=0.1)])
    with pytest.raises(ValueError, match="the lora learning rate must be a positive number, got nan"):
        RunRequest(pair, sentiment(), ["lora"], lrs={"lora": float("nan")})
    with pytest.raises(ValueError, match="isolate=True loads the model in each process"):
        RunRequest(pair, sentiment(), ["lora"], isolate=True)


def test_estimate_memory_parts_are_those_of_a_fake_training_step():
    vera, lora = VeraConfig(r=256), LoraConfig(r=8)
    v = estimate_memory("minilm-l6", vera, batch_size=8, seq_len=64)
    lo = estimate_memory("minilm-l6", lora, batch_size=8, seq_len=64)
    assert v["total"] == sum(v[k] for k in ("weights", "adapter", "gradients", "optimizer", "activations",
                                            "temporaries"))
    # all-MiniLM-L6-v2's 22.7M fp32 parameters, the 2-label classifier (and pooler) and two int64 position buffers
    assert v["weights"] == lo["weights"] == 4 * (22_713_216 + 384 * 2 + 2) + 2 * 8 * 512
    assert v["adapter"] == 4 * 7_680 + 4 * 256 * (384 + 384)  # vectors + the shared A and B, counted once
    # AdamW's two moments and its step counter per trainable tensor: there from the second step on
    assert v["optimizer"] == 8 * estimate_parameters(_minilm(), vera)["trainable"] + 4 * 12 * 2
    assert lo["optimizer"] == 8 * 73_728 + 4 * 12 * 2
    assert v["activations"] > 8 * 64 * 384 * 4 * 6  # at least one hidden state per layer is kept for backward
    half = estimate_memory("minilm-l6", lora, 8, 64, dtype="bfloat16")
    assert half["weights"] == (v["weights"] - 2 * 8 * 512) // 2 + 2 * 8 * 512
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the fake step runs unquantized, the weights are bitsandbytes'
        four = estimate_memory("minilm-l6", lora, 8, 64, quantization="4bit")
    assert four["weights"] < 0.6 * v["weights"]  # Linear weights inside the layers at 4 bits; embeddings stay fp32
    assert {k: four[k] for k in ("adapter", "gradients", "optimizer", "activations")} == {
        k: lo[k] for k in ("adapter", "gradients", "optimizer", "activations")}
    assert four["total"] - lo["total"] == four["weights"] - lo["weights"]
    base = estimate_memory("minilm-l6", None, 8, 64)
    assert base["gradients"] == base["optimizer"] == base["activations"] == 0
    with pytest.raises(ValueError, match="dtype must be one of"):
        estimate_memory("minilm-l6", lora, 8, 64, dtype="float8")


def test_estimate_memory_falls_back_to_the_formula_naming_the_reason(monkeypatch):
    import vera_core.lab.memory as memory

    def broken(*args):
        raise RuntimeError("data-dependent shape in forward")

    monkeypatch.setattr(memory, "fake_step_estimate", broken)
    with pytest.warns(UserWarning, match="formula .*RuntimeError: data-dependent shape in forward"):
        fallback = estimate_memory("minilm-l6", LoraConfig(r=8), 8, 64)
    assert fallback["optimizer"] == 8 * 73_728 and fallback["temporaries"] == 0


def _minilm():
    from vera_core.lab.calculator import known_model

    return known_model("minilm-l6").config


def test_params_figure_draws_when_nothing_was_trained():
    import io

    from vera_core.lab.plots import params_figure

    fig = params_figure([{"name": "base", "trainable_params": 0}])  # a comparison stopped after "base"
    assert fig.axes[0].get_yscale() == "linear" and len(fig.axes[0].patches) == 0
    fig.savefig(io.BytesIO(), format="png")
    fig = params_figure([{"name": "base", "trainable_params": 0}, {"name": "vera-r8", "trainable_params": 80}])
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].patches) == 1


def test_tradeoff_figure_draws_one_line_per_method_sorted_by_size():
    from vera_core.lab.plots import tradeoff_figure

    rows = [{"method": "vera", "r": 1024, "trainable_params": 16_896, "accuracy": 81.0},
            {"method": "lora", "r": 8, "trainable_params": 73_728, "accuracy": 80.0},
            {"method": "vera", "r": 256, "trainable_params": 7_680, "accuracy": 79.5},
            {"method": "head", "r": None, "trainable_params": 0, "accuracy": 52.0}]
    ax = tradeoff_figure(rows).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"vera", "lora", "head (baseline)"} and ax.get_xscale() == "log"
    assert list(lines["head (baseline)"].get_ydata()) == [52.0, 52.0]
    assert list(lines["vera"].get_xdata()) == [7_680, 16_896] and list(lines["vera"].get_ydata()) == [79.5, 81.0]
    assert sorted(t.get_text() for t in ax.texts) == ["r=1024", "r=256", "r=8"]
