"""VeRA Lab's Gradio app: `python -m app`. app/layout.py builds the page from one module per tab (train_tab,
results_tab, runs_tab, outputs_tab, many_tab, calculator_tab, export_tab) around common.Lab, the state they
share; app/form.py turns the form into a RunRequest; app/jobs.py runs the job."""
from .layout import build_app, launch

__all__ = ["build_app", "launch"]
