"""The lab's page: one tab per module (Train & compare, Results, Runs, Outputs, Many adapters, Calculator, Export)
around the shared state (common.Lab), the events that cross tabs, and `launch`."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from .calculator_tab import CalculatorTab
from .common import MAX_UPLOAD, Lab
from .export_tab import ExportTab
from .form import RunForm, default_form
from .many_tab import ManyTab
from .outputs_tab import OutputsTab
from .results_tab import ResultsTab
from .runs_tab import RunsTab
from .train_tab import TrainTab

CSS = """
#job-status progress { width: 100%; height: 14px; }
#job-status .badge { font-weight: 600; padding: 1px 8px; border-radius: 8px; background: var(--neutral-200); }
#job-status[data-status=running] .badge, #job-status[data-status=stopping] .badge { background: #fde68a; }
#job-status[data-status=done] .badge { background: #bbf7d0; }
#job-status[data-status^=failed] .badge { background: #fecaca; }
.mono textarea { font-family: var(--font-mono); font-size: 12px; }
"""


def build_app(runs_dir: str | Path = "runs", defaults: RunForm | None = None, poll_s: float = 1.0,
              max_batch_rows: int = 64) -> gr.Blocks:
    """The lab's Blocks; runs land in `runs_dir`. `defaults` pre-fills the form (tests use a tiny MiniLM run);
    None picks `form.default_form()`, a few-minute SmolLM2 comparison on CPU."""
    lab = Lab(runs_dir, max_batch_rows)
    train, results, runs, outputs = TrainTab(lab), ResultsTab(lab), RunsTab(lab), OutputsTab(lab)
    many, export = ManyTab(lab), ExportTab(lab)
    with gr.Blocks(title="VeRA Lab") as demo:
        demo.lab = lab  # for callers that build the app and then need its state (tests, __main__)
        gr.Markdown("# VeRA Lab — fine-tune with VeRA and LoRA, side by side\n"
                    "VeRA trains two small vectors per layer on top of random frozen matrices shared by all layers; "
                    "LoRA trains two matrices per layer. Choose a model, data and ranks, then compare.")
        with gr.Tabs() as tabs:
            train.build(demo, defaults or default_form())
            results.build()
            runs.build()
            outputs.build()
            many.build()
            CalculatorTab().build(demo)
            export.build()
        train.wire_job(demo, poll_s)
        results.reopen_btn.click(results.reopen, results.pick, list(train.form.values()), api_name="reopen_run")
        runs.wire_open(tabs, results.pick, outputs.pick)
        # Every list of runs shows the runs there are now when its tab opens and when a job ends.
        for tab in (results, runs, outputs, many, export):
            tab.refresh(tab.tab.select)
            tab.refresh(train.ended.change)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """Serve the lab: local-only by default, uploads capped, files served only from the runs directory."""
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD,
                       allowed_paths=[str(demo.lab.runs_dir)], css=CSS, **kwargs)
