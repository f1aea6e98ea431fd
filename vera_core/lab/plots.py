"""Figures of a comparison, drawn from report.json data and step/eval histories (see `compare.load_run`).

Each function returns a matplotlib Figure built on the Agg canvas (no pyplot, no display needed), so the app and
notebooks can show it and `save_figures` can write PNGs. Colour is the method everywhere (`METHOD_COLOURS`); runs of
one setting over several seeds are drawn as their mean with the spread (a band, error bars or the seeds as dots),
never as one line each.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..adapters.files import atomic_file

METHOD_COLOURS = {"vera": "tab:orange", "lora": "tab:blue", "head": "0.45", "base": "0.2"}
MAX_SERIES = 8  # series per axis a reader can still tell apart; more are left out and the title says so
SEED_SUFFIX = re.compile(r"-s\d+$")  # a run's name is its setting's plus "-s<seed>" when a comparison has seeds
STYLES = ("-", "--", ":", "-.")  # a method's settings after its first, in its one colour


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def method_colour(method: str) -> str:
    """A method's colour in every figure (a method without one gets a light grey)."""
    return METHOD_COLOURS.get(method, "0.7")


def _method_of(name: str) -> str:
    """A run name's method: its first word ("vera-r16-s0" -> "vera"), after any "directory/" an overlay adds."""
    return name.rsplit("/", 1)[-1].split("-", 1)[0]


def _has_rank(row: dict) -> bool:
    """Whether a row has a rank: head-only and base rows carry None, or NaN once they passed through pandas."""
    r = row.get("r")
    return r is not None and not (isinstance(r, float) and math.isnan(r)) and r > 0


def _bars(ax, names: list[str], values: list[float], fmt: str, methods: list[str]) -> None:
    bars = ax.bar(names, values, color=[method_colour(m) for m in methods])
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)


def _by_setting(runs: list[dict]) -> dict[str, list[dict]]:
    """report.json runs grouped by setting (a run without one: by its name without the seed suffix), in order."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run.get("setting") or SEED_SUFFIX.sub("", run["name"]), []).append(run)
    return groups


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: one batch's loss is noisy, the trend is what a reader compares."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _band(ax, curves: list[list[tuple[int, float]]], colour: str, style: str, label: str, window: int) -> None:
    """The mean over seeds as a line and, with several seeds, their min-max as a band, over the steps every seed
    reached."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    if not steps:
        return
    columns = [_smooth([dict(c)[s] for s in steps], window) for c in curves]
    ax.plot(steps, [sum(v) / len(v) for v in zip(*columns)], style, color=colour, lw=1.4, ms=4, label=label)
    if len(curves) > 1:
        ax.fill_between(steps, [min(v) for v in zip(*columns)], [max(v) for v in zip(*columns)], color=colour,
                        alpha=0.2, lw=0)


def loss_figure(histories: dict[str, list[dict]], runs: list[dict] | None = None) -> Figure:
    """Training loss against the step, one series per setting in its method's colour: the mean over its seeds
    (smoothed over 1/20 of the steps) with their min-max as a band; evaluation losses as marked lines. `runs`
    (report.json's) names each run's setting and method; without it both are read from the run names."""
    fig, ax = _figure(8.0, 4.2)
    known = {r["name"]: r for r in runs or []}
    groups: dict[str, tuple[str, list[list[dict]]]] = {}
    for name, events in histories.items():
        run = known.get(name, {"name": name, "method": _method_of(name)})
        setting = run.get("setting") or SEED_SUFFIX.sub("", name)
        groups.setdefault(setting, (run["method"], []))[1].append(events)
    per_method: dict[str, int] = {}
    for setting, (method, seeds) in list(groups.items())[:MAX_SERIES]:
        k = per_method[method] = per_method.get(method, -1) + 1
        steps = [[(e["step"], e["loss"]) for e in h if e["type"] == "step"] for h in seeds]
        evals = [[(e["step"], e["eval_loss"]) for e in h if e["type"] == "eval"] for h in seeds]
        label = setting + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
        if all(steps):
            last = max(s for c in steps for s, _ in c)
            _band(ax, steps, method_colour(method), STYLES[k % 4], label, max(1, last // 20))
        if all(evals):
            _band(ax, evals, method_colour(method), "o" + STYLES[k % 4], f"{setting} eval", 1)
    title = "Loss: mean over seeds, band = min-max" if any(len(s) > 1 for _, s in groups.values()) else "Loss"
    if len(groups) > MAX_SERIES:
        title += f" (first {MAX_SERIES} of {len(groups)} settings)"
    ax.set(xlabel="optimizer step", ylabel="loss (training: smoothed)", title=title)
    if ax.has_data():
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def params_figure(runs: list[dict]) -> Figure:
    """Trainable parameters per setting (head excluded) on a log scale; settings that train nothing are left out."""
    groups = [g[0] for g in _by_setting([r for r in runs if r["trainable_params"]]).values()]
    fig, ax = _figure()
    _bars(ax, [r.get("setting") or r["name"] for r in groups], [r["trainable_params"] for r in groups], "{:,.0f}",
          [r.get("method", _method_of(r["name"])) for r in groups])
    if groups:  # a log axis needs a positive bar (a comparison stopped after "base" has none)
        ax.set_yscale("log")
    ax.set(ylabel="trainable parameters (log scale)", title="Trainable parameters (head excluded)")
    return fig


MEMORY_COLOURS = {"weights": "0.6", "adapter": "tab:orange", "gradients": "tab:red", "optimizer": "tab:purple",
                  "activations": "tab:blue", "temporaries": "tab:cyan"}


def _mib(value: float) -> str:
    return "0" if not value else f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def breakdown_figure(bars: list[tuple[str, dict]], title: str = "Peak tensor memory by category",
                     predicted: list[float | None] | None = None) -> Figure:
    """Stacked bars in MiB, one per (label, breakdown) with the memory_breakdown categories, the total on top, and
    beside them a table of every category in MiB, where the small ones (adapter, gradients, optimizer) stay readable.
    `predicted`: a total in bytes per bar (None: none), drawn as a black tick on the bar."""
    fig = Figure(figsize=(max(9.0, 1.2 * len(bars) + 6.5), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax, side = fig.subplots(1, 2, width_ratios=[max(1.3, 0.6 * len(bars)), 1.3])
    names = [label for label, _ in bars]
    bottom = [0.0] * len(bars)
    for category, colour in MEMORY_COLOURS.items():
        heights = [parts.get(category, 0) / 2**20 for _, parts in bars]
        ax.bar(names, heights, bottom=bottom, color=colour, label=category)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, (_, parts) in enumerate(bars):
        ax.annotate(f"{parts['total'] / 2**20:,.1f}", (i, bottom[i]), ha="center", va="bottom", fontsize=8)
    for i, total in enumerate(predicted or []):
        if total:
            ax.plot([i - 0.45, i + 0.45], [total / 2**20] * 2, color="black", lw=2,
                    label="predicted total" if i == next(j for j, t in enumerate(predicted) if t) else None)
    ax.tick_params(axis="x", labelrotation=20 if len(bars) > 2 else 0)
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=10)
    side.axis("off")
    if bars:
        ax.legend(fontsize=7, ncols=3, loc="upper left")
        ax.set_ylim(0, max([*bottom, *(t / 2**20 for t in predicted or [] if t)]) * 1.4)  # room for the legend
        cells = [[_mib(parts.get(c, 0) / 2**20) for _, parts in bars] for c in (*MEMORY_COLOURS, "total")]
        # Column heads: the label's first line, one word a line, so six or more columns stay apart (the bars'
        # labels below the axis keep the rest, e.g. "(mean of 2)").
        heads = [n.split("\n")[0].replace(" ", "\n") for n in names]
        table = side.table(cellText=cells, rowLabels=[*MEMORY_COLOURS, "total"], colLabels=heads, loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.auto_set_column_width(list(range(-1, len(names))))  # every head whole, however long
        lines = max(h.count("\n") + 1 for h in heads)
        for col in range(len(heads)):
            table[0, col].set_height(table[0, col].get_height() * lines)
        side.set_title("MiB per category", fontsize=9)
    return fig


def memory_figure(runs: list[dict]) -> Figure:
    """Peak tensor memory per setting, measured (the tracked steps; the mean over seeds), stacked by category, with
    the prediction made before the run (one fake step) as a black tick; a run with no breakdown (trained nothing, or
    recorded before the tracker) is left out."""
    bars, predicted = [], []
    for setting, group in _by_setting([r for r in runs if r.get("memory_breakdown")]).items():
        keys = set().union(*(r["memory_breakdown"] for r in group))
        mean = {k: sum(r["memory_breakdown"].get(k, 0) for r in group) / len(group) for k in keys}
        bars.append((setting + (f"\n(mean of {len(group)})" if len(group) > 1 else ""), mean))
        estimates = [r["memory_estimate"]["total"] for r in group if r.get("memory_estimate")]
        predicted.append(sum(estimates) / len(estimates) if estimates else None)
    title = "Peak tensor memory, measured" if bars else "Peak memory (not measured)"
    return breakdown_figure(bars, title, predicted)


def metric_figure(runs: list[dict], task: str, settings: list[dict] | None = None) -> Figure:
    """Test accuracy (classification) or BLEU and ROUGE-L (generation) per run, 0-100; with several seeds
    (`settings`, report.json's), the headline metric's mean per setting with ± std error bars and each seed's
    value as a dot."""
    if settings and any(s["std"] is not None for s in settings):
        fig, ax = _figure()
        names, means = [s["setting"] for s in settings], [s["mean"] for s in settings]
        methods = [s.get("method") or _method_of(s["setting"]) for s in settings]
        bars = ax.bar(names, means, yerr=[s["std"] or 0.0 for s in settings], capsize=4,
                      color=[method_colour(m) for m in methods], alpha=0.8)
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8, label_type="center")
        for i, s in enumerate(settings):
            values = s.get("values") or []
            ax.plot([i] * len(values), values, "k.", ms=5, label="one seed" if i == 0 and values else None)
        ax.tick_params(axis="x", labelrotation=20)
        ax.set(ylabel=settings[0]["metric"],
               title=f"Test {settings[0]['metric']}: mean ± std over seeds (dots: seeds)")
        return fig
    runs = [r for r in runs if r["eval"]]
    fig, ax = _figure()
    names = [r["name"] for r in runs]
    if task == "classification":
        _bars(ax, names, [r["eval"]["accuracy"] for r in runs], "{:.1f}",
              [r.get("method", _method_of(r["name"])) for r in runs])
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
    """`value` against trainable parameters (log x, head excluded): one line per `series` (default: per method, in
    its colour) through its runs sorted by size, each point labelled with its rank. Rows need "r",
    "trainable_params", `value` and `series` (a report.json run with its metric copied up, see
    `report.tradeoff_rows`, or a sweep row); a row with f"{value}_err" (e.g. the std over seeds) gets that error
    bar. Rows without a rank (None or NaN: head only, the base model) are dashed horizontal baselines."""
    fig, ax = _figure()
    for r in rows:
        if not _has_rank(r):
            ax.axhline(r[value], ls="--", lw=1, color=method_colour(r.get("method", "")),
                       label=f"{r[series]} (baseline)")
    names = list(dict.fromkeys(r[series] for r in rows if _has_rank(r)))[:MAX_SERIES]
    for i, name in enumerate(names):
        points = sorted((r["trainable_params"], r[value], r["r"], r.get(f"{value}_err"))
                        for r in rows if r[series] == name and _has_rank(r))
        colour = method_colour(name) if series == "method" and name in METHOD_COLOURS else f"C{i}"
        _line(ax, [p[0] for p in points], [p[1] for p in points], [p[3] for p in points], colour, name)
        for x, y, r, _ in points:
            ax.annotate(f"r={r:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
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
    rows = [r for r in rows if r.get("method") == "vera" and r.get("d_init") is not None and _has_rank(r)]
    ranks = sorted({r["r"] for r in rows})[:MAX_SERIES]
    for i, rank in enumerate(ranks):
        points = sorted((r["d_init"], r[value], r.get(f"{value}_err")) for r in rows if r["r"] == rank)
        colour = method_colour("vera") if len(ranks) == 1 else f"C{i}"  # one rank: VeRA's colour, as elsewhere
        _line(ax, [p[0] for p in points], [p[1] for p in points], [p[2] for p in points], colour, f"r={rank:g}")
    if rows:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set(xlabel="d_init (log scale)", ylabel=value, title=title)
    ax.grid(alpha=0.3)
    return fig


def _line(ax, xs: list, ys: list, errors: list, colour: str, label: str) -> None:
    """A marked line; with error bars only when every point carries one (a partial set would mislead)."""
    if errors and all(e is not None and not math.isnan(e) for e in errors):
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
    draw = dict(zip(FIGURES, (lambda: loss_figure(histories, report["runs"]), lambda: params_figure(report["runs"]),
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
