"""Equal tuning for every method: each setting's learning rates × every scale of the grid, trained for the same
number of steps on the first seed and scored by validation loss; the lowest wins. The test split is never read.

Each grid point trains into run_dir/tune/<setting>-x<scale>/ and records tune.json there when it finishes, so a
resumed comparison reuses finished points and continues a stopped one from its checkpoint.
"""
from __future__ import annotations

import json
import math
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..adapters.files import write_json
from .request import RunRequest, RunSpec
from .train import train as train_model

RESULT = "tune.json"
LR_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # the default grid: a factor 16 around each method's default rates


def _point(request: RunRequest, spec: RunSpec, scale: float, prepare: Callable[[RunSpec], tuple], work: Path,
           emit: Callable[[dict], None], stop: threading.Event | None) -> dict | None:
    """One grid point's {"scale", "lr", "head_lr", "val_loss", "steps", "wall_s"}; None when stopped."""
    # Evaluated once, at the end, on the whole validation split: the one number the choice rests on.
    steps = request.tune_steps or request.steps_per_run()
    config = replace(request.train_config(spec, scale), steps=steps, epochs=None, eval_every=steps,
                     eval_batches=None, checkpoint_every=None)
    if (work / RESULT).is_file():
        point = json.loads((work / RESULT).read_text())
        if (point["steps"], point["lr"], point["head_lr"]) == (steps, config.lr, config.head_lr):
            return point
        shutil.rmtree(work)  # made for other steps or rates (the request changed): train this point again
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
    write_json(work / RESULT, point)
    return point


def tune_rates(request: RunRequest, run_dir: Path, prepare: Callable[[RunSpec], tuple],
               emit: Callable[[dict], None], stop: threading.Event | None = None) -> dict | None:
    """{setting: {"scale", "lr", "head_lr" (the chosen ones), "grid": [every point, in grid order]}} for every
    trained setting of `request` (`request.tuning_plan()`); None when `stop` ended it (finished points are kept).
    prepare(spec) gives the fresh, trainable (model, tokenizer) of a run. A point whose loss is not finite
    (diverged) is never chosen; ties go to the earlier scale."""
    chosen: dict[str, dict] = {}
    for spec, scale in request.tuning_plan():
        emit({"type": "tune_start", "run": spec.setting, "scale": scale})
        point = _point(request, spec, scale, prepare, run_dir / "tune" / f"{spec.setting}-x{scale:g}", emit, stop)
        if point is None:
            return None
        entry = chosen.setdefault(spec.setting, {"grid": []})
        entry["grid"].append(point)
        emit({"type": "tune_done", "run": spec.setting, **point})
    for setting, entry in chosen.items():
        scored = [p for p in entry["grid"] if p["val_loss"] is not None]
        if not scored:
            raise ValueError(f"every tuning run of {setting} diverged (no finite validation loss); try smaller scales.")
        best = min(scored, key=lambda p: p["val_loss"])
        entry.update(scale=best["scale"], lr=best["lr"], head_lr=best["head_lr"])
    write_json(run_dir / "tuning.json", chosen)
    return chosen
