"""The Runs tab: every run directory in a table, filtered by model and data set; two or more side by side; one
opened in Results or Outputs, or deleted."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd

from vera_core.lab.plots import loss_figure
from vera_core.lab.report import load_run
from vera_core.lab.runs import list_runs as vera_list_runs

from .common import Lab, list_runs, read_lab_meta, run_label
from .results_tab import RESULT_COLUMNS, results_table

ALL = "all"  # the filter value that keeps every model / data set
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


def overlay_table(reports: dict[str, dict], totals: dict[str, int | None]) -> pd.DataFrame:
    """Several run directories side by side: every run's metric, parameters, memory and step time, by directory."""
    tables = [results_table(report, totals[name]).assign(directory=name) for name, report in reports.items()]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["directory", *RESULT_COLUMNS])
    return table[["directory", *RESULT_COLUMNS]]


def overlay_histories(histories: dict[str, dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """{directory: {run: events}} as one {"directory/run": events} for `plots.loss_figure`."""
    return {f"{directory}/{run}": events for directory, runs in histories.items() for run, events in runs.items()}


class RunsTab:
    """Handlers and layout of the Runs tab."""

    def __init__(self, lab: Lab):
        self.lab = lab

    def history(self, model: str | None, dataset: str | None, selected: list[str] | None):
        """The history table and the run checkboxes, filtered by model and data set; the filters' choices."""
        runs = vera_list_runs(self.lab.runs_dir)
        shown = filter_runs(runs, model, dataset)
        choices = [(run_label(run), run["run_dir"]) for run in shown]
        kept = [path for path in selected or [] if path in {run["run_dir"] for run in shown}]
        models = [ALL, *dict.fromkeys(run["model"] for run in runs)]
        datasets = [ALL, *dict.fromkeys(run["dataset"] for run in runs)]
        return (history_table(shown), gr.update(choices=choices, value=kept),
                gr.update(choices=models, value=model if model in models else ALL),
                gr.update(choices=datasets, value=dataset if dataset in datasets else ALL))

    def overlay(self, selected: list[str] | None):
        """Two or more runs: their loss curves on one plot, and their numbers side by side."""
        if not selected or len(selected) < 2:
            raise gr.Error("select two or more runs to compare")
        reports, histories, totals = {}, {}, {}
        for run_dir in selected:
            path = self.lab.run_dir(run_dir)
            reports[path.name], histories[path.name] = load_run(path)
            totals[path.name] = read_lab_meta(path).get("total_params")
        return loss_figure(overlay_histories(histories)), overlay_table(reports, totals)

    def _one(self, selected: list[str] | None) -> str:
        if not selected or len(selected) != 1:
            raise gr.Error("select exactly one run for this")
        return selected[0]

    def open_in(self, tab: str, selected: list[str] | None):
        """Switch to the Results or Outputs tab with the selected run chosen there."""
        run_dir = str(self.lab.run_dir(self._one(selected)))
        return gr.Tabs(selected=tab), gr.update(choices=list_runs(self.lab.runs_dir), value=run_dir)

    def delete(self, selected: list[str] | None, confirmed: bool) -> str:
        """Delete one run directory, after a confirmation, and only a real folder directly inside runs_dir (never
        a link, never a path that leads elsewhere, never the running job's)."""
        run_dir = self._one(selected)
        if not confirmed:
            raise gr.Error("tick \"Yes, delete the selected run\" first: deleting cannot be undone")
        given = Path(run_dir)
        path = self.lab.runs_dir / given.name
        if (given.resolve() != path or path.is_symlink() or not path.is_dir()
                or not (path / "config.json").is_file()):
            raise gr.Error(f"{run_dir} is not a run directory of this lab (runs live in {self.lab.runs_dir})")
        snap = self.lab.manager.snapshot()
        if snap["status"] in ("running", "stopping") and snap["run_dir"] == str(path):
            raise gr.Error("this run is still running; stop it first")
        shutil.rmtree(path)
        self.lab.forget(path)
        return f"deleted {path.name}"

    def build(self) -> None:
        with gr.Tab("Runs", id="runs") as self.tab:
            with gr.Row():
                filter_model = gr.Dropdown([ALL], value=ALL, label="Model", scale=2)
                filter_dataset = gr.Dropdown([ALL], value=ALL, label="Data set", scale=2)
                history_btn = gr.Button("Refresh", scale=1)
            history = gr.Dataframe(pd.DataFrame(columns=HISTORY_COLUMNS), label="Run history (newest first)",
                                   interactive=False, elem_id="runs-table")
            # A dropdown that takes any value: the API names runs by path, and Lab.run_dir checks every one.
            self.picked = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, label="Select runs",
                                      elem_id="runs-pick")
            with gr.Row():
                overlay_btn = gr.Button("Compare selected", variant="primary", elem_id="overlay")
                self.open_results_btn = gr.Button("Open in Results")
                self.open_outputs_btn = gr.Button("Open in Outputs")
            with gr.Row():
                confirm_delete = gr.Checkbox(False, label="Yes, delete the selected run")
                delete_btn = gr.Button("Delete selected run", variant="stop")
            runs_notice = gr.Markdown(elem_id="runs-notice")
            overlay_plot = gr.Plot(label="Loss curves of the selected runs", elem_id="overlay-plot")
            overlay_results = gr.Dataframe(label="Selected runs side by side", interactive=False,
                                           elem_id="overlay-table")
        self._inputs = [filter_model, filter_dataset, self.picked]
        self._outputs = [history, self.picked, filter_model, filter_dataset]
        for trigger in (history_btn.click, filter_model.input, filter_dataset.input):
            self.refresh(trigger)
        overlay_btn.click(self.overlay, self.picked, [overlay_plot, overlay_results], api_name="overlay_runs")
        delete_btn.click(self.delete, [self.picked, confirm_delete], runs_notice, api_name="delete_run").success(
            self.history, self._inputs, self._outputs, api_visibility="private").then(
            lambda: False, None, confirm_delete, api_visibility="private")

    def refresh(self, trigger) -> None:
        """On `trigger` (the tab opening, a job ending, a filter), the table lists the runs there are now."""
        trigger(self.history, self._inputs, self._outputs, api_visibility="private")

    def wire_open(self, tabs: gr.Tabs, results_pick: gr.Dropdown, outputs_pick: gr.Dropdown) -> None:
        """"Open in Results / Outputs": switch tabs with the selected run chosen there."""
        self.open_results_btn.click(functools.partial(self.open_in, "results"), self.picked, [tabs, results_pick],
                                    api_visibility="private")
        self.open_outputs_btn.click(functools.partial(self.open_in, "outputs"), self.picked, [tabs, outputs_pick],
                                    api_visibility="private")
