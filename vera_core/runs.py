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

from .files import atomic_directory
from .inject import remove_adapter
from .io import export_peft, load_adapter, save_adapter
from .models import load_model

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
    """(model, tokenizer) of a finished run: its base model loaded as the run loaded it (seed, quantization and
    task from the run's config.json) with adapter `run_name` ("base": none). A model that needed remote code
    still needs the caller's own trust_remote_code=True."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.get("trust_remote_code") and not trust_remote_code:
        raise ValueError(f"the run in {str(run_dir)!r} used a model with remote code ({config['model']}); pass "
                         "trust_remote_code=True to load it again.")
    adapter = run_dir / "adapters" / run_name
    if run_name != "base" and not adapter.is_dir():
        raise ValueError(f"run {run_name!r} saved no adapter in {str(run_dir)!r}; runs with one: "
                         f"{sorted(p.name for p in (run_dir / 'adapters').glob('*') if p.is_dir())}.")
    model, tokenizer = load_base(config["model"], config["task"], config["train"]["seed"], config.get("quantization"),
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


def list_runs(runs_dir: str | os.PathLike) -> list[dict]:
    """Every run directory under `runs_dir` with a readable report.json, newest first: {"run_dir", "model",
    "dataset", "runs" (names), "stopped"}. Unreadable ones are skipped with a warning."""
    found = []
    for path in sorted(Path(runs_dir).glob("*/report.json"), reverse=True):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            warnings.warn(f"skipping {path.parent}: its report.json cannot be read ({err}).", stacklevel=2)
            continue
        found.append({"run_dir": str(path.parent), "model": report.get("model"), "dataset": report.get("dataset"),
                      "runs": [r["name"] for r in report.get("runs", [])], "stopped": bool(report.get("stopped"))})
    return found
