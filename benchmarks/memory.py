"""Training memory, predicted against measured: `estimate_memory` (one step on fake tensors) beside the trainer's
tensor tracker (the first steps of a real run), with the process RSS for reference.

    python benchmarks/memory.py            # every configuration; resumes: rows already in memory.json are kept
    python benchmarks/memory.py --fresh    # start over
    python benchmarks/memory.py --only smollm2   # configurations whose key contains this text
    python benchmarks/memory.py --only smollm2 --redo   # measure those again, replacing their rows
    python benchmarks/memory.py --only /vera/ --only lab-order --redo   # --only may be given several times

Each configuration runs in its own process: `estimate_memory` first (timed), then `train` for 3 steps (the steps the
trainer tracks) on fixed-length batches, so padding is the same in both (every row is longer than max_length and is
truncated to it). Rows go into benchmarks/results/memory.json as they finish, each with the date it was measured;
memory.md and memory.png are redrawn from it.

An independent check of the tracker: on the "profile" rows (MiniLM and SmolLM2, VeRA and LoRA, two sizes) the child
runs under torch.profiler from before the model is built (weights included) to the end of training, and
`profiler_peak_bytes` is the highest running sum of the profiler's allocator events, never adjusted.

"lab-order" rows check the lab's default comparison: each method's peak in one in-process comparison (VeRA then LoRA,
and LoRA then VeRA) against the same method alone in a fresh process.
"""
from __future__ import annotations

import datetime
import json
import os
import time

from harness import (RESULTS, SMOLLM2, ChildFailed, command_line, machine, parse_or_serve, peak_rss_bytes,
                     run_child, write_page)

from vera_core.adapters.files import write_json
STEPS = 3  # the steps the trainer tracks (train.TRACKED_STEPS)
RUN_STEPS = 6  # three more, untracked, time the tracker's overhead
TARGET = 0.05  # |predicted / measured - 1|
PROFILER_TOLERANCE = 0.03  # |tracker / profiler - 1| on the profiled rows


def configurations() -> list[dict]:
    """(model, method, r, targets, batch, seq, dtype, grad checkpointing, quantization) rows, cheapest first;
    "profile" marks the rows also measured by torch.profiler (not part of the key)."""
    rows = []
    for batch, seq in ((8, 64), (16, 128)):
        for method, r in (("head", None), ("vera", 256), ("lora", 8), ("full", None)):
            rows.append(dict(model="minilm-l6", method=method, r=r, targets="query,value", batch_size=batch,
                             seq_len=seq, profile=method in ("vera", "lora")))
    for quant in ("4bit", "8bit"):
        for method, r in (("vera", 256), ("lora", 8)):
            rows.append(dict(model="minilm-l6", method=method, r=r, targets="query,value", batch_size=8, seq_len=64,
                             quantization=quant))
    for batch, seq in ((2, 64), (4, 128)):
        for method, r in (("vera", 256), ("lora", 8), ("full", None)):
            rows.append(dict(model="tiny-gpt2", method=method, r=r, targets="c_attn,c_proj,c_fc", batch_size=batch,
                             seq_len=seq))
    for batch, seq in ((2, 64), (4, 128)):
        for targets in ("all-linear", "q_proj,v_proj"):
            for method, r in (("vera", 256), ("vera", 1024), ("lora", 8)):
                rows.append(dict(model=SMOLLM2, method=method, r=r, targets=targets, batch_size=batch,
                                 seq_len=seq, profile=targets == "all-linear" and r in (256, 8)))
    for method, r in (("vera", 256), ("lora", 8)):
        rows.append(dict(model=SMOLLM2, method=method, r=r, targets="all-linear", batch_size=4,
                         seq_len=128, grad_checkpointing=True))
        rows.append(dict(model=SMOLLM2, method=method, r=r, targets="all-linear", batch_size=4,
                         seq_len=128, dtype="bfloat16"))
    for row in rows:
        row.setdefault("dtype", "float32")
        row.setdefault("grad_checkpointing", False)
        row.setdefault("quantization", None)
        row.setdefault("profile", False)
        row["key"] = "/".join(str(row[k]) for k in ("model", "method", "r", "targets", "batch_size", "seq_len", "dtype",
                                                    "grad_checkpointing", "quantization"))
    return rows


# ---------------------------------------------------------------------------------------------- child process
def _model(cfg: dict):
    """(model, tokenizer) for a configuration; "tiny-gpt2" is a 2-layer GPT-2 (Conv1D projections), random weights,
    with SmolLM2's tokenizer."""
    from vera_core.lab.models import load_model

    if cfg["model"] != "tiny-gpt2":
        return load_model(cfg["model"], quantization=cfg["quantization"], dtype=cfg["dtype"])
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = load_model(SMOLLM2)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=len(tokenizer), n_positions=256)
    return GPT2LMHeadModel(config).to(getattr(__import__("torch"), cfg["dtype"])), tokenizer


def _adapter(cfg: dict):
    from vera_core.adapters.config import ALL_LINEAR, LoraConfig, VeraConfig

    targets = ALL_LINEAR if cfg["targets"] == "all-linear" else cfg["targets"].split(",")
    if cfg["method"] == "vera":
        return VeraConfig(r=cfg["r"], target_modules=targets)
    if cfg["method"] == "lora":
        return LoraConfig(r=cfg["r"], target_modules=targets)
    return cfg["method"]  # "full" or "head"


def _long_rows(task: str, n: int) -> list[dict]:
    """Rows longer than any max_length used here, so every batch is exactly (B, T) after truncation."""
    text = ("The Golden Curry is a family friendly Indian restaurant near the river, with a customer rating of 5 out "
            "of 5 and prices in the moderate range; it serves breakfast, lunch and dinner every day of the week. ") * 8
    if task == "classification":
        return [{"text": f"{i} {text}", "label": i % 2} for i in range(n)]
    return [{"prompt": f"Describe restaurant {i}.", "response": text, "group": str(i)} for i in range(n)]


def profiled_peak(prof) -> int:
    """The highest running sum of the profiler's [memory] events (allocations +, frees -), in time order."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def child(cfg: dict) -> dict:
    """A configuration's row; on a "profile" row the whole of it, model building included, runs under torch.profiler
    (its times are then slower: the profiler records every operator)."""
    import contextlib

    import torch

    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                if cfg["profile"] else contextlib.nullcontext())
    with profiler as prof:
        row = _measure(cfg)
    return {**row, "profiler_peak_bytes": profiled_peak(prof) if cfg["profile"] else None,
            "date": datetime.date.today().isoformat()}


def _measure(cfg: dict) -> dict:
    import warnings

    from vera_core.lab.data import TextDataset
    from vera_core.lab.memory import estimate_memory, fold_estimates
    from vera_core.lab.models import make_trainable
    from vera_core.lab.train import TrainConfig, train

    load_1m = os.getloadavg()[0]  # the estimate's time means little without the machine's load beside it
    model, tokenizer = _model(cfg)
    adapter = _adapter(cfg)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predicted = estimate_memory(model, adapter, cfg["batch_size"], cfg["seq_len"], cfg["dtype"], cfg["quantization"],
                                    grad_checkpointing=cfg["grad_checkpointing"])
    estimate_s = time.perf_counter() - t0
    # what VeRA's two ways with its folded weights would each have cost (two more fake steps, untimed)
    folds = fold_estimates(model, adapter, cfg["batch_size"], cfg["seq_len"], cfg["dtype"], cfg["quantization"],
                           grad_checkpointing=cfg["grad_checkpointing"])
    fallback = next((str(w.message) for w in caught if "closed-form formula" in str(w.message)), None)
    task = "classification" if cfg["model"] == "minilm-l6" else "causal-lm"
    rows = _long_rows(task, cfg["batch_size"] * RUN_STEPS)
    data = TextDataset("long-rows", task, train=rows, validation=rows[:1], test=[],
                       labels=["neg", "pos"] if task == "classification" else None, source="benchmark")
    model = make_trainable(model, cfg["method"], adapter if cfg["method"] in ("vera", "lora") else None)
    result = train(model, tokenizer, data, TrainConfig(
        steps=RUN_STEPS, batch_size=cfg["batch_size"], max_length=cfg["seq_len"], eval_every=10**6, eval_batches=1,
        grad_checkpointing=cfg["grad_checkpointing"], device="cpu"), progress=False)
    return {**{k: v for k, v in cfg.items() if k != "key"}, "key": cfg["key"],
            "predicted_peak_bytes": predicted["total"], "measured_peak_bytes": result.peak_memory_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            "breakdown": result.memory_breakdown, "predicted_breakdown": predicted, "fold_estimates": folds,
            "estimate_s": round(estimate_s, 2),
            "load_1m": round(load_1m, 1),
            "estimate_kind": "formula" if fallback else "fake step, bnb weights" if cfg["quantization"] else "fake step",
            "fallback": fallback,
            **_step_times(result.history)}


def _step_times(history: list[dict]) -> dict:
    """The tracker's overhead: median time of the tracked steps 2-3 (the first also warms up) over that of the
    untracked steps 4-6. Every batch has the same tokens, so times are in inverse ratio to tokens per second."""
    import statistics

    rates = [e["tokens_per_s"] for e in history if e["type"] == "step"]
    return {"tracker_overhead": round(statistics.median(rates[STEPS:]) / statistics.median(rates[1:STEPS]), 3)}


def child_lab(cfg: dict) -> dict:
    """The lab's default comparison (SmolLM2, synthetic-restaurants, VeRA r=256 and LoRA r=8 all-linear, 4 x 128),
    3 steps, in-process in the given order: each method's tracked peak."""
    import tempfile

    from vera_core.lab.compare import compare
    from vera_core.lab.config import TrainConfig
    from vera_core.adapters.config import ALL_LINEAR, LoraConfig, VeraConfig

    with tempfile.TemporaryDirectory() as out:
        report = compare(SMOLLM2, "synthetic-restaurants", methods=cfg["order"],
                         vera=VeraConfig(r=256, target_modules=ALL_LINEAR), lora=LoraConfig(r=8, target_modules=ALL_LINEAR),
                         train=TrainConfig(steps=STEPS, batch_size=4, max_length=128, eval_batches=1, device="cpu"),
                         out_dir=out, max_rows=96, eval_generate=0, samples=0, progress=False)
    return {"key": cfg["key"], "order": cfg["order"],
            "peaks": {r.method: r.peak_memory_bytes for r in report.runs},
            "breakdowns": {r.method: r.memory_breakdown for r in report.runs}}


# ---------------------------------------------------------------------------------------------- parent
def lab_configurations() -> list[dict]:
    return [{"key": f"lab-order/{'-'.join(order)}", "order": list(order)}
            for order in (("vera", "lora"), ("lora", "vera"), ("vera",), ("lora",))]


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def _seconds(row: dict, unit: str = "") -> str:
    """The estimate's seconds, with the 1-minute load average when the row started (rows before it was kept: none)."""
    load = f" (load {row['load_1m']:.1f})" if row.get("load_1m") is not None else ""
    return f"{row['estimate_s']:.1f}{' ' + unit if unit else ''}{load}"


def _fold_choice(row: dict) -> str:
    """Which way with its folded weights the library's default took on a VeRA row, read from the estimates."""
    folds, predicted = row["fold_estimates"], row["predicted_peak_bytes"]
    if folds["keep"] == folds["rebuild"]:
        return "same either way (no layer where it matters)"
    return {folds["keep"]: "kept W'", folds["rebuild"]: "rebuilt W'"}.get(predicted, "kept W' in some layers")


def _fold_lines(rows: list[dict]) -> list[str]:
    """VeRA rows: what the default fold policy did and what each way costs (fake steps), beside LoRA r=8 on the
    same model, targets and batch."""
    vera = [r for r in rows if r["method"] == "vera" and r.get("fold_estimates")]
    if not vera:
        return []
    lines = ["", "VeRA's folded weights W' = W0 + (b ⊙ B)(d ⊙ A): the library's default rebuilds W' in backward "
             "(adapters/fused.py); "
             "`TrainConfig(prefer=\"speed\")` keeps it. Estimates are fake steps; measured is the tracker's "
             "peak with the default.", "",
             "| model | r | targets | B x T | dtype | ckpt | default did | measured MiB | keeping W' MiB | "
             "rebuilding W' MiB | LoRA r=8 measured MiB | VeRA / LoRA |", "|" + "---|" * 12]
    same = ("model", "targets", "batch_size", "seq_len", "dtype", "grad_checkpointing", "quantization")
    for row in vera:
        lora = next((r for r in rows if r["method"] == "lora" and r["r"] == 8
                     and all(r[k] == row[k] for k in same)), None)
        dtype = row["dtype"] + (f" {row['quantization']}" if row["quantization"] else "")
        ratio = f"{row['measured_peak_bytes'] / lora['measured_peak_bytes']:.2f}x" if lora else "-"
        lines.append(f"| {row['model']} | {row['r']} | {row['targets']} | {row['batch_size']} x {row['seq_len']} | "
                     f"{dtype} | {'on' if row['grad_checkpointing'] else 'off'} | {_fold_choice(row)} | "
                     f"{_mib(row['measured_peak_bytes'])} | {_mib(row['fold_estimates']['keep'])} | "
                     f"{_mib(row['fold_estimates']['rebuild'])} | {_mib(lora and lora['measured_peak_bytes'])} | "
                     f"{ratio} |")
    return lines


def _against_profiler(row: dict) -> str:
    """The tracker's peak over the profiler's, as a signed percentage, flagged outside the tolerance."""
    if not row.get("profiler_peak_bytes"):
        return "-"
    difference = row["measured_peak_bytes"] / row["profiler_peak_bytes"] - 1
    return f"{100 * difference:+.2f}%" + ("" if abs(difference) <= PROFILER_TOLERANCE else " **miss**")


def write_report(data: dict) -> None:
    rows = data["rows"]
    lines = ["# Training memory: predicted (one fake step) vs measured (the trainer's tensor tracker)", "",
             f"Device: {data['device']}. Date of the last run: {data['date']} (each row's own date is in its date "
             "column). Command: `HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/memory.py`. "
             f"Load average (1, 5, 15 min) at the last start: {data.get('load_avg')} on {os.cpu_count()} cores. Times "
             "(estimate seconds, step-time ratios) are slower and noisier under load; bytes are not affected. A row's "
             "estimate seconds show the 1-minute load when it started; rows without one ran at loads of 5-10.",
             "", f"Measured: the peak live tensor bytes over the first {STEPS} training steps (memtrack.py), fixed-length "
             "batches (every row truncated to the sequence length). Predicted: `estimate_memory`, one forward, "
             "backward and AdamW step on fake tensors with the same tracker (bitsandbytes weights cannot be faked: "
             "a 4-bit / 8-bit base runs the step unquantized, its weights counted as bitsandbytes stores them). RSS: "
             "the process's peak resident memory, model loading included, for reference only.", "",
             "Profiler: torch.profiler's allocator events over the whole child, from before the model is built "
             "(weights included), on the rows that have one; those rows' times include the profiler's overhead.", "",
             "| model | method | r | targets | B x T | dtype | ckpt | predicted MiB | tracker MiB | error | "
             "profiler MiB | tracker vs profiler | RSS MiB | estimate | estimate s | tracked / untracked step | "
             "date |", "|" + "---|" * 17]
    for row in rows:
        error = row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1
        flag = "" if abs(error) <= TARGET else " **miss**"
        dtype = row["dtype"] + (f" {row['quantization']}" if row["quantization"] else "")
        lines.append(f"| {row['model']} | {row['method']} | {row['r'] or '-'} | {row['targets']} | "
                     f"{row['batch_size']} x {row['seq_len']} | {dtype} | {'on' if row['grad_checkpointing'] else 'off'} | "
                     f"{_mib(row['predicted_peak_bytes'])} | {_mib(row['measured_peak_bytes'])} | {100 * error:+.2f}%{flag} | "
                     f"{_mib(row.get('profiler_peak_bytes'))} | {_against_profiler(row)} | "
                     f"{_mib(row['peak_rss_bytes'])} | {row['estimate_kind']} | {_seconds(row)} | "
                     f"{row['tracker_overhead']:.2f}x | {row['date']} |")
    faked = [r for r in rows if not r["quantization"]]
    unprofiled = [r for r in faked if not r.get("profiler_peak_bytes")]  # the profiler slows every operator
    if faked and unprofiled:
        worst = max(faked, key=lambda r: abs(r["predicted_peak_bytes"] / r["measured_peak_bytes"] - 1))
        lines += ["", f"Fake-step rows: {len(faked)}, largest error "
                  f"{100 * (worst['predicted_peak_bytes'] / worst['measured_peak_bytes'] - 1):+.2f}% ({worst['key']}); "
                  f"slowest estimate without the profiler "
                  f"{_seconds(max(unprofiled, key=lambda r: r['estimate_s']), 's')} (target < 10 s for SmolLM2; the "
                  "estimate runs first in a fresh process, so it includes fake tensors' one-off set-up)."]
    profiled = [r for r in rows if r.get("profiler_peak_bytes")]
    if profiled:
        worst = max(profiled, key=lambda r: abs(r["measured_peak_bytes"] / r["profiler_peak_bytes"] - 1))
        lines += ["", f"Tracker against torch.profiler (whole-run peaks, weights included): {len(profiled)} rows, "
                  f"largest difference {_against_profiler(worst)} ({worst['key']}); tolerance "
                  f"{100 * PROFILER_TOLERANCE:.0f}%."]
    lines += _fold_lines(rows)
    smol = sorted(r["tracker_overhead"] for r in rows if r["model"].startswith("smollm2"))
    if smol:
        lines += ["", f"Tracker overhead, SmolLM2 rows (time of a tracked step over an untracked one): median "
                  f"{smol[len(smol) // 2]:.2f}x, range {smol[0]:.2f}-{smol[-1]:.2f}x. Only the first {STEPS} steps of "
                  "a run are tracked; on a loaded CPU single-step ratios are noisy (the small models' rows swing "
                  "either way)."]
    quantized = [r for r in rows if r["quantization"]]
    if quantized:
        lines += ["", "Quantized bases: " + "; ".join(
            f"{r['method']} {r['quantization']} {100 * (r['predicted_peak_bytes'] / r['measured_peak_bytes'] - 1):+.1f}% "
            f"(temporaries measured {_mib(r['breakdown']['temporaries'])} vs predicted "
            f"{_mib(r['predicted_breakdown']['temporaries'])} MiB; {r['date']})" for r in quantized) + ". The fake "
            "step runs the base unquantized, so it is told what bitsandbytes' layers keep (lab/memory.py "
            "`_as_quantized`): its 8-bit matmul (0.50.2, `MatMul8bitLt`) holds each layer's input for backward in "
            "`ctx.tensors` even when the weight is frozen (not through save_for_backward, so the tracker counts it "
            "as temporaries), where a frozen fp32 Linear keeps nothing; and a bitsandbytes layer is never folded "
            "by VeRA."]
    lab = data.get("lab", {})
    if len(lab) == 4:
        alone = {m: lab[f"lab-order/{m}"]["peaks"][m] for m in ("vera", "lora")}
        lines += ["", "Lab default comparison (SmolLM2, synthetic-restaurants, VeRA r=256 / LoRA r=8 all-linear, "
                  "4 x 128, in one process) against each method alone in a fresh process:", "",
                  "| order | VeRA MiB | vs alone | LoRA MiB | vs alone | date |", "|---|---|---|---|---|---|"]
        for order in ("vera-lora", "lora-vera", "vera", "lora"):
            peaks = lab[f"lab-order/{order}"]["peaks"]
            cells = [f"{_mib(peaks.get(m))} | " + (f"{100 * (peaks[m] / alone[m] - 1):+.2f}%" if m in peaks else "-")
                     for m in ("vera", "lora")]
            lines.append(f"| {order.replace('-', ' then ')} | " + " | ".join(cells)
                         + f" | {lab[f'lab-order/{order}'].get('date')} |")
    lines += ["", "![predicted vs measured](memory.png)"]
    write_page(RESULTS / "memory.md", "\n".join(lines) + "\n")


def plot(data: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for kind, marker in (("fake step", "o"), ("fake step, bnb weights", "s"), ("formula", "x")):
        pts = [(r["measured_peak_bytes"] / 2**20, r["predicted_peak_bytes"] / 2**20) for r in data["rows"]
               if r["estimate_kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=f"predicted by the {kind}")
    rss = [(r["measured_peak_bytes"] / 2**20, r["peak_rss_bytes"] / 2**20) for r in data["rows"]]
    ax.scatter(*zip(*rss), marker=".", color="0.6", label="process peak RSS (reference)")
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="k", alpha=0.08, label="±5%")
    ax.set(xscale="log", yscale="log", xlabel="measured tensor peak (MiB)", ylabel="MiB",
           title="Training memory: predicted vs measured")
    ax.legend(fontsize=8)
    fig.savefig(RESULTS / "memory.png", dpi=110)


def main() -> None:
    parser = command_line(__doc__, "memory.json")
    parser.add_argument("--only", action="append", default=[],
                        help="run only configurations whose key contains this text (several: any of them)")
    parser.add_argument("--redo", action="store_true",
                        help="measure the --only configurations again, replacing their recorded rows (e.g. times "
                             "taken on a loaded machine)")
    args = parse_or_serve(parser, lambda cfg: child_lab(cfg) if cfg["key"].startswith("lab-order") else child(cfg))
    if args is None:
        return
    path = RESULTS / "memory.json"
    data = {"rows": [], "lab": {}} if args.fresh or not path.exists() else json.loads(path.read_text())
    import torch

    for row in [*data["rows"], *data["lab"].values()]:  # rows from before rows kept their own date: the record's
        row.setdefault("date", data.get("date"))
    data.update(device=machine(torch, "cpu"),
                date=datetime.date.today().isoformat(), load_avg=[round(x, 1) for x in os.getloadavg()])
    for row in data["rows"]:  # early rows also carried per-token times, dropped as they read like step times
        row.pop("step_s", None), row.pop("tracked_step_s", None)
    done = {r["key"] for r in data["rows"]} | set(data["lab"])
    for cfg in configurations() + lab_configurations():
        if not any(text in cfg["key"] for text in args.only or [""]) or (cfg["key"] in done and not args.redo):
            continue
        t0 = time.perf_counter()
        try:
            result = run_child(__file__, cfg)[-1]
        except ChildFailed as err:
            print(f"{cfg['key']}: FAILED: {err}", flush=True)
            continue
        if cfg["key"].startswith("lab-order"):
            data["lab"][cfg["key"]] = {**result, "date": datetime.date.today().isoformat()}
            print(f"{cfg['key']}: {({m: _mib(p) for m, p in result['peaks'].items()})}", flush=True)
        else:
            keys = [r["key"] for r in data["rows"]]
            if result["key"] in keys:
                data["rows"][keys.index(result["key"])] = result
            else:
                data["rows"].append(result)
            print(f"{cfg['key']}: predicted {_mib(result['predicted_peak_bytes'])} MiB, measured "
                  f"{_mib(result['measured_peak_bytes'])} MiB, profiler {_mib(result['profiler_peak_bytes'])} MiB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        write_json(path, data)
        if data["rows"]:
            write_report(data)
            plot(data)


if __name__ == "__main__":
    main()
