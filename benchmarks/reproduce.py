"""Paper reproduction on real data: VeRA vs LoRA on SST-2 (all-MiniLM-L6-v2) and E2E NLG (SmolLM2-135M-Instruct),
and the lab's own Rotten Tomatoes bar (all-MiniLM-L6-v2, query + value, the built-in set).

Each task is one or two comparisons (one per set of target layers, e.g. query+value and every linear layer), each a
`vera_core.lab.compare` call with the same verbs a user has: `tune=` tunes head-only first on its own grid, and its
chosen rate is the one head rate of every method of the comparison (and of the task's comparison without head-only,
SST-2's every linear layer, which waits for it); then every adapter gets the same learning-rate
grid and step budget on the validation split (first seed); `seeds=` then runs the chosen rate once per seed on the
test split. A comparison writes <out>/repro/<task>/<group>/ and is resumed there (finished runs and tuning points
kept); after each one the rows are merged into <out>/quality.json and
quality.md is rewritten, with per setting mean ± std, a 95% interval over seeds and the tuned rate, per VeRA/LoRA
pair the paired difference with its interval over seeds and test examples (recomputed from predictions/*.jsonl),
and which tuning choices were near-ties.

    .venv/bin/python benchmarks/reproduce.py --task sst2              # CPU subset, 5 seeds, 6-point grid (x0.25..x8)
    .venv/bin/python benchmarks/reproduce.py --task e2e               # CPU subset, 3 seeds, grid x2..x16, 300 steps
    .venv/bin/python benchmarks/reproduce.py --task rotten-tomatoes   # whole built-in set, 400 steps x 16
    .venv/bin/python benchmarks/reproduce.py --task sst2 --group all  # one comparison of a task
    .venv/bin/python benchmarks/reproduce.py --task all --full        # full sets (a GPU)
    .venv/bin/python benchmarks/reproduce.py --task all --quick --out /tmp/q   # smoke: 2 seeds, 2-point grid, 3 steps
    .venv/bin/python benchmarks/reproduce.py --records-only           # no training: every record from predictions/

Data: ../shared/data/{sst2/train.tsv, sst2/dev.tsv, e2e/devset.csv} (or --data-dir / $VERA_REPRO_DATA); elsewhere,
export the Hub sets glue/sst2 and e2e_nlg to those files (see benchmarks/results/reproduction.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from harness import RESULTS, ROOT, SMOLLM2, STOPPED, committed_file, stop_on_sigterm  # noqa: E402

from vera_core.lab.parse import float_list, seed_list  # noqa: E402
from vera_core.lab.compare import compare  # noqa: E402
from vera_core.adapters.config import LoraConfig, VeraConfig  # noqa: E402
from vera_core.lab.data import MR_INSTRUCTION, TextDataset, load_dataset  # noqa: E402
from vera_core.adapters.files import write_json, write_text  # noqa: E402
from vera_core.lab.plots import tradeoff_figure  # noqa: E402
from vera_core.lab.report import (Report, load_run, mean_cell, pair_line, pair_rows, seeds_note,  # noqa: E402
                                  tuning_lines, verdict_text)
from vera_core.lab.runs import run_summary  # noqa: E402
from vera_core.lab.stats import CI_SEEDS, MARGIN, mean_std  # noqa: E402
from vera_core.lab.train import TrainConfig  # noqa: E402
from vera_core.lab.tune import LR_SCALES  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
TASKS = ("sst2", "e2e", "rotten-tomatoes")
MODELS = {"sst2": "minilm-l6", "e2e": SMOLLM2, "rotten-tomatoes": "minilm-l6"}
METRICS = {"sst2": "accuracy", "e2e": "bleu", "rotten-tomatoes": "accuracy"}
# What the paper reports (VeRA, ICLR 2024; ../shared/docs/vera-method.md): RoBERTa-base GLUE SST-2 accuracy.
PAPER = {"sst2": {"lora": "LoRA 95.1 (RoBERTa-base, 0.3M params)", "vera": "VeRA 94.6 (RoBERTa-base, 0.043M params)"}}
# The library's grid plus x8: on SST-2 VeRA and head-only chose x4, the library grid's top, so the record widened it.
SCALES = (*LR_SCALES, 8.0)
# The centre of head-only's grid: 1e-3, fixed here (the library's default head rate may change; the record's grid
# stays the one it was tuned on, so a resumed comparison keeps its finished points).
HEAD_CENTRE = 1e-3
# Head-only's own grid (x HEAD_CENTRE). Its choice is the one head rate of every method of the
# comparison, so the grid must reach past its best: at x8 (SCALES' top) and then at x64 it still improved (Rotten
# Tomatoes, 400 steps: validation loss 0.651, 0.636, 0.621, 0.612 at x8..x64), so it reaches x1024.
HEAD_SCALES = (*SCALES, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
# Per-task tuning defaults (flags override them). E2E: every grid point trains the full step budget (at half of it,
# VeRA chose x8, past a cliff that the full budget exposes on unseen MRs), on x2..x16 of the centre rates: both
# methods chose x8 at the half budget, and x16 keeps that choice off the grid's top.
TUNING = {"e2e": {"scales": (2.0, 4.0, 8.0, 16.0)}}
# Tasks whose grid points are also scored on the test split, so the record shows how the test metric moves with
# the rate (never used to choose): E2E, where a rate chosen on 20 validation MRs once sat past a cliff (issue 31).
SCORE_TUNING = ("e2e",)
SEEDS = {"sst2": [0, 1, 2, 3, 4], "rotten-tomatoes": [0, 1, 2, 3, 4], "e2e": [0, 1, 2]}  # the final runs' seeds
TARGET_RATIO = 8.0  # the bar: VeRA within 1 point of LoRA (stats.verdict) with >= 8x fewer parameters
QUICK = {"seeds": [0, 1], "scales": [0.5, 2.0], "head_scales": [1.0, 8.0], "tune_steps": 2}  # --quick's smoke run


@dataclass(frozen=True)
class Group:
    """One comparison on one set of target layers: its own compare() call and run directory. Its settings appear in
    quality.json as "<setting>-<group>" (vera-r256-qv); baselines (head, base) keep their own name."""

    name: str  # "qv" | "all"
    methods: tuple[str, ...]
    vera: tuple[VeraConfig, ...]
    lora: tuple[LoraConfig, ...]


def data_dir(flag: str | None) -> Path:
    return Path(flag or os.environ.get("VERA_REPRO_DATA") or DEFAULT_DATA)


def missing_data(task: str, root: Path) -> str | None:
    """The skip message for `task` when its files are absent, else None (Rotten Tomatoes is built in)."""
    if task == "rotten-tomatoes":
        return None
    need = {"sst2": ["sst2/train.tsv", "sst2/dev.tsv"], "e2e": ["e2e/devset.csv"]}[task]
    absent = [p for p in need if not (root / p).is_file()]
    if not absent:
        return None
    hub = {"sst2": "glue/sst2 (train -> train.tsv, validation -> dev.tsv; columns label, sentence)",
           "e2e": "e2e_nlg (columns mr, ref -> devset.csv)"}[task]
    return (f"SKIP {task}: {', '.join(str(root / p) for p in absent)} not found. Get the Hugging Face Hub data set "
            f"{hub}, or point --data-dir / VERA_REPRO_DATA at a folder holding them.")


# ---------------------------------------------------------------------------------------------- data

def sst2_dataset(root: Path, seed: int, train_rows: int | None, val_rows: int | None,
                 test_rows: int | None = None) -> TextDataset:
    """Train/validation carved from train.tsv (stratified, seeded); the GLUE dev set, untouched, as the test split.

    load_dataset has no "this file is the test split" option, so the TextDataset is assembled from two loads.
    """
    carved = load_dataset(root / "sst2" / "train.tsv", "classification", seed=seed, val_fraction=0.05,
                          test_fraction=0.0)
    dev = load_dataset(root / "sst2" / "dev.tsv", "classification", seed=seed, val_fraction=0.0, test_fraction=0.0)
    if dev.labels != carved.labels:
        raise ValueError(f"SST-2 label sets differ: train {carved.labels}, dev {dev.labels}")
    # Splits come out shuffled, so a prefix is a random (and, for train/validation, roughly balanced) subset.
    return TextDataset("sst2", "classification", carved.train[:train_rows], carved.validation[:val_rows],
                       dev.train[:test_rows], carved.labels, f"{root / 'sst2'} (test = dev.tsv)")


def first_groups(rows: list[dict], n: int | None) -> list[dict]:
    """Rows of the first `n` distinct groups (every reference of a kept MR stays)."""
    if n is None:
        return rows
    keep: list[str] = list(dict.fromkeys(r["group"] for r in rows))[:n]
    return [r for r in rows if r["group"] in set(keep)]


def e2e_dataset(root: Path, seed: int, train_groups: int | None, val_groups: int | None,
                test_groups: int | None) -> TextDataset:
    """E2E devset split 60/10/30 by meaning representation (no MR in two splits), then capped per split in MRs. The
    test share is 30% (164 MRs, 1,290 references): at 10% each of the 55 test MRs was ~2% of the corpus BLEU counts."""
    ds = load_dataset(root / "e2e" / "devset.csv", "causal-lm", seed=seed, val_fraction=0.1, test_fraction=0.3)
    return replace(ds, name="e2e", train=first_groups(ds.train, train_groups),
                   validation=first_groups(ds.validation, val_groups), test=first_groups(ds.test, test_groups))


def mr_id(mr: str) -> str:
    """A short stable id for a meaning representation, so outputs can be committed without the data set's text."""
    return "mr-" + hashlib.sha1(mr.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- plans

def plan(task: str, args: argparse.Namespace) -> list[Group]:
    """The comparisons of a task, most important first."""
    all_linear = "all-linear"  # every linear layer except the output head (for BERT: attention, MLP and pooler)
    if task == "sst2":
        qv = None  # None -> the architecture's query/value default (BERT: query, value)
        return [Group("qv", ("head", "lora", "vera"), (VeraConfig(r=256, d_init=args.d_init, target_modules=qv),
                                                       VeraConfig(r=1024, d_init=args.d_init, target_modules=qv)),
                      (LoraConfig(r=8, alpha=16, target_modules=qv),)),
                Group("all", ("lora", "vera"), (VeraConfig(r=256, d_init=args.d_init, target_modules=all_linear),),
                      (LoraConfig(r=8, alpha=16, target_modules=all_linear),))]
    if task == "rotten-tomatoes":  # the lab's own quality bar: VeRA r=256 vs LoRA r=8 on query+value
        return [Group("qv", ("head", "lora", "vera"), (VeraConfig(r=256, d_init=args.d_init),),
                      (LoraConfig(r=8, alpha=16),))]
    return [Group("all", ("base", "lora", "vera"), (VeraConfig(r=256, d_init=args.d_init, target_modules=all_linear),),
                  (LoraConfig(r=8, alpha=16, target_modules=all_linear),))]


def budgets(task: str, args: argparse.Namespace) -> dict:
    """Subset sizes and the step budget: --quick (smoke), --full (whole sets, for a GPU), else the CPU subset flags."""
    if args.quick:
        return {"train": 16, "val": 8 if task != "e2e" else 2, "test": 8 if task != "e2e" else 2, "steps": 3,
                "batch_size": 4, "max_length": 32 if task != "e2e" else 64}
    if args.full:
        return {"train": None, "val": None, "test": None, "steps": args.steps or (2000 if task != "e2e" else 1000),
                "batch_size": args.batch_size or (32 if task != "e2e" else 8),
                "max_length": args.max_length or (64 if task != "e2e" else 128)}
    if task == "sst2":
        return {"train": args.sst2_train_rows, "val": 500, "test": None, "steps": args.steps or 300,
                "batch_size": args.batch_size or 32, "max_length": args.max_length or 64}
    if task == "rotten-tomatoes":  # the whole built-in set (80/10/10), 400 steps x 16 as the quality bar
        return {"train": None, "val": 500, "test": None, "steps": args.steps or 400,
                "batch_size": args.batch_size or 16, "max_length": args.max_length or 64}
    return {"train": args.e2e_train_groups, "val": 20, "test": args.e2e_test_groups, "steps": args.steps or 300,
            "batch_size": args.batch_size or 4, "max_length": args.max_length or 128}


def tuning(task: str, args: argparse.Namespace, steps: int) -> tuple[list[float], int | None]:
    """(the adapters' learning-rate scales, steps per grid point; None: the full budget): --quick's, else the flags,
    else the task's defaults (`TUNING`)."""
    if args.quick:
        return QUICK["scales"], QUICK["tune_steps"]
    own = TUNING.get(task, {})
    share = own.get("step_share")
    return (args.tune or list(own.get("scales", SCALES)),
            args.tune_steps or (max(1, round(steps * share)) if share else None))


def tune_grids(group: Group, scales: list[float], args: argparse.Namespace) -> dict | None:
    """compare's `tune` for a comparison: the adapters' grid, and head-only's own when the comparison has one."""
    if args.no_tune:
        return None
    head = QUICK["head_scales"] if args.quick else args.head_tune or list(HEAD_SCALES)
    return {"lr_scale": scales, **({"head_lr_scale": head} if "head" in group.methods else {})}


def subset_note(task: str, ds: TextDataset, b: dict) -> str:
    unit = "MRs" if task == "e2e" else "rows"
    count = (lambda rows: len({r["group"] for r in rows})) if task == "e2e" else (lambda rows: len(rows))
    return (f"train {count(ds.train)} {unit}, validation {count(ds.validation)}, test {count(ds.test)}"
            f"{' (all of dev.tsv)' if task == 'sst2' and b['test'] is None else ''}; {b['steps']} steps x batch "
            f"{b['batch_size']}, max_length {b['max_length']}")


# ---------------------------------------------------------------------------------------------- running

def run_task(task: str, args: argparse.Namespace, stop: threading.Event | None = None) -> list[dict]:
    """Run (or resume) every comparison of `task` not already finished; returns its quality.json rows. `stop` set
    (SIGTERM) ends the comparison within a step, checkpointed, and the script with exit status STOPPED."""
    root = data_dir(args.data_dir)
    message = missing_data(task, root)
    if message:
        print(message)
        return []
    b = budgets(task, args)
    if task == "sst2":
        ds = sst2_dataset(root, args.seed, b["train"], b["val"], b["test"])
    elif task == "rotten-tomatoes":
        full = load_dataset("rotten-tomatoes", seed=args.seed)
        ds = replace(full, train=full.train[:b["train"]], validation=full.validation[:b["val"]],
                     test=full.test[:b["test"]])
    else:
        ds = e2e_dataset(root, args.seed, b["train"], b["val"], b["test"])
    note = subset_note(task, ds, b)
    seeds = QUICK["seeds"] if args.quick else args.seeds or SEEDS[task]
    scales, tune_steps = tuning(task, args, b["steps"])
    print(f"== {task}: {MODELS[task]}; {note}; seeds {seeds}; "
          + ("not tuned" if args.no_tune else f"lr scales {scales} ({tune_steps or b['steps']} steps)"))
    train = TrainConfig(steps=b["steps"], batch_size=b["batch_size"], max_length=b["max_length"], seed=args.seed,
                        eval_every=max(1, b["steps"] // 4) if not args.quick else b["steps"], eval_batches=8,
                        device=args.device)
    task_dir = Path(args.out) / "repro" / task
    n_test_groups = len({r["group"] for r in ds.test}) if task == "e2e" else 0
    for group in plan(task, args):
        if args.group and group.name != args.group:
            continue
        run_dir = task_dir / group.name
        if (run_dir / "report.json").is_file() and run_summary(run_dir)["status"] == "finished":
            print(f"   {group.name}: done earlier, kept ({run_dir})")
            continue
        lrs, head_from = {"vera": args.vera_lr, "lora": args.lora_lr, "head": HEAD_CENTRE}, None
        if ds.task == "classification" and "head" not in group.methods and not args.no_tune:
            shared = task_head_rate(task_dir, plan(task, args))
            if shared is None:
                print(f"   {group.name}: waits for the head rate head-only tunes in {task}'s other comparison; "
                      "run that one first", flush=True)
                continue
            head_from, lrs["head"] = shared
        print(f"   {group.name}: training {', '.join(group.methods)} (resumable) ...", flush=True)
        report = compare(MODELS[task], ds, methods=group.methods, vera=list(group.vera), lora=list(group.lora),
                         train=train, out_dir=run_dir, lrs=lrs,
                         eval_generate=n_test_groups, samples=n_test_groups, seeds=seeds,
                         tune=tune_grids(group, scales, args),
                         tune_steps=tune_steps, score_tuning=task in SCORE_TUNING, stop=stop,
                         exists="resume" if (run_dir / "config.json").is_file() else "refuse")
        if report.stopped:
            print(f"   {group.name}: stopped (SIGTERM) at a step, checkpointed: run again to resume it", flush=True)
            raise SystemExit(STOPPED)
        if task == "e2e":
            write_outputs(run_dir, report)
        write_json(run_dir / "subset.json", {"task": task, "subset": note, "full": bool(args.full),
                                             "quick": bool(args.quick), "head_lr_from": head_from})
        for row in report.settings:
            print(f"   {row['setting']}: {row['metric']} {mean_cell(row)} over seeds {row['seeds']}", flush=True)
        for line in tuning_lines(report.tuning):  # a choice at a grid's end: widen that grid for every setting alike
            if " of the grid" in line:
                print(f"   GRID EDGE: {line}", flush=True)
        merge_quality(Path(args.out), task, *task_rows(task, task_dir, plan(task, args)))
    rows, pairs = task_rows(task, task_dir, plan(task, args))
    merge_quality(Path(args.out), task, rows, pairs)
    return rows


def task_head_rate(task_dir: Path, groups: list[Group]) -> tuple[str, float] | None:
    """(comparison, rate): the head rate head-only chose in the task's comparison that tunes it, once that comparison
    has finished; None before. A comparison without head-only trains its heads at it, so the task's comparisons
    share one head rate, tuned once (issue 31)."""
    for group in groups:
        path = task_dir / group.name / "report.json"
        if "head" in group.methods and path.is_file() and run_summary(path.parent)["status"] == "finished":
            report = json.loads(path.read_text())
            if report.get("head_lr") is not None and "head" in (report.get("tuning") or {}):
                return group.name, report["head_lr"]
    return None


def write_outputs(run_dir: Path, report: Report) -> None:
    """outputs.jsonl: each scored test MR's id and the model's answer (samples.jsonl, which holds the data set's
    references, stays out of git)."""
    names = [r.name for r in report.runs]
    lines = [json.dumps({"mr_id": mr_id(s["prompt"].removeprefix(MR_INSTRUCTION)), **{n: s.get(n) for n in names}}) for s in report.samples]
    (run_dir / "outputs.jsonl").write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------- results

def task_rows(task: str, task_dir: Path, groups: list[Group]) -> tuple[list[dict], list[dict]]:
    """(quality.json rows, pairs) of every comparison of a task that has a report: one row per setting (its first
    seed's report.json run, plus the seeds' mean, std, 95% interval, tuned rate, the grid's validation losses and
    each seed run's last validation loss) and one pair per VeRA/LoRA pair of a comparison, named as the rows are,
    recomputed from the runs' predictions/*.jsonl."""
    rows, pairs = [], []
    for group in groups:
        path = task_dir / group.name / "report.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        # Which record a row comes from: its folder, and the head-rate rule it trained under (reports written before
        # the one-head-rate rule have no top-level "head_lr": their heads trained at 1e-3 x each adapter's scale).
        source = {"run_dir": _shown(task_dir / group.name), "comparison_head_lr": report.get("head_lr"),
                  "head_rule": "one rate per comparison" if "head_lr" in report else "scaled with each adapter",
                  "head_lr_tuned": "head" in (report.get("tuning") or {})}
        written = json.loads((task_dir / group.name / "subset.json").read_text()) \
            if (task_dir / group.name / "subset.json").is_file() else {}
        subset = written.get("subset")
        source["head_lr_from"] = written.get("head_lr_from")  # the comparison whose head-only chose the head rate
        runs = {r["name"]: r for r in report["runs"]}
        histories = load_run(task_dir / group.name)[1]
        named = {s["setting"]: s["setting"] + (f"-{group.name}" if s["method"] in ("vera", "lora") else "")
                 for s in report.get("settings", [])}
        for s in report.get("settings", []):
            tuned = (report.get("tuning") or {}).get(s["setting"])
            row = {**quality_row(task, runs[s["runs"][0]], report, named[s["setting"]], subset), **source}
            grid = [{k: p[k] for k in ("scale", "lr", "val_loss", "test") if k in p} for p in tuned["grid"]] \
                if tuned else None
            row.update(metric=s["mean"], metric_mean=s["mean"], metric_std=s["std"], ci95=s["ci95"],
                       ci_kind=CI_SEEDS if s.get("ci_kind") == "t over seeds" else s.get("ci_kind"), seeds=s["seeds"],
                       tuned_lr=tuned["lr"] if tuned else None, lr_grid=grid, tie=(tuned or {}).get("tie"),
                       val_loss_seeds=[last_val_loss(histories.get(name, [])) for name in s["runs"]],
                       wall_s=sum(runs[name]["wall_s"] or 0.0 for name in s["runs"]))
            rows.append(row)
        pairs += [{**p, "vera": named[p["vera"]], "lora": named[p["lora"]]}
                  for p in pair_rows(report, task_dir / group.name)]
    return rows, pairs


def _shown(path: Path) -> str:
    """A run folder as the records show it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def last_val_loss(history: list[dict]) -> float | None:
    """A run's validation loss at its last evaluation (None when it never evaluated)."""
    evals = [e["eval_loss"] for e in history if e.get("type") == "eval" and e.get("eval_loss") is not None]
    return evals[-1] if evals else None


def refresh_run_pairs(run_dir: Path) -> None:
    """Recompute a finished comparison's pairs from its predictions: report.json's "pairs", and in report.md the
    seeds note and each pair's line (the rest of report.md is what the runs measured, unchanged)."""
    report = json.loads((run_dir / "report.json").read_text())
    old, new = report.get("pairs") or [], pair_rows(report, run_dir)
    if [(p["vera"], p["lora"]) for p in old] != [(p["vera"], p["lora"]) for p in new]:
        raise ValueError(f"{run_dir}: the recomputed pairs are not the recorded ones; rerun the comparison.")
    text = (run_dir / "report.md").read_text()
    note = text.split("Training seeds ", 1)[1].split("\n", 1)[0]
    text = text.replace("Training seeds " + note, seeds_note(report))
    for before, after in zip(old, new):
        text = text.replace(f"- {pair_line(before)}\n", f"- {pair_line(after)}\n")
    write_json(run_dir / "report.json", {**report, "pairs": new})
    write_text(run_dir / "report.md", text)


def refresh_records(results: Path, args: argparse.Namespace) -> None:
    """Rewrite every record (the run folders' pairs, quality.json, quality.md, the figures) from the saved runs and
    predictions; nothing trains."""
    for task in TASKS:
        task_dir = results / "repro" / task
        groups = [g for g in plan(task, args) if (task_dir / g.name / "report.json").is_file()]
        if not groups:
            continue
        for group in groups:
            refresh_run_pairs(task_dir / group.name)
        merge_quality(results, task, *task_rows(task, task_dir, groups))


def keep_previous(results: Path, source: str) -> None:
    """Store an earlier record's pairs (`source`: a quality.json file, or a commit whose
    benchmarks/results/quality.json is read), with what each side trained at, as quality.json's "previous": what
    quality.md's "what changed" section reads."""
    if Path(source).is_file():
        text, label = Path(source).read_text(), source
    else:
        try:
            text, label = committed_file(source, "benchmarks/results/quality.json"), f"commit {source}"
        except ValueError as err:
            raise SystemExit(f"--previous {source}: neither a file nor a commit holding "
                             f"benchmarks/results/quality.json ({err}).") from None
    try:
        old = json.loads(text)
        pairs = old["pairs"]
    except (ValueError, KeyError) as err:
        raise SystemExit(f"--previous {source}: not a quality.json with pairs ({err}); give an earlier record.") \
            from None
    previous = {}
    for task, task_pairs in pairs.items():
        rows = {r["name"]: r for r in old["tasks"].get(task, [])}
        previous[task] = [{**{k: p[k] for k in ("vera", "lora", "metric", "seeds", "diff_mean", "ci95", "verdict")},
                           **{f"{side}_{k}": rows.get(p[side], {}).get(k) for side in ("vera", "lora")
                              for k in ("metric_mean", "tuned_lr", "head_lr")}} for p in task_pairs]
    path = results / "quality.json"
    quality = json.loads(path.read_text()) if path.is_file() else {"tasks": {}}
    write_json(path, {**quality, "previous": {"from": label, "pairs": previous}})


def change_lines(quality: dict) -> list[str]:
    """quality.md's "what changed" section: each pair of the previous record (`keep_previous`) beside the same pair
    now, with its seeds, rates and head rates; a pair the record no longer has says so."""
    previous = quality.get("previous")
    if not previous:
        return []
    rows = {(t, r["name"]): r for t, task_rows in quality["tasks"].items() for r in task_rows}
    now = {(t, p["vera"], p["lora"]): p for t, task_pairs in quality.get("pairs", {}).items() for p in task_pairs}

    def side(p: dict, vera: dict, lora: dict) -> str:
        parts = [f"{len(p['seeds'])} seeds"]
        parts += [f"{name} {r['metric_mean']:.1f} at lr {r['tuned_lr']:.2g}"
                  for name, r in (("VeRA", vera), ("LoRA", lora))
                  if r.get("metric_mean") is not None and r.get("tuned_lr") is not None]
        heads = {vera.get("head_lr"), lora.get("head_lr")} - {None}
        if len(heads) == 1:
            parts.append(f"one head rate {heads.pop():.2g}")
        elif heads:
            parts.append(f"heads {vera['head_lr']:.2g} (VeRA) vs {lora['head_lr']:.2g} (LoRA)")
        return f"{p['diff_mean']:+.1f} [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] {verdict_text(p)} ({'; '.join(parts)})"

    lines = ["## What changed from the previous record", "",
             f"Each pair of the previous record ({previous['from']}) and the same pair now (difference of the "
             "means [95% interval] verdict):", ""]
    for task, task_pairs in previous["pairs"].items():
        for old in task_pairs:
            was = side(old, {k.removeprefix("vera_"): v for k, v in old.items() if k.startswith("vera_")},
                       {k.removeprefix("lora_"): v for k, v in old.items() if k.startswith("lora_")})
            new = now.get((task, old["vera"], old["lora"]))
            is_ = (side(new, rows.get((task, new["vera"]), {}), rows.get((task, new["lora"]), {})) if new
                   else "not in this record")
            lines.append(f"- {task} {old['vera']} − {old['lora']}: was {was}; now {is_}")
    return lines + [""]


def quality_row(task: str, run: dict, report: dict, name: str, subset: str | None) -> dict:
    metric_name = METRICS[task] if task in METRICS else "accuracy"
    return {**run, "name": name, "task": task, "metric_name": metric_name, "metric": run["eval"][metric_name],
            "wall_s": run["wall_s"], "model": report["model"], "device": report["device"], "subset": subset}


def merge_quality(results: Path, task: str, rows: list[dict], pairs: list[dict]) -> None:
    """Replace `task`'s rows and pairs in quality.json (other tasks kept), rewrite quality.md and the figures
    (error bars: the std over seeds)."""
    path = results / "quality.json"
    quality = json.loads(path.read_text()) if path.is_file() else {"tasks": {}}
    quality["tasks"][task] = rows
    quality.setdefault("pairs", {})[task] = pairs
    # The one classifier-head rate of each comparison (None: no head trains apart, or a record from before the rule).
    quality.setdefault("head_lr", {})[task] = {r["run_dir"].rsplit("/", 1)[-1]: r["comparison_head_lr"] for r in rows}
    results.mkdir(parents=True, exist_ok=True)
    write_json(path, quality)
    for name, rows_ in quality["tasks"].items():
        if any(r.get("r") for r in rows_):
            title = f"{name}: {rows_[0]['metric_name']} against trainable parameters"
            if any(r.get("metric_std") for r in rows_):
                title += "\n(mean over seeds, bars ± std)"
            # One line per run family: the name without its rank ("vera-r256-qv" -> "vera-qv").
            fig = tradeoff_figure([{**r, "series": re.sub(r"-r\d+", "", r["name"]), "metric_err": r.get("metric_std")}
                                   for r in rows_], "metric", title, series="series")
            fig.axes[0].set_ylabel(rows_[0]["metric_name"])
            fig.savefig(results / f"quality_{name}.png", dpi=100)
    (results / "quality.md").write_text(markdown(quality))


def bar_line(pair: dict) -> str:
    """A pair's line with both halves of the bar: the mean difference against −1 point (the interval's verdict says
    whether the data can tell) and the parameter ratio against 8x."""
    return (f"{pair_line(pair)}; bar: mean {pair['diff_mean']:+.1f} vs -{MARGIN:g} point: "
            f"{'met' if pair['diff_mean'] >= -MARGIN else 'MISSED'}, {pair['param_ratio']:.1f}x vs "
            f"{TARGET_RATIO:g}x fewer parameters: {'met' if pair['param_ratio'] >= TARGET_RATIO else 'MISSED'}")


def table(rows: list[dict]) -> str:
    def metric(r: dict) -> str:
        text = f"{r['metric_name']} {r['metric']:.2f}" + (f" ± {r['metric_std']:.2f}" if r.get("metric_std") else "")
        return text + (f" [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r.get("ci95") else "")

    cells = [{"run": r["name"], "trainable": f"{r['trainable_params']:,}",
              "head": f"{r['head_params']:,}" if r.get("head_params") else "-",
              "lr": f"{r['lr']:.2g}" + (" (tuned)" if r.get("tuned_lr") else "") if r.get("lr") else "-",
              "seeds": len(r["seeds"]) if r.get("seeds") else 1, "metric (mean ± std [95% CI over seeds])": metric(r),
              "wall_s": f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "-",
              "device": r.get("device") or "-"} for r in rows]
    columns = ["run", "trainable", "head", "lr", "seeds", "metric (mean ± std [95% CI over seeds])", "wall_s", "device"]
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    return head + "\n" + "\n".join("| " + " | ".join(str(c[k]) for k in columns) + " |" for c in cells)


def markdown(quality: dict) -> str:
    lines = ["# Paper reproduction: VeRA vs LoRA on real data", "",
             "Written by `benchmarks/reproduce.py`. Trainable parameters exclude the classifier head. Rows with seeds: "
             "every adapter tuned on the same learning-rate grid and step budget (validation loss, first seed), then "
             "run once per seed on the same test rows. Each comparison's classifier heads train at one rate (head-only "
             "tuned first, on its own grid; its choice is every method's head rate) unless a row's head_rule says "
             "otherwise. A row's 95% interval is a t-interval over its seeds: it holds "
             "the seed-to-seed spread only, not the test set's sampling error. A VeRA − LoRA pair's interval is a "
             "two-level paired bootstrap (each replicate draws the seeds with replacement and one resample of the "
             "test examples shared by every drawn seed of both methods), so it holds both; its verdict reads that "
             "interval.", ""]
    for task, rows in quality["tasks"].items():
        if not rows:
            continue
        lines += [f"## {task} ({rows[0].get('model')}; {rows[0].get('subset')})", "", table(rows), ""]
        if any(r.get("r") for r in rows):
            lines += [f"![{task}](quality_{task}.png)", ""]
        lines += [f"- {bar_line(p)}" for p in quality.get("pairs", {}).get(task, [])]
        lines += [head_line(r) for r in {r["run_dir"]: r for r in rows if r.get("run_dir")}.values()]
        if task in PAPER:
            lines.append(f"- paper: {PAPER[task]['lora']}; {PAPER[task]['vera']} (≈7x fewer)")
        lines.append("")
    rows = [r for rows in quality["tasks"].values() for r in rows]
    ties = [line for r in rows if (line := tie_line(r))]
    if ties:
        lines += ["## Tuning: which choices were near-ties", "",
                  "The grid runs on the first seed; the winner is trained again on a second seed, which measures the "
                  "seed-to-seed spread of its validation loss, and every point within that spread of the winner is "
                  "a near-tie, trained on the second seed too: the lower two-seed mean then wins (lab/tune.py)."
                  + (" Records tuned before that check (no second seed) are read against the spread of their seed "
                     "runs' last validation loss instead (those runs evaluate on the first 8 validation batches at "
                     "the full step budget): a near-tie there could go either way on another seed."
                     if any(r.get("lr_grid") and not r.get("tie") for r in rows) else ""), "", *ties, ""]
    return "\n".join(lines + sensitivity_lines(rows) + change_lines(quality))


def sensitivity_lines(rows: list[dict]) -> list[str]:
    """For the settings whose grid points were also scored on the test split (`SCORE_TUNING`): a table of the
    validation loss and the test metrics at every rate, the section a learner reads before copying a rate."""
    scored = [r for r in rows if r.get("lr_grid") and all("test" in p for p in r["lr_grid"])]
    if not scored:
        return []
    metrics = [k for k in scored[0]["lr_grid"][0]["test"] if k != "loss"]
    lines = ["## How sensitive each method is to its rate", "",
             "Every grid point trained on the first seed at the full step budget and was scored on validation loss "
             "(what chooses the rate) and, for reading only, on the test split. A rate a learner copies should sit "
             "where the test column is flat, not at a cliff's edge.", "",
             "| task | setting | scale | lr | validation loss | " + " | ".join(f"test {m}" for m in metrics) + " |",
             "|---|---|---|---|---|" + "---|" * len(metrics)]
    for r in scored:
        for p in r["lr_grid"]:
            chosen = " (chosen)" if p["lr"] == r.get("tuned_lr") else ""
            loss = f"{p['val_loss']:.4f}" if p["val_loss"] is not None else "diverged"
            lines.append(f"| {r['task']} | {r['name']} | x{p['scale']:g}{chosen} | {p['lr']:.2g} | {loss} | "
                         + " | ".join(f"{p['test'][m]:.1f}" if p["test"].get(m) is not None else "-" for m in metrics)
                         + " |")
    return lines + [""]


def head_line(row: dict) -> str:
    """"- head rate, sst2 qv (benchmarks/results/...): 8e-3 for every method (head-only's tuned rate)": where a
    comparison's rows come from and the one rate its heads trained at."""
    where = f"{row['task']} {row['run_dir'].rsplit('/', 1)[-1]} ({row['run_dir']})"
    if row.get("comparison_head_lr") is None:
        return (f"- head rate, {where}: none apart from the body" if row.get("head_rule") == "one rate per comparison"
                else f"- head rate, {where}: 1e-3 x each adapter's tuned scale (the record before one head rate)")
    source = ("head-only's tuned rate" if row.get("head_lr_tuned") else
              f"head-only's tuned rate in the {row['head_lr_from']} comparison" if row.get("head_lr_from") else
              "the default, untuned")
    return f"- head rate, {where}: {row['comparison_head_lr']:.2g} for every method ({source})"


def tie_line(row: dict) -> str | None:
    """"- sst2 vera-r256-all: x2 0.2816 chosen over x4 0.2832 (gap 0.0016 < seed spread 0.0107): near-tie", or None
    for a row without a grid of two finite points. A row tuned with the second-seed check reports that check (its
    spread, its near-tied points, their two-seed means); an older row, the grid gap against its seed runs' spread
    (None without two seed losses)."""
    grid = sorted((p for p in row.get("lr_grid") or [] if p["val_loss"] is not None), key=lambda p: p["val_loss"])
    if len(grid) < 2:
        return None
    if row.get("tie"):
        return checked_tie_line(row, grid)
    seeds = [v for v in row.get("val_loss_seeds") or [] if v is not None]
    if len(seeds) < 2:
        return None
    (best, second), spread = grid[:2], mean_std(seeds)[1]
    gap = second["val_loss"] - best["val_loss"]
    return (f"- {row['task']} {row['name']}: x{best['scale']:g} {best['val_loss']:.4f} chosen over x{second['scale']:g} "
            f"{second['val_loss']:.4f} (gap {gap:.4f} {'<' if gap < spread else '>='} seed spread {spread:.4f}): "
            + ("near-tie" if gap < spread else "clear"))


def checked_tie_line(row: dict, grid: list[dict]) -> str:
    """"- rotten-tomatoes head: x128 0.6097 first, seed 1 spread 0.0050; near-tie with x256, x64: two-seed means x128
    0.6133, x256 0.6230, x64 0.6146; x128 chosen" from the row's recorded second-seed check (`tune._break_tie`)."""
    tie, best = row["tie"], grid[0]
    first = {p["scale"]: p["val_loss"] for p in grid}
    spread = "no spread (the winner diverged on it)" if tie["spread"] is None else f"spread {tie['spread']:.4f}"
    head = (f"- {row['task']} {row['name']}: x{best['scale']:g} {best['val_loss']:.4f} first, "
            f"runner-up x{grid[1]['scale']:g} {grid[1]['val_loss']:.4f}; seed {tie['seed']} {spread}")
    if not tie["near"]:
        return head + ": clear"
    means = ", ".join(f"x{p['scale']:g} " + (f"{(first[p['scale']] + p['val_loss']) / 2:.4f}"
                                              if p["val_loss"] is not None else "diverged")
                      for p in tie["val_loss_second_seed"])
    chosen = next(p["scale"] for p in row["lr_grid"] if p["lr"] == row["tuned_lr"])
    return (head + f"; near-tie with {', '.join(f'x{x:g}' for x in tie['near'])}: two-seed means {means}; "
            f"x{chosen:g} chosen")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 3 steps")
    parser.add_argument("--full", action="store_true", help="whole data sets (meant for a GPU)")
    parser.add_argument("--data-dir", help="folder with sst2/ and e2e/ (default $VERA_REPRO_DATA or ../shared/data)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (quality.json, quality.md, repro/)")
    parser.add_argument("--steps", type=int,
                        help="optimizer steps per run (default: sst2 300, e2e 300, rotten-tomatoes 400)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--sst2-train-rows", type=int, default=4000)
    parser.add_argument("--e2e-train-groups", type=int, default=200)
    parser.add_argument("--e2e-test-groups", type=int, help="cap on test MRs (default: all 164 of the split)")
    parser.add_argument("--lora-lr", type=float, default=5e-4,
                        help="LoRA rate, the centre of its grid (LoRA paper's RoBERTa GLUE: 4e-4-5e-4)")
    parser.add_argument("--vera-lr", type=float, default=1e-2, help="VeRA vector rate, the centre of its grid")
    parser.add_argument("--d-init", type=float, default=0.1)
    parser.add_argument("--seeds", type=seed_list,
                        help="training seeds of the final runs (default: sst2 and rotten-tomatoes 0-4, e2e 0,1,2; "
                             "--quick: 0,1)")
    parser.add_argument("--group", choices=("qv", "all"), help="run only this comparison of the task")
    parser.add_argument("--tune", type=lambda v: float_list(v, "scales"),
                        help="learning-rate scales tried on validation for every adapter (default 0.25,0.5,1,2,4,8; "
                             "e2e 2,4,8,16; --quick: 0.5,2)")
    parser.add_argument("--head-tune", type=lambda v: float_list(v, "scales"),
                        help="head-only's scales of the 1e-3 head rate (HEAD_CENTRE), tuned first; its choice is "
                             "every method's head rate (default 0.25 to 1024 by doublings; --quick: 1,8)")
    parser.add_argument("--no-tune", action="store_true", help="run every method at its centre rate, untuned")
    parser.add_argument("--tune-steps", type=int, help="steps per tuning run (default: the task's --steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--records-only", action="store_true",
                        help="train nothing: rewrite every record in --out from its saved runs and predictions")
    parser.add_argument("--previous", metavar="COMMIT_OR_FILE",
                        help="with --records-only: the earlier record (a commit, whose "
                             "benchmarks/results/quality.json is read, or a quality.json file), kept in quality.json "
                             "as \"previous\" so quality.md says what changed, pair by pair")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    if args.previous and not args.records_only:
        parser.error("--previous goes with --records-only (it compares records, it trains nothing)")

    results = Path(args.out)
    if args.records_only:
        if args.previous:
            keep_previous(results, args.previous)
        refresh_records(results, args)
        print((results / "quality.md").read_text() if (results / "quality.md").is_file() else
              f"no runs under {results / 'repro'}: nothing to rewrite")
        return 0
    with stop_on_sigterm() as stop:  # kill -TERM: the run in progress checkpoints and the next start resumes it
        for task in TASKS if args.task == "all" else (args.task,):
            run_task(task, args, stop)
    path = results / "quality.json"
    if path.is_file():
        print(markdown(json.loads(path.read_text())))
    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; "
          f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
