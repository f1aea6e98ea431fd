"""The tensor memory tracker, checked against hand counts and torch's profiler; the trainer's peaks do not depend
on run order or learning rate; the fake-step estimate predicts a real step."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_ALL, causal_data, tiny_bert, tiny_llama
from torch import nn

from vera_core.lab.compare import compare
from vera_core.lab.config import TrainConfig
from vera_core.adapters.config import LoraConfig, VeraConfig
from vera_core.adapters.inject import add_adapter
from vera_core.lab.memory import estimate_memory, largest_batch
from vera_core.lab.memtrack import MemoryTracker
from vera_core.lab.report import fold_policy_line, gradients_note, memory_differences, padding_note
from vera_core.lab.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts' shared harness is a sibling
from memory import profiled_peak  # noqa: E402  the one reading of the profiler's events, benchmarks/memory.py's


def _step(model, optimizer, batch) -> torch.Tensor:
    loss = model(**batch).loss if isinstance(batch, dict) else model(batch).pow(2).sum()
    loss.backward()
    optimizer.step()
    return loss


def test_exact_bytes_of_weights_gradients_and_adamw_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW(model[2].parameters())
    x = torch.randn(5, 8)  # made before tracking: not the step's
    tracker = MemoryTracker(model, optimizer)
    with tracker:
        loss = _step(model, optimizer, x)
    weights = 4 * (8 * 16 + 16 + 16 * 4 + 4)  # 848
    trainable = 4 * (16 * 4 + 4)  # 272
    now = tracker.current()
    assert now == {"weights": weights, "adapter": 0, "gradients": trainable, "optimizer": 2 * trainable + 2 * 4,
                   "activations": 0, "temporaries": 4, "total": weights + 3 * trainable + 8 + 4}  # + the loss
    # The peak is inside AdamW's update of the (16, 4) weight: its denominator sqrt(v) / c (two 256-byte tensors)
    # beside the loss, the gradients and both moments (the 4-byte step counters are made outside the dispatcher).
    assert tracker.breakdown() == {"weights": weights, "adapter": 0, "gradients": trainable,
                                   "optimizer": 2 * trainable, "activations": 0, "temporaries": 4 + 2 * 256,
                                   "total": weights + 3 * trainable + 4 + 512}
    del loss
    optimizer.zero_grad(set_to_none=True)
    assert tracker.current()["gradients"] == 0 and tracker.current()["temporaries"] == 0  # frees are seen


def test_saved_activations_are_labelled_and_freed_by_backward():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    tracker = MemoryTracker(model)
    with tracker:
        loss = model(torch.randn(5, 8)).pow(2).sum()
        # Saved for backward: the (5, 8) input (made inside the region) by Linear 1, ReLU's (5, 16) output, which
        # Linear 2 saves too (one storage, counted once), and the (5, 4) input of pow.
        assert tracker.current()["activations"] == 4 * (5 * 8 + 5 * 16 + 5 * 4)
        loss.backward()
        assert tracker.current()["activations"] == 0


def test_vera_shared_projections_count_once():
    model = add_adapter(tiny_llama(), VeraConfig(r=16, target_modules=LLAMA_ALL))
    tracker = MemoryTracker(model)
    with tracker:
        pass
    projections = model.base_model_projections if hasattr(model, "base_model_projections") else None
    vera = [m for m in model.modules() if type(m).__name__ == "VeraProjections"]
    assert len(vera) == 1 and projections is None
    vectors = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    assert tracker.current()["adapter"] == vectors + vera[0].A.nbytes + vera[0].B.nbytes
    frozen = {p.untyped_storage()._cdata: p.nbytes for p in model.parameters() if not p.requires_grad}
    buffers = {b.untyped_storage()._cdata: b.nbytes for m in model.modules() if m not in vera
               for b in m.buffers(recurse=False)}
    assert tracker.current()["weights"] == sum(frozen.values()) + sum(buffers.values())  # tied embeddings once


@pytest.mark.parametrize("adapter", [VeraConfig(r=16, target_modules=LLAMA_ALL), LoraConfig(r=4), "full"])
def test_fake_step_estimate_equals_the_tracked_real_step(adapter):
    """Same tracker, real tensors vs fake ones: the prediction has the measured peak and breakdown."""
    model = tiny_llama()
    predicted = estimate_memory(model, adapter, batch_size=4, seq_len=16, max_grad_norm=None)
    model = add_adapter(model, adapter) if adapter != "full" else model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.train()
    tracker = MemoryTracker(model, optimizer)
    for _ in range(2):  # the second step holds AdamW's state from the start, as every later step does
        with tracker:
            _step(model, optimizer, batch)
            optimizer.zero_grad(set_to_none=True)
    measured = tracker.breakdown()
    assert predicted["total"] == pytest.approx(measured["total"], rel=0.01)
    for key in ("weights", "adapter", "optimizer"):
        assert predicted[key] == measured[key], key


def test_a_head_copied_under_fake_tensors_stays_in_their_one_mode():
    """deepcopy would copy a fake tensor's FakeTensorMode with it: a second mode whose tensors the first took for
    real ones corrupted the heap within tens of estimates of a classifier with a head copy."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        model = add_adapter(tiny_bert(), VeraConfig(r=8, modules_to_save=["classifier"]))
    modes = {id(t.fake_mode) for t in [*model.parameters(), *model.buffers()]}
    assert modes == {id(mode)}
    head = model.classifier
    assert head.modules_to_save["default"].weight is not head.original_module.weight  # a copy, not the same tensor


def _tiny_pair(tokenizer):
    return tiny_llama(tokenizer=tokenizer), tokenizer


def test_peaks_do_not_depend_on_run_order(tokenizer, tmp_path):
    config = TrainConfig(steps=3, batch_size=4, max_length=32)
    runs = {}
    for order in (("vera", "lora"), ("lora", "vera")):
        report = compare(_tiny_pair(tokenizer), causal_data(), methods=order, vera=VeraConfig(r=16),
                         lora=LoraConfig(r=4), train=config, out_dir=tmp_path / "-".join(order), eval_generate=0,
                         samples=0, progress=False)
        runs[order] = {r.name: r for r in report.runs}
    for name in ("vera-r16", "lora-r4"):
        first, second = runs[("vera", "lora")][name], runs[("lora", "vera")][name]
        assert first.peak_memory_bytes == pytest.approx(second.peak_memory_bytes, rel=0.01), name
        for key, value in first.memory_breakdown.items():
            assert value == pytest.approx(second.memory_breakdown[key], rel=0.01, abs=64), (name, key)


def test_prefer_is_validated_applied_and_recorded(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="prefer must be 'memory' .* or 'speed' .*got 'fast'"):
        TrainConfig(prefer="fast")
    runs = {}
    for prefer in ("memory", "speed"):
        config = TrainConfig(steps=2, batch_size=4, max_length=32, prefer=prefer)
        compare(_tiny_pair(tokenizer), causal_data(), methods=("vera",), vera=VeraConfig(r=16), train=config,
                out_dir=tmp_path / prefer, eval_generate=0, samples=0, progress=False)
        runs[prefer] = json.loads((tmp_path / prefer / "report.json").read_text())["runs"][0]
    memory, speed = runs["memory"], runs["speed"]
    assert (memory["prefer"], speed["prefer"]) == ("memory", "speed")
    folds = memory["fold_estimates"]
    assert folds == {**speed["fold_estimates"], "keep_saving": pytest.approx(speed["fold_estimates"]["keep_saving"])}
    # r=16 is far below the rank where keeping pays, so "memory" rebuilds; "speed" keeps W' in every folded layer
    assert memory["memory_estimate"]["total"] == folds["rebuild"] < folds["keep"] == speed["memory_estimate"]["total"]
    # the measured peaks differ by the kept W' as predicted (the data's rows are shorter than max_length, so both
    # peaks are below the predictions, which are upper bounds)
    assert speed["peak_memory_bytes"] - memory["peak_memory_bytes"] == folds["keep"] - folds["rebuild"] > 0
    assert memory["peak_memory_bytes"] < folds["rebuild"]
    assert "rebuilt its folded weights in backward to save memory" in (tmp_path / "memory" / "report.md").read_text()


def test_peak_does_not_depend_on_learning_rate(tokenizer):
    peaks = []
    for lr in (1e-2, 1e-3):
        model = add_adapter(tiny_llama(tokenizer=tokenizer), VeraConfig(r=16, target_modules=LLAMA_ALL))
        result = train(model, tokenizer, causal_data(), TrainConfig(steps=4, batch_size=4, lr=lr), progress=False)
        peaks.append(result.memory_breakdown)
    for key in peaks[0]:
        assert peaks[0][key] == pytest.approx(peaks[1][key], rel=0.01, abs=64), key


@pytest.mark.integration
def test_tracker_agrees_with_the_profiler_on_a_smollm2_step():
    from vera_core.lab.models import load_model

    model, _ = load_model("smollm2-135m-instruct")
    model = add_adapter(model, VeraConfig(r=256, target_modules=LLAMA_ALL))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.train()
    t0 = time.perf_counter()
    _step(model, optimizer, batch)  # untracked: allocates AdamW's state, and times a plain step
    optimizer.zero_grad(set_to_none=True)
    untracked_s = time.perf_counter() - t0
    tracker = MemoryTracker(model, optimizer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        with tracker:
            start = tracker.current()["total"]  # what the model and optimizer hold before the step
            _step(model, optimizer, batch)
            optimizer.zero_grad(set_to_none=True)
        tracked_s = time.perf_counter() - t0
    profiled, tracked = profiled_peak(prof), tracker.peak_bytes - start
    print(f"tracker {tracked / 2**20:.1f} MiB, profiler {profiled / 2**20:.1f} MiB over the step start; "
          f"step {untracked_s:.2f} s untracked, {tracked_s:.2f} s tracked (with the profiler)")
    assert tracked == pytest.approx(profiled, rel=0.05)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_estimates_match_the_recorded_measurements(quantization):
    """bitsandbytes' 8-bit matmul keeps each layer's input for backward and its layers never fold: the fake step
    models both, so the estimate meets benchmarks/results/memory.json's measured peaks (it missed 8-bit by 16-18%)."""
    from pathlib import Path

    record = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "memory.json").read_text())
    rows = [r for r in record["rows"] if r.get("quantization") == quantization]
    assert {r["method"] for r in rows} == {"vera", "lora"}
    for row in rows:
        adapter = (VeraConfig if row["method"] == "vera" else LoraConfig)(r=row["r"], target_modules=["query", "value"])
        predicted = estimate_memory(row["model"], adapter, row["batch_size"], row["seq_len"], quantization=quantization)
        assert predicted["total"] == pytest.approx(row["measured_peak_bytes"], rel=0.01), row["key"]


def test_largest_batch_is_the_largest_that_the_estimate_fits():
    lora = LoraConfig(r=8)
    budget = 512 * 2**20
    fit = largest_batch("minilm-l6", lora, budget, seq_len=64)
    assert fit.fake_steps >= 3  # two for the line, at least one to check its answer
    assert fit.breakdown == estimate_memory("minilm-l6", lora, fit.batch_size, 64)
    assert fit.breakdown["total"] <= budget < estimate_memory("minilm-l6", lora, fit.batch_size + 1, 64)["total"]
    assert fit.message == f"batch {fit.batch_size:,} of 64 tokens fits: {fit.breakdown['total'] / 2**20:,.1f} MiB predicted"

    tiny = largest_batch("minilm-l6", lora, 50 * 2**20, seq_len=64)  # the weights alone take 87 MiB
    assert tiny.batch_size == 0 and tiny.fake_steps == 1
    assert tiny.message.startswith("does not fit: one sequence of 64 tokens needs 98.2 MiB, more than the 50.0 MiB")
    with pytest.raises(ValueError, match="budget_bytes must be positive, got 0"):
        largest_batch("minilm-l6", lora, 0, seq_len=64)


def test_memory_differences_say_what_the_breakdowns_differ_in():
    mib = 2**20
    parts = lambda grads, opt, acts, total: {"weights": 0, "adapter": 0, "gradients": grads * mib,  # noqa: E731
                                             "optimizer": opt * mib, "activations": acts * mib, "temporaries": 0,
                                             "total": total * mib}
    report = {"seeds": [0, 1], "runs": [
        {"name": "vera-r256", "method": "vera", "r": 256, "seed": 0, "memory_breakdown": parts(0.25, 0.5, 30, 100)},
        {"name": "vera-r256-s1", "method": "vera", "r": 256, "seed": 1, "memory_breakdown": parts(0.25, 0.5, 30, 100)},
        {"name": "lora-r8", "method": "lora", "r": 8, "seed": 0, "memory_breakdown": parts(1, 2, 40, 125)},
        {"name": "base", "method": "base", "r": None, "seed": 0, "memory_breakdown": None}]}
    assert memory_differences(report) == [
        "vera-r256 vs lora-r8: peak 100.0 vs 125.0 MiB (0.80x). Gradients and optimizer state 0.75 vs 3.00 MiB "
        "(VeRA trains fewer parameters); activations saved for backward 30.0 vs 40.0 MiB (fewer for VeRA: its "
        "backward keeps r=256-wide A x per adapted input; "
        "LoRA's keeps each adapted layer's full-width input for A's gradient)."]
    # A run that kept its folded weights (its estimate is the "keep" one) says so; one that rebuilt them does not.
    folds = {"keep": 110 * mib, "rebuild": 100 * mib, "keep_saving": 0.2}
    kept = {**report["runs"][0], "fold_estimates": folds, "memory_estimate": {"total": 110 * mib}}
    rebuilt = {**kept, "memory_estimate": {"total": 100 * mib}}
    for run, phrase in ((kept, True), (rebuilt, False)):
        lines = memory_differences({**report, "runs": [run, *report["runs"][2:]]})
        assert ("plus each folded weight it keeps rather than rebuilds" in lines[-1]) is phrase


def test_fold_policy_line_says_which_way_ran_and_what_the_other_costs():
    mib = 2**20
    folds = {"keep": 1698 * mib, "rebuild": 1295 * mib, "keep_saving": 0.0175}
    run = {"name": "vera-r256", "method": "vera", "prefer": "memory", "fold_estimates": folds,
           "memory_estimate": {"total": 1295 * mib}}
    assert fold_policy_line(run) == (
        "vera-r256 rebuilt its folded weights in backward to save memory: 1,295 MiB predicted (keeping them: "
        "1,698 MiB, about 1.8% faster by the cost model in adapters/fused.py; choose that with prefer='speed').")
    speed = {**run, "prefer": "speed", "memory_estimate": {"total": 1698 * mib}}
    assert fold_policy_line(speed) == ("vera-r256 kept its folded weights for backward for speed, as asked "
                                       "(prefer='speed'): 1,698 MiB predicted (rebuilding them: 1,295 MiB, about "
                                       "1.8% slower).")
    kept = {**run, "fold_estimates": {**folds, "keep_saving": 0.175}, "memory_estimate": {"total": 1698 * mib}}
    assert "because keeping them saves about 18% of the adapted layers' time here" in fold_policy_line(kept)
    assert "changes nothing: 1,295 MiB" in fold_policy_line({**run, "fold_estimates": {**folds, "keep": 1295 * mib}})
    assert fold_policy_line({"name": "lora-r8", "method": "lora", "memory_estimate": {"total": mib}}) is None
    lines = memory_differences({"seeds": [0], "runs": [{**run, "seed": 0}]})
    assert lines == [fold_policy_line(run)] and "folded_backward" not in lines[0]


def test_padding_note_gives_the_gap_and_its_reason():
    note = padding_note([0.18, 0.09, -0.001])
    assert note.endswith("Here the predictions were 9.0–18.0% above the measured peaks.")
    assert "pads each batch only to its longest row" in note
    assert padding_note([0.001]).endswith("no prediction was more than 0.5% above its measured peak.")


def test_a_gradients_column_of_zeros_is_explained_only_when_every_peak_holds_none():
    assert gradients_note([{"gradients": 0, "activations": 5}, {"gradients": None}]).startswith(
        "Gradients read 0 because every measured peak came before backward")
    assert gradients_note([{"gradients": 0}, {"gradients": 3080}]) is None  # one peak holds a head's 770 floats
    assert gradients_note([]) is None
