"""The Results tab: one run's summary, table, figures, and for a sweep its trade-off figures and sorted table;
its saved settings back into the form."""
from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from vera_core.lab.plots import dinit_figure, loss_figure, memory_figure, metric_figure, params_figure, tradeoff_figure
from vera_core.lab.report import load_run, memory_differences, metric_value, seed_summary_lines, summary_rows
from vera_core.lab.report import tradeoff_rows

from .common import Lab, list_runs, read_form, read_lab_meta

# report.summary_rows' keys as the lab labels them
RESULT_LABELS = {"run": "run", "method": "method", "trainable": "trainable params", "% of model": "% of model",
                 "head": "head params", "adapter_kib": "adapter file (KiB)", "peak_mib": "peak memory (MiB)",
                 "est_mib": "predicted memory (MiB)", "rss_mib": "process RSS (MiB)", "step_s": "step time (s)",
                 "tokens_per_s": "tokens/s", "train_loss": "final train loss", "test_loss": "test loss",
                 "metric": "test metric"}
RESULT_COLUMNS = list(RESULT_LABELS.values())
SWEEP_HEADING = "### Sweep: quality against size (base / head only dashed), and against d_init per r"
NOT_A_SWEEP = ("*This run is not a sweep* (one setting per method), so there is no trade-off or d_init figure: "
               "enter several values, e.g. VeRA r `16,256` or d_init `0.1,1`, in the Train tab for one.")


def results_table(report: dict, total_params: int | None) -> pd.DataFrame:
    """report.summary_rows as the lab's table ("% of model" against the base model's parameters)."""
    rows = [{RESULT_LABELS[k]: v for k, v in row.items()} for row in summary_rows(report, total_params)]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def seed_summary(report: dict) -> str:
    """Over several seeds: mean ± std and the 95% interval per setting, and every "VeRA − LoRA" line with its
    interval and verdict; the tuned rates when tuned ("" for one untuned seed), as a fixed-width block."""
    lines = seed_summary_lines(report)
    return "\n\n```\n" + "\n".join(lines).strip() + "\n```" if lines else ""


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


class ResultsTab:
    """Handlers and layout of the Results tab."""

    def __init__(self, lab: Lab):
        self.lab = lab

    def show_run(self, run_dir: str | None):
        """A finished (or stopped) run: summary, table, bar charts, loss curves, for a sweep its trade-off figures
        and its table sorted by metric (else a line saying it is not a sweep), and its saved settings."""
        if not run_dir:
            empty = pd.DataFrame(columns=RESULT_COLUMNS)
            hidden = gr.update(value=None, visible=False)
            return "No run selected.", empty, None, None, None, None, "", hidden, hidden, hidden, {}
        path = self.lab.run_dir(run_dir)
        report, histories = load_run(path)
        meta = read_lab_meta(path)
        config = json.loads((path / "config.json").read_text())
        summary = (f"**{report['model']}** on **{report['dataset']}** ({report['task']}) — "
                   f"device {report['device']}, "
                   f"dtype {report['dtype']}, seed {report['seed']}, peak memory measured {report['memory_mode']}"
                   + (" — **stopped early**" if report.get("stopped") else "") + seed_summary(report)
                   + "".join(f"\n- {line}" for line in memory_differences(report)))
        runs = report["runs"]
        figures = (loss_figure(histories), params_figure(runs), memory_figure(runs),
                   metric_figure(runs, report["task"], report.get("settings")))
        if is_sweep(report):
            scored = tradeoff_rows(report)
            metric = scored[0]["metric_name"] if scored else "accuracy"
            sweep = (SWEEP_HEADING,
                     *(gr.update(value=v, visible=True) for v in (
                         tradeoff_figure(scored, metric, "Test metric against trainable parameters"),
                         dinit_figure(scored, metric), sweep_table(report, meta.get("total_params")))))
        else:  # one point per method: the figures would look like a finding and say nothing
            sweep = (NOT_A_SWEEP, *[gr.update(value=None, visible=False)] * 3)
        return (summary, results_table(report, meta.get("total_params")), *figures, *sweep,
                {"compare config.json": config, "lab form": meta.get("form")})

    def reopen(self, run_dir: str | None):
        """Put a run's saved settings back into the Train tab's form."""
        form = read_form(self.lab.run_dir(run_dir))
        if form is None:
            raise gr.Error("this run has no saved lab form (it was not started from the lab)")
        return [getattr(form, name) for name in self.lab.form_fields]

    def build(self) -> None:
        with gr.Tab("Results", id="results") as self.tab:
            with gr.Row():
                self.pick = gr.Dropdown(label="Run", choices=list_runs(self.lab.runs_dir), scale=4,
                                        allow_custom_value=True)
                refresh_btn = gr.Button("Refresh", scale=1)
                self.reopen_btn = gr.Button("Load settings into the form", scale=1)
            summary = gr.Markdown()
            results = gr.Dataframe(pd.DataFrame(columns=RESULT_COLUMNS), label="Results", interactive=False,
                                   elem_id="results-table")
            with gr.Row():
                loss_plot, params_plot = gr.Plot(label="Loss"), gr.Plot(label="Trainable parameters")
            with gr.Row():
                memory_plot, metric_plot = gr.Plot(label="Peak memory"), gr.Plot(label="Test metric")
            sweep_note = gr.Markdown(elem_id="sweep-note")
            with gr.Row():
                tradeoff_plot = gr.Plot(label="Trade-off", elem_id="tradeoff-plot", visible=False)
                dinit_plot = gr.Plot(label="d_init", elem_id="dinit-plot", visible=False)
            sweep_results = gr.Dataframe(label="Runs sorted by test metric", interactive=False,
                                         elem_id="sweep-table", visible=False)
            saved_config = gr.JSON(label="Saved configuration")
        refresh_btn.click(self.lab.run_choices, self.pick, self.pick, api_visibility="private")
        self.pick.change(self.show_run, self.pick, [summary, results, loss_plot, params_plot, memory_plot,
                                                     metric_plot, sweep_note, tradeoff_plot, dinit_plot,
                                                     sweep_results, saved_config], api_name="show_run")

    def refresh(self, trigger) -> None:
        """On `trigger` (the tab opening, a job ending), the run picker lists the runs there are now."""
        trigger(self.lab.run_choices, self.pick, self.pick, api_visibility="private")
