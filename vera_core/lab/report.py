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

from ..adapters.files import write_json, write_jsonl, write_text

MEMORY_MODES = {
    "isolated": "each method ran in its own process (multiprocessing spawn)",
    "in-process": "all methods ran in one process (gc between them); the tensor peaks are each method's own, the "
                  "process RSS is not",
}


@dataclass
class RunReport:
    """One method's numbers; fields that do not apply are None (see the report.json contract in docs/report-json.md)."""

    name: str  # "base", "head", "vera-r256", "vera-r256-d0.1", "lora-r8", "full"; "-s1" added with several seeds
    method: str
    setting: str | None = None  # the name without the seed: runs of one setting are averaged over seeds
    seed: int | None = None  # training seed: data order, head init, dropout (the split and projections stay fixed)
    r: int | None = None
    alpha: float | None = None  # LoRA only
    d_init: float | None = None  # VeRA only
    targets: list[str] | None = None  # adapted module names (leaf names, sorted)
    lr: float | None = None
    head_lr: float | None = None  # the classifier head's rate (classification runs that train one)
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
    cpu_s: float | None = None  # the process's CPU seconds over the same span: the work, whatever shared the cores
    memory_estimate: dict | None = None  # estimate_memory(...) made before the run started, same categories
    prefer: str | None = None  # TrainConfig.prefer: "memory" or "speed" (what VeRA does with its folded weights)
    fold_estimates: dict | None = None  # VeRA: memory.fold_estimates, {"keep", "rebuild" (peak bytes), "keep_saving"}
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
    seeds: list[int] = field(default_factory=list)  # training seeds; `seed` is the data split's
    tuning: dict | None = None  # tune.tune_rates: per setting the chosen scale, lr, head_lr and the grid's losses
    head_lr: float | None = None  # every classifier head's one rate (compare._head_lr); None: no run trains one apart
    settings: list[dict] = field(default_factory=list)  # per setting over seeds (`setting_rows`)
    pairs: list[dict] = field(default_factory=list)  # every VeRA − LoRA pair (`pair_rows`)

    def to_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "dataset": self.dataset, "device": self.device,
                "dtype": self.dtype, "seed": self.seed, "seeds": self.seeds, "memory_mode": self.memory_mode,
                "stopped": self.stopped, "error": self.error, "runs": [r.to_dict() for r in self.runs],
                "settings": self.settings, "pairs": self.pairs, "tuning": self.tuning, "head_lr": self.head_lr}

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
    """The report's scored settings for `plots.tradeoff_figure` / `plots.dinit_figure`: each setting's first
    report.json run, named by its setting, with its headline metric (the mean over seeds) copied up under the
    metric's name ("accuracy" or "bleu") and its std over seeds under "<metric>_err" (error bars; None: one seed)."""
    report = _as_dict(report)
    if not report.get("settings"):  # a report.json from before seeds: one row per run
        report = {**report, "settings": setting_rows(report)}
    first = {r["name"]: r for r in report["runs"]}
    return [{**first[s["runs"][0]], "name": s["setting"], s["metric"]: s["mean"], f"{s['metric']}_err": s["std"],
             "metric_name": s["metric"]} for s in report["settings"]]


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
    runs = list({r.get("setting") or r["name"]: r for r in _as_dict(report)["runs"]}.values())  # one per setting
    loras = [r for r in runs if r["method"] == "lora" and r["trainable_params"]]
    veras = [r for r in runs if r["method"] == "vera" and r["trainable_params"]]
    name = lambda run: run.get("setting") or run["name"]  # noqa: E731
    return [f"{name(lo)} / {name(ve)}: {lo['trainable_params'] / ve['trainable_params']:.2f}x trainable "
            f"parameters ({lo['trainable_params']:,} vs {ve['trainable_params']:,}, head excluded)"
            for lo in loras for ve in veras]


def _percent(share: float) -> str:
    return f"{100 * abs(share):.0f}%" if abs(share) >= 0.1 else f"{100 * abs(share):.1f}%"


def fold_policy_line(run: dict) -> str | None:
    """What a VeRA run did with its folded weights (W0 plus its update, formed once per step by the fast path, and
    needed again in backward) and what the other way would have cost, in plain words; None for other runs."""
    folds, ran = run.get("fold_estimates"), (run.get("memory_estimate") or {}).get("total")
    if not folds or ran is None:
        return None
    keep, rebuild, saving = folds["keep"], folds["rebuild"], folds["keep_saving"]
    mib = lambda nbytes: f"{nbytes / 2**20:,.0f} MiB"  # noqa: E731
    speed = f"about {_percent(saving)} {'faster' if saving >= 0 else 'slower'} by the cost model in adapters/fused.py"
    name = run["name"]
    if keep == rebuild:
        return (f"{name} folded no weights at these settings (VeRA folds only full-precision, unquantized layers, "
                f"on batches long enough to gain), so preferring memory or speed changes nothing: {mib(ran)} predicted.")
    if ran == rebuild:
        return (f"{name} rebuilt its folded weights in backward to save memory: {mib(rebuild)} predicted (keeping "
                f"them: {mib(keep)}, {speed}; choose that with prefer='speed').")
    if ran == keep:
        why = ("for speed, as asked (prefer='speed')" if run.get("prefer") == "speed" else
               f"because keeping them saves about {_percent(saving)} of the adapted layers' time here")
        return (f"{name} kept its folded weights for backward {why}: {mib(keep)} predicted (rebuilding them: "
                f"{mib(rebuild)}, about {_percent(saving)} slower).")
    return (f"{name} rebuilt the folded weights of the layers where keeping them saved little time and kept the "
            f"rest: {mib(ran)} predicted (keeping all: {mib(keep)}; rebuilding all: {mib(rebuild)}).")


def memory_differences(report: Report | dict) -> list[str]:
    """Plain sentences about the peaks (the first seed's runs: memory does not depend on the seed): per VeRA run,
    what it did with its folded weights and what the other way would have cost (`fold_policy_line`); per LoRA-VeRA
    pair with measured breakdowns, what their peak tensor memory differs in."""
    report = _as_dict(report)
    first = (report.get("seeds") or [None])[0]
    runs = [r for r in report["runs"] if r.get("seed", first) in (None, first)]
    lines = [line for line in map(fold_policy_line, runs) if line]
    runs = [r for r in runs if r.get("memory_breakdown")]
    for ve in (r for r in runs if r["method"] == "vera"):
        for lo in (r for r in runs if r["method"] == "lora"):
            v, lo_parts = ve["memory_breakdown"], lo["memory_breakdown"]
            state_v, state_l = (p["gradients"] + p["optimizer"] for p in (v, lo_parts))
            more_acts = "more" if v["activations"] > lo_parts["activations"] else "fewer"
            folds = ve.get("fold_estimates") or {}
            kept = folds.get("keep") != folds.get("rebuild") and (ve.get("memory_estimate") or {}).get("total") \
                != folds.get("rebuild")  # some folded weight was kept for backward, not rebuilt there
            lines.append(
                f"{ve['name']} vs {lo['name']}: peak {v['total'] / 2**20:,.1f} vs {lo_parts['total'] / 2**20:,.1f} MiB "
                f"({v['total'] / lo_parts['total']:.2f}x). Gradients and optimizer state {state_v / 2**20:,.2f} vs "
                f"{state_l / 2**20:,.2f} MiB ({'VeRA trains fewer parameters' if state_v < state_l else 'VeRA trains more parameters here'}); "
                f"activations saved for backward {v['activations'] / 2**20:,.1f} vs {lo_parts['activations'] / 2**20:,.1f} MiB "
                f"({more_acts} for VeRA: its backward keeps r={ve['r']}-wide A x per adapted input"
                f"{', plus each folded weight it keeps rather than rebuilds' if kept else ''}; LoRA's keeps each "
                f"adapted layer's full-width input for A's gradient).")
    return lines


def load_predictions(run_dir: str | os.PathLike, name: str) -> list[dict] | None:
    """A run's predictions/<name>.jsonl rows (one per scored test example), or None when it has none."""
    path = Path(run_dir) / "predictions" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None


def _example_rows(run_dir, name: str, metric: str):
    """(n, k) numbers per test example whose column sums give the metric, and the `stats.Statistic` doing so."""
    import numpy as np

    from .metrics import bleu_from_statistics
    from .stats import accuracy_statistic

    rows = load_predictions(run_dir, name) if run_dir is not None else None
    if not rows:
        return None, None
    if metric == "accuracy":
        return np.array([[r["score"]] for r in rows]), accuracy_statistic
    return np.array([r["bleu_stats"] for r in rows]), bleu_from_statistics


def _by_setting(report: dict) -> dict[str, list[dict]]:
    """The scored, finished runs grouped by setting (runs written before seeds existed: by name)."""
    groups: dict[str, list[dict]] = {}
    for run in report["runs"]:
        if not run.get("stopped") and metric_value(run.get("eval")) is not None:
            groups.setdefault(run.get("setting") or run["name"], []).append(run)
    return groups


def setting_rows(report: Report | dict, run_dir: str | os.PathLike | None = None) -> list[dict]:
    """Per setting over its seeds: {"setting", "method", "seeds", "runs", "trainable_params", "lr", "head_lr",
    "metric" (its name), "values", "mean", "std" (None for one seed), "ci95" [low, high], "ci_kind"}: a t-interval
    over seeds when there are several, else a bootstrap over the run's test examples (predictions/*.jsonl in
    `run_dir`; None without them)."""
    from .stats import PERCENT, bootstrap_interval, mean_std, t_interval

    rows = []
    for setting, runs in _by_setting(_as_dict(report)).items():
        metric = metric_value(runs[0]["eval"])[0]
        values = [metric_value(r["eval"])[1] for r in runs]
        mean, std = mean_std(values)
        if len(values) > 1:
            ci, kind = list(t_interval(values, PERCENT)), "t over seeds"
        else:
            examples, statistic = _example_rows(run_dir, runs[0]["name"], metric)
            ci = list(bootstrap_interval([examples], statistic)) if examples is not None else None
            kind = "bootstrap over test examples" if ci else None
        rows.append({"setting": setting, "method": runs[0]["method"], "seeds": [r.get("seed") for r in runs],
                     "runs": [r["name"] for r in runs], "trainable_params": runs[0]["trainable_params"],
                     "lr": runs[0].get("lr"), "head_lr": runs[0].get("head_lr"), "metric": metric, "values": values,
                     "mean": mean, "std": std, "ci95": ci, "ci_kind": kind})
    return rows


def pair_rows(report: Report | dict, run_dir: str | os.PathLike | None) -> list[dict]:
    """Every VeRA setting against every LoRA setting on the runs of their common seeds: {"vera", "lora",
    "metric", "seeds", "diff_mean" (VeRA − LoRA, points), "ci95" (two-level paired bootstrap: seeds and test
    examples, `stats.paired_difference`), "ci_method", "verdict" (stats.verdict), "param_ratio" (LoRA ÷ VeRA
    trainable parameters)}. Pairs whose runs lack predictions are left out."""
    from .stats import paired_difference, verdict

    groups = _by_setting(_as_dict(report))
    pairs = []
    for vera in [g for g, runs in groups.items() if runs[0]["method"] == "vera"]:
        for lora in [g for g, runs in groups.items() if runs[0]["method"] == "lora"]:
            by_seed = [{r.get("seed"): r for r in groups[g]} for g in (vera, lora)]
            seeds = [s for s in by_seed[0] if s in by_seed[1]]
            metric = metric_value(groups[vera][0]["eval"])[0]
            found = [[_example_rows(run_dir, side[s]["name"], metric) for s in seeds] for side in by_seed]
            if not seeds or any(rows is None for side in found for rows, _ in side):
                continue
            statistic = found[0][0][1]
            diff = paired_difference([r for r, _ in found[0]], [r for r, _ in found[1]], statistic)
            pairs.append({"vera": vera, "lora": lora, "metric": metric, "seeds": seeds, **diff,
                          "verdict": verdict(*diff["ci95"]),
                          "param_ratio": groups[lora][0]["trainable_params"] / groups[vera][0]["trainable_params"]})
    return pairs


def mean_cell(row: dict) -> str:
    """"79.4 ± 0.6" over seeds, or "79.4" for one seed."""
    return f"{row['mean']:.1f}" + (f" ± {row['std']:.1f}" if row.get("std") is not None else "")


def setting_table(rows: list[dict]) -> list[dict]:
    """`setting_rows` as table rows: setting, seeds, trainable, lr, "<metric> mean ± std" and the 95% interval."""
    return [{"setting": r["setting"], "seeds": len(r["seeds"]), "trainable": r["trainable_params"],
             "lr": f"{r['lr']:.2g}" if r.get("lr") else "-", "mean ± std": f"{r['metric']} {mean_cell(r)}",
             "ci95": f"[{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]" if r.get("ci95") else "-"} for r in rows]


SETTING_COLUMNS = ["setting", "seeds", "trainable", "lr", "mean ± std", "ci95"]


def pair_line(pair: dict) -> str:
    """"vera-r256 − lora-r8 = +0.9 points [-0.8, +2.6] (accuracy, 3 seeds; 9.6x fewer parameters): matches within
    1 point"."""
    low, high = pair["ci95"]
    return (f"{pair['vera']} − {pair['lora']} = {pair['diff_mean']:+.1f} points [{low:+.1f}, {high:+.1f}] "
            f"({pair['metric']}, {len(pair['seeds'])} seed{'s' * (len(pair['seeds']) > 1)}; "
            f"{pair['param_ratio']:.1f}x fewer parameters): {verdict_text(pair)}")


def verdict_text(pair: dict) -> str:
    """The pair's verdict, and where its interval sits against 0 when that says more: "matches within 1 point (vera-r256
    ahead: the whole interval is above 0)"."""
    low, high = pair["ci95"]
    # The verdicts read the interval against -1 only; "matches" would also cover a clear lead or a clear small lag.
    side = (f" ({pair['vera']} ahead: the whole interval is above 0)" if low > 0 else
            f" ({pair['vera']} slightly behind: the whole interval is below 0)" if high < 0 and low >= -1 else "")
    return pair["verdict"] + side


def tuning_lines(tuning: dict | None) -> list[str]:
    """One line per tuned setting: the chosen rates and the validation loss at every scale; a rate chosen at an end
    of the grid says so (a rate beyond it may be better, so the comparison may favour the other method)."""
    lines = []
    for setting, entry in (tuning or {}).items():
        scales = [p["scale"] for p in entry["grid"]]
        edge = ("" if len(scales) < 2 else
                " — at the top of the grid: a higher rate may do better" if entry["scale"] == max(scales) else
                " — at the bottom of the grid: a lower rate may do better" if entry["scale"] == min(scales) else "")
        tie = entry.get("tie") or {}
        if tie.get("near"):  # chosen on two seeds: the first seed's losses alone would point elsewhere or nowhere
            again = ", ".join(f"x{p['scale']:g} {p['val_loss']:.4f}" if p["val_loss"] is not None
                              else f"x{p['scale']:g} diverged" for p in tie["val_loss_second_seed"])
            edge += (f" — a near-tie with {', '.join(f'x{x:g}' for x in tie['near'])} (within the seed spread"
                     + (f" {tie['spread']:.4f}" if tie["spread"] is not None else "")
                     + f"), chosen on the mean of two seeds (seed {tie['seed']}: {again})")
        lines.append(f"{setting}: lr {entry['lr']:.2g} (x{entry['scale']:g}); validation loss by scale: "
                     + ", ".join(f"x{p['scale']:g} {p['val_loss']:.4f}" if p["val_loss"] is not None
                                 else f"x{p['scale']:g} diverged" for p in entry["grid"]) + edge)
    return lines


def head_rate_line(report: Report | dict) -> str | None:
    """Where the classifier heads' one rate came from, in one sentence; None when no run trains a head apart."""
    report = _as_dict(report)
    if report.get("head_lr") is None:
        return None
    source = ("head-only's tuned rate" if "head" in (report.get("tuning") or {})
              else "not tuned: the request's head rate or the default; a new head's best rate depends on the model "
                   "(the default is a compromise), so add head-only with tuning when the head matters")
    return (f"Classifier head: one rate for every method, {report['head_lr']:.2g} ({source}); tuning moves the "
            "adapters' rates only, so the methods differ in their adapters alone.")


def seeds_note(report: Report | dict) -> str:
    """What varies with the seed and what does not, in one sentence."""
    report = _as_dict(report)
    return (f"Training seeds {', '.join(map(str, report['seeds']))} (data order, head init, dropout); the data split "
            f"(seed {report['seed']}) and VeRA's projection seed stay fixed, so every run is scored on the same test "
            "rows and pairs up. A setting's 95% interval is a t-interval over its seeds (the seed spread only); a "
            "VeRA − LoRA interval resamples both the seeds and the test rows.")


def seed_summary_lines(report: Report | dict) -> list[str]:
    """The CLI's and the app's plain-text summary over seeds: the mean ± std table, every VeRA − LoRA line and the
    tuned rates; [] for a single-seed, untuned run (its one table says it all)."""
    report = _as_dict(report)
    lines = []
    if len(report.get("seeds") or []) > 1 and report.get("settings"):
        lines += ["", seeds_note(report), format_table(setting_table(report["settings"]), SETTING_COLUMNS)]
        lines += [pair_line(p) for p in report.get("pairs") or []]
    if report.get("tuning"):
        lines += ["", "tuned learning rates (validation loss, first seed):", *tuning_lines(report["tuning"])]
    if lines and head_rate_line(report):
        lines.append(head_rate_line(report))
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
    if report.settings:
        lines += ["", seeds_note(report), "", "```", format_table(setting_table(report.settings), SETTING_COLUMNS),
                  "```", ""] + [f"- {pair_line(p)}" for p in report.pairs]
    if report.tuning:
        lines += ["", "Learning rates tuned on validation (the same steps for every method, first seed; head-only "
                  "first, its rate then the head rate of all):", ""]
        lines += [f"- {line}" for line in tuning_lines(report.tuning)]
    if head_rate_line(report):
        lines += ["", head_rate_line(report)]
    checks = [(r, comparable_estimate(r.memory_estimate, r.peak_memory_kind)) for r in report.runs if r.memory_estimate]
    checks = [(r, est) for r, est in checks if est and r.peak_memory_bytes]
    if checks:
        lines += ["", "Peak tensor memory, predicted (one fake step; an upper bound: every row at max_length) vs "
                  "measured (the tracked steps), MiB:", "",
                  "| run | " + " | ".join(CATEGORIES) + " | total | error |",
                  "|---|" + "---|" * (len(CATEGORIES) + 2)]
        for r, est in checks:
            for label, parts in (("predicted", r.memory_estimate), ("measured", r.memory_breakdown or {})):
                cells = [f"{parts[k] / 2**20:.1f}" if parts.get(k) is not None else "-" for k in (*CATEGORIES, "total")]
                error = f"{100 * (est - r.peak_memory_bytes) / r.peak_memory_bytes:+.1f}%" if label == "predicted" else ""
                lines.append(f"| {r.name} {label} | " + " | ".join(cells) + f" | {error} |")
        lines += ["", padding_note([est / r.peak_memory_bytes - 1 for r, est in checks])]
        lines += ["", note] if (note := gradients_note([r.memory_breakdown or {} for r, _ in checks])) else []
    lines += [""] + [f"![{Path(name).stem}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def gradients_note(measured: Sequence[dict]) -> str | None:
    """Why the gradients column reads 0 when no measured peak holds a gradient (None otherwise): a learner would
    otherwise read it as "gradients cost nothing"."""
    if not measured or any(parts.get("gradients") for parts in measured):
        return None
    return ("Gradients read 0 because every measured peak came before backward had made any: at the end of the "
            "forward pass, when every activation saved for backward is alive. Gradients (one number per trainable "
            "parameter) exist later in the step, once backward has freed part of those activations, and are freed "
            "after each optimizer step.")


def padding_note(errors: Sequence[float]) -> str:
    """Why a prediction can sit above the measured peak, with the gap the runs showed (errors: predicted ÷ measured
    − 1 per run)."""
    over = [e for e in errors if e > 0.005]
    gap = (f" Here the predictions were {100 * min(over):.1f}–{100 * max(over):.1f}% above the measured peaks."
           if over else " Here no prediction was more than 0.5% above its measured peak.")
    return ("The prediction pads every row to max_length; the trainer pads each batch only to its longest row, so "
            "data with shorter rows needs less than predicted." + gap)


def write_reports(run_dir: Path, report: Report, figures: bool = False, best_effort: bool = False) -> None:
    """report.json, report.md and samples.jsonl (and the figures) for what has finished so far, each atomically: a
    write that fails raises a WriteError and leaves the file's last good version. best_effort (after an error has
    ended the comparison): a file that fails is skipped instead, so that error stays the one reported."""
    report.settings = setting_rows(report, run_dir)
    report.pairs = pair_rows(report, run_dir)
    skip = (OSError,) if best_effort else ()
    for write, path, content in ((write_json, "report.json", report.to_dict()),
                                 (write_jsonl, "samples.jsonl", report.samples)):
        try:
            write(run_dir / path, content)
        except skip:
            pass
    names = []
    if figures and report.runs:
        from .plots import save_figures  # matplotlib is imported only when figures are drawn

        names = [p.name for p in save_figures(report.to_dict(), {r.name: r.history for r in report.runs}, run_dir,
                                              best_effort)]
    try:
        write_text(run_dir / "report.md", report_markdown(report, names))
    except skip:
        pass


def load_run(run_dir: str | os.PathLike) -> tuple[dict, dict[str, list[dict]]]:
    """(report.json, {run name: its step/eval events from metrics.jsonl}) of a run directory, for plots and UIs."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    histories: dict[str, list[dict]] = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            event = json.loads(line)
            if event.get("type") in ("step", "eval") and event.get("phase") != "tune":
                histories.setdefault(event["run"], []).append(event)
    return report, histories
