"""An independent check of the tensor tracker: torch.profiler's allocator events, recorded from before the model is
built (weights included), give a whole-peak figure beside MemoryTracker's peak of the same training run.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/profiler_check.py

Each row runs in its own process: profiler on, load the model, add the adapter, train 3 steps (the tracker's steps)
on rows longer than the sequence length (every batch exactly B x T), profiler off. `profiler_peak_bytes` is the
highest running sum of the profiler's [memory] events (allocations +, frees -) in time order, never adjusted.
Writes benchmarks/results/memory_profiler.json, keyed like memory.json's rows.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).parent / "results" / "memory_profiler.json"
TOLERANCE = 0.03  # the tracker's peak must be within 3% of the profiler's
ROWS = [dict(model=m, method=method, r=r, targets=t, batch_size=b, seq_len=s)
        for m, t, sizes in (("minilm-l6", "query,value", ((8, 64), (16, 128))),
                            ("smollm2-135m-instruct", "all-linear", ((2, 64), (4, 128))))
        for b, s in sizes for method, r in (("vera", 256), ("lora", 8))]


def key(row: dict) -> str:
    """memory.json's key for the same configuration (float32, no checkpointing, no quantization)."""
    return "/".join(str(v) for v in (row["model"], row["method"], row["r"], row["targets"], row["batch_size"],
                                     row["seq_len"], "float32", False, None))


def profiled_peak(prof) -> int:
    """The highest running sum of the profiler's [memory] events (allocations +, frees -), in time order."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def _rows(task: str, n: int) -> list[dict]:
    text = "The Golden Curry is a family friendly Indian restaurant near the river, rated 5 out of 5. " * 20
    if task == "classification":
        return [{"text": f"{i} {text}", "label": i % 2} for i in range(n)]
    return [{"prompt": f"Describe restaurant {i}.", "response": text, "group": str(i)} for i in range(n)]


def child(row: dict) -> dict:
    torch.set_num_threads(1)
    from vera_core.adapters.config import ALL_LINEAR, LoraConfig, VeraConfig
    from vera_core.lab.data import TextDataset
    from vera_core.lab.models import load_model, make_trainable
    from vera_core.lab.train import TRACKED_STEPS, TrainConfig, train

    task = "classification" if row["model"] == "minilm-l6" else "causal-lm"
    targets = ALL_LINEAR if row["targets"] == "all-linear" else row["targets"].split(",")
    adapter = (VeraConfig if row["method"] == "vera" else LoraConfig)(r=row["r"], target_modules=targets)
    rows = _rows(task, row["batch_size"] * TRACKED_STEPS)
    data = TextDataset("long-rows", task, train=rows, validation=rows[:1], test=[],
                       labels=["neg", "pos"] if task == "classification" else None, source="benchmark")
    config = TrainConfig(steps=TRACKED_STEPS, batch_size=row["batch_size"], max_length=row["seq_len"],
                         eval_every=10**6, eval_batches=1, device="cpu")
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        model, tokenizer = load_model(row["model"])
        model = make_trainable(model, row["method"], adapter)
        result = train(model, tokenizer, data, config, progress=False)
    tracker_peak = result.peak_memory_bytes
    profiler_peak = profiled_peak(prof)
    return {**row, "key": key(row), "tracker_peak_bytes": tracker_peak, "profiler_peak_bytes": profiler_peak,
            "difference": round(tracker_peak / profiler_peak - 1, 5), "seconds": round(time.perf_counter() - t0, 1),
            "load_1m": round(os.getloadavg()[0], 1)}


def _run(row: dict, queue) -> None:
    queue.put(child(row))


def main() -> None:
    ctx = multiprocessing.get_context("spawn")
    results = []
    for row in ROWS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(row, queue))
        proc.start()
        out = queue.get()
        proc.join()
        results.append(out)
        print(f"{out['key']}: tracker {out['tracker_peak_bytes'] / 2**20:,.1f} MiB, profiler "
              f"{out['profiler_peak_bytes'] / 2**20:,.1f} MiB ({100 * out['difference']:+.2f}%), {out['seconds']} s "
              f"(load {out['load_1m']})", flush=True)
    worst = max(abs(r["difference"]) for r in results)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "torch": torch.__version__, "threads": 1,
              "method": "torch.profiler [memory] events from before the model is built to after 3 tracked "
                        "training steps (weights included); tracker: the trainer's MemoryTracker peak of those steps",
              "tolerance": TOLERANCE, "largest_difference": worst, "within_tolerance": worst <= TOLERANCE,
              "rows": results}
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(OUT)
    print(f"largest difference {100 * worst:.2f}% (tolerance {100 * TOLERANCE:.0f}%); wrote {OUT}")


if __name__ == "__main__":
    main()
