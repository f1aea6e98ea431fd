"""Figures of a comparison, drawn from report.json data and step/eval histories (see `compare.load_run`).

Each function returns a matplotlib Figure built on the Agg canvas (no pyplot, no display needed), so the app and
notebooks can show it and `save_figures` can write PNGs.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..adapters.files import atomic_file


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _bars(ax, names: list[str], values: list[float], fmt: str) -> None:
    colours = [f"C{i}" for i in range(len(names))]
    bars = ax.bar(names, values, color=colours)
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)


def loss_figure(histories: dict[str, list[dict]]) -> Figure:
    """Every run's training loss against the step on one plot; evaluation losses as markers of the same colour."""
    fig, ax = _figure()
    for i, (name, history) in enumerate(histories.items()):
        steps = [(e["step"], e["loss"]) for e in history if e["type"] == "step"]
        evals = [(e["step"], e["eval_loss"]) for e in history if e["type"] == "eval"]
        if steps:
            ax.plot(*zip(*steps), color=f"C{i}", lw=1.2, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), "o--", color=f"C{i}", ms=5, lw=0.8, label=f"{name} eval")
    ax.set(xlabel="optimizer step", ylabel="loss", title="Loss curves")
    if ax.has_data():
        ax.legend(fontsize=8)
    return fig


def params_figure(runs: list[dict]) -> Figure:
    """Trainable parameters per run (head excluded) on a log scale; runs that train nothing are left out."""
    runs = [r for r in runs if r["trainable_params"]]
    fig, ax = _figure()
    _bars(ax, [r["name"] for r in runs], [r["trainable_params"] for r in runs], "{:,.0f}")
    if runs:  # a log axis needs a positive bar (a comparison stopped after "base" has none)
        ax.set_yscale("log")
    ax.set(ylabel="trainable parameters (log scale)", title="Trainable parameters (head excluded)")
    return fig


MEMORY_COLOURS = {"weights": "0.6", "adapter": "tab:orange", "gradients": "tab:red", "optimizer": "tab:purple",
                  "activations": "tab:blue", "temporaries": "tab:cyan"}


def breakdown_figure(bars: list[tuple[str, dict]], title: str = "Peak tensor memory by category") -> Figure:
    """Stacked bars in MiB, one per (label, breakdown) with the memory_breakdown categories; the total on top."""
    fig, ax = _figure(max(6.0, 1.1 * len(bars) + 2.5), 4.2)
    names = [label for label, _ in bars]
    bottom = [0.0] * len(bars)
    for category, colour in MEMORY_COLOURS.items():
        heights = [parts.get(category, 0) / 2**20 for _, parts in bars]
        ax.bar(names, heights, bottom=bottom, color=colour, label=category)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, (_, parts) in enumerate(bars):
        ax.annotate(f"{parts['total'] / 2**20:,.1f}", (i, bottom[i]), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    ax.set(ylabel="MiB", title=title)
    if bars:
        ax.legend(fontsize=7, ncols=3, loc="upper left")
        ax.set_ylim(0, max(bottom) * 1.35)  # room for the legend above the tallest bar
    return fig


def memory_figure(runs: list[dict]) -> Figure:
    """Peak tensor memory per run, predicted (before the run, one fake step) beside measured (the tracked steps),
    stacked by category; a run with no breakdown (trained nothing, or recorded before the tracker) is left out."""
    bars = []
    for run in runs:
        if run.get("memory_estimate") and run.get("memory_breakdown"):
            bars.append((f"{run['name']}\npredicted", run["memory_estimate"]))
        if run.get("memory_breakdown"):
            bars.append((f"{run['name']}\nmeasured", run["memory_breakdown"]))
    return breakdown_figure(bars, "Peak tensor memory: predicted beside measured" if bars else "Peak memory (not measured)")


def metric_figure(runs: list[dict], task: str, settings: list[dict] | None = None) -> Figure:
    """Test accuracy (classification) or BLEU and ROUGE-L (generation) per run, 0-100; with several seeds
    (`settings`, report.json's), the headline metric's mean per setting with ± std error bars."""
    if settings and any(s["std"] is not None for s in settings):
        fig, ax = _figure()
        names, means = [s["setting"] for s in settings], [s["mean"] for s in settings]
        bars = ax.bar(names, means, yerr=[s["std"] or 0.0 for s in settings], capsize=4,
                      color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8, label_type="center")
        ax.tick_params(axis="x", labelrotation=20)
        ax.set(ylabel=settings[0]["metric"], title=f"Test {settings[0]['metric']}: mean ± std over seeds")
        return fig
    runs = [r for r in runs if r["eval"]]
    fig, ax = _figure()
    names = [r["name"] for r in runs]
    if task == "classification":
        _bars(ax, names, [r["eval"]["accuracy"] for r in runs], "{:.1f}")
        ax.set(ylabel="accuracy %", title="Test accuracy")
    else:
        width = 0.4
        for j, key in enumerate(("bleu", "rougeL")):
            values = [r["eval"][key] or 0.0 for r in runs]
            bars = ax.bar([i + (j - 0.5) * width for i in range(len(runs))], values, width, label=key)
            ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        ax.set_xticks(range(len(runs)), names, rotation=20)
        ax.set(ylabel="score (0-100)", title="Test BLEU and ROUGE-L")
        ax.legend(fontsize=8)
    return fig


def tradeoff_figure(rows: list[dict], value: str = "accuracy", title: str = "Quality against trainable parameters",
                    series: str = "method") -> Figure:
    """`value` against trainable parameters (log x, head excluded): one line per `series` (default: per method)
    through its runs sorted by size, each point labelled with its rank. Rows need "r", "trainable_params", `value`
    and `series` (a report.json run with its metric copied up, see `report.tradeoff_rows`, or a sweep row); a row
    with f"{value}_err" (e.g. a half-width over seeds) gets that error bar. Rows without a rank (head only, the base
    model) are drawn as dashed horizontal baselines."""
    fig, ax = _figure()
    for r in rows:
        if not r.get("r"):
            ax.axhline(r[value], ls="--", lw=1, color="grey", label=f"{r[series]} (baseline)")
    names = dict.fromkeys(r[series] for r in rows if r.get("r"))
    for i, name in enumerate(names):
        points = sorted((r["trainable_params"], r[value], r["r"], r.get(f"{value}_err"))
                        for r in rows if r[series] == name and r.get("r"))
        _line(ax, [p[0] for p in points], [p[1] for p in points], [p[3] for p in points], f"C{i}", name)
        for x, y, r, _ in points:
            ax.annotate(f"r={r}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if names:
        ax.set_xscale("log")
    if rows:
        ax.legend(fontsize=8)
    ax.set(xlabel="trainable parameters, head excluded (log scale)", ylabel=value, title=title)
    ax.grid(alpha=0.3)
    return fig


def dinit_figure(rows: list[dict], value: str = "accuracy", title: str = "VeRA: quality against d_init") -> Figure:
    """`value` against VeRA's d_init (log x), one line per rank r; error bars from f"{value}_err" where rows carry
    it. Rows that are not VeRA runs are left out."""
    fig, ax = _figure()
    rows = [r for r in rows if r.get("method") == "vera" and r.get("d_init") is not None]
    for i, rank in enumerate(sorted({r["r"] for r in rows})):
        points = sorted((r["d_init"], r[value], r.get(f"{value}_err")) for r in rows if r["r"] == rank)
        _line(ax, [p[0] for p in points], [p[1] for p in points], [p[2] for p in points], f"C{i}", f"r={rank}")
    if rows:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set(xlabel="d_init (log scale)", ylabel=value, title=title)
    ax.grid(alpha=0.3)
    return fig


def _line(ax, xs: list, ys: list, errors: list, colour: str, label: str) -> None:
    """A marked line; with error bars only when every point carries one (a partial set would mislead)."""
    if errors and all(e is not None for e in errors):
        ax.errorbar(xs, ys, yerr=errors, fmt="o-", color=colour, capsize=3, label=label)
    else:
        ax.plot(xs, ys, "o-", color=colour, label=label)


FIGURES = ("loss.png", "params.png", "memory.png", "metric.png")  # what save_figures writes into a run directory


def save_figures(report: dict, histories: dict[str, list[dict]], directory: str | Path,
                 best_effort: bool = False) -> list[Path]:
    """Write FIGURES for a report.json dict, each atomically; return the paths written. A figure that cannot be
    drawn or written raises (a WriteError when the write failed), unless best_effort (after an earlier error, which
    a figure must not hide): then it is skipped and any earlier version of it kept."""
    directory = Path(directory)
    draw = dict(zip(FIGURES, (lambda: loss_figure(histories), lambda: params_figure(report["runs"]),
                              lambda: memory_figure(report["runs"]),
                              lambda: metric_figure(report["runs"], report["task"], report.get("settings")))))
    written = []
    for name, figure in draw.items():
        try:
            with atomic_file(directory / name) as tmp:
                figure().savefig(tmp, format="png", dpi=110)
        except Exception:
            if not best_effort:
                raise
            continue
        written.append(directory / name)
    return written


def calculator_figure(rows: list[dict]) -> Figure:
    """Trainable parameters per model, one bar per (method, r), log scale: the paper's Table 1 at a glance.
    rows: {"model", "method", "r", "trainable"} (the calculator's)."""
    fig, ax = _figure(9, 4.2)
    models = list(dict.fromkeys(row["model"] for row in rows))
    configs = list(dict.fromkeys((row["method"], row["r"]) for row in rows))
    trainable = {(row["model"], row["method"], row["r"]): row["trainable"] for row in rows}
    width = 0.8 / len(configs)
    for j, (method, r) in enumerate(configs):
        values = [trainable[(m, method, r)] for m in models]
        colour = "tab:orange" if method == "vera" else "tab:blue"
        shade = 0.45 + 0.55 * j / max(1, len(configs) - 1)
        ax.bar([i + (j - (len(configs) - 1) / 2) * width for i in range(len(models))], values, width,
               label=f"{method} r={r}", color=colour, alpha=shade)
    ax.set_yscale("log")
    ax.set_xticks(range(len(models)), models, rotation=10)
    ax.set(ylabel="trainable parameters (log scale)", title="VeRA vs LoRA trainable parameters (no weights loaded)")
    ax.legend(fontsize=8, ncols=2)
    return fig
