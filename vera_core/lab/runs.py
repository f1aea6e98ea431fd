"""Run directories after the fact: list them, load a run's model with its adapter exactly as it trained, export it.

A run directory (written by `compare`) holds config.json, metrics.jsonl, report.json, report.md, samples.jsonl,
adapters/<run>/ and figures.
"""
from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path

import torch

from ..adapters.files import atomic_directory
from ..adapters.inject import remove_adapter
from ..adapters.io import export_peft, load_adapter, save_adapter
from .models import load_model
from .report import metric_value

EXPORT_FORMATS = ("native", "peft", "lora", "merged")


def new_run_dir(runs_dir: str | os.PathLike, model: str) -> Path:
    """runs_dir/<time>-<model>, with a counter when a run of the same second exists (the path is not created)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(model).strip()).name).strip("-") or "model"
    stem = Path(runs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def load_base(model: str, task: str, seed: int, quantization: str | None = None, num_labels: int = 2,
              trust_remote_code: bool = False):
    """(model, tokenizer) as every run of a comparison starts: seeded first, so a new classification head is the
    same random head for every method (and again when the run is reloaded)."""
    torch.manual_seed(seed)
    return load_model(model, task=task, quantization=quantization, num_labels=num_labels,
                      trust_remote_code=trust_remote_code)


def read_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory: it has no config.json.")
    return json.loads(path.read_text())


def load_run_model(run_dir: str | os.PathLike, run_name: str = "base", trust_remote_code: bool = False):
    """(model, tokenizer) of a finished run: its base model loaded as the run loaded it (the run's own seed,
    quantization and task from the run's config.json) with adapter `run_name` ("base": none). A model that needed
    remote code still needs the caller's own trust_remote_code=True."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.get("trust_remote_code") and not trust_remote_code:
        raise ValueError(f"the run in {str(run_dir)!r} used a model with remote code ({config['model']}); pass "
                         "trust_remote_code=True to load it again.")
    adapter = run_dir / "adapters" / run_name
    if run_name != "base" and not adapter.is_dir():
        raise ValueError(f"run {run_name!r} saved no adapter in {str(run_dir)!r}; runs with one: "
                         f"{sorted(p.name for p in (run_dir / 'adapters').glob('*') if p.is_dir())}.")
    seed = config.get("run_seeds", {}).get(run_name, config["train"]["seed"])  # the run's own training seed
    model, tokenizer = load_base(config["model"], config["task"], seed, config.get("quantization"),
                                 len(config.get("labels") or [0, 1]), trust_remote_code)
    if run_name != "base":
        load_adapter(model, adapter)
    return model, tokenizer


def export(model, tokenizer, directory: str | os.PathLike, format: str, overwrite: bool = False) -> Path:
    """Write the model's active adapter as `format`: "native" (VeRA Lab files), "peft" (PeftModel loads it), "lora"
    (a VeRA adapter as its exact rank-r LoRA) or "merged" (a plain transformers folder with the update baked in;
    the model loses its adapter). `overwrite` may replace a non-empty directory VeRA Lab did not write; an
    earlier export of ours is always replaced."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    if format == "native":
        return save_adapter(model, directory, overwrite=overwrite)
    if format in ("peft", "lora"):
        return export_peft(model, directory, as_lora=format == "lora", overwrite=overwrite)
    with atomic_directory(directory, overwrite) as tmp:
        remove_adapter(model, merge=True).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(directory)


# The last event of metrics.jsonl says how a comparison ended; none of these yet: it is still running (or was killed).
_ENDINGS = {"compare_done": "finished", "stopped": "stopped", "error": "failed"}


def list_runs(runs_dir: str | os.PathLike) -> list[dict]:
    """The run history: every run directory directly under `runs_dir`, newest first, as {"run_dir", "model",
    "dataset", "methods", "settings" ({run name: its adapter settings, {} for base / head / full}), "best"
    ({method: its best headline metric, a mean over seeds when there are several}), "metric" (that metric's
    name), "started", "status" ("finished" | "stopped" | "failed" | "running"), "wall_s"}. A folder that is not a
    readable run is skipped with a warning; hidden folders (".name": the lab's uploads, scratch) are not runs."""
    found = []
    folders = sorted(p for p in Path(runs_dir).iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if Path(runs_dir).is_dir() else []
    for path in folders:
        try:
            found.append(run_summary(path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # json errors are ValueErrors
            warnings.warn(f"skipping {path}: not a readable run directory ({type(err).__name__}: {err}).",
                          stacklevel=2)
    return sorted(found, key=lambda run: (run["started"], run["run_dir"]), reverse=True)


def run_summary(run_dir: str | os.PathLike) -> dict:
    """One `list_runs` entry; ValueError (or OSError) when `run_dir` is not a readable run directory."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"runs": []}
    best: dict[str, float] = {}
    metric = None
    # With seeds, a setting counts by its mean over seeds (report.json "settings"), never by its luckiest seed.
    scored_runs = [(s["method"], (s["metric"], s["mean"])) for s in report["settings"]] if report.get("settings") \
        else [(run["method"], metric_value(run.get("eval"))) for run in report["runs"]]
    for method, scored in scored_runs:
        if scored is not None:
            metric = scored[0]
            best[method] = max(best.get(method, scored[1]), scored[1])
    started = config.get("started") or time.strftime("%Y-%m-%d %H:%M:%S",
                                                      time.localtime((run_dir / "config.json").stat().st_mtime))
    walls = [run["wall_s"] for run in report["runs"] if run.get("wall_s") is not None]
    adapters = config.get("adapters", {})
    return {"run_dir": str(run_dir), "model": config["model"], "dataset": config["dataset"],
            "methods": list(dict.fromkeys(adapters.get(name, {}).get("method", name) for name in config["methods"])),
            "settings": {name: _settings(adapters.get(name)) for name in config["methods"]},
            "best": best, "metric": metric, "started": started, "status": _status(run_dir, report),
            "wall_s": sum(walls) if walls else None}


def _settings(adapter: dict | None) -> dict:
    """The settings a run's name is made of (r, d_init or alpha), plus its targets."""
    if not adapter:
        return {}
    keys = ("r", "d_init", "target_modules") if adapter["method"] == "vera" else ("r", "alpha", "target_modules")
    return {k: adapter.get(k) for k in keys}


def _status(run_dir: Path, report: dict) -> str:
    if report.get("error"):
        return "failed"
    last = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text().splitlines()
        last = json.loads(lines[-1]).get("type") if lines and lines[-1].strip() else None
    return _ENDINGS.get(last, "running")
