"""The Train & compare tab: the form, its estimate and plan, Start / Stop, and the running job's status, curves,
log and results (the page polls the JobManager's snapshot every second, and on load, which is how a reloaded
page reattaches to a running job)."""
from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict
from pathlib import Path

import gradio as gr
import pandas as pd

from vera_core.lab.compare import measure_step_times, run_request as run_comparison
from vera_core.lab.config import PREFER
from vera_core.lab.data import BUILTIN_DATASETS, format_preview, load_dataset
from vera_core.lab.models import OFFLINE_MODELS
from vera_core.lab.plots import loss_figure
from vera_core.lab.request import RunRequest
from vera_core.lab.runs import new_run_dir

from .common import MAX_UPLOAD, Lab, read_lab_meta, write_form
from .form import (CONFIRM_ABOVE, METHOD_CHOICES, TARGET_PRESETS, UPLOAD, UPLOAD_SUFFIXES, RunForm, dataset_source,
                   keep_upload, number, run_request)
from .jobs import JobBusy
from .results_tab import RESULT_COLUMNS, results_table


def estimate_table(request: RunRequest) -> pd.DataFrame:
    """Before a run: trainable parameters, stored adapter size and training-memory estimate per planned run."""
    return pd.DataFrame([{
        "method": row["method"], "run": row["run"], "trainable params": row["trainable"],
        "% of model": row["% of model"],
        "stored adapter (KiB)": round(row["stored_bytes"] / 1024, 1) if row["stored_bytes"] is not None else None,
        "est. memory (MiB, upper bound: every row at max_length)": round(row["memory_estimate"]["total"] / 2**20, 1),
        "warning": row["warning"] or "",
    } for row in request.estimate()])


def plan_text(request: RunRequest, time_estimate: dict | None = None) -> str:
    """The planned runs (settings, seeds, tuning runs) and, once step times were measured, the time estimate with
    what it is based on."""
    names, seeds, tuning = [spec.name for spec in request.settings()], request.seeds, len(request.tuning_plan())
    count = request.run_count()
    line = f"**{count} run{'s' * (count != 1)}**: {', '.join(names)}"
    if len(seeds) > 1:
        line += f", each trained with seeds {', '.join(map(str, seeds))}"
    if tuning:
        fewest, most = request.tie_runs()
        grids = "; ".join(f"{'head-only' if key == 'head_lr_scale' else 'learning rate'} x "
                          + ", ".join(f"{x:g}" for x in scales) for key, scales in request.tune.items())
        line += (f", after {tuning} tuning runs ({grids}) and "
                 f"{fewest} second-seed run{'s' * (fewest != 1)} (up to {most} if grid points tie)")
    if time_estimate is None:
        return line + ". Time: press *Measure time* (it trains 2-3 steps of the smallest and largest run)."
    return (line + f". **Estimated training time ≈ {time_estimate['total_s'] / 60:.1f} min** "
            f"({time_estimate['based_on']}).")


def histories(events: list[dict]) -> dict[str, list[dict]]:
    """Step and eval events grouped by run, the shape `plots.loss_figure` draws."""
    grouped: dict[str, list[dict]] = {}
    for event in events:
        grouped.setdefault(event["run"], []).append(event)
    return grouped


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
        return pd.DataFrame(columns=RESULT_COLUMNS)
    meta = read_lab_meta(Path(run_dir))
    return results_table(json.loads((Path(run_dir) / "report.json").read_text()), meta.get("total_params"))


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


class TrainTab:
    """Handlers and layout of the Train & compare tab."""

    def __init__(self, lab: Lab):
        self.lab = lab

    def preview(self, dataset: str, upload: str | None, task: str, max_rows: int, seed: int) -> str:
        form = RunForm(dataset=dataset, task=task, max_rows=max_rows, seed=seed)
        try:
            data = load_dataset(dataset_source(form, upload), None if task == "auto" else task,
                                seed=number("seed", seed, True),
                                max_rows=number("rows per split", max_rows, True) or None)
            return format_preview(data, n=5)
        except ValueError as err:
            return f"error: {err}"

    def estimate(self, form: RunForm, upload: str | None) -> pd.DataFrame:
        try:
            return estimate_table(run_request(form, upload))
        except ValueError as err:
            raise gr.Error(str(err)) from None

    def plan(self, form: RunForm, upload: str | None) -> str:
        """How many runs the form makes, by name (a bad list or a repeated setting is the message instead)."""
        try:
            return plan_text(run_request(form, upload))
        except ValueError as err:
            return f"⚠ {err}"

    def measure(self, form: RunForm, upload: str | None) -> str:
        """The plan with its time estimate: a few real steps of the smallest and largest run of each method, timed on
        this device. Not while a job runs: it would slow the job and its own timing would be wrong."""
        try:
            request = run_request(form, upload)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if self.lab.manager.snapshot()["status"] in ("running", "stopping"):
            raise gr.Error("a run is already running; measure the step time when it has ended")
        return plan_text(request, request.time_estimate(measure_step_times(request)))

    def start(self, form: RunForm, upload: str | None) -> str:
        """Validate everything, then start the comparison in the worker thread (one job at a time)."""
        try:
            request = run_request(form, upload)
            warnings = [row["warning"] for row in request.estimate() if row["warning"]]
        except ValueError as err:
            raise gr.Error(str(err)) from None
        run_dir = new_run_dir(self.lab.runs_dir, form.model)

        def job(on_event, stop):
            run_dir.mkdir(parents=True)
            kept = keep_upload(dataset_source(form, upload), run_dir)
            write_form(run_dir, form, data=kept, labels=request.dataset.labels,
                       total_params=request.base_parameters())
            return run_comparison(request, out_dir=run_dir, on_event=on_event, stop=stop)

        try:
            self.lab.manager.start(run_dir.name, job, run_dir,
                                   {"form": asdict(form), "planned_runs": [spec.name for spec in request.plan()]})
        except JobBusy as err:
            raise gr.Error(str(err)) from None
        return "\n\n".join([f"started {run_dir.name}", *(f"⚠ {w}" for w in warnings)])

    def stop(self) -> str:
        return self.lab.manager.stop()

    def poll(self, seen: tuple | None):
        """Status, curves, log and results of the current job, and "<job>: <status>" once it has ended (the run
        lists refresh on that); the rest is skipped (and the plot not redrawn) unless a new event arrived."""
        snap = self.lab.manager.snapshot()
        key = (snap["name"], snap["status"], len(snap["curves"]), len(snap["log"]))
        status = status_html(snap)
        if key == seen:
            return status, gr.skip(), gr.skip(), gr.skip(), seen, gr.skip()
        log = "\n".join(snap["log"][-200:])
        figure = loss_figure(histories(snap["curves"])) if snap["curves"] else None
        ended = (f"{snap['name']}: {snap['status']}" if snap["name"] and snap["status"] not in ("running", "stopping")
                 else gr.skip())
        return status, figure, log, _job_results(snap), key, ended

    def job_state(self) -> dict:
        """The job as JSON, for API clients: status, run directory, progress."""
        snap = self.lab.manager.snapshot()
        return {"status": snap["status"], "run_dir": snap["run_dir"], "name": snap["name"],
                "progress": snap["progress"], "points": len(snap["curves"])}

    def build(self, demo: gr.Blocks, defaults: RunForm) -> None:
        with gr.Tab("Train & compare", id="train"):
            with gr.Row():
                data_inputs = _model_and_data(defaults)
                method_inputs = _methods_and_training(defaults)
            estimate = gr.Dataframe(label="Before starting: trainable parameters (heads excluded) and memory "
                                          "estimate per method", interactive=False, elem_id="estimate")
            plan = gr.Markdown(elem_id="plan")
            confirm_runs = gr.Checkbox(defaults.confirm_runs,
                                       label=f"I know this sweep has more than {CONFIRM_ABOVE} runs")
            with gr.Row():
                estimate_btn = gr.Button("Estimate")
                measure_btn = gr.Button("Measure time", elem_id="measure")
                start_btn = gr.Button("Start", variant="primary", elem_id="start")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            notice = gr.Markdown(elem_id="notice")
            status = gr.HTML(status_html(self.lab.manager.snapshot()))
            curves = gr.Plot(label="Loss curves (train and eval)", elem_id="loss-plot")
            job_results = gr.Dataframe(pd.DataFrame(columns=RESULT_COLUMNS), label="Results of this run",
                                       interactive=False, elem_id="job-results")
            log = gr.Textbox(label="Log", lines=8, max_lines=8, elem_classes="mono", autoscroll=True)
        upload, preview = data_inputs.pop("upload"), data_inputs.pop("preview")
        # The form by RunForm field name: handlers, API parameter names and "reopen" all read this one mapping.
        self.form = {**data_inputs, **method_inputs, "confirm_runs": confirm_runs}
        self.lab.form_fields = list(self.form)
        self._wire_form(demo, defaults, upload, preview, estimate, plan, estimate_btn, measure_btn)
        start_btn.click(form_handler(self.start, self.form, defaults), [upload, *self.form.values()], notice,
                        api_name="start_run", concurrency_limit=1)
        stop_btn.click(self.stop, None, notice, api_name="stop_run", queue=False)
        self._job_outputs = [status, curves, log, job_results]

    def wire_job(self, demo: gr.Blocks, poll_s: float) -> None:
        """The page polls the job every `poll_s` seconds and on load; `ended` changes when a job has ended.
        (Outside the tabs: the timer and the API endpoint are no tab's content.)"""
        seen = gr.State(None)
        # "<job>: <final status>" once a job has ended: the run lists refresh on its change. A hidden field, not a
        # gr.State: the poll is not queued, and only a component's change reaches the page from such an event.
        self.ended = gr.Textbox(visible="hidden", elem_id="job-ended")
        poll_outputs = [*self._job_outputs, seen, self.ended]
        gr.Timer(poll_s).tick(self.poll, seen, poll_outputs, api_visibility="private", show_progress="hidden",
                              queue=False)
        demo.load(self.poll, seen, poll_outputs, api_visibility="private")
        gr.api(self.job_state, api_name="job_state")

    def _wire_form(self, demo, defaults, upload, preview, estimate, plan, estimate_btn, measure_btn) -> None:
        """Preview, estimate and plan follow the form; Measure time adds the time estimate."""
        form, all_inputs = self.form, [upload, *self.form.values()]
        dataset, task, max_rows, seed = form["dataset"], form["task"], form["max_rows"], form["seed"]
        # An upload becomes the data set and is previewed in one event: a separate upload.change preview would read
        # the dropdown's old value and could land after (and overwrite) the upload's own preview.
        upload.upload(lambda *values: (UPLOAD, self.preview(UPLOAD, *values)), [upload, task, max_rows, seed],
                      [dataset, preview], api_visibility="private")
        for trigger in (dataset.change, upload.clear, task.change, max_rows.submit, demo.load):
            trigger(self.preview, [dataset, upload, task, max_rows, seed], preview, api_visibility="private")
        estimate_btn.click(form_handler(self.estimate, form, defaults), all_inputs, estimate, api_name="estimate")
        demo.load(form_handler(self.estimate, form, defaults), all_inputs, estimate, api_visibility="private")
        for trigger in (estimate_btn.click, demo.load):
            trigger(form_handler(self.plan, form, defaults), all_inputs, plan, api_visibility="private")
        measure_btn.click(form_handler(self.measure, form, defaults), all_inputs, plan, api_name="time_estimate",
                          concurrency_limit=1)


def _model_and_data(defaults: RunForm) -> dict[str, gr.components.Component]:
    """The form's first column, by RunForm field name (plus the upload and its preview)."""
    with gr.Column():
        gr.Markdown("### Model and data")
        model = gr.Dropdown(list(OFFLINE_MODELS), value=defaults.model, allow_custom_value=True, label="Model",
                            info="offline defaults, or a Hub id / local folder")
        with gr.Row():
            trust_remote_code = gr.Checkbox(defaults.trust_remote_code, label="trust_remote_code",
                                            info="runs code from the model's repository")
            quantize_4bit = gr.Checkbox(defaults.quantize_4bit, label="4-bit base (bitsandbytes)")
        task = gr.Radio(["auto", "causal-lm", "classification"], value=defaults.task, label="Task",
                        info="auto: the data set's own task")
        dataset = gr.Dropdown([*BUILTIN_DATASETS, UPLOAD], value=defaults.dataset, label="Data set")
        upload = gr.File(label=f"Upload JSONL / CSV / TSV (max {MAX_UPLOAD // 2**20} MiB)", file_types=list(UPLOAD_SUFFIXES),
                         type="filepath", height=120)
        max_rows = gr.Number(defaults.max_rows, precision=0, label="Rows per split (0 = all)")
        preview = gr.Textbox(label="Preview", lines=9, elem_id="preview", max_lines=14, elem_classes="mono",
                             interactive=False)
    return dict(model=model, trust_remote_code=trust_remote_code, quantize_4bit=quantize_4bit, task=task,
                dataset=dataset, max_rows=max_rows, upload=upload, preview=preview)


def _methods_and_training(defaults: RunForm) -> dict[str, gr.components.Component]:
    """The form's second column, by RunForm field name."""
    with gr.Column():
        gr.Markdown("### Methods and adapters")
        methods = gr.CheckboxGroup(METHOD_CHOICES, value=defaults.methods, label="Methods",
                                   info="base: evaluate only; head: the classifier head alone (the baseline an "
                                        "adapter must beat); full: full fine-tuning")
        gr.Markdown("One value each, or comma-separated lists for a **sweep**: every VeRA r with every d_init, and "
                    "every LoRA r (alpha empty: 2 × r each).")
        with gr.Row():
            vera_r = gr.Textbox(str(defaults.vera_r), label="VeRA r")
            vera_d_init = gr.Textbox(str(defaults.vera_d_init), label="VeRA d_init")
        with gr.Row():
            lora_r = gr.Textbox(str(defaults.lora_r), label="LoRA r")
            # Text, not a number field: an empty number field arrives as 0, not as "2r".
            lora_alpha = gr.Textbox("" if defaults.lora_alpha is None else str(defaults.lora_alpha),
                                    label="LoRA alpha", placeholder="empty: 2 × r")
        targets = gr.Dropdown(list(TARGET_PRESETS), value=defaults.targets, label="Target modules")
        custom_targets = gr.Textbox(defaults.custom_targets, label="Custom targets",
                                    placeholder="q_proj,v_proj  or a regex")
        gr.Markdown("### Training")
        with gr.Row():
            vera_lr = gr.Number(defaults.vera_lr, label="VeRA lr")
            lora_lr = gr.Number(defaults.lora_lr, label="LoRA lr")
            full_lr = gr.Number(defaults.full_lr, label="full lr")
            head_lr = gr.Number(defaults.head_lr, label="head lr (classifier, every method)")
        with gr.Row():
            steps = gr.Number(defaults.steps, precision=0, label="Steps")
            batch_size = gr.Number(defaults.batch_size, precision=0, label="Batch")
            max_length = gr.Number(defaults.max_length, precision=0, label="Sequence length")
            seed = gr.Number(defaults.seed, precision=0, label="Seed")
        with gr.Row():
            seeds = gr.Number(defaults.seeds, precision=0, minimum=1,
                              label="Seeds per setting (several: mean ± std, intervals)")
            tune_lr = gr.Checkbox(defaults.tune_lr, label="Tune the learning rate (every method, validation, "
                                                          "x0.25-x4; head-only x0.25-x64; Measure time first)")
        with gr.Row():
            eval_batches = gr.Number(defaults.eval_batches, precision=0, label="Eval batches (0 = whole split)")
            eval_generate = gr.Number(defaults.eval_generate, precision=0, label="Test generations scored (BLEU)")
        prefer = gr.Radio(list(PREFER), value=defaults.prefer, label="VeRA's folded weights in backward",
                          info="memory: rebuild them (least memory; up to ~13% slower a step: 12.5% measured at "
                               "4 x 128, r=256, none at 4 x 512, benchmarks/results/speed.md); speed: keep them (a "
                               "weight-sized copy per adapted layer until backward)")
    return dict(methods=methods, vera_r=vera_r, vera_d_init=vera_d_init, lora_r=lora_r, lora_alpha=lora_alpha,
                targets=targets, custom_targets=custom_targets, vera_lr=vera_lr, lora_lr=lora_lr, full_lr=full_lr,
                head_lr=head_lr,
                steps=steps, batch_size=batch_size, max_length=max_length, seed=seed, seeds=seeds, tune_lr=tune_lr,
                eval_batches=eval_batches, eval_generate=eval_generate, prefer=prefer)
