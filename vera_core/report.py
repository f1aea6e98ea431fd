"""What a comparison reports, and the one place results are formatted: report.json's dataclasses, the summary table
(CLI, app, notebooks, benchmarks), report.md, and reading a run directory back.

    report, histories = load_run("runs/20261130-101500-minilm-l6")
    print(format_table(summary_rows(report), SUMMARY_COLUMNS))
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .files import write_json, write_jsonl, write_text

MEMORY_MODES = {
    "isolated": "each method ran in its own process (multiprocessing spawn)",
    "in-process": "all methods ran in one process (gc between them); the tensor peaks are each method's own, the "
                  "process RSS is not",
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
    peak_memory_bytes: int | None = None  # peak live tensor bytes during training (the tracker's, memtrack.py)
    peak_memory_kind: str | None = None  # "tensors"
    memory_breakdown: dict | None = None  # bytes per category at that peak (weights, adapter, gradients, ..., total)
    peak_rss_bytes: int | None = None  # the process's sampled peak resident memory, for reference
    cuda_max_allocated_bytes: int | None = None  # CUDA only: the allocator's peak, a cross-check of the tracker
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    final_train_loss: float | None = None
    eval: dict | None = None  # {"loss", "accuracy"} or {"loss", "bleu", "rougeL"} on the test split
    stopped: bool = False  # the stop flag ended this run early (its eval is then None)
    wall_s: float | None = None
    memory_estimate: dict | None = None  # estimate_memory(...) made before the run started, same categories
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
    error: str | None = None  # the first line of the error that ended the comparison, if one did
    samples: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "dataset": self.dataset, "device": self.device,
                "dtype": self.dtype, "seed": self.seed, "memory_mode": self.memory_mode, "stopped": self.stopped,
                "error": self.error, "runs": [r.to_dict() for r in self.runs]}

    def run(self, name: str) -> RunReport:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"no run named {name!r}; runs: {[r.name for r in self.runs]}")


def _as_dict(report: Report | dict) -> dict:
    return report.to_dict() if isinstance(report, Report) else report


def metric_cell(scores: dict | None) -> str | None:
    """The test metric as text: "accuracy 80.1%", "BLEU 61.2 / ROUGE-L 70.3", or the loss when nothing else."""
    if not scores:
        return None
    if scores.get("accuracy") is not None:
        return f"accuracy {scores['accuracy']:.1f}%"
    if scores.get("bleu") is not None:
        return f"BLEU {scores['bleu']:.1f} / ROUGE-L {scores['rougeL']:.1f}"
    return f"loss {scores['loss']:.3f}" if scores.get("loss") is not None else None


def metric_value(scores: dict | None) -> tuple[str, float] | None:
    """(name, value) of the headline test metric, higher is better: accuracy, else BLEU; None when not scored."""
    for name in ("accuracy", "bleu"):
        if scores and scores.get(name) is not None:
            return name, scores[name]
    return None


def tradeoff_rows(report: Report | dict) -> list[dict]:
    """The report's scored runs for `plots.tradeoff_figure` / `plots.dinit_figure`: each run's report.json fields
    with its headline metric copied up under the metric's name ("accuracy" or "bleu")."""
    rows = []
    for run in _as_dict(report)["runs"]:
        metric = metric_value(run.get("eval"))
        if metric is not None:
            rows.append({**run, metric[0]: metric[1], "metric_name": metric[0]})
    return rows


def _rounded(value, digits: int):
    return None if value is None else round(value, digits)


def summary_rows(report: Report | dict, total_params: int | None = None) -> list[dict]:
    """One row per run (numbers rounded for reading, None where a field does not apply). `total_params` (the base
    model's) adds a "% of model" column."""
    rows = []
    for run in _as_dict(report)["runs"]:
        scores = run.get("eval") or {}
        row = {"run": run["name"] + (" (stopped)" if run.get("stopped") else ""), "method": run["method"],
               "trainable": run["trainable_params"]}
        if total_params:
            row["% of model"] = round(100 * run["trainable_params"] / total_params, 4)
        mib = {k: run.get(k) / 2**20 if run.get(k) is not None else None
               for k in ("peak_memory_bytes", "peak_rss_bytes")}
        estimate = (run.get("memory_estimate") or {}).get("total")
        row.update({
            "head": run.get("head_params"),
            "adapter_kib": _rounded(run["adapter_bytes"] / 1024 if run.get("adapter_bytes") else None, 1),
            "peak_mib": _rounded(mib["peak_memory_bytes"], 1),
            "est_mib": _rounded(estimate / 2**20 if estimate is not None else None, 1),
            "rss_mib": _rounded(mib["peak_rss_bytes"], 1),
            "step_s": _rounded(run.get("step_time_s"), 3),
            "tokens_per_s": _rounded(run.get("tokens_per_s"), 1),
            "train_loss": _rounded(run.get("final_train_loss"), 4),
            "test_loss": _rounded(scores.get("loss"), 4),
            "metric": metric_cell(scores),
        })
        rows.append(row)
    return rows


SUMMARY_COLUMNS = ["run", "trainable", "head", "adapter_kib", "peak_mib", "est_mib", "step_s", "train_loss", "test_loss",
                   "metric"]


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table: integers with thousands separators, floats as given, None as "-"."""
    def cell(v):
        if v is None:
            return "-"
        return f"{v:,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parameter_ratios(report: Report | dict) -> list[str]:
    """"lora-r8 / vera-r256: 9.60x trainable parameters" for every LoRA-VeRA pair (head excluded)."""
    runs = _as_dict(report)["runs"]
    loras = [r for r in runs if r["method"] == "lora" and r["trainable_params"]]
    veras = [r for r in runs if r["method"] == "vera" and r["trainable_params"]]
    return [f"{lo['name']} / {ve['name']}: {lo['trainable_params'] / ve['trainable_params']:.2f}x trainable "
            f"parameters ({lo['trainable_params']:,} vs {ve['trainable_params']:,}, head excluded)"
            for lo in loras for ve in veras]


def memory_differences(report: Report | dict) -> list[str]:
    """One plain sentence per LoRA-VeRA pair with measured breakdowns: what their peak tensor memory differs in."""
    runs = [r for r in _as_dict(report)["runs"] if r.get("memory_breakdown")]
    lines = []
    for ve in (r for r in runs if r["method"] == "vera"):
        for lo in (r for r in runs if r["method"] == "lora"):
            v, lo_parts = ve["memory_breakdown"], lo["memory_breakdown"]
            state_v, state_l = (p["gradients"] + p["optimizer"] for p in (v, lo_parts))
            more_acts = "more" if v["activations"] > lo_parts["activations"] else "fewer"
            lines.append(
                f"{ve['name']} vs {lo['name']}: peak {v['total'] / 2**20:,.1f} vs {lo_parts['total'] / 2**20:,.1f} MiB "
                f"({v['total'] / lo_parts['total']:.2f}x). Gradients and optimizer state {state_v / 2**20:,.2f} vs "
                f"{state_l / 2**20:,.2f} MiB ({'VeRA trains fewer parameters' if state_v < state_l else 'VeRA trains more parameters here'}); "
                f"activations saved for backward {v['activations'] / 2**20:,.1f} vs {lo_parts['activations'] / 2**20:,.1f} MiB "
                f"({more_acts} for VeRA: it keeps r={ve['r']}-wide intermediates per adapted layer, LoRA r={lo['r']}-wide ones).")
    return lines


def report_markdown(report: Report, figures: Sequence[str] = ()) -> str:
    """The human-readable report: settings, the table, ratios, memory estimate vs measured, figures."""
    from .memory import comparable_estimate
    from .memtrack import CATEGORIES

    lines = [f"# {report.model} on {report.dataset} ({report.task})", "",
             f"device {report.device}, dtype {report.dtype}, seed {report.seed}"
             + (" — **stopped early**" if report.stopped else ""), "",
             f"Peak memory: {report.memory_mode} — {MEMORY_MODES[report.memory_mode]}.", "", "```",
             format_table(summary_rows(report), SUMMARY_COLUMNS) if report.runs else "(no run finished)", "```", ""]
    lines += [f"- {line}" for line in parameter_ratios(report) + memory_differences(report)]
    checks = [(r, comparable_estimate(r.memory_estimate, r.peak_memory_kind)) for r in report.runs if r.memory_estimate]
    checks = [(r, est) for r, est in checks if est and r.peak_memory_bytes]
    if checks:
        lines += ["", "Peak tensor memory, predicted (one fake step) vs measured (the tracked steps), MiB:", "",
                  "| run | " + " | ".join(CATEGORIES) + " | total | error |",
                  "|---|" + "---|" * (len(CATEGORIES) + 2)]
        for r, est in checks:
            for label, parts in (("predicted", r.memory_estimate), ("measured", r.memory_breakdown or {})):
                cells = [f"{parts[k] / 2**20:.1f}" if parts.get(k) is not None else "-" for k in (*CATEGORIES, "total")]
                error = f"{100 * (est - r.peak_memory_bytes) / r.peak_memory_bytes:+.1f}%" if label == "predicted" else ""
                lines.append(f"| {r.name} {label} | " + " | ".join(cells) + f" | {error} |")
    lines += [""] + [f"![{Path(name).stem}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path, report: Report, figures: bool = False) -> None:
    """report.json, report.md and samples.jsonl (and the figures) for what has finished so far, each atomically."""
    write_json(run_dir / "report.json", report.to_dict())
    write_jsonl(run_dir / "samples.jsonl", report.samples)
    names = []
    if figures and report.runs:
        from .plots import save_figures  # matplotlib is imported only when figures are drawn

        names = [p.name for p in save_figures(report.to_dict(), {r.name: r.history for r in report.runs}, run_dir)]
    write_text(run_dir / "report.md", report_markdown(report, names))


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
