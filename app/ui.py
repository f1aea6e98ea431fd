"""The Gradio lab: train & compare VeRA with LoRA, read the results, try the adapters, size them, export them.

Layout and event wiring only. Training runs in the JobManager's worker thread; the page polls its snapshot
every second (and on load, which is how a reloaded page reattaches to a running job).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import gradio as gr
import pandas as pd

from vera_core import merge_adapter, unmerge_adapter
from vera_core.lab.calculator import KNOWN_MODELS
from vera_core.lab.compare import measure_step_times, run_request
from vera_core.lab.data import BUILTIN_DATASETS, format_preview, load_dataset
from vera_core.lab.many import load_many, serve_batch
from vera_core.lab.models import OFFLINE_MODELS, generate, predict
from vera_core.lab.plots import (
    breakdown_figure,
    calculator_figure,
    dinit_figure,
    loss_figure,
    memory_figure,
    metric_figure,
    params_figure,
    tradeoff_figure,
)
from vera_core.lab.report import load_run, memory_differences, tradeoff_rows
from vera_core.lab.runs import export, list_runs, load_run_model, new_run_dir, read_config

from . import views
from .jobs import JobBusy, JobManager
from .views import RunForm

MAX_UPLOAD = "20mb"
EXPORT_FORMATS = {
    "native (VeRA Lab: vectors + seed)": "native",
    "PEFT (loads with peft.PeftModel)": "peft",
    "exact LoRA (PEFT LoRA; VeRA as d·A, b·B)": "lora",
    "merged model (save_pretrained folder)": "merged",
}
CSS = """
#job-status progress { width: 100%; height: 14px; }
#job-status .badge { font-weight: 600; padding: 1px 8px; border-radius: 8px; background: var(--neutral-200); }
#job-status[data-status=running] .badge, #job-status[data-status=stopping] .badge { background: #fde68a; }
#job-status[data-status=done] .badge { background: #bbf7d0; }
#job-status[data-status^=failed] .badge { background: #fecaca; }
.mono textarea { font-family: var(--font-mono); font-size: 12px; }
"""


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def status_html(snapshot: dict) -> str:
    """Status badge, the current run's place in the comparison, a progress bar with step, total and ETA."""
    status = snapshot["status"]
    html_status = status.replace("<", "&lt;")
    if snapshot["name"] is None:
        return '<div id="job-status" data-status="idle"><span class="badge">idle</span> no run yet</div>'
    runs = snapshot["config"].get("planned_runs", [])
    current = snapshot["current_run"]
    place = f" ({runs.index(current) + 1}/{len(runs)})" if current in runs else ""
    progress = snapshot["progress"] or {}
    if progress.get("run") != current:  # loading or evaluating: no training step of this run yet
        progress = {}
    step, total = progress.get("step", 0), progress.get("total", 0)
    eta = progress.get("eta_s") if status == "running" else None
    line = (f'<span class="badge">{html_status}</span> {snapshot["name"]} — '
            f'{current or "preparing"}{place} · step {step}/{total} · ETA {_fmt_seconds(eta)} · '
            f'elapsed {_fmt_seconds(snapshot["elapsed_s"])}')
    return (f'<div id="job-status" data-status="{html_status.split(":")[0]}" data-step="{step}">{line}'
            f'<progress max="{max(total, 1)}" value="{step}"></progress></div>')


def _job_results(snapshot: dict) -> pd.DataFrame:
    """The current job's results so far: compare rewrites report.json after every method."""
    run_dir = snapshot["run_dir"]
    if not run_dir or not (Path(run_dir) / "report.json").is_file():
        return pd.DataFrame(columns=views.RESULT_COLUMNS)
    meta = views.read_lab_meta(Path(run_dir))
    return views.results_table(json.loads((Path(run_dir) / "report.json").read_text()), meta.get("total_params"))


def form_handler(method, form: dict[str, gr.components.Component], defaults: RunForm):
    """Let a handler take (RunForm, upload) while Gradio, and so API clients, see one named parameter per form
    component (with the form's defaults, so a client names only what it changes). The names are the mapping's keys,
    which are RunForm's field names: no input order to keep in step."""
    names = ["upload", *form]
    default_values = {"upload": None, **asdict(defaults)}

    @functools.wraps(method)
    def handler(*values):
        named = dict(zip(names, values))
        upload = named.pop("upload")
        return method(RunForm(**named), upload)

    handler.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default_values[n]) for n in names])
    return handler


class Lab:
    """The app's state: where runs live, the job manager, and the models loaded for the Outputs / Export tabs."""

    def __init__(self, runs_dir: str | Path = "runs", max_batch_rows: int = 64):
        self.runs_dir = Path(runs_dir).resolve()
        self.max_batch_rows = max_batch_rows  # the Many adapters tab's limit on rows in one batch
        self._many_model: tuple | None = None  # (key, model, tokenizer) of the adapters loaded for that tab
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.manager = JobManager()
        self._loaded: dict[tuple[str, str], tuple] = {}  # (run_dir, adapter run or "base") -> (model, tokenizer)
        self.form_fields: list[str] = []  # the Train tab's named inputs, in the order Gradio passes them

    # ------------------------------------------------------------------ train & compare
    def preview(self, dataset: str, upload: str | None, task: str, max_rows: int, seed: int) -> str:
        form = RunForm(dataset=dataset, task=task, max_rows=max_rows, seed=seed)
        try:
            data = load_dataset(views.dataset_source(form, upload), None if task == "auto" else task,
                                seed=views.number("seed", seed, True),
                                max_rows=views.number("rows per split", max_rows, True) or None)
            return format_preview(data, n=5)
        except ValueError as err:
            return f"error: {err}"

    def estimate(self, form: RunForm, upload: str | None) -> pd.DataFrame:
        try:
            return views.estimate_table(views.run_request(form, upload))
        except ValueError as err:
            raise gr.Error(str(err)) from None

    def plan(self, form: RunForm, upload: str | None) -> str:
        """How many runs the form makes, by name (a bad list or a repeated setting is the message instead)."""
        try:
            return views.plan_text(views.run_request(form, upload))
        except ValueError as err:
            return f"⚠ {err}"

    def measure(self, form: RunForm, upload: str | None) -> str:
        """The plan with its time estimate: a few real steps of the smallest and largest run of each method, timed on
        this device. Not while a job runs: it would slow the job and its own timing would be wrong."""
        try:
            request = views.run_request(form, upload)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if self.manager.snapshot()["status"] in ("running", "stopping"):
            raise gr.Error("a run is already running; measure the step time when it has ended")
        return views.plan_text(request, request.time_estimate(measure_step_times(request)))

    def start(self, form: RunForm, upload: str | None) -> str:
        """Validate everything, then start the comparison in the worker thread (one job at a time)."""
        try:
            request = views.run_request(form, upload)
            warnings = [row["warning"] for row in request.estimate() if row["warning"]]
        except ValueError as err:
            raise gr.Error(str(err)) from None
        run_dir = new_run_dir(self.runs_dir, form.model)

        def job(on_event, stop):
            run_dir.mkdir(parents=True)
            kept = views.keep_upload(views.dataset_source(form, upload), run_dir)
            views.write_form(run_dir, form, data=kept, labels=request.dataset.labels,
                             total_params=request.base_parameters())
            return run_request(request, out_dir=run_dir, on_event=on_event, stop=stop)

        try:
            self.manager.start(run_dir.name, job, run_dir,
                               {"form": asdict(form), "planned_runs": [spec.name for spec in request.plan()]})
        except JobBusy as err:
            raise gr.Error(str(err)) from None
        return "\n\n".join([f"started {run_dir.name}", *(f"⚠ {w}" for w in warnings)])

    def stop(self) -> str:
        return self.manager.stop()

    def poll(self, seen: tuple | None):
        """Status, curves, log and results of the current job; the rest is skipped (and the plot not redrawn)
        unless a new event arrived."""
        snap = self.manager.snapshot()
        key = (snap["name"], snap["status"], len(snap["curves"]), len(snap["log"]))
        status = status_html(snap)
        if key == seen:
            return status, gr.skip(), gr.skip(), gr.skip(), seen
        log = "\n".join(snap["log"][-200:])
        figure = loss_figure(views.histories(snap["curves"])) if snap["curves"] else None
        return status, figure, log, _job_results(snap), key

    def job_state(self) -> dict:
        """The job as JSON, for API clients: status, run directory, progress."""
        snap = self.manager.snapshot()
        return {"status": snap["status"], "run_dir": snap["run_dir"], "name": snap["name"],
                "progress": snap["progress"], "points": len(snap["curves"])}

    # ------------------------------------------------------------------ results
    def _run_dir(self, run_dir: str | None) -> Path:
        """A run directory inside runs_dir (paths from the browser are never trusted)."""
        if not run_dir:
            raise gr.Error("choose a run first")
        path = Path(run_dir).resolve()
        if path.parent != self.runs_dir or not (path / "report.json").is_file():
            raise gr.Error(f"{run_dir} is not a run of this lab (runs live in {self.runs_dir})")
        return path

    def run_choices(self, current: str | None = None):
        choices = views.list_runs(self.runs_dir)
        paths = [p for _, p in choices]
        value = current if current in paths else (paths[0] if paths else None)
        return gr.update(choices=choices, value=value)

    def show_run(self, run_dir: str | None):
        """A finished (or stopped) run: summary, table, bar charts, loss curves, for a sweep its trade-off figures
        and its table sorted by metric (else a line saying it is not a sweep), and its saved settings."""
        if not run_dir:
            empty = pd.DataFrame(columns=views.RESULT_COLUMNS)
            hidden = gr.update(value=None, visible=False)
            return "No run selected.", empty, None, None, None, None, "", hidden, hidden, hidden, {}
        path = self._run_dir(run_dir)
        report, histories = load_run(path)
        meta = views.read_lab_meta(path)
        config = json.loads((path / "config.json").read_text())
        summary = (f"**{report['model']}** on **{report['dataset']}** ({report['task']}) — device {report['device']}, "
                   f"dtype {report['dtype']}, seed {report['seed']}, peak memory measured {report['memory_mode']}"
                   + (" — **stopped early**" if report.get("stopped") else "") + views.seed_summary(report)
                   + "".join(f"\n- {line}" for line in memory_differences(report)))
        runs = report["runs"]
        figures = (loss_figure(histories), params_figure(runs), memory_figure(runs),
                   metric_figure(runs, report["task"], report.get("settings")))
        if views.is_sweep(report):
            scored = tradeoff_rows(report)
            metric = scored[0]["metric_name"] if scored else "accuracy"
            sweep = (views.SWEEP_HEADING,
                     *(gr.update(value=v, visible=True) for v in (
                         tradeoff_figure(scored, metric, "Test metric against trainable parameters"),
                         dinit_figure(scored, metric), views.sweep_table(report, meta.get("total_params")))))
        else:  # one point per method: the figures would look like a finding and say nothing
            sweep = (views.NOT_A_SWEEP, *[gr.update(value=None, visible=False)] * 3)
        return (summary, views.results_table(report, meta.get("total_params")), *figures, *sweep,
                {"compare config.json": config, "lab form": meta.get("form")})

    def reopen(self, run_dir: str | None):
        """Put a run's saved settings back into the Train tab's form."""
        form = views.read_form(self._run_dir(run_dir))
        if form is None:
            raise gr.Error("this run has no saved lab form (it was not started from the lab)")
        return [getattr(form, name) for name in self.form_fields]

    def samples(self, run_dir: str | None) -> pd.DataFrame:
        """The test inputs the comparison already answered, one column per run."""
        if not run_dir:
            return pd.DataFrame()
        path = self._run_dir(run_dir)
        rows = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
        table = views.samples_table(rows, views.read_lab_meta(path).get("labels"))
        # Fixed widths: left to itself, a wrapped long input column pushes the answers out of view.
        rest = len(table.columns) - 1
        return gr.Dataframe(table, column_widths=["34%"] + [f"{66 // max(rest, 1)}%"] * rest)

    # ------------------------------------------------------------------ run history
    def history(self, model: str | None, dataset: str | None, selected: list[str] | None):
        """The history table and the run checkboxes, filtered by model and data set; the filters' choices."""
        runs = list_runs(self.runs_dir)
        shown = views.filter_runs(runs, model, dataset)
        choices = [(views.run_label(run), run["run_dir"]) for run in shown]
        kept = [path for path in selected or [] if path in {run["run_dir"] for run in shown}]
        models = [views.ALL, *dict.fromkeys(run["model"] for run in runs)]
        datasets = [views.ALL, *dict.fromkeys(run["dataset"] for run in runs)]
        return (views.history_table(shown), gr.update(choices=choices, value=kept),
                gr.update(choices=models, value=model if model in models else views.ALL),
                gr.update(choices=datasets, value=dataset if dataset in datasets else views.ALL))

    def overlay(self, selected: list[str] | None):
        """Two or more runs: their loss curves on one plot, and their numbers side by side."""
        if not selected or len(selected) < 2:
            raise gr.Error("select two or more runs to compare")
        reports, histories, totals = {}, {}, {}
        for run_dir in selected:
            path = self._run_dir(run_dir)
            reports[path.name], histories[path.name] = load_run(path)
            totals[path.name] = views.read_lab_meta(path).get("total_params")
        return loss_figure(views.overlay_histories(histories)), views.overlay_table(reports, totals)

    def _one(self, selected: list[str] | None) -> str:
        if not selected or len(selected) != 1:
            raise gr.Error("select exactly one run for this")
        return selected[0]

    def open_in(self, tab: str, selected: list[str] | None):
        """Switch to the Results or Outputs tab with the selected run chosen there."""
        run_dir = str(self._run_dir(self._one(selected)))
        return gr.Tabs(selected=tab), gr.update(choices=views.list_runs(self.runs_dir), value=run_dir)

    def delete(self, selected: list[str] | None, confirmed: bool) -> str:
        """Delete one run directory, after a confirmation, and only a real folder directly inside runs_dir (never
        a link, never a path that leads elsewhere, never the running job's)."""
        run_dir = self._one(selected)
        if not confirmed:
            raise gr.Error("tick \"Yes, delete the selected run\" first: deleting cannot be undone")
        given = Path(run_dir)
        path = self.runs_dir / given.name
        if (given.resolve() != path or path.is_symlink() or not path.is_dir()
                or not (path / "config.json").is_file()):
            raise gr.Error(f"{run_dir} is not a run directory of this lab (runs live in {self.runs_dir})")
        snap = self.manager.snapshot()
        if snap["status"] in ("running", "stopping") and snap["run_dir"] == str(path):
            raise gr.Error("this run is still running; stop it first")
        shutil.rmtree(path)
        self._loaded = {key: value for key, value in self._loaded.items() if key[0] != str(path)}
        return f"deleted {path.name}"

    # ------------------------------------------------------------------ outputs side by side
    def _model(self, path: Path, run: str):
        """The run's base model with `run`'s adapter loaded ("base": no adapter), cached for the selected run."""
        if any(key[0] != str(path) for key in self._loaded):
            self._loaded.clear()  # one run's models at a time
        key = (str(path), run)
        if key not in self._loaded:
            form = views.read_form(path) or RunForm()
            self._loaded[key] = load_run_model(path, run, trust_remote_code=form.trust_remote_code)
        return self._loaded[key]

    def _adapter_runs(self, path: Path) -> list[str]:
        """The runs that saved an adapter, in the comparison's order."""
        report = json.loads((path / "report.json").read_text())
        return [r["name"] for r in report["runs"] if (path / "adapters" / r["name"]).is_dir()]

    def outputs(self, run_dir: str | None, prompt: str, sampled: bool, max_tokens: int, temperature: float):
        """The prompt through the base model and every adapter of the run: generations or class probabilities."""
        path = self._run_dir(run_dir)
        if not prompt or not prompt.strip():
            raise gr.Error("enter a prompt")
        report = json.loads((path / "report.json").read_text())
        labels = views.read_lab_meta(path).get("labels")
        rows = []
        for run in ["base", *self._adapter_runs(path)]:
            model, tokenizer = self._model(path, run)
            if report["task"] == "classification":
                probs = predict(model, tokenizer, [prompt])[0].tolist()
                names = labels or [str(i) for i in range(len(probs))]
                rows.append({"model": run, "output": ", ".join(f"{n} {p:.3f}" for n, p in zip(names, probs))})
            else:
                text = generate(model, tokenizer, [prompt], max_new_tokens=int(max_tokens), do_sample=sampled,
                                temperature=temperature)[0]
                rows.append({"model": run, "output": text})
        return pd.DataFrame(rows)

    def merged_check(self, run_dir: str | None, prompt: str, max_tokens: int) -> str:
        """Each VeRA adapter, merged into the weights, must answer exactly as when it runs beside them."""
        path = self._run_dir(run_dir)
        prompt = prompt.strip() or "Hello"
        report = json.loads((path / "report.json").read_text())
        veras = [r["name"] for r in report["runs"] if r["method"] == "vera" and r["name"] in self._adapter_runs(path)]
        if not veras:
            raise gr.Error("this run has no VeRA adapter")
        lines = []
        for run in veras:
            model, tokenizer = self._model(path, run)
            if report["task"] == "classification":
                outputs = [predict(model, tokenizer, [prompt])]
                merge_adapter(model)
                try:
                    outputs.append(predict(model, tokenizer, [prompt]))
                finally:
                    unmerge_adapter(model)
                diff = float((outputs[0] - outputs[1]).abs().max())
                lines.append(f"- **{run}**: max |p_unmerged - p_merged| = {diff:.2e} — "
                             + ("same output ✓" if diff < 1e-4 else "DIFFERENT ✗"))
            else:
                outputs = [generate(model, tokenizer, [prompt], max_new_tokens=int(max_tokens))[0]]
                merge_adapter(model)
                try:
                    outputs.append(generate(model, tokenizer, [prompt], max_new_tokens=int(max_tokens))[0])
                finally:
                    unmerge_adapter(model)
                same = outputs[0] == outputs[1]
                lines.append(f"- **{run}**: greedy generation unmerged vs merged — "
                             + ("identical ✓" if same else f"DIFFERENT ✗\n  - unmerged: {outputs[0]!r}\n"
                                                            f"  - merged: {outputs[1]!r}"))
        return "\n".join(lines)

    # ------------------------------------------------------------------ export
    def adapters(self, run_dir: str | None):
        names = self._adapter_runs(self._run_dir(run_dir)) if run_dir else []
        return gr.update(choices=names, value=names[0] if names else None)

    def export(self, run_dir: str | None, run: str | None, fmt: str) -> str:
        """Write the chosen export inside the run directory and hand it over as one zip file."""
        path = self._run_dir(run_dir)
        if run not in self._adapter_runs(path):
            raise gr.Error("choose an adapter of this run")
        kind = EXPORT_FORMATS[fmt]
        target = path / "exports" / f"{run}-{kind}"
        if kind == "native":
            source = path / "adapters" / run
        else:
            model, tokenizer = self._model(path, run)
            if kind == "merged":  # merging takes the adapter out of the cached model: drop it from the cache
                self._loaded.pop((str(path), run))
            try:
                source = export(model, tokenizer, target, kind, overwrite=True)
            except ValueError as err:  # e.g. merging into a 4-bit base is refused
                raise gr.Error(str(err)) from None
        archive = Path(shutil.make_archive(str(target), "zip", root_dir=source))
        if archive.resolve().parent != (path / "exports").resolve():
            raise gr.Error("refusing to serve a file outside the run directory")
        return str(archive)

    # ------------------------------------------------------------------ many adapters, one batch
    def many_choices(self, current: list[str] | None = None):
        choices = views.run_adapters(self.runs_dir)
        return gr.update(choices=choices, value=[c for c in current or [] if c in choices])

    def _many_sources(self, picked: list[str], uploads: list[str] | None) -> dict[str, Path]:
        """{label: adapter directory}: the chosen runs' adapters (inside runs_dir only) and the uploaded zips."""
        sources: dict[str, Path] = {}
        known = views.run_adapters(self.runs_dir)
        for label in picked or []:
            if label not in known:
                raise gr.Error(f"{label!r} is not an adapter of a run in {self.runs_dir}; press Refresh and choose "
                               "from the list.")
            run_dir, _, run = label.partition("/")
            path = self._run_dir(str(self.runs_dir / run_dir))
            if not (path / "adapters" / run).is_dir():
                raise gr.Error(f"{label}: this run saved no adapter {run!r}")
            sources[label] = path / "adapters" / run
        for upload in uploads or []:
            archive = Path(upload)
            target = self.runs_dir / "many-uploads" / f"{archive.stem}-{hashlib.sha256(archive.read_bytes()).hexdigest()[:12]}"
            if not target.exists():
                target.mkdir(parents=True)
            try:
                sources[f"upload:{archive.stem}"] = views.unzip_adapter(archive, target)
            except ValueError as err:
                shutil.rmtree(target, ignore_errors=True)
                raise gr.Error(str(err)) from None
        return sources

    def _many_base(self, picked: list[str], base_model: str) -> dict:
        """The base the chosen run adapters were trained on (one for all of them), else `base_model`."""
        bases = {}
        for label in picked or []:
            config = read_config(self.runs_dir / label.partition("/")[0])
            bases[label] = {"model": config["model"], "task": config["task"], "seed": config["train"]["seed"],
                            "quantization": config.get("quantization"), "labels": config.get("labels")}
        models = {b["model"] for b in bases.values()}
        if len(models) > 1:
            first = next(iter(bases))
            other = next(k for k, b in bases.items() if b["model"] != bases[first]["model"])
            raise gr.Error(f"{first} was trained on {bases[first]['model']} but {other} on {bases[other]['model']}: "
                           "one batch runs on one base model; choose adapters of one base.")
        if bases:
            return next(iter(bases.values()))
        if base_model not in OFFLINE_MODELS:
            raise gr.Error(f"choose a base model for the uploaded adapters ({list(OFFLINE_MODELS)})")
        return {"model": base_model, "task": OFFLINE_MODELS[base_model].tasks[0], "seed": 0, "quantization": None,
                "labels": None}

    def many(self, picked: list[str], uploads: list[str] | None, base_model: str, prompts: str, assignment: str,
             every: bool, max_tokens: int):
        """The rows (prompt, adapter) as one mixed batch, then one adapter at a time: outputs, times, memory."""
        picked = list(picked or [])
        sources = self._many_sources(picked, uploads)
        try:
            rows = views.assign_rows(views.prompt_lines(prompts), list(sources), assignment, every,
                                     self.max_batch_rows)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        base = self._many_base(picked, base_model)
        names = {label: f"a{i}" for i, label in enumerate(sources)}  # adapter names without "." or "/"
        key = (json.dumps(base, sort_keys=True), tuple((names[k], str(v)) for k, v in sources.items()))
        if self._many_model is None or self._many_model[0] != key:
            self._many_model = None  # free the previous set first
            try:
                model, tokenizer = load_many(base["model"], base["task"], base["seed"],
                                             {names[k]: v for k, v in sources.items()},
                                             quantization=base["quantization"],
                                             num_labels=len(base["labels"] or [0, 1]))
            except ValueError as err:
                message = str(err)
                for label, name in names.items():  # the library names its adapters a0, a1, ...: show the labels
                    message = message.replace(repr(name), repr(label))
                raise gr.Error(message) from None
            self._many_model = (key, model, tokenizer)
        _, model, tokenizer = self._many_model
        try:
            result = serve_batch(model, tokenizer, [p for p, _ in rows],
                                 [names.get(a, views.MANY_BASE) for _, a in rows], task=base["task"],
                                 max_new_tokens=int(max_tokens), labels=base["labels"])
        except ValueError as err:
            raise gr.Error(str(err)) from None
        table = pd.DataFrame({"prompt": [p for p, _ in rows], "adapter": [a for _, a in rows],
                              "output": result["outputs"]})
        summary = views.many_summary(result, {v: k for k, v in names.items()}, len(rows))
        return table, summary

    # ------------------------------------------------------------------ calculator
    def calculator(self, models: list[str], vera_ranks: str, lora_ranks: str, save_projection: bool):
        try:
            rows = views.calculator_rows(models, vera_ranks, lora_ranks, save_projection)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return pd.DataFrame(rows).rename(columns={"trainable": "trainable params"}), calculator_figure(rows)

    def will_it_fit(self, model: str, budget_gib: float, seq_len: int, vera_r: int, lora_r: int, dtype: str):
        try:
            rows, bars = views.fit_rows(model, budget_gib, seq_len, vera_r, lora_r, dtype)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        title = f"Predicted peak at the largest batch that fits {budget_gib} GiB ({seq_len} tokens)"
        return pd.DataFrame(rows), breakdown_figure(bars, title)


def build_app(runs_dir: str | Path = "runs", defaults: RunForm | None = None, poll_s: float = 1.0,
              max_batch_rows: int = 64) -> gr.Blocks:
    """The lab's Blocks; runs land in `runs_dir`. `defaults` pre-fills the form (tests use a tiny MiniLM run);
    None picks `views.default_form()`, a few-minute SmolLM2 comparison on CPU."""
    lab = Lab(runs_dir, max_batch_rows)
    defaults = defaults or views.default_form()
    with gr.Blocks(title="VeRA Lab") as demo:
        demo.lab = lab  # for callers that build the app and then need its state (tests, __main__)
        gr.Markdown("# VeRA Lab — fine-tune with VeRA and LoRA, side by side\n"
                    "VeRA trains two small vectors per layer on top of random frozen matrices shared by all layers; "
                    "LoRA trains two matrices per layer. Choose a model, data and ranks, then compare.")
        with gr.Tabs() as tabs:
            with gr.Tab("Train & compare", id="train"):
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### Model and data")
                        model = gr.Dropdown(list(OFFLINE_MODELS), value=defaults.model, allow_custom_value=True,
                                            label="Model", info="offline defaults, or a Hub id / local folder")
                        with gr.Row():
                            trust_remote_code = gr.Checkbox(defaults.trust_remote_code, label="trust_remote_code",
                                                            info="runs code from the model's repository")
                            quantize_4bit = gr.Checkbox(defaults.quantize_4bit, label="4-bit base (bitsandbytes)")
                        task = gr.Radio(["auto", "causal-lm", "classification"], value=defaults.task, label="Task",
                                        info="auto: the data set's own task")
                        dataset = gr.Dropdown([*BUILTIN_DATASETS, views.UPLOAD], value=defaults.dataset,
                                              label="Data set")
                        upload = gr.File(label=f"Upload JSONL / CSV / TSV (max {MAX_UPLOAD})",
                                         file_types=list(views.UPLOAD_SUFFIXES), type="filepath", height=120)
                        max_rows = gr.Number(defaults.max_rows, precision=0, label="Rows per split (0 = all)")
                        preview = gr.Textbox(label="Preview", lines=9, elem_id="preview", max_lines=14, elem_classes="mono",
                                             interactive=False)
                    with gr.Column():
                        gr.Markdown("### Methods and adapters")
                        methods = gr.CheckboxGroup(views.METHOD_CHOICES, value=defaults.methods, label="Methods",
                                                   info="base: evaluate only; full: full fine-tuning")
                        gr.Markdown("One value each, or comma-separated lists for a **sweep**: every VeRA r with "
                                    "every d_init, and every LoRA r (alpha empty: 2 × r each).")
                        with gr.Row():
                            vera_r = gr.Textbox(str(defaults.vera_r), label="VeRA r")
                            vera_d_init = gr.Textbox(str(defaults.vera_d_init), label="VeRA d_init")
                        with gr.Row():
                            lora_r = gr.Textbox(str(defaults.lora_r), label="LoRA r")
                            # Text, not a number field: an empty number field arrives as 0, not as "2r".
                            lora_alpha = gr.Textbox("" if defaults.lora_alpha is None else str(defaults.lora_alpha),
                                                    label="LoRA alpha", placeholder="empty: 2 × r")
                        targets = gr.Dropdown(list(views.TARGET_PRESETS), value=defaults.targets,
                                              label="Target modules")
                        custom_targets = gr.Textbox(defaults.custom_targets, label="Custom targets",
                                                    placeholder="q_proj,v_proj  or a regex")
                        gr.Markdown("### Training")
                        with gr.Row():
                            vera_lr = gr.Number(defaults.vera_lr, label="VeRA lr")
                            lora_lr = gr.Number(defaults.lora_lr, label="LoRA lr")
                            full_lr = gr.Number(defaults.full_lr, label="full lr")
                        with gr.Row():
                            steps = gr.Number(defaults.steps, precision=0, label="Steps")
                            batch_size = gr.Number(defaults.batch_size, precision=0, label="Batch")
                            max_length = gr.Number(defaults.max_length, precision=0, label="Sequence length")
                            seed = gr.Number(defaults.seed, precision=0, label="Seed")
                        with gr.Row():
                            seeds = gr.Number(defaults.seeds, precision=0, minimum=1,
                                              label="Seeds per setting (several: mean ± std, intervals)")
                            tune_lr = gr.Checkbox(defaults.tune_lr, label="Tune the learning rate (every method, "
                                                                           "validation, x0.25-x4; Measure time first)")
                        with gr.Row():
                            eval_batches = gr.Number(defaults.eval_batches, precision=0,
                                                     label="Eval batches (0 = whole split)")
                            eval_generate = gr.Number(defaults.eval_generate, precision=0,
                                                      label="Test generations scored (BLEU)")
                estimate = gr.Dataframe(label="Before starting: trainable parameters (heads excluded) and memory "
                                              "estimate per method", interactive=False, elem_id="estimate")
                plan = gr.Markdown(elem_id="plan")
                confirm_runs = gr.Checkbox(defaults.confirm_runs,
                                           label=f"I know this sweep has more than {views.CONFIRM_ABOVE} runs")
                with gr.Row():
                    estimate_btn = gr.Button("Estimate")
                    measure_btn = gr.Button("Measure time", elem_id="measure")
                    start_btn = gr.Button("Start", variant="primary", elem_id="start")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                notice = gr.Markdown(elem_id="notice")
                status = gr.HTML(status_html(lab.manager.snapshot()))
                curves = gr.Plot(label="Loss curves (train and eval)", elem_id="loss-plot")
                job_results = gr.Dataframe(pd.DataFrame(columns=views.RESULT_COLUMNS), label="Results of this run",
                                           interactive=False, elem_id="job-results")
                log = gr.Textbox(label="Log", lines=8, max_lines=8, elem_classes="mono", autoscroll=True)

            with gr.Tab("Results", id="results") as results_tab:
                with gr.Row():
                    run_pick = gr.Dropdown(label="Run", choices=views.list_runs(lab.runs_dir), scale=4, allow_custom_value=True)
                    refresh_btn = gr.Button("Refresh", scale=1)
                    reopen_btn = gr.Button("Load settings into the form", scale=1)
                summary = gr.Markdown()
                results = gr.Dataframe(pd.DataFrame(columns=views.RESULT_COLUMNS), label="Results", interactive=False,
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

            with gr.Tab("Runs", id="runs") as runs_tab:
                with gr.Row():
                    filter_model = gr.Dropdown([views.ALL], value=views.ALL, label="Model", scale=2)
                    filter_dataset = gr.Dropdown([views.ALL], value=views.ALL, label="Data set", scale=2)
                    history_btn = gr.Button("Refresh", scale=1)
                history = gr.Dataframe(pd.DataFrame(columns=views.HISTORY_COLUMNS), label="Run history (newest first)",
                                       interactive=False, elem_id="runs-table")
                # A dropdown that takes any value: the API names runs by path, and _run_dir checks every one.
                picked = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, label="Select runs",
                                     elem_id="runs-pick")
                with gr.Row():
                    overlay_btn = gr.Button("Compare selected", variant="primary", elem_id="overlay")
                    open_results_btn = gr.Button("Open in Results")
                    open_outputs_btn = gr.Button("Open in Outputs")
                with gr.Row():
                    confirm_delete = gr.Checkbox(False, label="Yes, delete the selected run")
                    delete_btn = gr.Button("Delete selected run", variant="stop")
                runs_notice = gr.Markdown(elem_id="runs-notice")
                overlay_plot = gr.Plot(label="Loss curves of the selected runs", elem_id="overlay-plot")
                overlay_results = gr.Dataframe(label="Selected runs side by side", interactive=False,
                                               elem_id="overlay-table")

            with gr.Tab("Outputs", id="outputs") as outputs_tab:
                out_run = gr.Dropdown(label="Run", choices=views.list_runs(lab.runs_dir), allow_custom_value=True)
                samples = gr.Dataframe(label="Test inputs answered during the comparison", interactive=False,
                                       wrap=True, elem_id="samples")
                prompt = gr.Textbox(label="Prompt (or text to classify)", lines=3)
                with gr.Row():
                    sampled = gr.Checkbox(False, label="Sample (else greedy)")
                    max_tokens = gr.Slider(8, 256, value=48, step=8, label="Max new tokens")
                    temperature = gr.Slider(0.1, 2.0, value=0.8, step=0.1, label="Temperature (sampling)")
                with gr.Row():
                    generate_btn = gr.Button("Run base | VeRA | LoRA", variant="primary")
                    merged_btn = gr.Button("Check merged VeRA = unmerged")
                side_by_side = gr.Dataframe(pd.DataFrame(columns=["model", "output"]), label="Outputs",
                                            interactive=False, wrap=True, column_widths=["20%", "80%"],
                                            elem_id="side-by-side")
                merged_result = gr.Markdown()

            with gr.Tab("Many adapters", id="many") as many_tab:
                gr.Markdown("Serve several adapters of one base in **one batch**: every row (a prompt) uses its own "
                            "adapter. VeRA adapters share one A and B, so a mixed batch costs about one adapter; the "
                            "same rows run one adapter at a time for comparison.")
                with gr.Row():
                    many_pick = gr.Dropdown(views.run_adapters(lab.runs_dir), multiselect=True, scale=4,
                                            allow_custom_value=True,
                                            label="Adapters trained in the lab (run/adapter)", elem_id="many-pick")
                    many_refresh = gr.Button("Refresh", scale=1)
                with gr.Row():
                    many_upload = gr.File(label="…or adapter zip files (e.g. from the Export tab)", file_count="multiple",
                                          file_types=[".zip"], height=100)
                    many_base = gr.Dropdown(list(OFFLINE_MODELS), value="smollm2-135m-instruct",
                                            label="Base model for uploads alone (runs bring their own)")
                with gr.Row():
                    many_prompts = gr.Textbox(label="Prompts, one a line", lines=5, elem_id="many-prompts")
                    many_assign = gr.Textbox(label="Adapter per prompt, one a line (empty: in turn; 'base': none)",
                                             lines=5, elem_id="many-assign")
                with gr.Row():
                    many_every = gr.Checkbox(False, label="Every adapter × every prompt")
                    many_tokens = gr.Slider(4, 128, value=32, step=4, label="Max new tokens")
                many_btn = gr.Button("Run as one batch", variant="primary")
                many_summary = gr.Markdown(elem_id="many-summary")
                many_table = gr.Dataframe(pd.DataFrame(columns=["prompt", "adapter", "output"]), label="Outputs",
                                          interactive=False, wrap=True, elem_id="many-table")

            with gr.Tab("Calculator", id="calculator"):
                gr.Markdown("Trainable parameters and stored bytes from the architectures' shapes alone — no weights "
                            "are downloaded. RoBERTa-base LoRA r=8 vs VeRA r=1024 and RoBERTa-large LoRA r=8 vs "
                            "VeRA r=256 are the paper's Table 1.")
                with gr.Row():
                    calc_models = gr.CheckboxGroup(list(KNOWN_MODELS), value=list(KNOWN_MODELS), label="Models")
                    calc_vera = gr.Textbox("256,1024", label="VeRA ranks")
                    calc_lora = gr.Textbox("8,64", label="LoRA ranks")
                    calc_save = gr.Checkbox(False, label="VeRA stores A and B too")
                calc_btn = gr.Button("Compute", variant="primary")
                calc_table = gr.Dataframe(interactive=False, elem_id="calc-table")
                calc_plot = gr.Plot()
                gr.Markdown("### Will it fit?\nThe largest training batch for VeRA and LoRA within a memory budget, "
                            "predicted by running training steps on fake tensors (shapes only, no weights, no "
                            "compute; a few seconds each): weights, adapter, gradients, AdamW state, activations "
                            "saved for backward and temporaries at the step's peak. The same tracker measures real "
                            "runs, so the two can be compared on the Results tab. Three or four fake steps per "
                            "method: about half a minute for a 30-layer model on a quiet 2-core CPU.")
                with gr.Row():
                    fit_model = gr.Dropdown(list(KNOWN_MODELS), value="smollm2-135m-instruct", label="Model shape",
                                            elem_id="fit-model")
                    fit_budget = gr.Dropdown([8, 16, 24, 80], value=8, allow_custom_value=True,
                                             label="Memory budget (GiB)")
                    fit_seq = gr.Number(256, precision=0, minimum=1, label="Sequence length (tokens)")
                    fit_vera = gr.Number(256, precision=0, minimum=1, label="VeRA rank")
                    fit_lora = gr.Number(8, precision=0, minimum=1, label="LoRA rank")
                    fit_dtype = gr.Radio(["float32", "bfloat16"], value="float32", label="Weights dtype")
                fit_btn = gr.Button("Will it fit?", variant="primary")
                fit_table = gr.Dataframe(interactive=False, elem_id="fit-table")
                fit_plot = gr.Plot()

            with gr.Tab("Export", id="export") as export_tab:
                exp_run = gr.Dropdown(label="Run", choices=views.list_runs(lab.runs_dir), allow_custom_value=True)
                exp_adapter = gr.Dropdown(label="Adapter", allow_custom_value=True)
                exp_format = gr.Radio(list(EXPORT_FORMATS), value=next(iter(EXPORT_FORMATS)), label="Format")
                exp_btn = gr.Button("Export", variant="primary")
                exp_file = gr.File(label="Download", interactive=False, height=100, elem_id="export-file")

        # The form by RunForm field name: handlers, API parameter names and "reopen" all read this one mapping.
        form = dict(model=model, trust_remote_code=trust_remote_code, quantize_4bit=quantize_4bit, task=task,
                    dataset=dataset, max_rows=max_rows, methods=methods, vera_r=vera_r, vera_d_init=vera_d_init,
                    lora_r=lora_r, lora_alpha=lora_alpha, targets=targets, custom_targets=custom_targets,
                    vera_lr=vera_lr, lora_lr=lora_lr, full_lr=full_lr, steps=steps, batch_size=batch_size,
                    max_length=max_length, seed=seed, seeds=seeds, tune_lr=tune_lr, eval_batches=eval_batches,
                    eval_generate=eval_generate, confirm_runs=confirm_runs)
        lab.form_fields = list(form)
        form_inputs = list(form.values())
        all_inputs = [upload, *form_inputs]

        # Train & compare
        preview_inputs = [dataset, upload, task, max_rows, seed]
        # An upload becomes the data set and is previewed in one event: a separate upload.change preview would read
        # the dropdown's old value and could land after (and overwrite) the upload's own preview.
        upload.upload(lambda *values: (views.UPLOAD, lab.preview(views.UPLOAD, *values)),
                      [upload, task, max_rows, seed], [dataset, preview], api_visibility="private")
        for trigger in (dataset.change, upload.clear, task.change, max_rows.submit, demo.load):
            trigger(lab.preview, preview_inputs, preview, api_visibility="private")
        estimate_btn.click(form_handler(lab.estimate, form, defaults), all_inputs, estimate, api_name="estimate")
        demo.load(form_handler(lab.estimate, form, defaults), all_inputs, estimate, api_visibility="private")
        for trigger in (estimate_btn.click, demo.load):
            trigger(form_handler(lab.plan, form, defaults), all_inputs, plan, api_visibility="private")
        measure_btn.click(form_handler(lab.measure, form, defaults), all_inputs, plan, api_name="time_estimate",
                          concurrency_limit=1)
        start_btn.click(form_handler(lab.start, form, defaults), all_inputs, notice, api_name="start_run", concurrency_limit=1)
        stop_btn.click(lab.stop, None, notice, api_name="stop_run", queue=False)
        seen = gr.State(None)
        poll_outputs = [status, curves, log, job_results, seen]
        gr.Timer(poll_s).tick(lab.poll, seen, poll_outputs, api_visibility="private", show_progress="hidden",
                              queue=False)
        demo.load(lab.poll, seen, poll_outputs, api_visibility="private")
        gr.api(lab.job_state, api_name="job_state")

        # Results, Outputs, Export: every run picker is refreshed when its tab opens
        for tab, picker in ((results_tab, run_pick), (outputs_tab, out_run), (export_tab, exp_run)):
            tab.select(lab.run_choices, picker, picker, api_visibility="private")
        refresh_btn.click(lab.run_choices, run_pick, run_pick, api_visibility="private")
        run_pick.change(lab.show_run, run_pick, [summary, results, loss_plot, params_plot, memory_plot, metric_plot,
                                                 sweep_note, tradeoff_plot, dinit_plot, sweep_results,
                                                 saved_config],
                        api_name="show_run")

        # Runs: the history, filtered; overlay, open elsewhere, delete
        history_inputs, history_outputs = [filter_model, filter_dataset, picked], [history, picked, filter_model,
                                                                                    filter_dataset]
        for trigger in (runs_tab.select, history_btn.click, filter_model.input, filter_dataset.input):
            trigger(lab.history, history_inputs, history_outputs, api_visibility="private")
        overlay_btn.click(lab.overlay, picked, [overlay_plot, overlay_results], api_name="overlay_runs")
        open_results_btn.click(functools.partial(lab.open_in, "results"), picked, [tabs, run_pick],
                               api_visibility="private")
        open_outputs_btn.click(functools.partial(lab.open_in, "outputs"), picked, [tabs, out_run],
                               api_visibility="private")
        delete_btn.click(lab.delete, [picked, confirm_delete], runs_notice, api_name="delete_run").success(
            lab.history, history_inputs, history_outputs, api_visibility="private").then(
            lambda: False, None, confirm_delete, api_visibility="private")
        reopen_btn.click(lab.reopen, run_pick, form_inputs, api_name="reopen_run")
        out_run.change(lab.samples, out_run, samples, api_visibility="private")
        generate_btn.click(lab.outputs, [out_run, prompt, sampled, max_tokens, temperature], side_by_side,
                           api_name="outputs", concurrency_limit=1)
        merged_btn.click(lab.merged_check, [out_run, prompt, max_tokens], merged_result, api_name="merged_check",
                         concurrency_limit=1)
        exp_run.change(lab.adapters, exp_run, exp_adapter, api_visibility="private")
        exp_btn.click(lab.export, [exp_run, exp_adapter, exp_format], exp_file, api_name="export", concurrency_limit=1)

        # Many adapters
        many_tab.select(lab.many_choices, many_pick, many_pick, api_visibility="private")
        many_refresh.click(lab.many_choices, many_pick, many_pick, api_visibility="private")
        many_btn.click(lab.many, [many_pick, many_upload, many_base, many_prompts, many_assign, many_every, many_tokens],
                       [many_table, many_summary], api_name="many_adapters", concurrency_limit=1)

        # Calculator
        calc_inputs = [calc_models, calc_vera, calc_lora, calc_save]
        calc_btn.click(lab.calculator, calc_inputs, [calc_table, calc_plot], api_name="calculator")
        demo.load(lab.calculator, calc_inputs, [calc_table, calc_plot], api_visibility="private")
        fit_btn.click(lab.will_it_fit, [fit_model, fit_budget, fit_seq, fit_vera, fit_lora, fit_dtype],
                      [fit_table, fit_plot], api_name="will_it_fit", concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """Serve the lab: local-only by default, uploads capped, files served only from the runs directory."""
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD,
                       allowed_paths=[str(demo.lab.runs_dir)], css=CSS, **kwargs)
