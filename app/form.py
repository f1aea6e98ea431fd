"""The Train & compare tab's form: every setting as one RunForm, and the form as one prepared RunRequest.
Plain functions without Gradio, so tests can call them directly; every check is a vera_core call."""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from vera_core import TrainConfig, lora_grid, vera_grid
from vera_core.adapters.config import ALL_LINEAR
from vera_core.lab.data import BUILTIN_DATASETS
from vera_core.lab.parse import float_list, int_list
from vera_core.lab.request import RunRequest, TooManyRuns
from vera_core.lab.train import DEFAULT_LR
from vera_core.lab.tune import tuning_grids

UPLOAD = "uploaded file"
UPLOAD_SUFFIXES = (".jsonl", ".csv", ".tsv")
TARGET_PRESETS = {
    "default (the architecture's query + value)": None,
    "all-linear (every projection, head excluded)": ALL_LINEAR,
    "custom": "custom",
}
METHOD_CHOICES = ["base", "head", "vera", "lora", "full"]
SAMPLES = 4  # test inputs whose outputs every method writes to samples.jsonl (shown in the Outputs tab)
CONFIRM_ABOVE = 24  # the lab's run cap: a sweep with more runs starts only with the form's confirm_runs ticked


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
    vera_r: int | str = "256"  # text: one rank, or a comma-separated list for a sweep ("16,256")
    vera_d_init: float | str = "0.1"  # text: one value or a list; every VeRA r is run with every d_init
    lora_r: int | str = "8"  # text: one rank or a list
    lora_alpha: float | str | None = None  # text: one alpha for every LoRA rank; empty (None): 2r each
    targets: str = "all-linear (every projection, head excluded)"  # a TARGET_PRESETS key
    custom_targets: str = ""  # comma-separated module names, or one regex
    vera_lr: float = DEFAULT_LR["vera"][0]
    lora_lr: float = DEFAULT_LR["lora"][0]
    full_lr: float = DEFAULT_LR["full"][0]
    head_lr: float = DEFAULT_LR["head"][1]  # the classifier head's one rate under every method (classification)
    steps: int = 20  # ≈4-5 s a step for SmolLM2 at batch 4 x 128 on 2 quiet CPU cores: a few minutes in all
    batch_size: int = 4
    max_length: int = 128  # built-in restaurant rows are 67-114 SmolLM2 tokens, chat template included
    seed: int = 0  # the data split's seed, and the first training seed
    seeds: int = 1  # training seeds per setting (seed, seed + 1, ...): several give mean ± std and intervals
    tune_lr: bool = False  # every method's learning rates x LR_SCALES (head-only: x HEAD_LR_SCALES) on validation
    eval_batches: int = 2  # validation batches per evaluation during training (0: the whole split)
    eval_generate: int = 4  # test inputs generated and scored with BLEU / ROUGE-L after training (causal LM)
    prefer: str = "memory"  # VeRA's folded weights: "memory" rebuilds them in backward, "speed" keeps them
    confirm_runs: bool = False  # the user's yes to a plan of more than CONFIRM_ABOVE runs (tuning included)

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


def run_request(form: RunForm, upload: str | None) -> RunRequest:
    """The form as one prepared RunRequest (vera_core checks every value and loads the data set). Its run cap is
    CONFIRM_ABOVE until the form's confirm_runs is ticked: the lab's words for the library's TooManyRuns."""
    unknown = [m for m in form.methods if m not in METHOD_CHOICES]
    if unknown or not any(m != "base" for m in form.methods):
        raise ValueError(f"choose at least one method to train among head, vera, lora, full (got {form.methods}).")
    targets = target_modules(form)
    seed, seeds = number("seed", form.seed, True), number("seeds", form.seeds, True)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds is how many training seeds to run, a whole number >= 1; got {form.seeds!r}.")
    try:
        request = _request(form, upload, targets, seed, seeds)
    except TooManyRuns as err:  # a typo can make a 200-run grid: the user says yes with the tick box
        raise ValueError(f"this sweep makes {err.runs} runs, more than {err.limit}; tick \"I know this sweep has "
                         f"more than {CONFIRM_ABOVE} runs\" (API: confirm_runs=True) to start it.") from None
    return request.prepare()


def _request(form: RunForm, upload: str | None, targets, seed: int, seeds: int) -> RunRequest:
    return RunRequest(
        model=form.model, dataset=dataset_source(form, upload), methods=form.methods,
        vera=vera_grid(r=int_list(form.vera_r, "VeRA r"), d_init=float_list(form.vera_d_init, "VeRA d_init"),
                       target_modules=targets),
        lora=lora_grid(r=int_list(form.lora_r, "LoRA r"), target_modules=targets,
                       alpha=None if str(form.lora_alpha if form.lora_alpha is not None else "").strip() == ""
                       else number("LoRA alpha", form.lora_alpha)),
        train=TrainConfig(steps=number("steps", form.steps, True), batch_size=number("batch", form.batch_size, True),
                          max_length=number("sequence length", form.max_length, True),
                          seed=seed, prefer=form.prefer,
                          eval_batches=number("eval batches", form.eval_batches, True) or None),
        lrs={m: number(f"{m} learning rate", rate) for m, rate in
             (("vera", form.vera_lr), ("lora", form.lora_lr), ("full", form.full_lr), ("head", form.head_lr))},
        task=None if form.task == "auto" else form.task, max_rows=number("rows per split", form.max_rows, True) or None,
        quantization="4bit" if form.quantize_4bit else None, trust_remote_code=form.trust_remote_code,
        eval_generate=number("test generations scored", form.eval_generate, True), samples=SAMPLES,
        seeds=list(range(seed, seed + seeds)), tune=tuning_grids(form.methods) if form.tune_lr else None,
        isolate=True,  # each method in its own process: one the OOM killer ends takes only its run, not the lab
        max_runs=None if form.confirm_runs else CONFIRM_ABOVE)


def keep_upload(source: str, run_dir: Path) -> str:
    """Copy an uploaded data file into the run directory, so the run keeps the data it was trained on."""
    if source in BUILTIN_DATASETS:
        return source
    target = run_dir / "data" / Path(source).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return str(target)
