"""What every tab shares: the lab's state (where runs live, the job manager, the models loaded for a run), the
checks on run directories that come from the browser, and the lab's files inside a run directory."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import gradio as gr

from vera_core.adapters.files import write_json
from vera_core.lab.runs import list_runs as vera_list_runs
from vera_core.lab.runs import load_run_model

from .form import RunForm
from .jobs import JobManager

MAX_UPLOAD = 20 * 2**20  # bytes; Gradio refuses a larger upload
FORM_FILE = "lab_form.json"  # the form as the user filled it, next to compare's config.json


def list_runs(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of the lab's runs for a dropdown or checkboxes, newest first (vera_core.list_runs reads them)."""
    return [(run_label(run), run["run_dir"]) for run in vera_list_runs(runs_dir)]


def run_label(run: dict) -> str:
    status = "" if run["status"] == "finished" else f" — {run['status']}"
    return f"{Path(run['run_dir']).name} — {run['dataset']} ({', '.join(run['settings']) or 'no run'}){status}"


def read_form(run_dir: Path) -> RunForm | None:
    path = Path(run_dir) / FORM_FILE
    return RunForm.from_dict(json.loads(path.read_text())["form"]) if path.is_file() else None


def read_lab_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / FORM_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_form(run_dir: Path, form: RunForm, **extra) -> None:
    write_json(Path(run_dir) / FORM_FILE, {"form": asdict(form), **extra})


class Lab:
    """The app's state, shared by the tabs: where runs live, the job manager, and the models loaded for the
    Outputs / Export tabs (one run's at a time)."""

    def __init__(self, runs_dir: str | Path = "runs", max_batch_rows: int = 64):
        self.runs_dir = Path(runs_dir).resolve()
        self.max_batch_rows = max_batch_rows  # the Many adapters tab's limit on rows in one batch
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.manager = JobManager()
        self._loaded: dict[tuple[str, str], tuple] = {}  # (run_dir, adapter run or "base") -> (model, tokenizer)
        self.form_fields: list[str] = []  # the Train tab's named inputs, in the order Gradio passes them

    def run_dir(self, run_dir: str | None) -> Path:
        """A run directory inside runs_dir (paths from the browser are never trusted)."""
        if not run_dir:
            raise gr.Error("choose a run first")
        path = Path(run_dir).resolve()
        if path.parent != self.runs_dir or not (path / "report.json").is_file():
            raise gr.Error(f"{run_dir} is not a run of this lab (runs live in {self.runs_dir})")
        return path

    def run_choices(self, current: str | None = None):
        choices = list_runs(self.runs_dir)
        paths = [p for _, p in choices]
        value = current if current in paths else (paths[0] if paths else None)
        return gr.update(choices=choices, value=value)

    def model(self, path: Path, run: str):
        """The run's base model with `run`'s adapter loaded ("base": no adapter), cached for the selected run."""
        if any(key[0] != str(path) for key in self._loaded):
            self._loaded.clear()  # one run's models at a time
        key = (str(path), run)
        if key not in self._loaded:
            form = read_form(path) or RunForm()
            self._loaded[key] = load_run_model(path, run, trust_remote_code=form.trust_remote_code)
        return self._loaded[key]

    def adapter_runs(self, path: Path) -> list[str]:
        """The runs that saved an adapter, in the comparison's order."""
        report = json.loads((path / "report.json").read_text())
        return [r["name"] for r in report["runs"] if (path / "adapters" / r["name"]).is_dir()]

    def forget(self, path: Path, run: str | None = None) -> None:
        """Drop the cached models of a run directory (or of one of its adapter runs)."""
        self._loaded = {key: value for key, value in self._loaded.items()
                        if key[0] != str(path) or (run is not None and key[1] != run)}
