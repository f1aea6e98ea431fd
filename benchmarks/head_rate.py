"""The classifier head's learning rate: head-only validation loss at each rate of a decade grid, on Rotten Tomatoes,
for the two offline models a learner classifies with (all-MiniLM-L6-v2; SmolLM2-135M-Instruct with a new
sequence-classification head). It is where DEFAULT_LR's head rate comes from: the grid rate whose worst loss,
relative to each model's own best on the grid, is lowest (tests/test_train.py recomputes it from the record).

A head starts random, so its best rate depends on the features it reads: MiniLM's pooled outputs are tanh-bounded,
SmolLM2's last hidden states are much larger, and the same step moves their logits by very different amounts. The
project's head-rate rerun tuned head-only on MiniLM at 400 steps and chose 0.128 (benchmarks/results/rerun/); this
record asks what one default can do for both models.

Each point: seed 0, 200 steps x batch 16, max_length 64, AdamW, scored on the whole validation split (487 reviews).
Resumable: every finished point is written to head_rate.json at once, and a rerun skips it.

    .venv/bin/python benchmarks/head_rate.py             # the record (CPU: MiniLM ~1 min a point, SmolLM2 ~5 min)
    .venv/bin/python benchmarks/head_rate.py --quick --out /tmp/hr   # smoke run: 2 steps, 8 rows
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from harness import RESULTS, SMOLLM2  # noqa: E402

from vera_core.adapters.files import write_json, write_text  # noqa: E402
from vera_core.lab.data import load_dataset  # noqa: E402
from vera_core.lab.models import load_model, make_trainable  # noqa: E402
from vera_core.lab.train import TrainConfig, train  # noqa: E402

MODELS = ("minilm-l6", SMOLLM2)
RATES = (1e-3, 1e-2, 1e-1)
BUDGET = {"steps": 200, "batch_size": 16, "max_length": 64}


def point(model_name: str, rate: float, quick: bool) -> dict:
    """One head-only run at `rate`: its validation loss and accuracy."""
    data = load_dataset("rotten-tomatoes", seed=0)
    data = replace(data, train=data.train[:8], validation=data.validation[:8]) if quick else data
    torch.manual_seed(0)  # the new head's initial weights
    model, tokenizer = load_model(model_name, task="classification", num_labels=2)
    budget = {**BUDGET, "steps": 2} if quick else BUDGET
    config = TrainConfig(**budget, lr=rate, head_lr=rate, seed=0, eval_every=budget["steps"], eval_batches=None)
    result = train(make_trainable(model, "head", None), tokenizer, data, config, progress=False, keep_adapter=False)
    return {"model": model_name, "rate": rate, "val_loss": result.eval["eval_loss"],
            "val_accuracy": result.eval["eval_accuracy"], "validation_rows": len(data.validation),
            "wall_s": round(result.wall_s, 1), "load_average": round(os.getloadavg()[0], 2)}


def default_rate(rows: list[dict]) -> float:
    """The grid rate whose worst validation loss, relative to each model's own best on the grid, is lowest."""
    best = {m: min(r["val_loss"] for r in rows if r["model"] == m) for m in {r["model"] for r in rows}}
    worst = {rate: max(r["val_loss"] / best[r["model"]] for r in rows if r["rate"] == rate)
             for rate in {r["rate"] for r in rows}}
    return min(worst, key=worst.get)


def markdown(record: dict) -> str:
    rows, models = record["rows"], list(dict.fromkeys(r["model"] for r in record["rows"]))
    loss = {(r["model"], r["rate"]): r for r in rows}
    lines = ["# The classifier head's learning rate", "", f"Written by `benchmarks/head_rate.py` ({record['date']}, "
             f"{record['machine']}). Head-only on Rotten Tomatoes, seed 0, {record['budget']['steps']} steps x "
             f"{record['budget']['batch_size']}, max_length {record['budget']['max_length']}; validation loss "
             f"(accuracy) on the {rows[0]['validation_rows']} validation reviews. One seed: a neighbouring rate "
             "within a few hundredths of loss is a tie, not a ranking. Beside it: "
             f"{record.get('beside') or 'not recorded'} (1-minute load average at each point's end: "
             f"{', '.join(str(r['load_average']) for r in rows)}).", "",
             "| head rate | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for rate in sorted({r["rate"] for r in rows}):
        cells = [f"{loss[m, rate]['val_loss']:.3f} ({loss[m, rate]['val_accuracy']:.1f}%)" if (m, rate) in loss
                 else "-" for m in models]
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    if len(models) > 1 and all((m, rate) in loss for m in models for rate in {r["rate"] for r in rows}):
        best = {m: min((r for r in rows if r["model"] == m), key=lambda r: r["val_loss"])["rate"] for m in models}
        lines += ["", "Best rate per model: " + ", ".join(f"{m} {rate:g}" for m, rate in best.items())
                  + f". The one rate that is worst-case closest to each model's best: **{default_rate(rows):g}** "
                  "(DEFAULT_LR's head rate). Tune head-only when the head matters: with head-only in a comparison, "
                  "its tuned rate is every method's head rate."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS), help="results folder (head_rate.json, head_rate.md)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps on 8 rows")
    parser.add_argument("--beside", help="what else ran on the machine meanwhile, for the record")
    args = parser.parse_args()
    out = Path(args.out)
    path = out / "head_rate.json"
    record = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    record.update(date=time.strftime("%Y-%m-%d"), beside=args.beside or record.get("beside"), budget=BUDGET if not args.quick else {**BUDGET, "steps": 2},
                  machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}")
    done = {(r["model"], r["rate"]) for r in record["rows"]}
    for model_name in MODELS:
        for rate in RATES:
            if (model_name, rate) in done:
                continue
            row = point(model_name, rate, args.quick)
            print(f"{model_name} head rate {rate:g}: validation loss {row['val_loss']:.4f}, "
                  f"accuracy {row['val_accuracy']:.1f}% ({row['wall_s']:.0f} s)", flush=True)
            record["rows"].append(row)
            out.mkdir(parents=True, exist_ok=True)
            write_json(path, record)  # each finished point at once: a killed run keeps it
            write_text(out / "head_rate.md", markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
