"""Quality bar: VeRA vs LoRA r=8 on Rotten Tomatoes with all-MiniLM-L6-v2, query + value, on CPU.

Pass: VeRA's test accuracy within 2 points of LoRA r=8 with at least 8x fewer trainable parameters (head excluded),
the pair within 15 minutes. Each method runs in its own process (isolate=True), so each CPU peak is its own.

    .venv/bin/python benchmarks/quality_rotten_tomatoes.py            # writes benchmarks/results/quality_rotten_tomatoes.{json,md}
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from vera_core.compare import compare  # noqa: E402
from vera_core.config import LoraConfig, VeraConfig  # noqa: E402
from vera_core.files import write_json  # noqa: E402
from vera_core.memory import comparable_estimate  # noqa: E402
from vera_core.report import SUMMARY_COLUMNS, format_table, summary_rows  # noqa: E402
from vera_core.train import TrainConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vera-r", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "quality_rotten_tomatoes_run"))
    args = parser.parse_args()

    vera, lora = VeraConfig(r=args.vera_r, d_init=0.1), LoraConfig(r=8, alpha=16)
    # Validation during training only draws the curve: 8 batches keep it cheap; the reported accuracy is the full test split.
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=64, seed=0,
                        eval_every=max(1, args.steps // 4), eval_batches=8)
    t0 = time.perf_counter()
    report = compare("minilm-l6", "rotten-tomatoes", methods=("vera", "lora"), vera=vera, lora=lora, train=train,
                     out_dir=args.out, isolate=True, samples=8, exists="overwrite")
    wall = time.perf_counter() - t0
    v, lo = report.runs[0], report.runs[1]
    gap = lo.eval["accuracy"] - v.eval["accuracy"]
    ratio = lo.trainable_params / v.trainable_params
    memory = {r.name: {"estimated_bytes": comparable_estimate(r.memory_estimate, r.peak_memory_kind),
                       "measured_bytes": r.peak_memory_bytes, "kind": r.peak_memory_kind} for r in report.runs}
    for m in memory.values():
        m["error_pct"] = 100 * (m["estimated_bytes"] - m["measured_bytes"]) / m["measured_bytes"]
    result = {
        "model": "minilm-l6", "dataset": "rotten-tomatoes", "targets": v.targets, "steps": args.steps,
        "batch_size": args.batch_size, "cpu_threads": torch.get_num_threads(), "cpu_count": psutil.cpu_count(),
        "load_average_at_end": os.getloadavg(), "wall_s_pair": wall,
        "vera": {"name": v.name, "accuracy": v.eval["accuracy"], "trainable_params": v.trainable_params,
                 "head_params": v.head_params, "wall_s": v.wall_s, "lr": v.lr},
        "lora": {"name": lo.name, "accuracy": lo.eval["accuracy"], "trainable_params": lo.trainable_params,
                 "head_params": lo.head_params, "wall_s": lo.wall_s, "lr": lo.lr},
        "accuracy_gap_points": gap, "parameter_ratio": ratio, "memory_estimate_vs_measured": memory,
        "pass": {"accuracy_within_2_points": gap <= 2.0, "at_least_8x_fewer": ratio >= 8.0,
                 "within_15_minutes": wall <= 900},
        "run_dir": str(args.out),
    }
    write_json(RESULTS / "quality_rotten_tomatoes.json", result)
    lines = [
        "# Quality bar: Rotten Tomatoes, all-MiniLM-L6-v2, query + value", "",
        f"{args.steps} steps x batch {args.batch_size}, seed 0, CPU ({torch.get_num_threads()} threads; the machine "
        f"was shared, load average at the end {os.getloadavg()[0]:.1f}); each method in its own process.", "",
        "```", format_table(summary_rows(report), SUMMARY_COLUMNS), "```", "",
        f"- test accuracy: VeRA {v.eval['accuracy']:.2f}% vs LoRA {lo.eval['accuracy']:.2f}% "
        f"(gap {gap:+.2f} points; bar: within 2) — {'pass' if gap <= 2 else 'FAIL'}",
        f"- trainable parameters (head excluded): LoRA {lo.trainable_params:,} / VeRA {v.trainable_params:,} = "
        f"**{ratio:.2f}x** (bar: at least 8x) — {'pass' if ratio >= 8 else 'FAIL'}",
        f"- wall time for the pair: {wall / 60:.1f} min (bar: 15) — {'pass' if wall <= 900 else 'FAIL'}",
        "- memory estimate vs measured tensor peak: " + "; ".join(
            f"{n} {m['estimated_bytes'] / 2**20:.0f} vs {m['measured_bytes'] / 2**20:.0f} MiB ({m['error_pct']:+.0f}%)"
            for n, m in memory.items()),
    ]
    (RESULTS / "quality_rotten_tomatoes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
