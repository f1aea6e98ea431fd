"""The training loop on tiny random models: learning, repeatability, exact resume, stop, errors, events, DDP."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import BAD, GOOD, LLAMA_ALL, causal_data, tiny_bert, tiny_llama, trainable, vera_llama

from vera_core.adapters.config import LoraConfig, VeraConfig
from vera_core.lab.data import TextDataset
from vera_core.adapters.inject import add_adapter
from vera_core.adapters.io import load_adapter
from vera_core.lab.evaluate import evaluate
from vera_core.lab.train import DEFAULT_LR, TrainConfig, default_lr, detect_method, train


def classification_data() -> TextDataset:
    rows = [{"text": t, "label": 1} for t in GOOD] + [{"text": t, "label": 0} for t in BAD]
    rows = rows[::2] + rows[1::2]  # interleave so both splits hold both labels
    return TextDataset("tiny-sentiment", "classification", train=rows[:8], validation=rows[8:], test=[],
                       labels=["negative", "positive"], source="test")


def step_losses(result) -> list[float]:
    return [e["loss"] for e in result.history if e["type"] == "step"]


def test_vera_loss_decreases_and_eval_improves(tokenizer):
    model, data = vera_llama(tokenizer), causal_data()
    config = TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup_ratio=0.0, schedule="constant")
    before = evaluate(model, tokenizer, data, config)
    result = train(model, tokenizer, data, config)
    losses = step_losses(result)
    assert len(losses) == 20 and result.steps_done == 20 and not result.stopped
    # A random 32-wide model over a 30k vocabulary moves slowly; 20 VeRA steps take ~0.1 nat off (0.12 measured).
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert result.eval["eval_loss"] < before["eval_loss"]
    assert result.final_train_loss == pytest.approx(sum(losses[-5:]) / 5)
    assert result.method == "vera" and result.device == "cpu" and result.dtype == "float32"
    # The tracker's peak covers the model's own tensors (its weights: a 30k-row embedding, twice with the LM head)
    # plus the step's gradients, optimizer state and activations, and is the sum of its breakdown. The sampled
    # process RSS holds all of that and torch itself (~600 MiB), so it is larger.
    weights = sum(p.nbytes for p in {p.untyped_storage()._cdata: p for p in model.parameters()}.values())
    parts = result.memory_breakdown
    assert result.peak_memory_kind == "tensors" and parts["total"] == result.peak_memory_bytes
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert parts["weights"] + parts["adapter"] >= weights and parts["weights"] <= weights + 2**20  # + small buffers
    assert weights < result.peak_memory_bytes < result.peak_rss_bytes and result.cuda_max_allocated_bytes is None
    assert result.step_time_s > 0 and result.tokens_per_s > 0 and result.truncated == 0


def test_same_seed_same_run(tokenizer):
    config = TrainConfig(steps=5, batch_size=4, seed=3)
    runs = []
    for _ in range(2):
        model = vera_llama(tokenizer, dropout=0.1)  # dropout: the torch RNG must be seeded too
        runs.append((step_losses(train(model, tokenizer, causal_data(), config)), trainable(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    other = vera_llama(tokenizer, dropout=0.1)
    assert step_losses(train(other, tokenizer, causal_data(), TrainConfig(steps=5, batch_size=4, seed=4))) != runs[0][0]


RESUMABLE = dict(steps=6, batch_size=4, grad_accum=2, checkpoint_every=3, lr=1e-2, warmup_ratio=0.2)


@pytest.fixture(scope="module")
def straight_run(tokenizer, tmp_path_factory):
    """Six steps in one go, with a checkpoint at step 3 (dropout on, so RNG state matters on resume)."""
    out = tmp_path_factory.mktemp("straight")
    model = vera_llama(tokenizer, dropout=0.1)
    result = train(model, tokenizer, causal_data(), TrainConfig(**RESUMABLE), out_dir=out)
    return out, result, trainable(model)


def test_resume_continues_the_same_curve(tokenizer, straight_run, tmp_path):
    out, straight, final = straight_run
    assert [Path(c).name for c in straight.checkpoints] == ["step-000003", "step-000006"]
    model = vera_llama(tokenizer, dropout=0.1)
    with torch.no_grad():  # scramble the adapter: resuming must restore it from the checkpoint
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    events = []
    resumed = train(model, tokenizer, causal_data(), TrainConfig(**RESUMABLE), out_dir=tmp_path,
                    resume_from=out / "checkpoints" / "step-000003", on_event=events.append)
    assert events[0]["type"] == "start" and events[0]["step"] == 3
    assert step_losses(resumed) == step_losses(straight)  # steps 1-3 from the checkpoint, 4-6 recomputed
    assert [e["step"] for e in events if e["type"] == "step"] == [4, 5, 6]
    got = trainable(model)
    assert all(torch.equal(got[n], final[n]) for n in final)


def test_resume_from_another_configuration_is_refused(tokenizer, straight_run, tmp_path):
    out, _, _ = straight_run
    other = TrainConfig(**{**RESUMABLE, "lr": 5e-3, "batch_size": 2})
    mismatch = r"another configuration.*batch_size: checkpoint 4, now 2.*lr: checkpoint 0\.01, now 0\.005"
    with pytest.raises(ValueError, match=mismatch):
        train(vera_llama(tokenizer, dropout=0.1), tokenizer, causal_data(), other, out_dir=tmp_path, resume_from=out)
    with pytest.raises(ValueError, match=r"r: checkpoint 16, now 32"):
        train(vera_llama(tokenizer, r=32, dropout=0.1), tokenizer, causal_data(), TrainConfig(**RESUMABLE),
              out_dir=tmp_path, resume_from=out)
    lora = add_adapter(tiny_llama(tokenizer=tokenizer), LoraConfig(r=4, target_modules=LLAMA_ALL))
    with pytest.raises(ValueError, match=r"method: checkpoint 'vera', now 'lora'"):
        train(lora, tokenizer, causal_data(), TrainConfig(**{**RESUMABLE, "lr": 1e-2}), out_dir=tmp_path,
              resume_from=out)


def test_stop_takes_effect_within_a_step_and_keeps_the_adapter(tokenizer, tmp_path):
    model, data, stop, events = vera_llama(tokenizer), causal_data(), threading.Event(), []

    def on_event(event):
        events.append(event)
        if event["type"] == "step" and event["step"] == 2:
            stop.set()

    result = train(model, tokenizer, data, TrainConfig(steps=50, batch_size=4, grad_accum=2), out_dir=tmp_path,
                   on_event=on_event, stop=stop)
    assert result.stopped and result.steps_done == 2
    assert events[-1]["type"] == "stopped" and events[-1]["step"] == 2
    checkpoint = tmp_path / "checkpoints" / "step-000002"  # a stopped run can be resumed ...
    from_checkpoint = load_adapter(tiny_llama(tokenizer=tokenizer), checkpoint)  # ... and it is an adapter too
    reloaded = load_adapter(tiny_llama(tokenizer=tokenizer), result.adapter_dir)
    ids = torch.tensor([[101, 2054, 3609, 2003, 8875, 1017, 102]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
        assert torch.allclose(from_checkpoint(ids).logits, model(ids).logits, atol=1e-5)
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "vera_lambda_b" in n)


def test_non_finite_loss_names_the_step(tokenizer):
    model = vera_llama(tokenizer)
    events = []
    with pytest.raises(FloatingPointError, match=r"loss became (nan|inf) at step \d+"):
        train(model, tokenizer, causal_data(), TrainConfig(steps=10, batch_size=4, lr=1e30, warmup_ratio=0.0,
                                                           max_grad_norm=None), on_event=events.append)
    assert events[-1]["type"] == "error" and "FloatingPointError" in events[-1]["message"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be a positive integer or None, got 0"),
    (dict(steps=2.5), "steps must be a positive integer or None, got 2.5"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(max_length=-8), "max_length must be a positive integer, got -8"),
    (dict(lr=0.0), "lr must be a positive number or None, got 0.0"),
    (dict(lr=-1e-3), "lr must be a positive number or None, got -0.001"),
    (dict(head_lr=float("nan")), "head_lr must be a positive number or None, got nan"),
    (dict(steps=None), "set exactly one of steps or epochs"),
    (dict(steps=10, epochs=1), "set exactly one of steps or epochs"),
    (dict(steps=None, epochs=-1), "epochs must be a positive number or None, got -1"),
    (dict(schedule="exponential"), "schedule must be one of"),
    (dict(warmup_ratio=1.0), r"warmup_ratio must be in \[0, 1\), got 1.0"),
    (dict(grad_accum=0), "grad_accum must be a positive integer, got 0"),
    (dict(bf16="yes"), "bf16 must be 'auto', True or False, got 'yes'"),
    (dict(device="gpu"), "device must be 'auto' or a torch device"),
])
def test_bad_config_is_refused_with_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_unwritable_out_dir_fails_before_training(tokenizer, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    events = []
    with pytest.raises(ValueError, match="is not a writable directory"):
        train(vera_llama(tokenizer), tokenizer, causal_data(), TrainConfig(steps=2), out_dir=blocker / "x",
              on_event=events.append)
    assert events == []
    with pytest.raises(ValueError, match="checkpoint_every needs out_dir"):
        train(vera_llama(tokenizer), tokenizer, causal_data(), TrainConfig(steps=2, checkpoint_every=1))


def test_events_classification_with_head(tokenizer):
    model = add_adapter(tiny_bert(tokenizer=tokenizer, num_labels=2),
                        VeraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    events = []
    config = TrainConfig(steps=4, batch_size=4, eval_every=2, schedule="constant", warmup_ratio=0.0)
    result = train(model, tokenizer, classification_data(), config, run_name="bert-vera", on_event=events.append)
    json.dumps(events)  # plain, serialisable values only
    assert [e["type"] for e in events] == ["start", "step", "step", "eval", "step", "step", "eval", "done"]
    assert all(e["run"] == "bert-vera" and e["total"] == 4 for e in events)
    steps = [e for e in events if e["type"] == "step"]
    for e in steps:
        assert {"loss", "lr", "head_lr", "tokens_per_s", "eta_s", "elapsed_s", "epoch", "grad_norm"} <= set(e)
        assert (e["lr"], e["head_lr"]) == default_lr("vera") == (4e-2, 1e-2)  # two groups, each its own rate
    assert steps[-1]["eta_s"] == 0 and steps[0]["epoch"] == 0.5  # 8 rows / batch 4: two steps per epoch
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(0 <= e["eval_accuracy"] <= 100 and e["eval_loss"] > 0 for e in evals)
    assert result.eval == {"eval_loss": evals[-1]["eval_loss"], "eval_accuracy": evals[-1]["eval_accuracy"]}


def test_epoch_budget_and_schedule(tokenizer):
    events = []
    config = TrainConfig(steps=None, epochs=2, batch_size=4, lr=1e-2, warmup_ratio=0.2)  # 12 rows -> 3 steps/epoch
    result = train(vera_llama(tokenizer), tokenizer, causal_data(), config, on_event=events.append)
    rates = [e["lr"] for e in events if e["type"] == "step"]
    assert result.steps_done == 6 and len(rates) == 6
    assert rates[0] == pytest.approx(1e-2 / 2)  # one warm-up step (int(0.2 * 6)) at half the rate
    assert rates[1] == pytest.approx(1e-2)
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))  # then linear decay


def test_gradient_checkpointing_gives_the_same_losses(tokenizer):
    config = TrainConfig(steps=3, batch_size=4)
    plain = step_losses(train(vera_llama(tokenizer), tokenizer, causal_data(), config))
    model = vera_llama(tokenizer)
    checkpointed = step_losses(train(model, tokenizer, causal_data(), TrainConfig(steps=3, batch_size=4,
                                                                                  grad_checkpointing=True)))
    assert checkpointed == pytest.approx(plain, rel=1e-5)
    assert not model.is_activation_checkpointing  # the model is left as it was found


def test_detect_method_and_defaults(tokenizer):
    assert detect_method(vera_llama(tokenizer)) == "vera"
    assert detect_method(add_adapter(tiny_llama(tokenizer=tokenizer), LoraConfig(target_modules=["q_proj"]))) == "lora"
    bert = tiny_bert(tokenizer=tokenizer, num_labels=2)
    assert detect_method(bert) == "full" and default_lr("full") == (2e-5, 2e-5)
    for name, p in bert.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    assert detect_method(bert) == "head"
    for p in bert.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        detect_method(bert)


@pytest.mark.integration  # torchrun and two worker processes, each importing torch
def test_ddp_two_processes_end_with_identical_vectors(tokenizer, tmp_path):
    """Two CPU processes (gloo, accelerate inside): the ranks agree, the vectors moved, and DDP with batch 2 on 2 ranks
    matches one process with batch 2 and grad_accum 2 (the same rows per step).

    torchrun starts them: `accelerate launch --cpu` runs multi-process CPU jobs only through MPI, absent here.
    """
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path)]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        output, _ = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and both workers, so no rank outlives the test
        output, _ = launcher.communicate()
    assert launcher.returncode == 0, output[-3000:]
    from safetensors.torch import load_file

    rank0, rank1, init = (load_file(tmp_path / f"{k}.safetensors") for k in ("rank0", "rank1", "init"))
    assert set(rank0) == set(rank1) == set(init) and any("vera_lambda_d" in n for n in rank0)
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    assert all(not torch.equal(rank0[n], init[n]) for n in rank0)
    assert (tmp_path / "out" / "checkpoints" / "step-000002").is_dir() and (tmp_path / "out" / "adapter").is_dir()

    model = vera_llama(tokenizer)
    single = train(model, tokenizer, causal_data(), TrainConfig(steps=3, batch_size=2, grad_accum=2))
    ddp_losses = json.loads((tmp_path / "losses0.json").read_text())
    assert ddp_losses == pytest.approx(step_losses(single), rel=1e-5)
    got = trainable(model)
    assert all(torch.allclose(got[n], rank0[n], atol=1e-6) for n in got)


@pytest.mark.integration
def test_smollm2_vera_all_projections_lowers_eval_loss():
    from vera_core.lab.data import load_dataset
    from vera_core.lab.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    add_adapter(model, VeraConfig(r=256, target_modules=LLAMA_ALL))
    data = load_dataset("synthetic-restaurants", max_rows=40)
    # eval_batches=None: evaluate() always reads the whole split, so the in-training check must read it too
    config = TrainConfig(steps=6, batch_size=4, max_length=128, eval_every=6, eval_batches=None, warmup_ratio=0.0)
    before = evaluate(model, tok, data, config)
    result = train(model, tok, data, config)
    print(f"\nSmolLM2 VeRA r=256: {result.step_time_s:.2f} s/step, {result.tokens_per_s:.0f} tok/s, "
          f"eval loss {before['eval_loss']:.3f} -> {result.eval['eval_loss']:.3f}, "
          f"peak RSS delta {result.peak_memory_bytes / 2**20:.0f} MiB")
    assert result.steps_done == 6
    assert result.eval["eval_loss"] < before["eval_loss"]


def test_warns_when_most_rows_are_cut(tokenizer):
    data = causal_data()  # rows of ~15 tokens: max_length 8 cuts every one of the 12
    with pytest.warns(UserWarning, match="12 of 12 training rows are longer than max_length=8 tokens"):
        result = train(vera_llama(tokenizer), tokenizer, data, TrainConfig(steps=1, batch_size=4, max_length=8))
    assert result.truncated == 12


def test_warns_when_an_adapter_trains_under_a_frozen_classifier_head(tokenizer, recwarn):
    config = TrainConfig(steps=1, batch_size=4)
    frozen = add_adapter(tiny_bert(tokenizer=tokenizer, num_labels=2), VeraConfig(r=8, target_modules=["query"]))
    with pytest.warns(UserWarning, match=r"the classifier head \(classifier\) is frozen .* "
                                         r"modules_to_save=\['classifier'\]"):
        train(frozen, tokenizer, classification_data(), config)
    recwarn.clear()
    trained = add_adapter(tiny_bert(tokenizer=tokenizer, num_labels=2),
                          VeraConfig(r=8, target_modules=["query"], modules_to_save=["classifier"]))
    train(trained, tokenizer, classification_data(), config)
    assert not [w for w in recwarn if "classifier head" in str(w.message)]


def test_evaluate_scores_the_whole_split_whatever_eval_batches_says(tokenizer):
    """eval_batches caps the validation checks during training; a reported score always reads the whole split."""
    model, data = tiny_bert(tokenizer=tokenizer, num_labels=2), classification_data()
    rows = data.train  # 8 rows: 4 batches of 2
    data = TextDataset(data.name, data.task, train=rows, validation=rows, test=rows, labels=data.labels, source="test")
    whole = evaluate(model, tokenizer, data, TrainConfig(batch_size=2), split="test")
    capped = evaluate(model, tokenizer, data, TrainConfig(batch_size=2, eval_batches=1), split="test")
    assert capped == whole
    first = evaluate(model, tokenizer, TextDataset(data.name, data.task, train=rows, validation=rows, test=rows[:2],
                                                   labels=data.labels, source="test"), split="test")
    assert first != whole  # (the first batch alone scores differently: the cap would have changed the result)


def test_the_default_rates_are_the_tuned_records_geometric_mean():
    """DEFAULT_LR's VeRA and LoRA rates: the geometric mean of quality.json's tuned rates within each task, then
    across tasks, to one significant figure (the comment in lab/train.py says so)."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    quality = json.loads((results / "quality.json").read_text())

    def geometric_mean(values):
        return math.exp(sum(map(math.log, values)) / len(values))

    for method in ("vera", "lora"):
        per_task = [geometric_mean([r["tuned_lr"] for r in rows if r["method"] == method and r.get("tuned_lr")])
                    for rows in quality["tasks"].values()]
        assert len(per_task) == 3
        mean = geometric_mean(per_task)
        assert DEFAULT_LR[method][0] == float(f"{mean:.0e}"), (method, mean)
        assert DEFAULT_LR[method][1] == DEFAULT_LR["head"][1]  # one head rate for every method


def test_the_default_head_rate_is_the_head_rate_records_worst_case_closest_to_each_models_best():
    """DEFAULT_LR's head rate: of benchmarks/head_rate.py's decade grid, the rate whose validation loss, divided by
    each model's own best on the grid, is lowest in the worst case over the two models (lab/train.py says so)."""
    rows = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "head_rate.json")
                      .read_text())["rows"]
    models, rates = {r["model"] for r in rows}, {r["rate"] for r in rows}
    assert models == {"minilm-l6", "smollm2-135m-instruct"} and len(rows) == len(models) * len(rates) >= 6
    best = {m: min(r["val_loss"] for r in rows if r["model"] == m) for m in models}
    worst = {rate: max(r["val_loss"] / best[r["model"]] for r in rows if r["rate"] == rate) for rate in rates}
    assert DEFAULT_LR["head"] == (min(worst, key=worst.get),) * 2
