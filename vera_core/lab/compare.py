"""Side by side: train every method on the same model, data, seed and step budget, and write one run directory.

    report = compare("minilm-l6", "rotten-tomatoes", methods=("base", "vera", "lora"), train=TrainConfig(steps=200))

`compare` builds a `RunRequest` (vera_core.lab.request) and `run_request` runs it: the run directory holds config.json,
metrics.jsonl (every event, one per line), adapters/<run>/, report.json, report.md, samples.jsonl and the figures.
It is consistent after every run, so a stop leaves a readable directory.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import gc
import json
import multiprocessing
import os
import queue as queue_module
import shutil
import signal
import threading
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from ..adapters.checks import positive_int
from .config import TrainConfig
from ..adapters.config import AdapterConfig, LoraConfig, VeraConfig
from ..adapters.count import count_parameters
from .data import TextDataset
from .device import resolve_device
from .evaluate import score_split
from ..adapters.files import WriteError, as_write_error, write_json, write_jsonl
from ..adapters.inject import adapter_layers
from ..adapters.io import save_adapter
from .memory import DTYPE_BYTES, estimate_memory, fold_estimates
from .metrics import group_references
from .models import head_names, make_trainable
from .progress import with_bar
from .report import Report, RunReport, load_run, write_reports
from .request import MAX_RUNS, RunRequest, RunSpec
from .runs import load_base, new_run_dir
from .train import train as train_model
from .tune import train_point, tune_rates


def _adapter_config(model: nn.Module, spec: RunSpec, task: str) -> AdapterConfig | None:
    """The run's adapter config; classification adapters also train the head (as modules_to_save)."""
    heads = head_names(model) if task == "classification" else []
    if spec.adapter is not None and heads and not spec.adapter.modules_to_save:
        return replace(spec.adapter, modules_to_save=tuple(heads))
    return spec.adapter


def _counts(model: nn.Module, spec: RunSpec) -> tuple[int, int | None]:
    """(trainable parameters with the head excluded, trainable head parameters or None)."""
    counts = count_parameters(model)
    if spec.method in ("vera", "lora"):
        return counts["trainable_adapter"], counts["trainable_head"] or None
    if spec.method == "base":
        return 0, None
    head = sum(p.numel() for n in head_names(model) for p in getattr(model, n).parameters())
    if spec.method == "head":
        return 0, counts["trainable"]
    return counts["trainable"] - head, head or None


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sample_rows(dataset: TextDataset, n: int) -> list[dict]:
    """The first `n` test inputs shown side by side: {"prompt", "reference": [...]} or {"text", "label"}."""
    if dataset.task == "classification":
        return [{"text": r["text"], "label": r["label"]} for r in dataset.test[:n]]
    return [{"prompt": p, "reference": refs} for p, refs in group_references(dataset.test)[:n]]


def _run_one(request: RunRequest, spec: RunSpec, load: Callable[[int], tuple], run_dir: Path,
             emit: Callable[[dict], None], stop: threading.Event | None,
             scale: float = 1.0, head_scale: float = 1.0) -> tuple[RunReport, list, str, str]:
    """Build, train, save, evaluate one method at its learning-rate scale (and the comparison's head rate, see
    `RunRequest.rates`). Returns (report, sample outputs, device, dtype), and writes run_dir/predictions/<run>.jsonl
    (one row per scored test example).

    The trainer writes run_dir/train/<run>/: a checkpoint when stopped, which the next call resumes from."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    dataset, config = request.dataset, request.train_config(spec, scale, head_scale)
    model, tokenizer = load(spec.seed)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    adapter = _adapter_config(model, spec, dataset.task)
    try:  # from the shapes, before the adapter exists; "full" / "head" / None (base) describe the other methods
        shape = (model, adapter or (None if spec.method == "base" else spec.method), config.batch_size,
                 config.max_length, dtype if dtype in DTYPE_BYTES else "float32", request.quantization)
        options = {"grad_checkpointing": config.grad_checkpointing, "max_grad_norm": config.max_grad_norm}
        estimate = estimate_memory(*shape, **options, prefer=config.prefer)
        folds = fold_estimates(*shape, **options)  # VeRA: what keeping / rebuilding its folded weights costs
    except (ValueError, AttributeError):
        estimate = folds = None  # an architecture the estimator cannot read: the run goes on without it
    model = make_trainable(model, spec.method, adapter)
    trainable, head = _counts(model, spec)
    report = RunReport(name=spec.name, method=spec.method, setting=spec.setting, seed=spec.seed,
                       trainable_params=trainable, head_params=head, memory_estimate=estimate,
                       prefer=config.prefer if spec.method != "base" else None, fold_estimates=folds)
    if adapter is not None:
        report.r = adapter.r
        report.alpha = adapter.alpha if isinstance(adapter, LoraConfig) else None
        report.d_init = adapter.d_init if isinstance(adapter, VeraConfig) else None
        report.targets = sorted({p.rsplit(".", 1)[-1] for p, _ in adapter_layers(model)})
    emit({"type": "run_start", "run": spec.name, "method": spec.method, "trainable_params": trainable,
          "head_params": head, "memory_estimate": estimate})
    device = str(resolve_device(config.device))
    if spec.method != "base":
        work = run_dir / "train" / spec.name
        resume = work if (work / "checkpoints").is_dir() else None
        result = train_model(model, tokenizer, dataset, config, run_name=spec.name, out_dir=work, on_event=emit,
                             stop=stop, resume_from=resume)
        report.lr, report.head_lr = config.lr, config.head_lr if head else None
        report.steps, report.stopped, report.history = result.steps_done, result.stopped, result.history
        for name in ("peak_memory_bytes", "peak_memory_kind", "memory_breakdown", "peak_rss_bytes",
                     "cuda_max_allocated_bytes"):
            setattr(report, name, getattr(result, name))
        report.step_time_s, report.tokens_per_s = result.step_time_s, result.tokens_per_s
        report.final_train_loss = result.final_train_loss
        device, dtype = result.device, result.dtype
    else:
        model.to(device)
    if adapter is not None:
        path = save_adapter(model, run_dir / "adapters" / spec.name)
        report.adapter_bytes = _directory_bytes(path)
    outputs: list = []
    if not report.stopped:
        report.eval, outputs, examples = score_split(model, tokenizer, dataset, config, request.eval_generate,
                                                     request.samples)
        (run_dir / "predictions").mkdir(exist_ok=True)
        write_jsonl(run_dir / "predictions" / f"{spec.name}.jsonl", examples)
    report.wall_s, report.cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return report, outputs, device, dtype


def _tune_point(request: RunRequest, spec: RunSpec, load: Callable[[int], tuple], work: Path,
                emit: Callable[[dict], None], stop: threading.Event | None, scale: float, head_scale: float):
    """One tuning point (lab/tune.train_point) into its folder `work`, on a freshly loaded trainable model; called
    as `_run_one` is, in this process or an isolated one."""
    return train_point(request, spec, scale, head_scale, lambda s: _trainable_model(request, s, load), work, emit,
                       stop)


def _loader(request: RunRequest) -> Callable[[int], tuple]:
    """load(seed): a fresh (model, tokenizer) per run; a new classifier head is drawn from the run's seed, so every
    method gets the same head at one seed. A model passed as an object keeps its own head."""
    if request.loads_by_name:
        labels = request.dataset.labels
        return lambda seed: load_base(request.model, request.dataset.task, seed, request.quantization,
                                      len(labels) if labels else 2, request.trust_remote_code)
    base, tokenizer = request.model
    return lambda seed: (copy.deepcopy(base), tokenizer)


def _trainable_model(request: RunRequest, spec: RunSpec, load: Callable[[int], tuple]) -> tuple:
    """(model, tokenizer) of a run, freshly loaded at its seed, ready to train with its method."""
    model, tokenizer = load(spec.seed)
    return make_trainable(model, spec.method, _adapter_config(model, spec, request.dataset.task)), tokenizer


class RunDied(RuntimeError):
    """A method's process ended without a result: killed by a signal (the OOM killer's SIGKILL) or crashed."""


# Why a signal may have ended a method's process, as the user can act on it.
_SIGNAL_CAUSES = {signal.SIGKILL: "memory may have run out", signal.SIGSEGV: "a crash in native code",
                  signal.SIGBUS: "a crash, or a full /dev/shm", signal.SIGABRT: "aborted by a library"}


def _ended(name: str, exitcode: int | None) -> str:
    """"the process of vera-r256 ended by signal 9 (SIGKILL: memory may have run out)"."""
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:
            return f"the process of {name} ended by signal {-exitcode}"
        cause = _SIGNAL_CAUSES.get(sig)
        return f"the process of {name} ended by signal {-exitcode} ({sig.name}{': ' + cause if cause else ''})"
    return f"the process of {name} exited with code {exitcode} without a result"


def _child(job, request, spec, run_dir, messages, stop, scale, head_scale) -> None:
    """Body of an isolated run (job "run": a method's run into run_dir; "tune": one tuning point into its folder
    run_dir): same as in-process, with events and the result sent back through a queue.

    Ctrl-C and SIGTERM reach the whole process group; only the parent acts on them (it sets `stop`), so the child
    ends its step and saves. If the parent dies, the child stops the same way instead of running on as an orphan."""
    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing semaphore, registered with the parent's resource tracker: a child the
    # OOM killer ends could not release it, and the tracker would warn about it when the parent exits.
    tqdm.set_lock(threading.RLock())
    parent = multiprocessing.parent_process()

    def orphaned() -> None:
        parent.join()
        stop.set()  # end the step and save, as on Ctrl-C
        # Nobody reads the queue any more: once its pipe is full, exiting would wait forever to flush it.
        messages.cancel_join_thread()

    threading.Thread(target=orphaned, daemon=True).start()
    try:
        emit = lambda e: messages.put(("event", e))  # noqa: E731
        run = _run_one if job == "run" else _tune_point
        out = run(request, spec, _loader(request), Path(run_dir), emit, stop, scale, head_scale)
        messages.put(("result", out))
    except ValueError as err:  # bad input: the same one-line message as in-process
        messages.put(("invalid", str(err)))
    except BaseException as err:
        failure = _disk_failure(err, Path(run_dir))
        if isinstance(failure, WriteError):  # a failed write: the same one-line message as in-process
            messages.put(("write", failure))
        else:  # the parent re-raises it with the child's traceback
            messages.put(("error", traceback.format_exc()))


def _run_isolated(request: RunRequest, spec: RunSpec, run_dir: Path, emit, stop, scale: float, head_scale: float,
                  job: str = "run"):
    """Run one method (job "run") or one tuning point (job "tune", run_dir: the point's folder) in a spawned
    process, forwarding its events and the caller's stop flag."""
    ctx = multiprocessing.get_context("spawn")
    messages, child_stop = ctx.Queue(), ctx.Event()
    name = spec.name if job == "run" else f"tune/{run_dir.name}"
    proc = ctx.Process(target=_child, args=(job, request, spec, str(run_dir), messages, child_stop, scale,
                                            head_scale), daemon=True)
    proc.start()
    try:
        while True:
            if stop is not None and stop.is_set():
                child_stop.set()
            try:
                kind, payload = messages.get(timeout=0.1)
            except queue_module.Empty:
                if not proc.is_alive() and messages.empty():
                    proc.join()
                    raise RunDied(_ended(name, proc.exitcode)) from None
                continue
            if kind == "event":
                emit(payload)
            elif kind == "invalid":
                raise ValueError(payload)
            elif kind == "write":
                raise payload
            elif kind == "error":
                raise RuntimeError(f"run {name!r} failed in its process:\n{payload}")
            else:
                return payload
    finally:
        child_stop.set()  # a no-op after a result; after an error in this loop, the child stops within a step
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()


def measure_step_times(request: RunRequest, steps: int = 3, stop: threading.Event | None = None) -> dict[str, float]:
    """Seconds per optimizer step on this device, measured by training the smallest and the largest planned run
    of each trained method for `steps` steps (the first, warm-up step is not counted) and throwing them away;
    `RunRequest.time_estimate` turns them into the sweep's time. {run name: seconds}."""
    positive_int("steps", steps)
    sizes = {row["run"]: row["trainable"] for row in request.prepare().estimate()}
    by_method: dict[str, list[RunSpec]] = {}
    for spec in request.settings():
        if spec.method != "base":
            by_method.setdefault(spec.method, []).append(spec)
    chosen = {s.name: s for specs in by_method.values()
              for s in (min(specs, key=lambda x: sizes[x.name]), max(specs, key=lambda x: sizes[x.name]))}
    load, measured = _loader(request), {}
    # One evaluation batch at the end only: the measurement is about training steps, not scoring.
    config = replace(request.train, steps=max(2, steps), epochs=None, eval_every=max(2, steps), eval_batches=1,
                     checkpoint_every=None)
    for spec in chosen.values():
        model, tokenizer = _trainable_model(request, replace(spec, seed=request.seeds[0]), load)
        result = train_model(model, tokenizer, request.dataset, replace(config, lr=request.train_config(spec).lr),
                             run_name=spec.name, stop=stop, progress=False)
        if result.step_time_s is not None:
            measured[spec.name] = result.step_time_s
        del model
        gc.collect()
    return measured


def _write_config(run_dir: Path, request: RunRequest, specs: list[RunSpec]) -> None:
    dataset = request.dataset
    write_json(run_dir / "config.json", {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),  # local time; run history sorts on it (a resume restarts it)
        "model": request.model_name, "dataset": dataset.name, "task": dataset.task, "labels": dataset.labels,
        "methods": [s.name for s in specs],
        "adapters": {s.name: s.adapter.to_dict() for s in specs if s.adapter is not None},
        "train": asdict(request.train), "lrs": request.lrs, "isolate": request.isolate,
        "eval_generate": request.eval_generate, "samples": request.samples, "max_rows": request.max_rows,
        "seeds": request.seeds, "tune": request.tune, "tune_steps": request.tune_steps,
        "score_tuning": request.score_tuning,
        "run_seeds": {s.name: s.seed for s in specs},  # load_run_model draws a run's new head from its own seed
        "quantization": request.quantization, "trust_remote_code": request.trust_remote_code,
        "splits": {"train": len(dataset.train), "validation": len(dataset.validation), "test": len(dataset.test)},
        "request": request.to_dict(),  # what `--resume` rebuilds the request from (null: passed as objects)
    })


def _same_rates(request: RunRequest, spec: RunSpec, run: dict, scale: float, head_scale: float) -> bool:
    """Whether a finished run was trained at the rates this request gives it now, its head's included: a resume with
    another tuning grid can choose another rate, and a run recorded under another head rate (another head-only
    choice, or the rule that scaled the head with the adapter) would mix two head rates in one comparison; either
    way the run is trained again."""
    if spec.method == "base":
        return True
    config = request.train_config(spec, scale, head_scale)
    head_lr = config.head_lr if run.get("head_params") else None  # runs without a head record none (see _run_one)
    return (run.get("lr"), run.get("head_lr")) == (config.lr, head_lr)


def _head_lr(request: RunRequest, specs: list[RunSpec], head_scale: float) -> float | None:
    """The one rate every classifier head of the comparison trains at (head-only, VeRA, LoRA); None when no run
    trains a head apart from the body (a causal LM; base; full fine-tuning, whose head trains at its one rate)."""
    heads = request.dataset.task == "classification" and any(s.method in ("head", "vera", "lora") for s in specs)
    return request.head_rate(head_scale) if heads else None


EXISTS = ("refuse", "resume", "overwrite")
RUN_FILES = ("config.json", "metrics.jsonl", "report.json", "report.md", "samples.jsonl", "tuning.json")
RUN_FOLDERS = ("adapters", "train", "predictions", "tune")


def _open_run_dir(run_dir: Path, exists: str) -> tuple[dict | None, dict]:
    """Make `run_dir` ready for this run, as `exists` says; (the earlier report.json or None, its histories)."""
    if exists not in EXISTS:
        raise ValueError(f"exists must be one of {EXISTS}, got {exists!r}.")
    holds_run = (run_dir / "config.json").is_file()
    if not holds_run:
        if exists == "resume":
            raise ValueError(f"{str(run_dir)!r} holds no run to resume (no config.json); start a new run instead.")
        return None, {}
    if exists == "refuse":
        raise ValueError(f"{str(run_dir)!r} already holds a run; choose another output directory (--out), continue "
                         f"it with --resume {run_dir} (exists='resume'), or replace it (exists='overwrite').")
    if exists == "overwrite":  # only what a run writes: anything else the user keeps there stays
        from .plots import FIGURES  # matplotlib loads only here

        for name in (*RUN_FILES, *FIGURES):
            (run_dir / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
        return None, {}
    if not (run_dir / "report.json").is_file():
        return None, {}
    return load_run(run_dir)


class _EventLog:
    """metrics.jsonl, one whole line per event, and the caller's on_event. A line that cannot be written (a full
    disk) is cut off again, so the file stays whole lines, and raised once as a WriteError; later events skip the
    file (the comparison is ending) but still reach on_event."""

    def __init__(self, path: Path, on_event: Callable[[dict], None] | None):
        self.path, self.on_event, self.broken = path, on_event, False
        try:
            self.file = open(path, "ab", buffering=0)
        except OSError as err:
            raise as_write_error(err, path) from err

    def __call__(self, event: dict) -> None:
        if not self.broken:
            end = self.file.seek(0, os.SEEK_END)
            try:
                line = memoryview((json.dumps(event) + "\n").encode())
                while line:
                    line = line[self.file.write(line):]
            except OSError as err:
                self.broken = True
                with contextlib.suppress(OSError):
                    self.file.truncate(end)
                raise as_write_error(err, self.path) from err
        if self.on_event is not None:
            self.on_event(event)

    def close(self) -> None:
        self.file.close()


# A failed write anywhere (a figure library, a mkdir) that the writers did not name: these errors are the disk's.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _disk_failure(err: BaseException, run_dir: Path) -> BaseException:
    """`err`, or a WriteError for an OSError of a full or read-only disk (named by its file, else the run dir)."""
    if isinstance(err, OSError) and not isinstance(err, WriteError) and err.errno in _DISK_FULL:
        return as_write_error(err, err.filename or run_dir)
    return err


def _kept(run_dir: Path) -> str:
    """What a failed comparison left readable: the runs in report.json as last written, which a failed write of a
    newer one leaves in place."""
    try:
        names = [r["name"] for r in json.loads((run_dir / "report.json").read_text())["runs"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    if not names:
        return f"no run had finished, so {run_dir} holds no results"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"the finished runs ({shown}) are in {run_dir / 'report.json'}"


def _run_specs(request: RunRequest, specs: list[RunSpec], run_dir: Path, report: Report, finished: dict,
               histories: dict, emit: Callable[[dict], None], stop: threading.Event | None) -> None:
    """Tune (if asked), then train, evaluate and report every planned run into `report`, writing the reports
    after each; finished runs of a resumed directory are kept as they are."""
    load = None if request.isolate else _loader(request)
    scales: dict[str, float] = {}
    if request.tune:  # isolated like the runs: an OOM kill during tuning ends the comparison, not the CLI or lab
        def point(spec, scale, head_scale, work):
            if request.isolate:
                return _run_isolated(request, spec, work, emit, stop, scale, head_scale, job="tune")
            return _tune_point(request, spec, _loader(request), work, emit, stop, scale, head_scale)

        report.tuning = tune_rates(request, run_dir, point, emit)
        scales = {setting: entry["scale"] for setting, entry in (report.tuning or {}).items()}
    head_scale = scales.get("head", 1.0)  # head-only's tuned scale sets every method's head rate
    report.head_lr = _head_lr(request, specs, head_scale)
    for spec in specs:
        if spec.name in finished and _same_rates(request, spec, finished[spec.name],
                                                 scales.get(spec.setting, 1.0), head_scale):  # resumed: finished before
            kept = {k: v for k, v in finished[spec.name].items() if k in RunReport.__dataclass_fields__}
            report.runs.append(RunReport(**kept, history=histories.get(spec.name, [])))
            continue
        if stop is not None and stop.is_set():
            report.stopped = True
            return

        def emit_run(event: dict, method=spec.method) -> None:  # trainer events, tagged with their method
            emit({**event, "method": method})

        if request.isolate:
            run, outputs, device, dtype = _run_isolated(request, spec, run_dir, emit_run, stop,
                                                        scales.get(spec.setting, 1.0), head_scale)
        else:
            run, outputs, device, dtype = _run_one(request, spec, load, run_dir, emit_run, stop,
                                                   scales.get(spec.setting, 1.0), head_scale)
            gc.collect()  # drop this method's model before the next one measures its memory
        report.runs.append(run)
        report.device, report.dtype = device, dtype
        for row, output in zip(report.samples, outputs):
            row[run.name] = output
        emit({"type": "run_done", "run": run.name, "method": run.method, **run.to_dict()})
        write_reports(run_dir, report)
        if run.stopped:
            report.stopped = True
            return


def run_request(request: RunRequest, out_dir: str | os.PathLike | None = None,
                on_event: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
                progress: bool | None = None, exists: str = "refuse") -> Report:
    """Run every planned method of `request` into one run directory (default runs/<time>-<model>); write and return
    the Report. `stop` ends the current method within a step (saving its adapter and a checkpoint) and skips the
    rest; the directory stays consistent. exists: what to do when out_dir already holds a run: "refuse" (an error),
    "resume" (keep the finished runs, continue a stopped one from its checkpoint, run the rest) or "overwrite".
    progress: tqdm bars (None: when no `on_event` is given and a terminal or notebook shows the output).
    A write that fails (a full disk) raises one WriteError, and a method's process that dies (the OOM killer) one
    RunDied; both say what was kept, report.json records the error and the finished runs stay readable."""
    request.prepare()  # the data loads and is checked before a run directory exists
    on_event = with_bar(progress, on_event)
    specs = request.plan()
    run_dir = Path(out_dir) if out_dir is not None else new_run_dir("runs", request.model_name)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise as_write_error(err, run_dir, "nothing was written") from err
    earlier, histories = _open_run_dir(run_dir, exists)
    finished = {r["name"]: r for r in (earlier or {}).get("runs", []) if not r.get("stopped")}
    _write_config(run_dir, request, specs)
    dataset = request.dataset
    report = Report(model=request.model_name, task=dataset.task, dataset=dataset.name,
                    device=str(resolve_device(request.train.device)), dtype="float32", seed=request.train.seed,
                    runs=[], run_dir=str(run_dir), memory_mode="isolated" if request.isolate else "in-process",
                    samples=sample_rows(dataset, request.samples), seeds=request.seeds)
    if finished and (run_dir / "samples.jsonl").is_file():
        saved = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        for row, old in zip(report.samples, saved):
            row.update({name: old[name] for name in finished if name in old})
    emit = _EventLog(run_dir / "metrics.jsonl", on_event)
    try:
        _run_specs(request, specs, run_dir, report, finished, histories, emit, stop)
        write_reports(run_dir, report, figures=True)
        emit({"type": "stopped" if report.stopped else "compare_done", "run_dir": str(run_dir),
              "runs": [r.name for r in report.runs]})
        return report
    except BaseException as err:
        failure = _disk_failure(err, run_dir)
        if isinstance(failure, WriteError):  # what was kept is said once, below, from what is on disk then
            failure = failure.keeping("")
        report.error = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        # After an error, every file is best-effort: one that cannot be written keeps its last good version and
        # never hides the error that ended the comparison.
        write_reports(run_dir, report, figures=True, best_effort=True)
        with contextlib.suppress(OSError):
            emit({"type": "error", "message": report.error, "run_dir": str(run_dir),
                  "runs": [r.name for r in report.runs]})
        if isinstance(failure, (WriteError, RunDied)):
            kept = _kept(run_dir)
            raise (failure.keeping(kept) if isinstance(failure, WriteError)
                   else RunDied(f"{failure}; {kept}")) from err
        raise
    finally:
        emit.close()


def compare(
    model,
    dataset: TextDataset | str,
    methods: Sequence[str] = ("base", "vera", "lora"),
    vera: VeraConfig | Sequence[VeraConfig] = VeraConfig(),
    lora: LoraConfig | Sequence[LoraConfig] = LoraConfig(),
    train: TrainConfig = TrainConfig(),
    out_dir: str | os.PathLike | None = None,
    on_event: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
    *,
    lrs: dict[str, float] | None = None,
    isolate: bool = False,
    eval_generate: int = 32,
    samples: int = 8,
    max_rows: int | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    progress: bool | None = None,
    exists: str = "refuse",
    seeds: Sequence[int] | None = None,
    tune: dict | None = None,
    tune_steps: int | None = None,
    score_tuning: bool = False,
    max_runs: int | None = MAX_RUNS,
) -> Report:
    """Run every method on the same model, data, seed and step budget; write and return the Report.

    model: a `load_model` name or path (a fresh copy is loaded per method), or a loaded (model, tokenizer) pair
    (deep-copied per method). vera, lora: one config or several (a sweep: `vera_grid`, `lora_grid`), one run each. dataset: a TextDataset or a `load_dataset` name (split with `train.seed`,
    `max_rows` per split). lrs: per-method learning rates, e.g. {"vera": 4e-2, "lora": 1e-3} (else `train.lr`,
    else each method's default). isolate: each method in its own process, so CPU peak memory is its own.
    eval_generate: test groups scored with BLEU / ROUGE-L (causal LM); samples: test inputs in samples.jsonl.
    seeds: training seeds, e.g. (0, 1, 2): every setting runs once per seed on the same split; report.json then holds
    mean, std and a 95% interval per setting and the paired VeRA − LoRA differences. tune: {"lr_scale": [...]}:
    every method's rates × each scale, `tune_steps` steps on the first seed, lowest validation loss wins (near-ties
    broken on a second seed, lab/tune.py). score_tuning: also score each tuning point on the test split (recorded
    beside its validation loss, for reading how sensitive a method is to its rate; the choice never reads it).
    max_runs: more runs than this (seeds × settings + tuning + one second-seed run per tuned setting) is refused
    (None: no limit).
    The arguments are those of `RunRequest`; see `run_request` for out_dir, on_event, stop, progress and exists.
    """
    request = RunRequest(model, dataset, methods, vera, lora, train, lrs=dict(lrs or {}), max_rows=max_rows,
                         quantization=quantization, trust_remote_code=trust_remote_code, isolate=isolate,
                         eval_generate=eval_generate, samples=samples, seeds=seeds, tune=tune, tune_steps=tune_steps,
                         score_tuning=score_tuning, max_runs=max_runs)
    return run_request(request, out_dir, on_event, stop, progress, exists)
