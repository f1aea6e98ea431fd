"""Side by side: train every method on the same model, data, seed and step budget, and write one run directory.

    report = compare("minilm-l6", "rotten-tomatoes", methods=("base", "vera", "lora"), train=TrainConfig(steps=200))

The run directory holds config.json, metrics.jsonl (every event, one per line), adapters/<run>/, report.json,
report.md, samples.jsonl and the figures. It is consistent after every run, so a stop leaves a readable directory.
"""
from __future__ import annotations

import copy
import gc
import json
import multiprocessing
import os
import queue as queue_module
import re
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .cli import format_table
from .config import AdapterConfig, LoraConfig, VeraConfig
from .count import count_parameters
from .data import TextDataset, load_dataset
from .files import write_json
from .inject import adapter_layers, add_adapter
from .io import save_adapter
from .memory import DTYPE_BYTES, comparable_estimate, estimate_memory
from .metrics import generation_scores, group_references
from .models import CLASSIFIER_HEADS, generate, load_model, predict
from .train import TrainConfig, resolve_device, default_lr, evaluate, train as train_model

METHODS = ("base", "head", "vera", "lora", "full")
MEMORY_MODES = {
    "isolated": "each method ran in its own process (multiprocessing spawn), so its peak is its own",
    "in-process": "all methods ran in one process (gc between them); a CPU RSS delta can be distorted by what "
                  "earlier methods left allocated",
}


@dataclass
class RunReport:
    """One method's numbers; fields that do not apply are None (see the report.json contract in the README)."""

    name: str  # "base", "head", "vera-r256", "vera-r256-d0.1", "lora-r8", "full"
    method: str
    r: int | None = None
    alpha: float | None = None  # LoRA only
    d_init: float | None = None  # VeRA only
    targets: list[str] | None = None  # adapted module names (leaf names, sorted)
    lr: float | None = None
    steps: int | None = None  # optimizer steps done
    trainable_params: int = 0  # head excluded
    head_params: int | None = None  # trainable classifier-head parameters (classification runs that train one)
    adapter_bytes: int | None = None  # size of adapters/<name>/ on disk
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None  # "cuda_max_allocated" | "cpu_rss_delta"
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    final_train_loss: float | None = None
    eval: dict | None = None  # {"loss", "accuracy"} or {"loss", "bleu", "rougeL"} on the test split
    stopped: bool = False  # the stop flag ended this run early (its eval is then None)
    wall_s: float | None = None
    memory_estimate: dict | None = None  # estimate_memory(...) made before the run started
    history: list[dict] = field(default_factory=list, repr=False)  # step/eval events (metrics.jsonl has them too)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "history"}


@dataclass
class Report:
    """A whole comparison: what ran where, and one RunReport per finished (or stopped) method."""

    model: str
    task: str
    dataset: str
    device: str
    dtype: str
    seed: int
    runs: list[RunReport]
    memory_mode: str  # "isolated" | "in-process" (see MEMORY_MODES)
    run_dir: str | None = None
    stopped: bool = False
    samples: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "dataset": self.dataset, "device": self.device,
                "dtype": self.dtype, "seed": self.seed, "memory_mode": self.memory_mode, "stopped": self.stopped,
                "runs": [r.to_dict() for r in self.runs]}

    def run(self, name: str) -> RunReport:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"no run named {name!r}; runs: {[r.name for r in self.runs]}")


@dataclass(frozen=True)
class _Spec:
    name: str
    method: str
    adapter: AdapterConfig | None


def plan_runs(methods: Sequence[str], vera: VeraConfig | Sequence[VeraConfig], lora: LoraConfig, task: str) -> list[_Spec]:
    """The runs a comparison makes, named as in the report ("vera-r256-d0.1" only when several d_init differ)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown or methods!r}; choose from {', '.join(METHODS)}.")
    if "head" in methods and task != "classification":
        raise ValueError("method 'head' trains a classifier head only: it needs a classification data set.")
    veras = [vera] if isinstance(vera, VeraConfig) else list(vera)
    specs = []
    for method in dict.fromkeys(methods):  # keeps order, drops repeats
        if method == "vera":
            several_d = len({v.d_init for v in veras}) > 1
            specs += [_Spec(f"vera-r{v.r}" + (f"-d{v.d_init:g}" if several_d else ""), "vera", v) for v in veras]
        elif method == "lora":
            specs.append(_Spec(f"lora-r{lora.r}", "lora", lora))
        else:
            specs.append(_Spec(method, method, None))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs would share a name in {names}; give the VeRA configs different r or d_init.")
    return specs


def _head_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children() if name in CLASSIFIER_HEADS]


def _adapter_config(model: nn.Module, spec: _Spec, task: str) -> AdapterConfig | None:
    """The run's adapter config; classification adapters also train the head (as modules_to_save)."""
    heads = _head_names(model) if task == "classification" else []
    if spec.adapter is not None and heads and not spec.adapter.modules_to_save:
        return replace(spec.adapter, modules_to_save=tuple(heads))
    return spec.adapter


def _prepare(model: nn.Module, spec: _Spec, adapter: AdapterConfig | None) -> nn.Module:
    """Make `spec.method` the only thing trainable: the adapter, everything ("full"), the head, or nothing."""
    if adapter is not None:
        return add_adapter(model, adapter)
    model.requires_grad_(spec.method == "full")
    if spec.method == "head":
        for name in _head_names(model):
            getattr(model, name).requires_grad_(True)
    return model


def _counts(model: nn.Module, spec: _Spec) -> tuple[int, int | None]:
    """(trainable parameters with the head excluded, trainable head parameters or None)."""
    counts = count_parameters(model)
    if spec.method in ("vera", "lora"):
        return counts["trainable_adapter"], counts["trainable_head"] or None
    if spec.method == "base":
        return 0, None
    head = sum(p.numel() for n in _head_names(model) for p in getattr(model, n).parameters())
    if spec.method == "head":
        return 0, counts["trainable"]
    return counts["trainable"] - head, head or None


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sample_rows(dataset: TextDataset, n: int) -> list[dict]:
    """The first `n` test inputs shown side by side: {"prompt", "reference": [...]} or {"text", "label"}."""
    if dataset.task == "classification":
        return [{"text": r["text"], "label": r["label"]} for r in dataset.test[:n]]
    return [{"prompt": p, "reference": refs} for p, refs in group_references(dataset.test)[:n]]


def score_split(model, tokenizer, dataset: TextDataset, config: TrainConfig, eval_generate: int = 32,
                n_samples: int = 8, split: str = "test") -> tuple[dict | None, list]:
    """Scores on a split ({"loss", "accuracy"} or {"loss", "bleu", "rougeL"}) and the model's outputs for its first
    `n_samples` inputs (class probabilities, or greedy answers). BLEU / ROUGE-L use the first `eval_generate` groups."""
    rows = getattr(dataset, split)
    if not rows:
        return None, []
    scores = evaluate(model, tokenizer, dataset, config, split=split)
    if dataset.task == "classification":
        texts = [r["text"] for r in rows[:n_samples]]
        probs = predict(model, tokenizer, texts, max_length=config.max_length) if texts else torch.empty(0, 0)
        outputs = [[round(p, 4) for p in row] for row in probs.tolist()]
        return {"loss": scores["eval_loss"], "accuracy": scores["eval_accuracy"]}, outputs
    groups = group_references(rows)[: max(eval_generate, n_samples)]
    answers = generate(model, tokenizer, [p for p, _ in groups], max_new_tokens=config.max_length // 2) if groups else []
    result = {"loss": scores["eval_loss"], "bleu": None, "rougeL": None}
    if eval_generate > 0:
        scored = min(eval_generate, len(groups))
        result.update(generation_scores(answers[:scored], [refs for _, refs in groups[:scored]]))
    return result, answers[:n_samples]


def _run_one(spec: _Spec, load: Callable[[], tuple], dataset: TextDataset, config: TrainConfig, run_dir: Path,
             emit: Callable[[dict], None], stop: threading.Event | None, eval_generate: int, n_samples: int,
             quantization: str | None) -> tuple[RunReport, list, str, str]:
    """Build, train, save, evaluate one method. Returns (report, sample outputs, device, dtype)."""
    t0 = time.perf_counter()
    model, tokenizer = load()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    adapter = _adapter_config(model, spec, dataset.task)
    try:  # from the shapes, before the adapter exists; "full" / "head" / None (base) describe the other methods
        estimate = estimate_memory(model, adapter or (None if spec.method == "base" else spec.method),
                                   config.batch_size, config.max_length,
                                   dtype if dtype in DTYPE_BYTES else "float32", quantization)
    except (ValueError, AttributeError):
        estimate = None  # an architecture the estimator cannot read: the run goes on without it
    model = _prepare(model, spec, adapter)
    trainable, head = _counts(model, spec)
    report = RunReport(name=spec.name, method=spec.method, trainable_params=trainable, head_params=head,
                       memory_estimate=estimate)
    if adapter is not None:
        report.r = adapter.r
        report.alpha = adapter.alpha if isinstance(adapter, LoraConfig) else None
        report.d_init = adapter.d_init if isinstance(adapter, VeraConfig) else None
        report.targets = sorted({p.rsplit(".", 1)[-1] for p, _ in adapter_layers(model)})
    emit({"type": "run_start", "run": spec.name, "method": spec.method, "trainable_params": trainable,
          "head_params": head, "memory_estimate": estimate})
    device = str(resolve_device(config))
    if spec.method != "base":
        result = train_model(model, tokenizer, dataset, config, run_name=spec.name, on_event=emit, stop=stop)
        report.lr = config.lr or default_lr(spec.method)[0]
        report.steps, report.stopped, report.history = result.steps_done, result.stopped, result.history
        report.peak_memory_bytes, report.peak_memory_kind = result.peak_memory_bytes, result.peak_memory_kind
        report.step_time_s, report.tokens_per_s = result.step_time_s, result.tokens_per_s
        report.final_train_loss = result.final_train_loss
        device, dtype = result.device, result.dtype
    else:
        model.to(device)
    if adapter is not None:
        path = save_adapter(model, run_dir / "adapters" / spec.name)
        report.adapter_bytes = _directory_bytes(path)
    outputs: list = []
    if not report.stopped:
        report.eval, outputs = score_split(model, tokenizer, dataset, config, eval_generate, n_samples)
    report.wall_s = time.perf_counter() - t0
    return report, outputs, device, dtype


def _loader(model, dataset: TextDataset, seed: int, quantization: str | None) -> Callable[[], tuple]:
    """A function giving a fresh (model, tokenizer) per method, with the same seeded classifier-head init each time."""
    if isinstance(model, (str, os.PathLike)):
        num_labels = len(dataset.labels) if dataset.labels else 2

        def load():
            torch.manual_seed(seed)  # a new classification head is random: every method starts from the same one
            return load_model(str(model), task=dataset.task, quantization=quantization, num_labels=num_labels)

        return load
    base, tokenizer = model
    return lambda: (copy.deepcopy(base), tokenizer)


def _model_name(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    config = getattr(model[0], "config", None)
    return getattr(config, "_name_or_path", None) or type(model[0]).__name__


def _child(spec, model_name, dataset, config, run_dir, eval_generate, n_samples, quantization, messages, stop) -> None:
    """Body of an isolated run: same as in-process, with events and the result sent back through a queue."""
    try:
        load = _loader(model_name, dataset, config.seed, quantization)
        out = _run_one(spec, load, dataset, config, Path(run_dir), lambda e: messages.put(("event", e)), stop,
                       eval_generate, n_samples, quantization)
        messages.put(("result", out))
    except BaseException:  # the parent re-raises it with the child's traceback
        messages.put(("error", traceback.format_exc()))


def _run_isolated(spec, model, dataset, config, run_dir, emit, stop, eval_generate, n_samples, quantization):
    """Run one method in a spawned process, forwarding its events and the caller's stop flag."""
    ctx = multiprocessing.get_context("spawn")
    messages, child_stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_child, args=(spec, str(model), dataset, config, str(run_dir), eval_generate,
                                            n_samples, quantization, messages, child_stop), daemon=True)
    proc.start()
    try:
        while True:
            if stop is not None and stop.is_set():
                child_stop.set()
            try:
                kind, payload = messages.get(timeout=0.1)
            except queue_module.Empty:
                if not proc.is_alive() and messages.empty():
                    raise RuntimeError(f"run {spec.name!r} ended without a result (exit code {proc.exitcode}); "
                                       "it may have run out of memory.") from None
                continue
            if kind == "event":
                emit(payload)
            elif kind == "error":
                raise RuntimeError(f"run {spec.name!r} failed in its process:\n{payload}")
            else:
                return payload
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()


def _default_run_dir(model_name: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_name).name or model_name).strip("-") or "model"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Whole-file JSON lines through a temporary file and a rename (samples are rewritten after every run)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def compare(
    model,
    dataset: TextDataset | str,
    methods: Sequence[str] = ("base", "vera", "lora"),
    vera: VeraConfig | Sequence[VeraConfig] = VeraConfig(),
    lora: LoraConfig = LoraConfig(),
    train: TrainConfig = TrainConfig(),
    out_dir: str | os.PathLike | None = None,
    on_event: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
    *,
    lrs: dict[str, float] | None = None,
    isolate: bool = False,
    eval_generate: int = 32,
    samples: int = 8,
    max_rows: int | None = None,
    quantization: str | None = None,
) -> Report:
    """Run every method on the same model, data, seed and step budget; write and return the Report.

    model: a `load_model` name or path (a fresh copy is loaded per method), or a loaded (model, tokenizer) pair
    (deep-copied per method). dataset: a TextDataset or a `load_dataset` name (split with `train.seed`,
    `max_rows` per split). lrs: per-method learning rates, e.g. {"vera": 1e-2, "lora": 2e-4} (else `train.lr`,
    else each method's default). isolate: each method in its own process, so CPU peak memory is its own.
    eval_generate: test groups scored with BLEU / ROUGE-L (causal LM); samples: test inputs in samples.jsonl.
    `stop` ends the current method within a step and skips the rest; the run directory stays consistent.
    """
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_dataset(dataset, seed=train.seed, max_rows=max_rows)
    if isolate and not isinstance(model, (str, os.PathLike)):
        raise ValueError("isolate=True loads the model in each process: pass its name or path, not a loaded model.")
    specs = plan_runs(methods, vera, lora, dataset.task)
    lrs = dict(lrs or {})
    model_name = _model_name(model)
    run_dir = Path(out_dir) if out_dir is not None else _default_run_dir(model_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", {
        "model": model_name, "dataset": dataset.name, "task": dataset.task, "methods": [s.name for s in specs],
        "adapters": {s.name: s.adapter.to_dict() for s in specs if s.adapter is not None},
        "train": asdict(train), "lrs": lrs, "isolate": isolate, "eval_generate": eval_generate, "samples": samples,
        "max_rows": max_rows, "quantization": quantization,
        "splits": {"train": len(dataset.train), "validation": len(dataset.validation), "test": len(dataset.test)},
    })
    report = Report(model=model_name, task=dataset.task, dataset=dataset.name, device=str(resolve_device(train)),
                    dtype="float32", seed=train.seed, runs=[], run_dir=str(run_dir),
                    memory_mode="isolated" if isolate else "in-process", samples=sample_rows(dataset, samples))
    load = None if isolate else _loader(model, dataset, train.seed, quantization)

    with open(run_dir / "metrics.jsonl", "a", buffering=1) as log:
        def emit(event: dict) -> None:
            log.write(json.dumps(event) + "\n")
            if on_event is not None:
                on_event(event)

        current: dict = {}

        def emit_run(event: dict) -> None:  # trainer events, tagged with the method they belong to
            emit({**event, "method": current["method"]})

        try:
            for spec in specs:
                if stop is not None and stop.is_set():
                    report.stopped = True
                    break
                current["method"] = spec.method
                config = replace(train, lr=lrs.get(spec.method, train.lr))
                if isolate:
                    run, outputs, device, dtype = _run_isolated(spec, model, dataset, config, run_dir, emit_run, stop,
                                                                eval_generate, samples, quantization)
                else:
                    run, outputs, device, dtype = _run_one(spec, load, dataset, config, run_dir, emit_run, stop,
                                                           eval_generate, samples, quantization)
                    gc.collect()  # drop this method's model before the next one measures its memory
                report.runs.append(run)
                report.device, report.dtype = device, dtype
                for row, output in zip(report.samples, outputs):
                    row[run.name] = output
                emit({"type": "run_done", "run": run.name, "method": run.method, **run.to_dict()})
                _write_reports(run_dir, report)
                if run.stopped:
                    report.stopped = True
                    break
        finally:
            _write_reports(run_dir, report, figures=True)
            emit({"type": "stopped" if report.stopped else "compare_done", "run_dir": str(run_dir),
                  "runs": [r.name for r in report.runs]})
    return report


def _write_reports(run_dir: Path, report: Report, figures: bool = False) -> None:
    """report.json, report.md and samples.jsonl (and the figures) for what has finished so far."""
    write_json(run_dir / "report.json", report.to_dict())
    _write_jsonl(run_dir / "samples.jsonl", report.samples)
    names = []
    if figures and report.runs:
        from .plots import save_figures  # matplotlib is imported only when figures are drawn

        names = [p.name for p in save_figures(report.to_dict(), {r.name: r.history for r in report.runs}, run_dir)]
    tmp = run_dir / f".report.md.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(report_markdown(report, names))
    os.replace(tmp, run_dir / "report.md")


def _metric_cell(run: RunReport) -> str:
    if not run.eval:
        return "-"
    if run.eval.get("accuracy") is not None:
        return f"acc {run.eval['accuracy']:.1f}%"
    if run.eval.get("bleu") is not None:
        return f"BLEU {run.eval['bleu']:.1f} / RL {run.eval['rougeL']:.1f}"
    return f"loss {run.eval['loss']:.3f}"


def summary_rows(report: Report) -> list[dict]:
    """One plain row per run, for report.md and the CLI's closing table."""
    rows = []
    for run in report.runs:
        rows.append({
            "run": run.name + (" (stopped)" if run.stopped else ""),
            "trainable": run.trainable_params,
            "head": run.head_params if run.head_params is not None else "-",
            "adapter_kib": run.adapter_bytes / 1024 if run.adapter_bytes is not None else "-",
            "peak_mib": run.peak_memory_bytes / 2**20 if run.peak_memory_bytes is not None else "-",
            "step_s": f"{run.step_time_s:.3f}" if run.step_time_s is not None else "-",
            "train_loss": f"{run.final_train_loss:.3f}" if run.final_train_loss is not None else "-",
            "test_loss": f"{run.eval['loss']:.3f}" if run.eval else "-",
            "metric": _metric_cell(run),
        })
    return rows


SUMMARY_COLUMNS = ["run", "trainable", "head", "adapter_kib", "peak_mib", "step_s", "train_loss", "test_loss", "metric"]


def parameter_ratios(report: Report) -> list[str]:
    """"lora-r8 / vera-r256: 9.60x trainable parameters" for every LoRA-VeRA pair (head excluded)."""
    loras = [r for r in report.runs if r.method == "lora" and r.trainable_params]
    veras = [r for r in report.runs if r.method == "vera" and r.trainable_params]
    return [f"{lo.name} / {ve.name}: {lo.trainable_params / ve.trainable_params:.2f}x trainable parameters "
            f"({lo.trainable_params:,} vs {ve.trainable_params:,}, head excluded)" for lo in loras for ve in veras]


def report_markdown(report: Report, figures: Sequence[str] = ()) -> str:
    """The human-readable report: settings, the table, ratios, memory estimate vs measured, figures."""
    lines = [f"# {report.model} on {report.dataset} ({report.task})", "",
             f"device {report.device}, dtype {report.dtype}, seed {report.seed}"
             + (" — **stopped early**" if report.stopped else ""), "",
             f"Peak memory: {report.memory_mode} — {MEMORY_MODES[report.memory_mode]}.", "", "```",
             format_table(summary_rows(report), SUMMARY_COLUMNS) if report.runs else "(no run finished)", "```", ""]
    lines += [f"- {line}" for line in parameter_ratios(report)]
    checks = [(r, comparable_estimate(r.memory_estimate, r.peak_memory_kind)) for r in report.runs if r.memory_estimate]
    checks = [(r, est) for r, est in checks if est and r.peak_memory_bytes]
    if checks:
        lines += ["", "Memory estimate vs measured (the part of the estimate the measurement covers):", ""]
        lines += [f"- {r.name}: estimated {est / 2**20:.1f} MiB, measured {r.peak_memory_bytes / 2**20:.1f} MiB "
                  f"({r.peak_memory_kind}), error {100 * (est - r.peak_memory_bytes) / r.peak_memory_bytes:+.0f}%"
                  for r, est in checks]
    lines += [""] + [f"![{Path(name).stem}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def load_run(run_dir: str | os.PathLike) -> tuple[dict, dict[str, list[dict]]]:
    """(report.json, {run name: its step/eval events from metrics.jsonl}) of a run directory, for plots and UIs."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    histories: dict[str, list[dict]] = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            event = json.loads(line)
            if event.get("type") in ("step", "eval"):
                histories.setdefault(event["run"], []).append(event)
    return report, histories
