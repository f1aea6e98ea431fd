"""What the lab shows: the run form (and its saved copy), and tables made from vera_core's results for Gradio.
Plain functions without Gradio, so tests can call them directly; every computation is a vera_core call."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch

from vera_core import TrainConfig, lora_grid, vera_grid
from vera_core.lab.calculator import known_model, parameter_table
from vera_core.lab.parse import float_list, int_list
from vera_core.adapters.config import ALL_LINEAR, LoraConfig, VeraConfig
from vera_core.lab.data import BUILTIN_DATASETS, shorten
from vera_core.adapters.files import write_json
from vera_core.lab.memory import largest_batch
from vera_core.lab.report import metric_value, seed_summary_lines, summary_rows
from vera_core.lab.request import RunRequest
from vera_core.lab.runs import list_runs as vera_list_runs
from vera_core.lab.train import DEFAULT_LR
from vera_core.lab.tune import LR_SCALES

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
CONFIRM_ABOVE = 24  # a sweep with more runs starts only with the form's confirm_runs ticked


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
    steps: int = 20  # ≈4-5 s a step for SmolLM2 at batch 4 x 128 on 2 quiet CPU cores: a few minutes in all
    batch_size: int = 4
    max_length: int = 128  # built-in restaurant rows are 67-114 SmolLM2 tokens, chat template included
    seed: int = 0  # the data split's seed, and the first training seed
    seeds: int = 1  # training seeds per setting (seed, seed + 1, ...): several give mean ± std and intervals
    tune_lr: bool = False  # every method's learning rates x LR_SCALES on validation first, the best kept
    eval_batches: int = 2  # validation batches per evaluation during training (0: the whole split)
    eval_generate: int = 4  # test inputs generated and scored with BLEU / ROUGE-L after training (causal LM)
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


# ---------------------------------------------------------------------------------------------- form -> request

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
    """The form as one validated RunRequest (vera_core checks every value; the data set is loaded here)."""
    unknown = [m for m in form.methods if m not in METHOD_CHOICES]
    if unknown or not any(m != "base" for m in form.methods):
        raise ValueError(f"choose at least one method to train among vera, lora, full (got {form.methods}).")
    targets = target_modules(form)
    seed, seeds = number("seed", form.seed, True), number("seeds", form.seeds, True)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds is how many training seeds to run, a whole number >= 1; got {form.seeds!r}.")
    return RunRequest(
        model=form.model, dataset=dataset_source(form, upload), methods=form.methods,
        vera=vera_grid(r=int_list(form.vera_r, "VeRA r"), d_init=float_list(form.vera_d_init, "VeRA d_init"),
                       target_modules=targets),
        lora=lora_grid(r=int_list(form.lora_r, "LoRA r"), target_modules=targets,
                       alpha=None if str(form.lora_alpha if form.lora_alpha is not None else "").strip() == ""
                       else number("LoRA alpha", form.lora_alpha)),
        train=TrainConfig(steps=number("steps", form.steps, True), batch_size=number("batch", form.batch_size, True),
                          max_length=number("sequence length", form.max_length, True),
                          seed=seed,
                          eval_batches=number("eval batches", form.eval_batches, True) or None),
        lrs={m: number(f"{m} learning rate", rate) for m, rate in
             (("vera", form.vera_lr), ("lora", form.lora_lr), ("full", form.full_lr))},
        task=None if form.task == "auto" else form.task, max_rows=number("rows per split", form.max_rows, True) or None,
        quantization="4bit" if form.quantize_4bit else None, trust_remote_code=form.trust_remote_code,
        eval_generate=number("test generations scored", form.eval_generate, True), samples=SAMPLES,
        seeds=list(range(seed, seed + seeds)), tune={"lr_scale": list(LR_SCALES)} if form.tune_lr else None,
        isolate=True,  # each method in its own process: one the OOM killer ends takes only its run, not the lab
        max_runs=10**6)  # the lab's own limit is CONFIRM_ABOVE, with a confirmation (check_sweep_size)


def keep_upload(source: str, run_dir: Path) -> str:
    """Copy an uploaded data file into the run directory, so the run keeps the data it was trained on."""
    if source in BUILTIN_DATASETS:
        return source
    target = run_dir / "data" / Path(source).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return str(target)


# ---------------------------------------------------------------------------------------------- tables

def estimate_table(request: RunRequest) -> pd.DataFrame:
    """Before a run: trainable parameters, stored adapter size and training-memory estimate per planned run."""
    return pd.DataFrame([{
        "method": row["method"], "run": row["run"], "trainable params": row["trainable"],
        "% of model": row["% of model"],
        "stored adapter (KiB)": round(row["stored_bytes"] / 1024, 1) if row["stored_bytes"] is not None else None,
        "est. memory (MiB)": round(row["memory_estimate"]["total"] / 2**20, 1),
        "warning": row["warning"] or "",
    } for row in request.estimate()])


# report.summary_rows' keys as the lab labels them
RESULT_LABELS = {"run": "run", "method": "method", "trainable": "trainable params", "% of model": "% of model",
                 "head": "head params", "adapter_kib": "adapter file (KiB)", "peak_mib": "peak memory (MiB)",
                 "est_mib": "predicted memory (MiB)", "rss_mib": "process RSS (MiB)", "step_s": "step time (s)", "tokens_per_s": "tokens/s", "train_loss": "final train loss",
                 "test_loss": "test loss", "metric": "test metric"}
RESULT_COLUMNS = list(RESULT_LABELS.values())


def results_table(report: dict, total_params: int | None) -> pd.DataFrame:
    """report.summary_rows as the lab's table ("% of model" against the base model's parameters)."""
    rows = [{RESULT_LABELS[k]: v for k, v in row.items()} for row in summary_rows(report, total_params)]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def seed_summary(report: dict) -> str:
    """Over several seeds: mean ± std and the 95% interval per setting, and every "VeRA − LoRA" line with its
    interval and verdict; the tuned rates when tuned ("" for one untuned seed), as a fixed-width block."""
    lines = seed_summary_lines(report)
    return "\n\n```\n" + "\n".join(lines).strip() + "\n```" if lines else ""


def histories(events: list[dict]) -> dict[str, list[dict]]:
    """Step and eval events grouped by run, the shape `plots.loss_figure` draws."""
    grouped: dict[str, list[dict]] = {}
    for event in events:
        grouped.setdefault(event["run"], []).append(event)
    return grouped


def samples_table(rows: list[dict], labels: list[str] | None, width: int = 160) -> pd.DataFrame:
    """samples.jsonl as text: the input, its label or references, and each run's answer (probabilities named)."""
    def answer(value) -> str:
        if isinstance(value, list):  # class probabilities
            names = labels or [str(i) for i in range(len(value))]
            return ", ".join(f"{n} {p:.2f}" for n, p in zip(names, value))
        return shorten(value, width)

    table = []
    for row in rows:
        if "text" in row:
            label = row["label"]
            first = {"input": shorten(row["text"], width), "label": labels[label] if labels else str(label)}
        else:
            first = {"input": shorten(row["prompt"], width), "reference": shorten(" | ".join(row["reference"]), width)}
        keys = [k for k in row if k not in ("text", "label", "prompt", "reference")]
        table.append({**first, **{k: answer(row[k]) for k in keys}})
    return pd.DataFrame(table)


def list_runs(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of the lab's runs for a dropdown or checkboxes, newest first (vera_core.list_runs reads them)."""
    return [(run_label(run), run["run_dir"]) for run in vera_list_runs(runs_dir)]


def run_label(run: dict) -> str:
    status = "" if run["status"] == "finished" else f" — {run['status']}"
    return f"{Path(run['run_dir']).name} — {run['dataset']} ({', '.join(run['settings']) or 'no run'}){status}"


ALL = "all"  # the Runs tab's filter value that keeps every model / data set


HISTORY_COLUMNS = ["run directory", "started", "status", "model", "data set", "runs", "best", "wall (s)"]


def history_table(runs: list[dict]) -> pd.DataFrame:
    """vera_core.list_runs as the Runs tab's table: one row per run directory."""
    return pd.DataFrame([{
        "run directory": Path(run["run_dir"]).name, "started": run["started"], "status": run["status"],
        "model": run["model"], "data set": run["dataset"], "runs": ", ".join(run["settings"]),
        "best": ", ".join(f"{m} {v:.1f}" for m, v in run["best"].items()) + (f" ({run['metric']})" if run["best"]
                                                                              else ""),
        "wall (s)": round(run["wall_s"], 1) if run["wall_s"] is not None else None,
    } for run in runs], columns=HISTORY_COLUMNS)


def filter_runs(runs: list[dict], model: str | None, dataset: str | None) -> list[dict]:
    return [run for run in runs if model in (None, ALL, run["model"]) and dataset in (None, ALL, run["dataset"])]


def run_count(request: RunRequest) -> int:
    """Every run a request makes: each setting once per seed, plus the tuning runs."""
    return len(request.plan()) + len(request.tuning_plan())


def check_sweep_size(request: RunRequest, confirmed: bool) -> None:
    """A plan above CONFIRM_ABOVE runs starts only after an explicit yes (a typo can make a 200-run grid)."""
    runs = run_count(request)
    if runs > CONFIRM_ABOVE and not confirmed:
        raise ValueError(f"this sweep makes {runs} runs, more than {CONFIRM_ABOVE}; tick \"I know this sweep has "
                         f"more than {CONFIRM_ABOVE} runs\" (API: confirm_runs=True) to start it.")


def plan_text(request: RunRequest, time_estimate: dict | None = None) -> str:
    """The planned runs (settings, seeds, tuning runs) and, once step times were measured, the time estimate with
    what it is based on."""
    names, seeds, tuning = [spec.name for spec in request.settings()], request.seeds, len(request.tuning_plan())
    line = f"**{run_count(request)} run{'s' * (run_count(request) != 1)}**: {', '.join(names)}"
    if len(seeds) > 1:
        line += f", each trained with seeds {', '.join(map(str, seeds))}"
    if tuning:
        line += f", after {tuning} tuning runs (learning rate x {', '.join(f'{x:g}' for x in LR_SCALES)})"
    if run_count(request) > CONFIRM_ABOVE:
        line += f" — more than {CONFIRM_ABOVE}: tick the confirmation to start"
    if time_estimate is None:
        return line + ". Time: press *Measure time* (it trains 2-3 steps of the smallest and largest run)."
    return (line + f". **Estimated training time ≈ {time_estimate['total_s'] / 60:.1f} min** "
            f"({time_estimate['based_on']}).")


SWEEP_HEADING = "### Sweep: quality against size (base / head only dashed), and against d_init per r"
NOT_A_SWEEP = ("*This run is not a sweep* (one setting per method), so there is no trade-off or d_init figure: "
               "enter several values, e.g. VeRA r `16,256` or d_init `0.1,1`, in the Train tab for one.")


def is_sweep(report: dict) -> bool:
    """Several settings (r, d_init, alpha) of one method: what the trade-off and d_init figures are for."""
    settings: dict[str, set] = {}
    for run in report["runs"]:
        settings.setdefault(run["method"], set()).add((run.get("r"), run.get("d_init"), run.get("alpha")))
    return any(len(s) > 1 for s in settings.values())


def sweep_table(report: dict, total_params: int | None) -> pd.DataFrame:
    """The results table sorted by the test metric (best first; unscored runs last), with each run's settings."""
    table = results_table(report, total_params)
    settings = pd.DataFrame([{"r": run.get("r"), "d_init": run.get("d_init"), "alpha": run.get("alpha")}
                             for run in report["runs"]])
    scores = [(metric_value(run.get("eval")) or (None, float("-inf")))[1] for run in report["runs"]]
    table = pd.concat([table[["run"]], settings, table.drop(columns=["run"])], axis=1)
    return table.iloc[sorted(range(len(scores)), key=lambda i: -scores[i])].reset_index(drop=True)


def overlay_table(reports: dict[str, dict], totals: dict[str, int | None]) -> pd.DataFrame:
    """Several run directories side by side: every run's metric, parameters, memory and step time, by directory."""
    tables = [results_table(report, totals[name]).assign(directory=name) for name, report in reports.items()]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["directory", *RESULT_COLUMNS])
    return table[["directory", *RESULT_COLUMNS]]


def overlay_histories(histories: dict[str, dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """{directory: {run: events}} as one {"directory/run": events} for `plots.loss_figure`."""
    return {f"{directory}/{run}": events for directory, runs in histories.items() for run, events in runs.items()}


def read_form(run_dir: Path) -> RunForm | None:
    path = Path(run_dir) / FORM_FILE
    return RunForm.from_dict(json.loads(path.read_text())["form"]) if path.is_file() else None


def read_lab_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / FORM_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_form(run_dir: Path, form: RunForm, **extra) -> None:
    write_json(Path(run_dir) / FORM_FILE, {"form": asdict(form), **extra})


# ---------------------------------------------------------------------------------------------- calculator

def calculator_rows(models: list[str], vera_ranks: str, lora_ranks: str, save_projection: bool) -> list[dict]:
    """`parameter_table` for each known model: trainable parameters, stored KiB, and LoRA's first row over each."""
    if not models:
        raise ValueError("choose at least one model shape.")
    vera_r, lora_r = int_list(vera_ranks, "VeRA ranks"), int_list(lora_ranks, "LoRA ranks")
    rows = []
    for name in models:
        known = known_model(name)
        for row in parameter_table(known.config, known.targets, vera_r, lora_r, save_projection):
            rows.append({"model": name, "targets": known.note, "method": row["method"], "r": row["r"],
                         "trainable": row["trainable"], "stored (KiB)": round(row["stored_bytes"] / 1024, 1),
                         "LoRA first rank / this": round(row["lora_ratio"], 1) if row["lora_ratio"] else None})
    return rows


def fit_rows(model: str, budget_gib: float, seq_len: int, vera_r: int, lora_r: int, dtype: str) -> tuple[list[dict], list]:
    """"Will it fit?": the largest training batch for VeRA and LoRA on one known model within a memory budget, and the
    (label, breakdown) bars of each answer."""
    known = known_model(model)
    try:
        budget = float(budget_gib)  # typed into the dropdown, it arrives as text
    except (TypeError, ValueError):
        budget = float("nan")
    if not budget > 0:
        raise ValueError(f"the memory budget must be a positive number of GiB, got {budget_gib!r}.")
    rows, bars = [], []
    for config in (VeraConfig(r=int(vera_r), target_modules=known.targets),
                   LoraConfig(r=int(lora_r), target_modules=known.targets)):
        fit = largest_batch(known.config, config, int(budget * 2**30), int(seq_len), dtype)
        label = f"{config.method} r={config.r}"
        rows.append({"method": label, "largest batch": fit.batch_size,
                     "predicted peak (GiB)": round(fit.breakdown["total"] / 2**30, 2),
                     "per extra row (MiB)": round(fit.per_row_bytes / 2**20, 1),
                     "fixed (MiB)": round(fit.fixed_bytes / 2**20, 1), "answer": fit.message})
        bars.append((f"{label}\nbatch {fit.batch_size or 1}", fit.breakdown))
    return rows, bars


# ---------------------------------------------------------------------------------------------- many adapters
MANY_BASE = "__base__"
ADAPTER_FILES = ("vera_lab_adapter.json", "adapter_config.json")  # native, PEFT


def run_adapters(runs_dir: Path) -> list[str]:
    """"<run directory>/<adapter run>" for every saved adapter of the lab's runs, newest run first."""
    out = []
    for run in vera_list_runs(runs_dir):
        path = Path(run["run_dir"])
        out += [f"{path.name}/{name}" for name in run["settings"] if (path / "adapters" / name).is_dir()]
    return out


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def unzip_adapter(archive: Path, target: Path) -> Path:
    """Extract an uploaded adapter zip into `target` (names that would land outside it are refused) and return
    the folder that holds the adapter files (the zip's root, or its one folder)."""
    import zipfile

    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (target / member).resolve().is_relative_to(target.resolve()):
                    raise ValueError(f"{archive.name}: refusing the entry {member!r} (it points outside the folder).")
            zf.extractall(target)
    except zipfile.BadZipFile:
        raise ValueError(f"{archive.name} is not a zip file; upload an adapter folder zipped (e.g. from the Export "
                         "tab).") from None
    candidates = [target] + sorted(p for p in target.rglob("*") if p.is_dir())
    found = next((p for p in candidates if any((p / f).is_file() for f in ADAPTER_FILES)), None)
    if found is None:
        raise ValueError(f"{archive.name} holds no adapter: neither {' nor '.join(ADAPTER_FILES)} is in it.")
    return found


def assign_rows(prompts: list[str], adapters: list[str], assignment: str, every: bool,
                limit: int) -> list[tuple[str, str]]:
    """(prompt, adapter label) per row: every adapter x every prompt, or one adapter per prompt from
    `assignment` (one label a line, in the prompts' order; "base" for no adapter; a run's adapter may be named by
    its last part alone when that is unique), or, when `assignment` is empty, the adapters in turn."""
    if not prompts:
        raise ValueError("enter at least one prompt (one a line).")
    if not adapters:
        raise ValueError("choose at least one adapter (a run's adapter or an uploaded zip).")
    if every:
        rows = [(p, a) for p in prompts for a in adapters]
    else:
        wanted = prompt_lines(assignment)
        if not wanted:
            rows = [(p, adapters[i % len(adapters)]) for i, p in enumerate(prompts)]
        else:
            if len(wanted) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(wanted)} adapter lines; give one adapter a line, "
                                 "one per prompt (or leave it empty to take the adapters in turn).")
            rows = [(p, _label(w, adapters)) for p, w in zip(prompts, wanted)]
    if len(rows) > limit:
        raise ValueError(f"{len(rows)} rows is more than this lab serves in one batch ({limit}); use fewer prompts "
                         "or adapters.")
    return rows


def _label(wanted: str, adapters: list[str]) -> str:
    if wanted in ("base", MANY_BASE):
        return MANY_BASE
    if wanted in adapters:
        return wanted
    short = [a for a in adapters if a.rsplit("/", 1)[-1] == wanted]
    if len(short) == 1:
        return short[0]
    raise ValueError(f"unknown adapter {wanted!r}" + (" (more than one adapter has that name)" if short else "")
                     + f"; choose one of {adapters} or 'base'.")


def many_summary(result: dict, labels: dict[str, str], rows: int) -> str:
    """The batch's time beside one adapter at a time, whether they agree, and the adapters' memory."""
    batch, single = result["batch_s"], result["one_at_a_time_s"]
    same = sum(a == b for a, b in zip(result["outputs"], result["outputs_one_at_a_time"]))
    memory = result["memory"]
    per = ", ".join(f"{labels.get(n, n)} {b / 1024:.1f} KiB" for n, b in memory["per_adapter"].items())
    shared = f" + the shared A and B {memory['shared'] / 2**20:.2f} MiB, once for all" if memory["shared"] else ""
    return (f"**One mixed batch**: {rows} rows in {batch:.2f} s · **one adapter at a time**: {single:.2f} s "
            f"({single / batch:.1f}× the batch's time) · same outputs both ways: {same}/{rows} rows\n\n"
            f"**Adapter memory**: {len(memory['per_adapter'])} adapters, {memory['adapters_total'] / 1024:.1f} KiB "
            f"({per}){shared}.")
