"""What the lab shows, built from vera_core results: the run form and its configs, estimate and results tables,
loss-curve data, the calculator table and figure. Plain functions without Gradio, so tests can call them directly."""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import AutoConfig

from vera_core import LoraConfig, VeraConfig, count_parameters, estimate_parameters
from vera_core.calculator import KNOWN_MODELS, known_model, parameter_table
from vera_core.compare import plan_runs
from vera_core.config import ALL_LINEAR
from vera_core.count import meta_model
from vera_core.data import BUILTIN_DATASETS, TextDataset, load_dataset
from vera_core.files import write_json
from vera_core.memory import estimate_memory
from vera_core.models import OFFLINE_MODELS
from vera_core.train import DEFAULT_LR, TrainConfig

UPLOAD = "uploaded file"
UPLOAD_SUFFIXES = (".jsonl", ".csv", ".tsv")
TARGET_PRESETS = {
    "default (the architecture's query + value)": None,
    "all-linear (every projection, head excluded)": ALL_LINEAR,
    "custom": "custom",
}
METHOD_CHOICES = ["base", "vera", "lora", "full"]
FORM_FILE = "lab_form.json"  # the form as the user filled it, next to compare's config.json
SAMPLES = 4  # test inputs whose outputs every method writes to samples.jsonl (shown in the Outputs tab)


@dataclass
class RunForm:
    """Every setting of the Train & compare tab; saved with each run so it can be re-opened."""

    model: str = "smollm2-135m-instruct"  # an offline name, a Hub id or a local folder
    trust_remote_code: bool = False  # only when the user ticks it
    quantize_4bit: bool = False  # 4-bit (bitsandbytes NF4) base weights
    task: str = "auto"  # "auto" (the data set's), "causal-lm" or "classification"
    dataset: str = "synthetic-restaurants"  # a built-in name or UPLOAD
    max_rows: int = 96  # rows kept per split (0: all), so CPU runs stay short
    methods: list[str] = field(default_factory=lambda: ["base", "vera", "lora"])
    vera_r: int = 256
    vera_d_init: float | str = 0.1  # a text field in the UI, so any input (nan too) reaches VeraConfig's check
    lora_r: int = 8
    lora_alpha: float = 16
    targets: str = "all-linear (every projection, head excluded)"  # a TARGET_PRESETS key
    custom_targets: str = ""  # comma-separated module names, or one regex
    vera_lr: float = DEFAULT_LR["vera"][0]
    lora_lr: float = DEFAULT_LR["lora"][0]
    full_lr: float = DEFAULT_LR["full"][0]
    steps: int = 20  # ≈4-5 s a step for SmolLM2 at batch 4 x 128 on 2 quiet CPU cores: a few minutes in all
    batch_size: int = 4
    max_length: int = 128  # built-in restaurant rows are 67-114 SmolLM2 tokens, chat template included
    seed: int = 0
    eval_batches: int = 2  # validation batches per evaluation during training (0: the whole split)
    eval_generate: int = 4  # test inputs generated and scored with BLEU / ROUGE-L after training (causal LM)

    @classmethod
    def from_dict(cls, data: dict) -> "RunForm":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def default_form(gpu: bool | None = None) -> RunForm:
    """The defaults: a few-minute SmolLM2 comparison on 2 CPU cores; longer, larger runs when a GPU is present."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if gpu:
        return RunForm(max_rows=0, steps=300, batch_size=16, max_length=128, eval_batches=0, eval_generate=32)
    return RunForm()


# ---------------------------------------------------------------------------------------------- form -> configs

def number(name: str, value, integer: bool = False):
    """A form value as a number. Empty fields arrive as None and text fields as strings: name the field in the
    error instead of failing deep inside a config (whose own checks still reject 0, nan and the like)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} is empty; enter a number.")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}.") from None
    return int(value) if integer and math.isfinite(value) and float(value).is_integer() else value


def target_modules(form: RunForm):
    """The target_modules value of the chosen preset (custom: a list of names, or a regex when it has no comma)."""
    if form.targets not in TARGET_PRESETS:
        raise ValueError(f"unknown target preset {form.targets!r}; choose one of {list(TARGET_PRESETS)}.")
    preset = TARGET_PRESETS[form.targets]
    if preset != "custom":
        return preset
    text = form.custom_targets.strip()
    if not text:
        raise ValueError("custom target modules are empty; enter names such as q_proj,v_proj or a regex.")
    return [t.strip() for t in text.split(",") if t.strip()] if "," in text else text


def adapter_configs(form: RunForm) -> tuple[VeraConfig, LoraConfig]:
    """The VeRA and LoRA configs of the form (vera_core validates them: r = 0 or d_init = nan raise here)."""
    targets = target_modules(form)
    vera = VeraConfig(r=number("VeRA r", form.vera_r, True), d_init=number("VeRA d_init", form.vera_d_init),
                      target_modules=targets)
    lora = LoraConfig(r=number("LoRA r", form.lora_r, True), alpha=number("LoRA alpha", form.lora_alpha),
                      target_modules=targets)
    return vera, lora


def train_config(form: RunForm) -> TrainConfig:
    return TrainConfig(steps=number("steps", form.steps, True), batch_size=number("batch", form.batch_size, True),
                       max_length=number("sequence length", form.max_length, True), seed=number("seed", form.seed, True),
                       eval_batches=number("eval batches", form.eval_batches, True) or None)


def planned_runs(methods: list[str], vera: VeraConfig, lora: LoraConfig, task: str) -> list[str]:
    """The names compare will give the runs (for the progress line's "run 2/3")."""
    return [spec.name for spec in plan_runs(methods, vera, lora, task)]


def new_run_dir(runs_dir: Path, model: str) -> Path:
    """runs_dir/<time>-<model>, with a counter when a run of the same second exists."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.strip()).name).strip("-") or "model"
    stem = runs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def learning_rates(form: RunForm) -> dict[str, float]:
    rates = {"vera": form.vera_lr, "lora": form.lora_lr, "full": form.full_lr}
    for method, rate in rates.items():
        number(f"{method} learning rate", rate)
    return rates


def methods(form: RunForm) -> list[str]:
    unknown = [m for m in form.methods if m not in METHOD_CHOICES]
    if unknown or not any(m != "base" for m in form.methods):
        raise ValueError(f"choose at least one method to train among vera, lora, full (got {form.methods}).")
    return list(form.methods)


def dataset_source(form: RunForm, upload: str | None) -> str:
    """The name or file path `load_dataset` gets; uploads are checked by suffix here and by content there."""
    if form.dataset != UPLOAD:
        if form.dataset not in BUILTIN_DATASETS:
            raise ValueError(f"unknown data set {form.dataset!r}; choose one of {[*BUILTIN_DATASETS, UPLOAD]}.")
        return form.dataset
    if not upload:
        raise ValueError(f"no file uploaded; upload a {' / '.join(UPLOAD_SUFFIXES)} file or pick a built-in data set.")
    if Path(upload).suffix.lower() not in UPLOAD_SUFFIXES:
        raise ValueError(f"{Path(upload).name}: unsupported file type; upload a {' / '.join(UPLOAD_SUFFIXES)} file.")
    return upload


def load_form_dataset(form: RunForm, source: str) -> TextDataset:
    return load_dataset(source, None if form.task == "auto" else form.task, seed=number("seed", form.seed, True),
                        max_rows=number("rows per split", form.max_rows, True) or None)


def keep_upload(source: str, run_dir: Path) -> str:
    """Copy an uploaded data file into the run directory, so the run keeps the data it was trained on."""
    if source in BUILTIN_DATASETS:
        return source
    target = run_dir / "data" / Path(source).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return str(target)


# ---------------------------------------------------------------------------------------------- estimates

def model_config(name: str, trust_remote_code: bool = False):
    """The architecture of a model without its weights: the calculator's shapes for the offline names, else the
    checkpoint's config.json (local folder or Hub)."""
    name = name.strip()
    if not name:
        raise ValueError("the model field is empty; pick an offline model or enter a Hub id or local folder.")
    if name in KNOWN_MODELS:
        return known_model(name).config
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        offline = ", ".join(OFFLINE_MODELS)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"unknown model {name!r}: not a local model folder, and the Hub did not provide it "
                         f"({reason}). Offline choices: {offline}.") from err


def total_parameters(config) -> int:
    """Parameters of the base model's body (no task head), counted on the meta device."""
    return count_parameters(meta_model(config))["total"]


def estimate_table(form: RunForm) -> pd.DataFrame:
    """Before a run: trainable parameters, stored adapter size and training-memory estimate per chosen method."""
    config = model_config(form.model, form.trust_remote_code)
    vera, lora = adapter_configs(form)
    train = train_config(form)
    total = total_parameters(config)
    quantization = "4bit" if form.quantize_4bit else None
    rows = []
    for method in methods(form):
        adapter = {"vera": vera, "lora": lora}.get(method)
        if adapter is not None:
            params = estimate_parameters(config, adapter)
            trainable, stored = params["trainable"], params["stored_bytes"]
        else:
            trainable, stored = (total if method == "full" else 0), None
        memory = estimate_memory(config, adapter or (None if method == "base" else method), train.batch_size,
                                 train.max_length, quantization=quantization)
        rows.append({"method": method, "trainable params": trainable, "% of model": round(100 * trainable / total, 4),
                     "stored adapter (KiB)": round(stored / 1024, 1) if stored is not None else None,
                     "est. memory (MiB)": round(memory["total"] / 2**20, 1)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- results

RESULT_COLUMNS = ["run", "method", "trainable params", "% of model", "head params", "adapter file (KiB)",
                  "peak memory (MiB)", "step time (s)", "tokens/s", "final train loss", "test loss", "test metric"]


def _metric(run: dict) -> str | None:
    scores = run.get("eval") or {}
    if scores.get("accuracy") is not None:
        return f"accuracy {scores['accuracy']:.1f}%"
    if scores.get("bleu") is not None:
        return f"BLEU {scores['bleu']:.1f} / ROUGE-L {scores['rougeL']:.1f}"
    return None


def _round(value, digits: int):
    return None if value is None else round(value, digits)


def results_table(report: dict, total_params: int | None) -> pd.DataFrame:
    """One row per run of report.json; sizes in KiB / MiB, "% of model" against the base model's parameters."""
    rows = []
    for run in report.get("runs", []):
        eval_ = run.get("eval") or {}
        rows.append({
            "run": run["name"] + (" (stopped)" if run.get("stopped") else ""),
            "method": run["method"],
            "trainable params": run["trainable_params"],
            "% of model": round(100 * run["trainable_params"] / total_params, 4) if total_params else None,
            "head params": run.get("head_params"),
            "adapter file (KiB)": _round(run["adapter_bytes"] / 1024 if run.get("adapter_bytes") else None, 1),
            "peak memory (MiB)": _round(run["peak_memory_bytes"] / 2**20 if run.get("peak_memory_bytes") is not None
                                        else None, 1),
            "step time (s)": _round(run.get("step_time_s"), 3),
            "tokens/s": _round(run.get("tokens_per_s"), 1),
            "final train loss": _round(run.get("final_train_loss"), 4),
            "test loss": _round(eval_.get("loss"), 4),
            "test metric": _metric(run),
        })
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def histories(events: list[dict]) -> dict[str, list[dict]]:
    """Step and eval events grouped by run, the shape `plots.loss_figure` draws."""
    grouped: dict[str, list[dict]] = {}
    for event in events:
        grouped.setdefault(event["run"], []).append(event)
    return grouped


def samples_table(rows: list[dict], labels: list[str] | None, width: int = 160) -> pd.DataFrame:
    """samples.jsonl as text: the input, its label or references, and each run's answer (probabilities named)."""
    def shorten(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[: width - 1] + "…"

    def answer(value) -> str:
        if isinstance(value, list):  # class probabilities
            names = labels or [str(i) for i in range(len(value))]
            return ", ".join(f"{n} {p:.2f}" for n, p in zip(names, value))
        return shorten(value)

    table = []
    for row in rows:
        if "text" in row:
            label = row["label"]
            first = {"input": shorten(row["text"]), "label": labels[label] if labels else str(label)}
        else:
            first = {"input": shorten(row["prompt"]), "reference": shorten(" | ".join(row["reference"]))}
        keys = [k for k in row if k not in ("text", "label", "prompt", "reference")]
        table.append({**first, **{k: answer(row[k]) for k in keys}})
    return pd.DataFrame(table)


def list_runs(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of the run directories holding a report.json, newest first."""
    found = []
    for path in sorted(runs_dir.glob("*/report.json"), reverse=True):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a directory being written right now, or damaged: not listed
        names = ", ".join(r["name"] for r in report.get("runs", [])) or "no finished run"
        stopped = " — stopped" if report.get("stopped") else ""
        found.append((f"{path.parent.name} — {report.get('dataset')} ({names}){stopped}", str(path.parent)))
    return found


def read_form(run_dir: Path) -> RunForm | None:
    path = Path(run_dir) / FORM_FILE
    return RunForm.from_dict(json.loads(path.read_text())["form"]) if path.is_file() else None


def read_lab_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / FORM_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_form(run_dir: Path, form: RunForm, **extra) -> None:
    write_json(Path(run_dir) / FORM_FILE, {"form": asdict(form), **extra})


# ---------------------------------------------------------------------------------------------- calculator

def _ranks(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers such as 8,64; got {text!r}.") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{what} must be positive integers; got {text!r}.")
    return values


def calculator_rows(models: list[str], vera_ranks: str, lora_ranks: str, save_projection: bool) -> pd.DataFrame:
    """`parameter_table` for each known model: trainable parameters, stored KiB, and LoRA's first row over each."""
    if not models:
        raise ValueError("choose at least one model shape.")
    vera_r, lora_r = _ranks(vera_ranks, "VeRA ranks"), _ranks(lora_ranks, "LoRA ranks")
    rows = []
    for name in models:
        known = known_model(name)
        for row in parameter_table(known.config, known.targets, vera_r, lora_r, save_projection):
            rows.append({"model": name, "targets": known.note, "method": row["method"], "r": row["r"],
                         "trainable params": row["trainable"], "stored (KiB)": round(row["stored_bytes"] / 1024, 1),
                         "LoRA first rank / this": round(row["lora_ratio"], 1) if row["lora_ratio"] else None})
    return pd.DataFrame(rows)


def calculator_figure(table: pd.DataFrame) -> Figure:
    """Trainable parameters per model, one bar per (method, r), log scale: the paper's Table 1 at a glance."""
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(table["model"]))
    configs = list(dict.fromkeys(zip(table["method"], table["r"])))
    width = 0.8 / len(configs)
    for j, (method, r) in enumerate(configs):
        sub = table[(table["method"] == method) & (table["r"] == r)].set_index("model")
        values = [sub.loc[m, "trainable params"] for m in models]
        colour = ("tab:orange" if method == "vera" else "tab:blue")
        shade = 0.45 + 0.55 * (j % len(configs)) / max(1, len(configs) - 1)
        ax.bar([i + (j - (len(configs) - 1) / 2) * width for i in range(len(models))], values, width,
               label=f"{method} r={r}", color=colour, alpha=shade)
    ax.set_yscale("log")
    ax.set_xticks(range(len(models)), models, rotation=10)
    ax.set(ylabel="trainable parameters (log scale)", title="VeRA vs LoRA trainable parameters (no weights loaded)")
    ax.legend(fontsize=8, ncols=2)
    return fig
