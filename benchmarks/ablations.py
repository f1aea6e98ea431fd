"""Why VeRA works: the paper's ablations and rank sweep, reproduced with intervals on a CPU-sized task, beside what
the paper reports (Kopiczko et al., ICLR 2024, Tables 6-7 and Section 4.5, as ../shared/docs/vera-method.md lists).

Task: all-MiniLM-L6-v2 on SST-2, query + value, VeRA r=256: reproduce.py's CPU subset (train 4,000 rows carved from
train.tsv, validation 500, test all 872 rows of GLUE dev; 300 steps x batch 32, max_length 64). Why SST-2 rather
than Rotten Tomatoes: its test set is 1.8x larger (872 rows against 487), so the test-sampling half of a paired
interval is about 25% narrower (sqrt(487/872) = 0.75); in the existing record VeRA r=256's 95% interval over 3 seeds
is 1.7 points wide on SST-2 against 5.7 on Rotten Tomatoes; a run costs about the same (300 x 32 rows against
400 x 16: ~270 s against ~240 s per run in quality.md). The md's first lines recompute these from quality.json.

Groups, each its own `compare` run directory under <out>/ablations/ (resumed there: finished runs and tuning points
kept, a stopped run continues from its checkpoint):
- eight variants (VARIANTS), 5 seeds each; every variant's adapter rate is tuned on the 3-point grid x0.5, x1, x2
  around default VeRA's tuned rate in quality.json (sst2 vera-r256-qv), with tune's second-seed tie-break;
- the rank sweep: VeRA r = 1 ... 1024 at default's tuned rate (r=256 is default's first 3 seeds, not rerun) and
  LoRA r = 1 ... 64 with alpha 16 fixed (the LoRA paper's way: scaling alpha/r keeps the rate tuned at r=8 usable
  as r varies) at the rate quality.json tuned for lora-r8-qv, 3 seeds each;
- one classifier-head rate for every run of every group (issue 31: a comparison must not differ in the head): the
  record's per-comparison head rate (the head-rate rerun's benchmarks/results/rerun/quality.json, the default
  --rates-from once it holds the task), or --head-lr; a record from before that rule (its VeRA and LoRA heads
  trained at different rates) is refused;
- the per-layer picture of default VeRA's seed-0 adapter (mean |b|, mean |d|, ||d||_2, ||dW||_F / ||W0||_F).
The groups train in two child processes (harness.run_child: the variants, then the sweep); every group that ends
rewrites ablations.{json,md} (the figure is drawn when the run ends), so a killed run keeps what finished and a rerun
restarts at what did not; stopped with `kill -TERM -PGID` (its process group), the run in progress checkpoints first
and the rerun resumes it at that step (exit status 3). Tuning runs train half the steps (--tune-steps), as
reproduce.py tunes E2E. CPU hours and what ran beside it (benchmarks/beside.sh, every 5 minutes) go into the record.

    .venv/bin/python benchmarks/ablations.py --data-dir ../shared/data                 # the full run (CPU)
    .venv/bin/python benchmarks/ablations.py --estimate --data-dir ../shared/data      # its time, from step timings
    .venv/bin/python benchmarks/ablations.py --quick --out /tmp/abl                    # smoke run, minutes
    .venv/bin/python benchmarks/ablations.py --phase sweep --data-dir ../shared/data   # one phase (a second core)

Full run's cost (--estimate, 2026-12-05, this 2-core machine at 1 thread, load average 6-7 from other sessions and
a 1-thread reproduction rerun beside it): 1.1-1.4 s/step for VeRA r=1-1024 and LoRA r=1-64 at batch 32 x 64 (a
first, noisier measurement gave 1.1-1.8 s). The plan is 89 run-equivalents of 300 steps: the variants' 40 seed runs
and 32 tuning runs at half the steps (3 grid points + one second-seed check each; every further near-tie adds one
more), and the sweep's 33 runs; loading and scoring add 6% (quality.json's SST-2 runs). Estimate: 9.7 CPU hours at
1 thread on the loaded machine; at quality.md's SST-2 speed (0.9 s/step, an idle machine) about 7.1 hours. Both are
above the issue's ~6 hours: `--seeds 0,1,2` (the sweep's count) makes it 73 run-equivalents, about 5.8 hours idle.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from harness import (RESULTS, STOPPED, ChildFailed, beside_sampler, command_line, parse_or_serve,  # noqa: E402
                     run_child, stop_on_sigterm, write_page)
from reproduce import budgets, data_dir, missing_data, sst2_dataset  # noqa: E402

from vera_core.adapters.config import LoraConfig, VeraConfig  # noqa: E402
from vera_core.adapters.files import write_json  # noqa: E402
from vera_core.lab.parse import seed_list  # noqa: E402
from vera_core.lab.report import load_predictions, setting_rows  # noqa: E402
from vera_core.lab.stats import CI_SEEDS, accuracy_statistic, paired_difference  # noqa: E402

RANK = 256  # the paper's rank for RoBERTa-large (Table 8) and the lab's default
VARIANTS = {  # name -> the VeraConfig fields it changes (one component at a time, as Table 6)
    "default": {},
    "only_d": {"train_vectors": "d"},
    "only_b": {"train_vectors": "b"},
    "unique": {"projections": "unique"},
    "init_kaiming_normal": {"projection_init": "kaiming_normal"},
    "init_uniform": {"projection_init": "uniform"},
    "d_init_1e-07": {"d_init": 1e-7},
    "d_init_1.0": {"d_init": 1.0},
}
SCALES = (0.5, 1.0, 2.0)  # the 3-point grid around default VeRA's tuned rates
SWEEP = {"vera": (1, 4, 16, 64, 256, 1024), "lora": (1, 2, 4, 8, 16, 32, 64)}  # the paper's ranks (Section 4.5)
SWEEP_SEEDS = 3
PHASES = ("variants", "sweep")  # the sweep trains VeRA at the rate the variants' default group tuned
LORA_ALPHA = 16
QUICK = {"seeds": [0, 1], "scales": [0.5, 2.0], "tune_steps": 2, "sweep": {"vera": (1, 16, 256), "lora": (1, 2)}}
MODEL = "minilm-l6"

# What the paper reports (RoBERTa-large, accuracy, mean ± std over 5 seeds), as ../shared/docs/vera-method.md lists.
CITATION = ("Kopiczko, Blankevoort, Asano, VeRA, ICLR 2024 (arXiv 2310.11454 v2): Tables 6-7, RoBERTa-large, "
            "5 seeds, mean ± std; Section 4.5 / Figure 2 for the rank sweep (via ../shared/docs/vera-method.md)")
PAPER_TASKS = ("MRPC", "RTE")
PAPER = {  # Table 6; "unique" and its reference "shared" from Table 7
    "default": {"MRPC": (90.5, 0.7), "RTE": (85.8, 0.7)},
    "only_d": {"MRPC": (89.7, 0.0), "RTE": (67.0, 13.9)},
    "only_b": {"MRPC": (81.6, 10.1), "RTE": (64.3, 11.5)},
    "init_kaiming_normal": {"MRPC": (90.0, 1.1), "RTE": (82.6, 5.2)},
    "init_uniform": {"MRPC": (68.9, 1.3), "RTE": (53.1, 0.8)},
    "d_init_1e-07": {"MRPC": (90.8, 0.9), "RTE": (84.7, 0.9)},
    "d_init_1.0": {"MRPC": (70.3, 1.2), "RTE": (60.3, 12.4)},
    "unique": {"MRPC": (90.7, 0.3), "RTE": (84.6, 0.8)},
}
PAPER_SHARED_TABLE7 = {"MRPC": (90.0, 0.9), "RTE": (84.6, 1.5)}
PAPER_SWEEP = ("RoBERTa-large on RTE, VeRA r in {1, 4, 16, 64, 256, 1024} against LoRA r in {1, ..., 64}, 5 seeds, "
               "median: at equal trainable parameters the higher-rank VeRA is about 4 accuracy points above LoRA "
               "(per-rank values only in the plot: about 1e5-1e6 parameters, 83-86%)")


# ---------------------------------------------------------------------------------------------- what runs

def variant_config(variant: str, r: int = RANK) -> VeraConfig:
    return VeraConfig(r=r, **VARIANTS[variant])


def rates_record(task: str) -> Path:
    """The record the centres come from: the head-rate rerun's quality.json once it holds `task`, else the committed
    one (which refuses in `centre_rates` while it predates one head rate per comparison)."""
    rerun = RESULTS / "rerun" / "quality.json"
    if rerun.is_file() and json.loads(rerun.read_text())["tasks"].get(task):
        return rerun
    return RESULTS / "quality.json"


def centre_rates(path: Path, task: str, head_lr: float | None = None) -> dict[str, tuple[float, float]]:
    """{"vera": (lr, head_lr), "lora": (lr, head_lr)}: the adapter rates reproduce.py tuned for `task`'s query+value
    rows, with one head rate for both (issue 31: an adapter comparison must not differ in the head): `head_lr` when
    given, else the record's per-comparison head rate (quality.json's "head_lr"[task][group], else the rows' own)."""
    quality = json.loads(path.read_text()) if path.is_file() else {"tasks": {}}
    rows = {r["name"]: r for r in quality["tasks"].get(task, [])}
    lrs, heads = {}, {}
    for method, name in (("vera", "vera-r256-qv"), ("lora", "lora-r8-qv")):
        row = rows.get(name)
        if not row or not row.get("tuned_lr"):
            raise SystemExit(f"{path} has no tuned {task} {name} row: run `benchmarks/reproduce.py --task {task}` "
                             f"first, or point --rates-from at a quality.json that has one.")
        group = (row.get("run_dir") or "").rsplit("/", 1)[-1]
        lrs[method] = row["lr"]
        heads[method] = (quality.get("head_lr") or {}).get(task, {}).get(group) or row["head_lr"]
    if head_lr is None:
        if heads["vera"] != heads["lora"]:
            raise SystemExit(f"{path} predates one head rate per comparison ({task}: VeRA's head trained at "
                             f"{heads['vera']:g}, LoRA's at {heads['lora']:g}): run after the head-rate rerun "
                             "(benchmarks/rerun.sh) or pass --head-lr.")
        head_lr = heads["vera"]
    return {method: (lr, head_lr) for method, lr in lrs.items()}


def task_dataset(args: argparse.Namespace):
    """(TextDataset, budget) of the chosen task: reproduce.py's subsets and step budget (--quick: its smoke ones)."""
    from vera_core.lab.data import load_dataset

    b = budgets(args.task, args)
    if args.task == "sst2":
        return sst2_dataset(data_dir(args.data_dir), args.seed, b["train"], b["val"], b["test"]), b
    full = load_dataset("rotten-tomatoes", seed=args.seed)
    return replace(full, train=full.train[:b["train"]], validation=full.validation[:b["val"]],
                   test=full.test[:b["test"]]), b


def train_config(args: argparse.Namespace, b: dict, head_lr: float):
    from vera_core.lab.train import TrainConfig

    return TrainConfig(steps=b["steps"], batch_size=b["batch_size"], max_length=b["max_length"], seed=args.seed,
                       eval_every=b["steps"], eval_batches=8, head_lr=head_lr, device="cpu")


def seeds_of(args: argparse.Namespace) -> list[int]:
    return QUICK["seeds"] if args.quick else args.seeds


def sweep_plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(method, r) of every sweep point, smallest first; VeRA r=256 is the default variant's run, not trained here."""
    ranks = QUICK["sweep"] if args.quick else SWEEP
    return [(m, r) for m in ("vera", "lora") for r in ranks[m]]


def sweep_seeds(args: argparse.Namespace) -> list[int]:
    return seeds_of(args)[:SWEEP_SEEDS]


def group_dir(args: argparse.Namespace, group: str) -> Path:
    return Path(args.out) / "ablations" / group


def finished(run_dir: Path, seeds: list[int], head_lr: float) -> bool:
    """Whether the group's comparison finished, for these seeds and this head rate (another --seeds or --head-lr
    resumes it with them: compare retrains the runs whose rates differ)."""
    from vera_core.lab.runs import read_config, run_summary

    return ((run_dir / "report.json").is_file() and run_summary(run_dir)["status"] == "finished"
            and read_config(run_dir)["seeds"] == seeds
            and json.loads((run_dir / "report.json").read_text()).get("head_lr") == head_lr)


def run_group(args: argparse.Namespace, run_dir: Path, method: str, adapter, rates: tuple[float, float],
              seeds: list[int], tune: bool, stop: threading.Event | None = None) -> dict:
    """One compare() into `run_dir`, resumed when it holds one (`--fresh`: replaced); {"group", "kept"}. `stop` set
    (SIGTERM) ends it within a step, checkpointed, and the process with exit status STOPPED."""
    from vera_core.lab.compare import compare

    if finished(run_dir, seeds, rates[1]) and not args.fresh:
        return {"group": str(run_dir.relative_to(Path(args.out) / "ablations")), "kept": True}
    ds, b = task_dataset(args)
    exists = "overwrite" if args.fresh else ("resume" if (run_dir / "config.json").is_file() else "refuse")
    tune_steps = QUICK["tune_steps"] if args.quick else (args.tune_steps or max(1, b["steps"] // 2))
    report = compare(args.model, ds, methods=(method,), vera=adapter if method == "vera" else VeraConfig(),
                     lora=adapter if method == "lora" else LoraConfig(), train=train_config(args, b, rates[1]),
                     out_dir=run_dir, lrs={method: rates[0]}, seeds=seeds, samples=0, progress=False, exists=exists,
                     tune={"lr_scale": list(QUICK["scales"] if args.quick else SCALES)} if tune else None,
                     tune_steps=tune_steps if tune else None, stop=stop)
    if report.stopped:
        raise SystemExit(STOPPED)
    return {"group": str(run_dir.relative_to(Path(args.out) / "ablations")), "kept": False}


def tuned_lr(run_dir: Path) -> float:
    """The adapter rate the default variant's tuning chose (its head rate is the one every group trains at)."""
    path = run_dir / "tuning.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the sweep trains VeRA at default VeRA's tuned rates; run the variants "
                         "first (they run before the sweep).")
    return json.loads(path.read_text())[f"vera-r{RANK}"]["lr"]


def phase_seeds(args: argparse.Namespace, phase: str) -> list[int]:
    return seeds_of(args) if phase == "variants" else sweep_seeds(args)


def plan(args: argparse.Namespace, phase: str) -> list[tuple[str, str, object]]:
    """(group, method, adapter config) of every group of a phase, in order: "variants" (default first: the sweep
    trains at its tuned rates) or "sweep" (VeRA r=256 left out: it is the default variant's runs)."""
    if phase == "variants":
        return [(variant, "vera", variant_config(variant)) for variant in VARIANTS]
    return [(f"sweep/{m}-r{r}", m, VeraConfig(r=r) if m == "vera" else LoraConfig(r=r, alpha=LORA_ALPHA))
            for m, r in sweep_plan(args) if (m, r) != ("vera", RANK)]


def child_work(cfg: dict):
    """The child's side: every group of the phase, one result per group."""
    args = argparse.Namespace(**cfg["args"])
    rates = {k: tuple(v) for k, v in cfg["rates"].items()}
    if cfg["phase"] == "sweep":
        rates["vera"] = (tuned_lr(group_dir(args, "default")), rates["vera"][1])
    with stop_on_sigterm() as stop:  # kill -TERM -PGID: the run in progress checkpoints; the next start resumes it
        for group, method, adapter in plan(args, cfg["phase"]):
            yield run_group(args, group_dir(args, group), method, adapter, rates[method],
                            phase_seeds(args, cfg["phase"]), tune=cfg["phase"] == "variants", stop=stop)


# ---------------------------------------------------------------------------------------------- the record

def example_rows(run_dir: Path, run: str) -> np.ndarray | None:
    """(n, 1) the 0/1 "correct" column of a run's test predictions (None without them)."""
    rows = load_predictions(run_dir, run)
    return np.array([[r["score"]] for r in rows]) if rows else None


def paired(a_dir: Path, a_runs: dict[int, str], b_dir: Path, b_runs: dict[int, str]) -> dict | None:
    """A − B over the seeds both have (two-level paired bootstrap, stats.paired_difference); None without any."""
    seeds = sorted(set(a_runs) & set(b_runs))
    a = [example_rows(a_dir, a_runs[s]) for s in seeds]
    b = [example_rows(b_dir, b_runs[s]) for s in seeds]
    if not seeds or any(x is None for x in a + b):
        return None
    return {**paired_difference(a, b, accuracy_statistic), "seeds": seeds}


def setting_of(run_dir: Path, seeds: list[int] | None = None) -> dict | None:
    """The group's one setting over its finished seeds (only `seeds`, when given), with {seed: run name} and its
    tuning entry; None before any run finished."""
    if not (run_dir / "report.json").is_file():
        return None
    report = json.loads((run_dir / "report.json").read_text())
    if seeds is not None:
        report = {**report, "runs": [r for r in report["runs"] if r.get("seed") in seeds]}
    rows = setting_rows(report, run_dir)
    if not rows:
        return None
    row = rows[0]
    row["by_seed"] = dict(zip(row["seeds"], row["runs"]))
    row["tuning"] = (report.get("tuning") or {}).get(row["setting"])
    points = ((report.get("tuning") or {}).get(row["setting"]) or {}).get("grid", [])
    for key in ("wall_s", "cpu_s"):  # the group's time: its seed runs and its tuning points
        row[key] = sum(r.get(key) or 0.0 for r in [*report["runs"], *points])
    return row


def paper_change(variant: str) -> dict[str, float]:
    """{task: the paper's accuracy change} against its reference: Table 6's VeRA row (for "unique", Table 7's
    shared row, the same paper's comparison)."""
    reference = PAPER_SHARED_TABLE7 if variant == "unique" else PAPER["default"]
    return {t: round(PAPER[variant][t][0] - reference[t][0], 1) for t in PAPER_TASKS}


def paper_sign(variant: str) -> int:
    """The paper's direction against its reference: +1 / -1 when MRPC and RTE agree, 0 when they do not (or one
    is unchanged)."""
    signs = {int(np.sign(change)) for change in paper_change(variant).values()}
    return signs.pop() if len(signs) == 1 else 0


def direction(paper: int, ci: list[float] | None) -> str:
    """Whether the lab's interval reproduces the paper's direction: "reproduces" (same sign, 0 excluded),
    "opposite" (other sign, 0 excluded), "cannot tell" (0 inside); when the paper shows no direction, what the lab
    finds."""
    if ci is None:
        return "not run yet"
    lab = 1 if ci[0] > 0 else (-1 if ci[1] < 0 else 0)
    if lab == 0:
        return "cannot tell"
    if paper == 0:
        return f"paper: no direction; lab: {'higher' if lab > 0 else 'lower'}"
    return "reproduces" if lab == paper else "opposite"


def variant_rows(args: argparse.Namespace) -> list[dict]:
    base_dir = group_dir(args, "default")
    base = setting_of(base_dir)
    rows = []
    for variant in VARIANTS:
        run_dir = group_dir(args, variant)
        s = setting_of(run_dir)
        if s is None:
            continue
        pair = paired(run_dir, s["by_seed"], base_dir, base["by_seed"]) if base and variant != "default" else None
        tuning = s["tuning"] or {}
        rows.append({
            "variant": variant, "config": {k: v for k, v in variant_config(variant).to_dict().items()
                                           if k in ("r", "d_init", "train_vectors", "projections", "projection_init")},
            "seeds": s["seeds"], "values": s["values"], "metric": s["metric"], "metric_mean": s["mean"],
            "metric_std": s["std"], "ci95": s["ci95"], "ci_kind": CI_SEEDS, "trainable_params": s["trainable_params"],
            "lr": s["lr"], "head_lr": s["head_lr"], "tuned_scale": tuning.get("scale"),
            "lr_grid": [{k: p[k] for k in ("scale", "lr", "val_loss")} for p in tuning.get("grid", [])],
            "diff": pair["diff_mean"] if pair else None, "diff_ci95": pair["ci95"] if pair else None,
            "ci_method": pair["ci_method"] if pair else None, "paired_seeds": pair["seeds"] if pair else None,
            "paper": {t: {"mean": m, "std": sd} for t, (m, sd) in PAPER[variant].items()},
            "paper_direction": paper_sign(variant) if variant != "default" else None,
            "direction": direction(paper_sign(variant), pair["ci95"] if pair else None)
            if variant != "default" else None,
            "complete": len(s["seeds"]) == len(seeds_of(args)), "wall_s": s["wall_s"], "cpu_s": s["cpu_s"]})
    return rows


def sweep_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for method, r in sweep_plan(args):
        name = "default" if (method, r) == ("vera", RANK) else f"sweep/{method}-r{r}"
        s = setting_of(group_dir(args, name), sweep_seeds(args))
        if s is None:
            continue
        rows.append({"method": method, "r": r, "alpha": LORA_ALPHA if method == "lora" else None,
                     "trainable_params": s["trainable_params"], "seeds": s["seeds"], "values": s["values"],
                     "metric_mean": s["mean"], "metric_std": s["std"], "ci95": s["ci95"], "lr": s["lr"],
                     "head_lr": s["head_lr"], "group": name, "by_seed": s["by_seed"],
                     **{k: s[k] if name != "default" else 0.0 for k in ("wall_s", "cpu_s")}})  # default's: its row
    return rows


def equal_budget_pair(args: argparse.Namespace, sweep: list[dict]) -> dict | None:
    """VeRA's largest swept rank against the LoRA rank nearest it in trainable parameters (paired, same seeds)."""
    vera = [r for r in sweep if r["method"] == "vera"]
    lora = [r for r in sweep if r["method"] == "lora"]
    if not vera or not lora:
        return None
    v = max(vera, key=lambda r: r["r"])
    lo = min(lora, key=lambda r: abs(math.log(r["trainable_params"] / v["trainable_params"])))
    pair = paired(group_dir(args, v["group"]), v["by_seed"], group_dir(args, lo["group"]), lo["by_seed"])
    return pair and {"vera_r": v["r"], "vera_params": v["trainable_params"], "lora_r": lo["r"],
                     "lora_params": lo["trainable_params"], "diff": pair["diff_mean"], "diff_ci95": pair["ci95"],
                     "ci_method": pair["ci_method"], "seeds": pair["seeds"]}


def layer_picture(args: argparse.Namespace) -> list[dict] | None:
    """Per adapted layer of default VeRA's first-seed adapter: {"layer", "module", "mean_abs_b", "mean_abs_d",
    "d_norm", "delta_ratio" (||dW||_F / ||W0||_F)}; cached in <out>/ablations/default/layers.json."""
    import torch

    from vera_core.adapters.inject import adapter_layers
    from vera_core.lab.runs import load_run_model

    run_dir = group_dir(args, "default")
    base = setting_of(run_dir)
    if base is None:
        return None
    run = base["by_seed"][min(base["by_seed"])]
    cache = run_dir / "layers.json"
    if cache.is_file() and json.loads(cache.read_text())["run"] == run:
        return json.loads(cache.read_text())["layers"]
    model, _ = load_run_model(run_dir, run)
    rows = []
    with torch.no_grad():
        for path, layer in adapter_layers(model):
            b, d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
            w0 = layer.base_layer.weight.float()
            index = re.search(r"\.(\d+)\.", path)
            rows.append({"path": path, "layer": int(index.group(1)) if index else None, "in": w0.shape[1],
                         "out": w0.shape[0],
                         "module": path.rsplit(".", 1)[-1], "mean_abs_b": float(b.abs().mean()),
                         "mean_abs_d": float(d.abs().mean()), "d_norm": float(d.norm()),
                         "delta_ratio": float(layer.delta_weight("default").norm() / w0.norm())})
    write_json(cache, {"run": run, "layers": rows})
    return rows


def task_choice(quality: Path) -> list[str]:
    """Why the task: each candidate's test rows and VeRA r=256's interval over seeds, read from quality.json."""
    if not quality.is_file():
        return []
    lines = []
    for task, rows in json.loads(quality.read_text())["tasks"].items():
        row = next((r for r in rows if r["name"] == f"vera-r{RANK}-qv"), None)
        if row and row.get("ci95") and task in ("sst2", "rotten-tomatoes"):
            test = re.search(r"test (\d+)", row.get("subset") or "")
            per_run = row["wall_s"] / len(row["seeds"])
            lines.append(f"- {task}: {test.group(1) if test else '?'} test rows; VeRA r={RANK} q+v "
                         f"{row['metric_mean']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] over "
                         f"{len(row['seeds'])} seeds (width {row['ci95'][1] - row['ci95'][0]:.1f} points); "
                         f"{per_run:.0f} s per run")
    return lines


def record(args: argparse.Namespace, rates: dict, errors: list[str], draw: bool = True) -> dict:
    """Rewrite ablations.{json,md} in --out from every group's run directory, and ablations.png when `draw`."""
    import torch

    rows, sweep = variant_rows(args), sweep_rows(args)
    ds_note = json.loads((group_dir(args, "default") / "config.json").read_text())["splits"] \
        if (group_dir(args, "default") / "config.json").is_file() else None
    wall, cpu = (sum(r[key] for r in [*rows, *sweep]) for key in ("wall_s", "cpu_s"))
    result = {"task": args.task, "model": args.model, "targets": ["query", "value"], "r": RANK,
              "splits": ds_note, "quick": bool(args.quick), "seeds": seeds_of(args), "sweep_seeds": sweep_seeds(args),
              "lr_scales": list(QUICK["scales"] if args.quick else SCALES), "centre_rates": rates,
              "head_lr": rates["vera"][1], "head_lr_source": "--head-lr" if args.head_lr is not None else
              f"the per-comparison head rate of {args.rates_from}",
              "rows": rows, "rank_sweep": [{k: v for k, v in r.items() if k != "by_seed"} for r in sweep],
              "equal_budget": equal_budget_pair(args, sweep), "layers": layer_picture(args),
              "paper": {"citation": CITATION, "sweep": PAPER_SWEEP, "table7_shared": PAPER_SHARED_TABLE7},
              "wall_h": wall / 3600, "cpu_h": cpu / 3600, "threads": torch.get_num_threads(),
              "load_average": list(os.getloadavg()), "nice": os.nice(0), "beside": beside(args),
              "errors": errors}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablations.json", result)
    if draw and (rows or sweep):
        figure(result).savefig(out / "ablations.png", dpi=100)
    write_page(out / "ablations.md", markdown(result, task_choice(Path(args.rates_from))))
    return result


def figure(result: dict):
    """Four panels: the variants' accuracy (95% interval over seeds), their paired difference to default (two-level
    interval), the rank sweep against trainable parameters (bars: std over seeds), the per-layer picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colours = {v: plt.cm.tab10(i) for i, v in enumerate(VARIANTS)}
    rows = result["rows"]
    for i, row in enumerate(rows):
        c = colours[row["variant"]]
        axes[0, 0].errorbar(i, row["metric_mean"], yerr=[[row["metric_mean"] - row["ci95"][0]],
                                                         [row["ci95"][1] - row["metric_mean"]]], fmt="o", color=c,
                            capsize=4)
        if row["diff_ci95"]:
            axes[0, 1].errorbar(i, row["diff"], yerr=[[row["diff"] - row["diff_ci95"][0]],
                                                      [row["diff_ci95"][1] - row["diff"]]], fmt="o", color=c, capsize=4)
    for ax, title in ((axes[0, 0], "accuracy, mean and 95% interval over seeds"),
                      (axes[0, 1], "variant − default, paired (two-level 95% interval)")):
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right")
        ax.set_title(title)
    axes[0, 1].axhline(0, color="grey", lw=0.8)
    for method, colour in (("vera", "tab:blue"), ("lora", "tab:orange")):
        pts = sorted((r for r in result["rank_sweep"] if r["method"] == method), key=lambda r: r["trainable_params"])
        if pts:
            axes[1, 0].errorbar([p["trainable_params"] for p in pts], [p["metric_mean"] for p in pts],
                                yerr=[p["metric_std"] or 0.0 for p in pts], fmt="-o", color=colour, capsize=3,
                                label=method.upper())
            for i, p in enumerate(pts):  # staggered: VeRA r = 1, 4, 16 differ by a few parameters, one x apart
                axes[1, 0].annotate(f"r={p['r']}", (p["trainable_params"], p["metric_mean"]), fontsize=7,
                                    textcoords="offset points", xytext=(3, 3 + 9 * (i % 3)))
    axes[1, 0].set(xscale="log", xlabel="trainable parameters (head excluded)", ylabel="accuracy (%)",
                   title="rank sweep: mean, bars ± std over seeds")
    axes[1, 0].legend()
    for module, marker in (("query", "o"), ("value", "s")):
        pts = sorted((r for r in result["layers"] or [] if r["module"] == module), key=lambda r: r["layer"])
        x = [p["layer"] for p in pts]
        axes[1, 1].plot(x, [p["d_norm"] for p in pts], marker=marker, color="tab:green", label=f"||d||₂ {module}")
        axes[1, 1].plot(x, [100 * p["delta_ratio"] for p in pts], marker=marker, color="tab:red",
                        label=f"100·||ΔW||/||W0|| {module}")
        axes[1, 1].plot(x, [100 * p["mean_abs_b"] for p in pts], marker=marker, color="tab:purple",
                        label=f"100·mean |b| {module}")
    axes[1, 1].set(xlabel="layer", title="default VeRA after training, per layer (seed 0)")
    axes[1, 1].legend(fontsize=7)
    fig.suptitle(f"VeRA ablations: {result['model']} on {result['task']}, query+value, r={result['r']}")
    fig.tight_layout()
    return fig


def interval(ci: list[float] | None, sign: bool = False) -> str:
    return "-" if ci is None else (f"[{ci[0]:+.1f}, {ci[1]:+.1f}]" if sign else f"[{ci[0]:.1f}, {ci[1]:.1f}]")


def paper_cell(variant: str) -> str:
    """"MRPC 89.7 ± 0.0 (−0.8), RTE 67.0 ± 13.9 (−18.8)": the paper's accuracy and its change against its
    reference (Table 6's VeRA row; for "unique", Table 7's shared row)."""
    changes = paper_change(variant)
    cells = []
    for task in PAPER_TASKS:
        mean, std = PAPER[variant][task]
        change = "" if variant == "default" else f" ({changes[task]:+.1f})"
        cells.append(f"{task} {mean:.1f} ± {std:.1f}{change}")
    return ", ".join(cells)


def variant_table(rows: list[dict]) -> list[str]:
    head = ["variant", "paper (RoBERTa-large; change vs its reference)", "paper direction", "lab accuracy [95% CI]",
            "lab − default [two-level 95% CI]", "direction reproduces?", "seeds", "lr (tuned scale)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sign = {1: "higher", -1: "lower", 0: "none (MRPC and RTE disagree or unchanged)", None: "reference"}
        diff = "-" if r["diff"] is None else f"{r['diff']:+.2f} {interval(r['diff_ci95'], True)}"
        lr = f"{r['lr']:.3g}" + (f" (x{r['tuned_scale']:g})" if r["tuned_scale"] is not None else "")
        lines.append(f"| {r['variant']} | {paper_cell(r['variant'])} | {sign[r['paper_direction']]} | "
                     f"{r['metric_mean']:.2f} {interval(r['ci95'])} | {diff} | {r['direction'] or '-'} | "
                     f"{len(r['seeds'])} | {lr} |")
    return lines


def sweep_table(sweep: list[dict]) -> list[str]:
    lines = ["| method | r | trainable | accuracy mean ± std | 95% CI over seeds | seeds | lr |",
             "|---|---|---|---|---|---|---|"]
    for r in sweep:
        std = f" ± {r['metric_std']:.2f}" if r["metric_std"] is not None else ""
        lines.append(f"| {r['method']} | {r['r']} | {r['trainable_params']:,} | {r['metric_mean']:.2f}{std} | "
                     f"{interval(r['ci95'])} | {len(r['seeds'])} | {r['lr']:.3g} |")
    return lines


def layer_lines(layers: list[dict] | None) -> list[str]:
    """Per module: the range over layers of ||d||, mean |b| and ||ΔW||/||W0||, and where the largest sits."""
    lines = []
    for module in sorted({r["module"] for r in layers or []}):
        pts = sorted((r for r in layers if r["module"] == module), key=lambda r: r["layer"])
        top = max(pts, key=lambda r: r["delta_ratio"])
        lines.append(f"- {module}: ||d||₂ {min(p['d_norm'] for p in pts):.3g}–{max(p['d_norm'] for p in pts):.3g}, "
                     f"mean |b| {min(p['mean_abs_b'] for p in pts):.2e}–{max(p['mean_abs_b'] for p in pts):.2e}, "
                     f"||ΔW||/||W0|| {min(p['delta_ratio'] for p in pts):.2e}–{top['delta_ratio']:.2e} "
                     f"(largest in layer {top['layer']})")
    return lines + figure3_lines(layers)


def figure3_lines(layers: list[dict] | None) -> list[str]:
    """The paper's Figure 3 read on this adapter: mean ||d||₂ of query against value, and of the later half of the
    layers against the earlier half."""
    if not layers:
        return []

    def mean(rows: list[dict]) -> float:
        return sum(r["d_norm"] for r in rows) / len(rows)

    depths = sorted({r["layer"] for r in layers})
    middle = depths[len(depths) // 2]
    query, value = ([r for r in layers if r["module"] == m] for m in ("query", "value"))
    early, late = [r for r in layers if r["layer"] < middle], [r for r in layers if r["layer"] >= middle]
    if not (query and value and early and late):
        return []

    def side(a: float, b: float, paper: str, other: str) -> str:  # within 2%: one seed's adapter cannot order them
        return ("about equal, within 2%" if abs(a - b) <= 0.02 * max(a, b) else
                f"{paper} larger, as in the paper" if a > b else f"{other} larger, unlike the paper")

    by_module = side(mean(query), mean(value), "query", "value")
    by_depth = side(mean(late), mean(early), "later", "earlier")
    return [f"- Figure 3's pattern here (one trained adapter: a description, not a test with an interval): mean "
            f"||d||₂ query {mean(query):.3g} against value {mean(value):.3g} ({by_module}); layers {middle}–"
            f"{depths[-1]} {mean(late):.3g} against layers {depths[0]}–{middle - 1} {mean(early):.3g} ({by_depth})."]


def reading(result: dict) -> list[str]:
    """What this CPU-sized record can and cannot tell, from its numbers."""
    rows = [r for r in result["rows"] if r["diff_ci95"]]
    if not rows:
        return ["No variant has a paired difference yet."]
    halves = sorted((r["diff_ci95"][1] - r["diff_ci95"][0]) / 2 for r in rows)
    resolution = halves[len(halves) // 2]
    by = {}
    for r in rows:
        by.setdefault(r["direction"], []).append(r["variant"])
    counts = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(by.items()))
    small = [r["variant"] for r in rows if max(map(abs, paper_change(r["variant"]).values())) < resolution]
    text = [f"Of {len(rows)} variants against default ({result['model']}, {result['task']}, "
            f"{len(result['seeds'])} seeds): {counts}. The lab's paired intervals are ±{resolution:.1f} points wide "
            f"(median half-width, seeds and test rows both resampled): an effect smaller than that reads "
            "\"cannot tell\" here whatever its true size."]
    if small:
        text.append(f"The paper's own changes for {', '.join(small)} are below that on both MRPC and RTE, so no "
                    "CPU-sized record of this width could confirm or refute them.")
    layers = result.get("layers") or []
    if layers:
        width = layers[0]["out"]
        text.append(f"The lab adapts {len(layers)} layers {width} wide at r={result['r']} (r/width "
                    f"{result['r'] / width:.2f}); the paper's RoBERTa-large adapts 48 layers 1024 wide at r=256 "
                    "(0.25): a direction that reproduces says the mechanism carries over to a small model and a "
                    "single-sentence task; the sizes of the paper's effects (RoBERTa-large, MRPC and RTE) are not "
                    "what this record measures, and its accuracies are not comparable to the paper's.")
    pair = result.get("equal_budget")
    if pair:
        lo, hi = pair["diff_ci95"]
        said = "above" if lo > 0 else ("below" if hi < 0 else "not distinguishable from")
        text.append(f"Rank sweep: VeRA r={pair['vera_r']} ({pair['vera_params']:,} parameters) − LoRA "
                    f"r={pair['lora_r']} ({pair['lora_params']:,}) = {pair['diff']:+.2f} "
                    f"{interval(pair['diff_ci95'], True)} "
                    f"({len(pair['seeds'])} seeds): VeRA is {said} LoRA at about equal trainable parameters "
                    "(the paper: about 4 points above, RoBERTa-large on RTE).")
    return [" ".join(text)]


def pace(result: dict) -> str:
    """What the run cost and what shared the machine: CPU hours are the work; wall hours also hold the waiting."""
    nice = f" and nice {result['nice']} (it yields the cores to the jobs beside it)" if result["nice"] else ""
    seen = result["beside"]
    beside = (f"beside it, {seen['busy']} of {seen['samples']} five-minute samples saw other processes over 20% CPU "
              f"({seen['log']} lists them); " if seen else "")
    return (f"{result['cpu_h']:.2f} CPU hours in the runs' own processes, {result['wall_h']:.2f} h wall at "
            f"{result['threads']} thread(s){nice}; {beside}load average at the last write "
            f"{', '.join(f'{x:.1f}' for x in result['load_average'])}.")


def beside(args: argparse.Namespace) -> dict | None:
    """{"samples", "busy", "log"} from the beside.log the run's sampler writes (benchmarks/beside.sh), None before
    its first sample."""
    log = Path(args.out) / "ablations" / "beside.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    if not lines:
        return None
    return {"samples": len(lines), "busy": sum("%);" in line for line in lines),
            "log": str(log.relative_to(Path(args.out)))}


def markdown(result: dict, choice: list[str]) -> str:
    lines = ["# Why VeRA works: the paper's ablations beside the lab's", "",
             f"Written by `benchmarks/ablations.py`{' (--quick smoke run: not a result)' if result['quick'] else ''}. "
             f"{result['model']} on {result['task']} (splits {result['splits']}), query+value, VeRA r={result['r']}; "
             f"seeds {result['seeds']}; each variant's rates tuned on "
             f"x{', x'.join(f'{s:g}' for s in result['lr_scales'])} "
             f"around default VeRA's tuned rate ({result['centre_rates']['vera'][0]:g}); every run, variant and "
             f"sweep point alike, trains its classifier head at one rate, {result['head_lr']:g} "
             f"({result['head_lr_source']}), so no comparison differs in the head. A row's interval is a t-interval over seeds; a difference's "
             "is the two-level paired bootstrap (seeds and test rows resampled). Training: "
             f"{pace(result)}", ""]
    if choice:
        lines += ["Why this task (from quality.json, the reproduction's record):", "", *choice, ""]
    lines += ["## Ablations: the paper beside the lab", "", f"Paper: {CITATION}. Reference for \"unique\": Table 7's "
              "shared row (MRPC 90.0 ± 0.9, RTE 84.6 ± 1.5). \"direction reproduces?\": the lab's interval "
              "excludes 0 on the paper's side (reproduces), on the other side (opposite), or holds 0 (cannot tell); "
              "the paper's direction is the sign both of its tasks agree on.", "", *variant_table(result["rows"]), ""]
    lines += ["## What a CPU-sized model and task can and cannot tell", "", *reading(result), ""]
    lines += ["## Rank sweep", "", f"Paper: {PAPER_SWEEP}.", "",
              f"Lab: VeRA at default's tuned rate (r={result['r']}: default's first {len(result['sweep_seeds'])} "
              f"seeds), LoRA alpha {LORA_ALPHA} at the record's tuned lora-r8-qv rate; heads "
              f"at {result['head_lr']:g}; "
              f"seeds {result['sweep_seeds']}.",
              "", *sweep_table(result["rank_sweep"]), "", "![ablations](ablations.png)", ""]
    lines += ["## Per layer after training (default VeRA, first seed)", "",
              "Paper (Figure 3): ||d||₂ larger for query than value and in later layers than earlier ones.", "",
              *(layer_lines(result["layers"]) or ["- not run yet"]), ""]
    if result["errors"]:
        lines += ["## Errors", "", *[f"- {e}" for e in result["errors"]], ""]
    return "\n".join(lines)


def estimate(args: argparse.Namespace, rates: dict) -> str:
    """The full plan's CPU time: seconds per step measured here (compare.measure_step_times on the sweep's smallest
    and largest VeRA and LoRA) through RunRequest.time_estimate, plus loading and scoring as the share they took in
    quality.json's runs of this task."""
    from vera_core.lab.compare import measure_step_times
    from vera_core.lab.request import RunRequest

    ds, b = task_dataset(args)
    seeds = sweep_seeds(args)
    request = RunRequest(args.model, ds, ("vera", "lora"), [VeraConfig(r=r) for r in SWEEP["vera"]],
                         [LoraConfig(r=r, alpha=LORA_ALPHA) for r in SWEEP["lora"]],
                         train_config(args, b, rates["vera"][1]),
                         lrs={"vera": rates["vera"][0], "lora": rates["lora"][0]}, seeds=seeds, max_runs=None)
    step_s = measure_step_times(request)
    plan = request.time_estimate(step_s)
    per_vera = plan["runs"][f"vera-r{RANK}-s{seeds[0]}"]
    # Each variant: its seeds, and its grid plus one second-seed check at the tuning steps' share of a run.
    share = (args.tune_steps or max(1, b["steps"] // 2)) / b["steps"]
    variant_runs = len(VARIANTS) * (len(seeds_of(args)) + (len(SCALES) + 1) * share)
    sweep_s = plan["total_s"] - len(seeds) * per_vera  # r=256 is default's
    row = next(r for r in json.loads(Path(args.rates_from).read_text())["tasks"][args.task]
               if r["name"] == f"vera-r{RANK}-qv")
    overhead = row["wall_s"] / (len(row["seeds"]) * row["steps"] * row["step_time_s"])
    total = (variant_runs * per_vera + sweep_s) * overhead
    import torch

    steps = ", ".join(f"{k} {v:.2f} s" for k, v in step_s.items())
    return (f"seconds per step here ({os.cpu_count()} cores, {torch.get_num_threads()} threads): {steps}\n"
            f"variants: {variant_runs:g} run-equivalents x {per_vera / 3600:.3f} h; sweep: {sweep_s / 3600:.2f} h; "
            "loading and "
            f"scoring x{overhead:.2f} (quality.json's {args.task} vera-r{RANK}-qv)\n"
            f"estimated full run: {total / 3600:.1f} CPU hours")


def main() -> int:
    parser = command_line(__doc__.splitlines()[0], "<out>/ablations/ (every group is trained again)")
    parser.add_argument("--task", choices=("sst2", "rotten-tomatoes"), default="sst2")
    parser.add_argument("--model", default=MODEL, help="model name or folder (default minilm-l6)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 3 steps, 2 seeds, few ranks")
    parser.add_argument("--estimate", action="store_true", help="measure step times and print the full run's hours")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (ablations.*, ablations/)")
    parser.add_argument("--data-dir", help="folder with sst2/ (default $VERA_REPRO_DATA or ../shared/data)")
    parser.add_argument("--rates-from", help="quality.json holding the task's tuned vera-r256-qv and lora-r8-qv rates "
                        "(the centres; default: the head-rate rerun's record once it holds the task, else the "
                        "committed one)")
    parser.add_argument("--head-lr", type=float, help="the one classifier-head rate of every run (default: the "
                        "record's per-comparison head rate)")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2, 3, 4], help="seeds of every variant (0..4)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: reproduce.py's, 300 on sst2)")
    parser.add_argument("--tune-steps", type=int,
                        help="steps per tuning run (default: half of --steps, as reproduce.py tunes E2E)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--sst2-train-rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0, help="the data split's seed")
    parser.add_argument("--phase", choices=PHASES, action="append",
                        help="run only this phase (repeatable; default both, in order): two processes, one per phase, "
                             "use two cores once the variants' default group has tuned (the sweep trains at its rate)")
    args = parse_or_serve(parser, child_work)
    if args is None:
        return 0
    args.full = False  # reproduce.budgets' GPU mode: not an ablation budget
    args.rates_from = args.rates_from or str(rates_record(args.task))
    rates = centre_rates(Path(args.rates_from), args.task, args.head_lr)
    message = missing_data(args.task, data_dir(args.data_dir))
    if message:
        print(message)
        return 0
    if args.estimate:
        print(estimate(args, rates))
        return 0
    if "variants" not in (args.phase or PHASES):
        tuned_lr(group_dir(args, "default"))  # the sweep alone needs default's tuning: say so before any child starts
    errors: list[str] = []
    # SIGTERM (to the process group) reaches the child, which checkpoints and exits STOPPED; this process outlives it
    # to stop the sampler and write the record.
    with beside_sampler(Path(args.out) / "ablations" / "beside.log"), stop_on_sigterm() as stop:
        stopped = train_phases(args, rates, errors, stop)
    result = record(args, rates, errors)
    print(markdown(result, []))
    return STOPPED if stopped else 1 if errors else 0


def train_phases(args: argparse.Namespace, rates: dict, errors: list[str], stop: threading.Event) -> bool:
    """Each phase's groups in one child process; a finished group is kept, and every group that ends rewrites the
    record (without the figure: it is drawn once, at the end). A stopped child, or `stop`, ends the phases: True."""
    def recorded(row: dict) -> None:
        print(f"   {row['group']}: {'done earlier, kept' if row['kept'] else 'finished'}", flush=True)
        record(args, rates, errors, draw=False)

    for phase in args.phase or PHASES:
        print(f"== {phase} ({args.task}, {args.model}) ...", flush=True)
        groups = [group for group, _, _ in plan(args, phase)]
        if not args.fresh and all(finished(group_dir(args, g), phase_seeds(args, phase), rates["vera"][1])
                                   for g in groups):
            for group in groups:  # nothing to train: no child to start
                print(f"   {group}: done earlier, kept", flush=True)
            continue
        try:
            run_child(__file__, {"phase": phase, "args": vars(args), "rates": rates}, on_result=recorded)
        except ChildFailed as err:
            if err.returncode == STOPPED:
                print(f"   {phase}: stopped (SIGTERM) at a step, checkpointed: run again to resume it", flush=True)
                return True
            errors.append(f"{phase}: {err}")
            print(f"   {phase} stopped: {err}\n{err.tail}", flush=True)
        if stop.is_set():
            print("   stopped (SIGTERM) between phases: run again to go on", flush=True)
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
