"""The comparison figures a learner reads: colour is the method, seeds are a mean with a spread, rank-less rows are
baselines, the memory figure's small categories are in its table."""
import math

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba

from vera_core.lab import plots


def _history(seed: int, offset: float, steps: int = 40) -> list[dict]:
    events = [{"type": "step", "step": s, "loss": 0.7 - offset * s / steps + 0.01 * seed} for s in range(1, steps + 1)]
    return events + [{"type": "eval", "step": steps, "eval_loss": 0.6 - offset + 0.01 * seed}]


def test_loss_figure_draws_one_mean_line_and_band_per_setting_in_its_method_colour():
    histories = {f"{m}-s{seed}": _history(seed, off) for m, off in (("vera-r256", 0.1), ("lora-r8", 0.2))
                 for seed in (0, 1, 2)}
    ax = plots.loss_figure(histories).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"vera-r256 (3 seeds)", "vera-r256 eval", "lora-r8 (3 seeds)", "lora-r8 eval"}
    assert to_rgba(lines["vera-r256 (3 seeds)"].get_color()) == to_rgba("tab:orange")
    assert to_rgba(lines["lora-r8 eval"].get_color()) == to_rgba("tab:blue")
    assert lines["lora-r8 eval"].get_ydata()[0] == pytest.approx(0.41)  # mean of 0.40, 0.41, 0.42
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 4  # training and eval, for each of the two settings
    assert lines["vera-r256 (3 seeds)"].get_ydata()[0] == pytest.approx(0.7 - 0.1 / 40 + 0.01)  # smoothing starts at 1
    assert "min-max" in ax.get_title()


def test_loss_figure_uses_report_settings_and_caps_the_series():
    runs = [{"name": f"run{i}", "method": "vera", "setting": f"vera-d{i}"} for i in range(10)]
    ax = plots.loss_figure({f"run{i}": _history(0, 0.01 * i) for i in range(10)}, runs).axes[0]
    assert len([line for line in ax.get_lines() if "eval" not in line.get_label()]) == plots.MAX_SERIES
    assert ax.get_title() == f"Loss (first {plots.MAX_SERIES} of 10 settings)"
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # one seed each: no band


def test_tradeoff_figure_keeps_a_nan_rank_as_a_baseline_and_labels_integer_ranks():
    nan = float("nan")
    rows = [{"method": "vera", "r": 16.0, "trainable_params": 4800, "accuracy": 67.6, "accuracy_err": 1.8},
            {"method": "vera", "r": 256.0, "trainable_params": 7680, "accuracy": 70.4, "accuracy_err": 1.7},
            {"method": "lora", "r": 8.0, "trainable_params": 73728, "accuracy": 71.9, "accuracy_err": 0.7},
            {"method": "head", "r": nan, "trainable_params": 0, "accuracy": 62.6, "accuracy_err": 2.4}]
    ax = plots.tradeoff_figure(rows).axes[0]
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["head (baseline)", "vera", "lora"]
    baseline = next(line for line in ax.get_lines() if line.get_label() == "head (baseline)")
    assert list(baseline.get_ydata()) == [62.6, 62.6] and baseline.get_linestyle() == "--"
    assert sorted(t.get_text() for t in ax.texts) == ["r=16", "r=256", "r=8"]
    assert [to_rgba(c.lines[0].get_color()) for c in ax.containers] == [to_rgba("tab:orange"), to_rgba("tab:blue")]


def test_dinit_figure_labels_integer_ranks_from_floats():
    rows = [{"method": "vera", "r": 256.0, "d_init": d, "accuracy": a} for d, a in ((1e-7, 70.4), (1.0, 71.7))]
    ax = plots.dinit_figure(rows + [{"method": "head", "r": math.nan, "d_init": None, "accuracy": 60}]).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["r=256"]
    assert list(ax.get_lines()[0].get_xdata()) == [1e-7, 1.0]


def _run(name, setting, method, adapter, activations, estimate=None):
    parts = {"weights": 80 * 2**20, "adapter": adapter, "gradients": adapter, "optimizer": 2 * adapter,
             "activations": activations, "temporaries": 0}
    return {"name": name, "setting": setting, "method": method, "trainable_params": adapter // 4,
            "memory_breakdown": {**parts, "total": sum(parts.values())},
            "memory_estimate": {"total": estimate} if estimate else None}


def test_memory_figure_draws_one_stacked_bar_per_setting_with_the_mean_and_a_table():
    runs = [_run("vera-s0", "vera", "vera", 30_720, 100 * 2**20, 250 * 2**20),
            _run("vera-s1", "vera", "vera", 30_720, 120 * 2**20, 250 * 2**20),
            _run("lora-s0", "lora", "lora", 294_912, 90 * 2**20)]
    fig = plots.memory_figure(runs)
    ax, side = fig.axes
    assert len(ax.patches) == len(plots.MEMORY_COLOURS) * 2  # one segment per category per setting
    activations = [p.get_height() for p in ax.patches][4 * 2:5 * 2]  # the fifth category, both bars
    assert activations == pytest.approx([110.0, 90.0])  # VeRA: the mean of its two seeds
    assert [t.get_text() for t in ax.get_xticklabels()] == ["vera\n(mean of 2)", "lora"]
    ticks = [line for line in ax.get_lines() if line.get_label() == "predicted total"]
    assert len(ticks) == 1 and list(ticks[0].get_ydata()) == [250.0, 250.0]
    cells = {(r, c): cell.get_text().get_text() for (r, c), cell in side.tables[0].get_celld().items()}
    assert cells[(0, 0)] == "vera" and cells[(2, 0)] == "0.0293"  # adapter row: 30,720 B in MiB
    assert cells[(2, 1)] == "0.281"


def test_breakdown_table_heads_are_the_labels_first_line_one_word_a_line():
    parts = {**{name: 2**20 for name in plots.MEMORY_COLOURS}, "total": 6 * 2**20}
    fig = plots.breakdown_figure([("4bit vera\n(mean of 2)", parts), ("fp32 lora", parts)])
    table = fig.axes[1].tables[0]
    assert [table[0, c].get_text().get_text() for c in (0, 1)] == ["4bit\nvera", "fp32\nlora"]
    assert table[0, 0].get_height() == pytest.approx(2 * table[1, 0].get_height())  # room for the two lines


def test_breakdown_figure_without_a_prediction_scales_to_its_tallest_bar():
    # The calculator's "will it fit?" draws breakdowns with no predicted totals (the bars are the predictions).
    parts = {**{name: 10 * 2**20 for name in plots.MEMORY_COLOURS}, "total": 60 * 2**20}
    fig = plots.breakdown_figure([("vera", parts), ("lora", {**parts, "activations": 40 * 2**20, "total": 90 * 2**20})])
    ax, _ = fig.axes
    tallest = 10 * (len(plots.MEMORY_COLOURS) - 1) + 40
    assert ax.get_ylim() == pytest.approx((0, tallest * 1.4))


def test_metric_figure_colours_by_method_and_dots_each_seed():
    settings = [{"setting": "vera-r256", "method": "vera", "metric": "accuracy", "mean": 72.0, "std": 2.0,
                 "values": [70.0, 72.0, 74.0]},
                {"setting": "lora-r8", "method": "lora", "metric": "accuracy", "mean": 71.0, "std": 1.0,
                 "values": [70.0, 72.0]}]
    ax = plots.metric_figure([], "classification", settings).axes[0]
    assert [to_rgba(p.get_facecolor())[:3] for p in ax.patches] == [to_rgba("tab:orange")[:3], to_rgba("tab:blue")[:3]]
    dots = [line for line in ax.get_lines() if line.get_marker() == "."]
    assert [list(d.get_ydata()) for d in dots] == [[70.0, 72.0, 74.0], [70.0, 72.0]]


def test_memory_table_columns_hold_their_whole_heads():
    # Long setting names ("vera-r256 (mean of 2)") used to run past their column into the next one.
    runs = [_run(f"{name}-s{seed}", name, name.split("-")[0], 30_720, 100 * 2**20)
            for name in ("head", "vera-r256", "lora-r8") for seed in (0, 1)]
    fig = plots.memory_figure(runs)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    cells = fig.axes[1].tables[0].get_celld()
    labels = [cells[(0, c)] for c in range(3)]
    assert [cell.get_text().get_text().split("\n")[0] for cell in labels][1:] == ["vera-r256", "lora-r8"]
    for cell in labels:
        box, text = cell.get_window_extent(renderer), cell.get_text().get_window_extent(renderer)
        assert box.x0 <= text.x0 and text.x1 <= box.x1, (box, text)
