"""Equal tuning for every method: each setting's learning rate × every scale of the grid, trained for the same
number of steps on the first seed and scored by validation loss; the lowest wins. The test split is never read.

The classifier head trains at one rate in every method of a comparison (`RunRequest.rates`), so tuning moves only
the adapters' rates. When the comparison includes head-only, it is tuned first, on its own grid (tune's
"head_lr_scale"), and its chosen rate becomes that head rate: every other setting's grid points, and later every
seed run, train their heads at it.

One seed's validation loss moves with the seed, so a lowest loss can win by chance. The winner is therefore trained
again on a second seed: half the gap between its two losses, times sqrt(2), is the seed-to-seed spread (the sample
std of the two). Every other point whose first-seed loss is within that spread of the winner's is a near-tie, and is
trained on the second seed too; the lowest mean over the two seeds then wins. A clear winner costs one run more.

Each grid point trains into run_dir/tune/<setting>-x<scale>/ (the second seed's: <setting>-x<scale>-s<seed>/) and
records tune.json there when it finishes, so a resumed comparison reuses finished points and continues a stopped
one from its checkpoint.

A request with `score_tuning` also scores each point on the test split (tune.json "test", and predictions.jsonl
beside it): how the test metric moves with the rate, for a learner who copies a rate. The choice never reads it.
"""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..adapters.files import write_json, write_jsonl
from .evaluate import score_split
from .request import RunRequest, RunSpec
from .train import train as train_model

RESULT = "tune.json"
LR_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # the default grid: a factor 16 around each method's default rates
# Head-only's grid in the CLI and the lab: a new head's best rate moves with the features it reads (on Rotten
# Tomatoes, 0.1 for all-MiniLM-L6-v2 and 0.01 for SmolLM2: benchmarks/results/head_rate.md), so its grid spans
# factors of 4 from x0.25 to x64 of the default head rate.
HEAD_LR_SCALES = (0.25, 1.0, 4.0, 16.0, 64.0)


def tuning_grids(methods, scales=LR_SCALES, head_scales=None) -> dict:
    """RunRequest's `tune` for the CLI and the lab: `scales` for every method, and head-only's own grid
    (`head_scales`, else HEAD_LR_SCALES) when head-only is among `methods`."""
    head = {"head_lr_scale": list(head_scales or HEAD_LR_SCALES)} if "head" in methods else {}
    return {"lr_scale": list(scales), **head}


# train_point(spec, scale, head_scale, work): one grid point's result, None when stopped (`train_point` below
# in this process; compare runs it in a child process when the request isolates its runs).
PointTrainer = Callable[[RunSpec, float, float, Path], "dict | None"]


def train_point(request: RunRequest, spec: RunSpec, scale: float, head_scale: float,
                prepare: Callable[[RunSpec], tuple], work: Path, emit: Callable[[dict], None],
                stop: threading.Event | None) -> dict | None:
    """One grid point's {"scale", "lr", "head_lr", "val_loss", "steps", "wall_s", "cpu_s"} (and "test" when the
    request scores its tuning); None when stopped. prepare(spec) gives the fresh, trainable (model, tokenizer) of the point."""
    # Evaluated once, at the end, on the whole validation split: the one number the choice rests on.
    steps = request.tune_steps or request.steps_per_run()
    config = replace(request.train_config(spec, scale, head_scale), steps=steps, epochs=None, eval_every=steps,
                     eval_batches=None, checkpoint_every=None)
    if (work / RESULT).is_file():
        point = json.loads((work / RESULT).read_text())
        if ((point["steps"], point["lr"], point["head_lr"]) == (steps, config.lr, config.head_lr)
                and ("test" in point or not request.score_tuning)):
            return point
        shutil.rmtree(work)  # made for other steps, rates or scoring (the request changed): train this point again
    cpu0 = time.process_time()  # the point's CPU seconds: its cost on a shared machine, where wall time is not
    model, tokenizer = prepare(spec)
    resume = work if (work / "checkpoints").is_dir() else None
    name = f"tune/{work.name}"
    result = train_model(model, tokenizer, request.dataset, config, run_name=name, out_dir=work,
                         on_event=lambda e: emit({**e, "phase": "tune"}), stop=stop, resume_from=resume,
                         keep_adapter=False)  # the point keeps its score: the chosen rate is retrained per seed
    if result.stopped:
        return None
    loss = result.eval["eval_loss"] if result.eval else float("nan")
    point = {"scale": scale, "lr": config.lr, "head_lr": config.head_lr,
             "val_loss": loss if math.isfinite(loss) else None, "steps": result.steps_done, "wall_s": result.wall_s}
    if request.score_tuning:
        point["test"], _, examples = score_split(model, tokenizer, request.dataset, config, request.eval_generate, 0)
        write_jsonl(work / "predictions.jsonl", examples)
    point["cpu_s"] = time.process_time() - cpu0
    write_json(work / RESULT, point)  # last: a point without it is unfinished
    return point


def second_seed(request: RunRequest) -> int:
    """The seed that breaks near-ties: the request's second seed, else the first plus one."""
    return request.seeds[1] if len(request.seeds) > 1 else request.seeds[0] + 1


def _break_tie(request: RunRequest, spec: RunSpec, entry: dict, head_scale: float, point_trainer: PointTrainer,
               run_dir: Path, emit: Callable[[dict], None]) -> dict | None:
    """The setting's choice after the second-seed check (module docstring): {"scale", "lr", "head_lr", "tie"}, where
    "tie" records the seed, the spread, the near-tied scales and every second-seed loss; None when stopped."""
    scored = sorted((p for p in entry["grid"] if p["val_loss"] is not None), key=lambda p: p["val_loss"])
    if not scored:
        raise ValueError(f"every tuning run of {spec.setting} diverged (no finite validation loss); try smaller scales.")
    seed, best = second_seed(request), scored[0]
    again: dict[float, float | None] = {}

    def run_again(point: dict) -> bool:
        emit({"type": "tune_start", "run": spec.setting, "scale": point["scale"], "seed": seed})
        work = run_dir / "tune" / f"{spec.setting}-x{point['scale']:g}-s{seed}"
        result = point_trainer(replace(spec, seed=seed), point["scale"], head_scale, work)
        if result is not None:
            again[point["scale"]] = result["val_loss"]
            emit({"type": "tune_done", "run": spec.setting, "seed": seed, **result})
        return result is not None

    if len(scored) > 1 and not run_again(best):
        return None
    second = again.get(best["scale"])
    # A winner that diverges on the second seed has no spread to measure: every other point is then in question.
    spread = abs(best["val_loss"] - second) / math.sqrt(2) if second is not None else math.inf
    near = [p for p in scored[1:] if p["val_loss"] - best["val_loss"] < spread]
    for point in near:
        if not run_again(point):
            return None

    def two_seed_mean(point: dict) -> float:
        later = again.get(point["scale"])
        return math.inf if later is None else (point["val_loss"] + later) / 2

    # Ties among equal means go to the first seed's order (the earlier scale among equal losses).
    winner = min([best, *near], key=two_seed_mean) if near else best
    tie = {"seed": seed, "spread": spread if math.isfinite(spread) else None, "near": [p["scale"] for p in near],
           "val_loss_second_seed": [{"scale": k, "val_loss": v} for k, v in again.items()]} if again else None
    return {"scale": winner["scale"], "lr": winner["lr"], "head_lr": winner["head_lr"], "tie": tie}


def tune_rates(request: RunRequest, run_dir: Path, point_trainer: PointTrainer,
               emit: Callable[[dict], None]) -> dict | None:
    """{setting: {"scale", "lr", "head_lr" (the chosen ones), "grid": [every point, in grid order], "tie" (the
    second-seed check, `_break_tie`; None for a one-point grid)}} for every trained setting of `request`
    (`request.tuning_plan()`), head-only first: its chosen scale sets the head rate of the rest; None when stopped
    (finished points are kept). point_trainer trains one grid point (`PointTrainer`). A point whose loss
    is not finite (diverged) is never chosen; ties go to the earlier scale."""
    plan = request.tuning_plan()
    chosen = _tune(request, [p for p in plan if p[0].method == "head"], 1.0, run_dir, point_trainer, emit)
    head_scale = (chosen or {}).get("head", {}).get("scale", 1.0)
    rest = None if chosen is None else _tune(request, [p for p in plan if p[0].method != "head"], head_scale,
                                             run_dir, point_trainer, emit)
    if rest is None:
        return None
    chosen.update(rest)
    write_json(run_dir / "tuning.json", chosen)
    return chosen


def _tune(request: RunRequest, plan: list[tuple[RunSpec, float]], head_scale: float, run_dir: Path,
          point_trainer: PointTrainer, emit: Callable[[dict], None]) -> dict | None:
    """`tune_rates` for the grid points of `plan`, every head trained at the head rate × `head_scale`."""
    chosen: dict[str, dict] = {}
    specs: dict[str, RunSpec] = {}
    for spec, scale in plan:
        emit({"type": "tune_start", "run": spec.setting, "scale": scale})
        point = point_trainer(spec, scale, head_scale, run_dir / "tune" / f"{spec.setting}-x{scale:g}")
        if point is None:
            return None
        specs[spec.setting] = spec
        entry = chosen.setdefault(spec.setting, {"grid": []})
        entry["grid"].append(point)
        emit({"type": "tune_done", "run": spec.setting, **point})
    for setting, entry in chosen.items():
        choice = _break_tie(request, specs[setting], entry, head_scale, point_trainer, run_dir, emit)
        if choice is None:
            return None
        entry.update(choice)
    return chosen
