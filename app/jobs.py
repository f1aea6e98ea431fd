"""Job control for the lab: one training job at a time, in a worker thread, outside every request handler.

The UI never keeps its own idea of the job's state: it polls `JobManager.snapshot()`, whose status is derived
from the worker thread itself (alive or not, and how its function ended). A page reload simply polls again and
finds the same job, curves included.
"""
from __future__ import annotations

import gc
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vera_core.lab.compare import RunDied

# The worker's function: runs the job, reporting through `on_event(dict)` and watching `stop`; returns the result.
JobFunction = Callable[[Callable[[dict], None], threading.Event], Any]

_CURVE_EVENTS = ("step", "eval")
_MAX_LOG_LINES = 400


class JobBusy(RuntimeError):
    """A job is already running: the lab runs one at a time (a double click must not start two)."""


@dataclass
class Job:
    """One run of a JobFunction; fields written by the worker thread are read under `lock`."""

    name: str
    run_dir: Path | None
    config: dict
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    curves: list[dict] = field(default_factory=list)  # "step" and "eval" events, for the loss plot
    progress: dict | None = None  # the latest "step" event
    current_run: str | None = None  # the run of the latest event (training, or evaluating before / after it)
    log: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None  # set when the function raised
    stopped: bool = False  # set when the function returned after a stop request

    def status(self) -> str:
        """'running', 'stopping', 'done', 'stopped' or 'failed: <message>', read from the thread's real state."""
        alive = self.thread is not None and self.thread.is_alive()
        with self.lock:
            if alive:
                return "stopping" if self.stop.is_set() else "running"
            if self.error is not None:
                return f"failed: {self.error}"
            if self.stopped:
                return "stopped"
            if self.ended_at is None:  # the thread is gone without recording an outcome
                return "failed: the worker ended unexpectedly"
            return "done"

    def add_event(self, event: dict) -> None:
        with self.lock:
            self.current_run = event.get("run") or self.current_run
            if event.get("type") in _CURVE_EVENTS:
                self.curves.append(event)
            if event.get("type") == "step":
                self.progress = event
            line = describe_event(event)
            if line:
                self.log.append(f"{time.strftime('%H:%M:%S')} {line}")
                del self.log[:-_MAX_LOG_LINES]

    def add_log(self, line: str) -> None:
        with self.lock:
            self.log.append(f"{time.strftime('%H:%M:%S')} {line}")


def describe_event(event: dict) -> str | None:
    """One log line for the events worth reading; training steps only every tenth (the plot shows them all)."""
    kind, run = event.get("type"), event.get("run")
    if kind == "step":
        if event["step"] % 10 and event["step"] != event["total"]:
            return None
        return f"[{run}] step {event['step']}/{event['total']} loss {event['loss']:.4f}"
    if kind == "eval":
        return f"[{run}] eval at step {event['step']}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in event.items() if k.startswith("eval_"))
    if kind == "run_start":
        return f"[{run}] {event['trainable_params']:,} trainable parameters (head excluded)"
    if kind == "start":
        return f"[{run}] training on {event['device']}"
    if kind == "run_done":
        if event.get("stopped"):
            return f"[{run}] stopped after {event.get('steps')} steps; adapter saved, not evaluated"
        scores = ", ".join(f"{k} {v:.4g}" for k, v in (event.get("eval") or {}).items() if v is not None)
        return f"[{run}] finished{': test ' + scores if scores else ''}"
    if kind == "error":
        return f"[{run}] error: {event.get('message')}"
    if kind == "stopped":
        return f"[{run}] stopped" if run else f"comparison stopped; results so far in {event.get('run_dir')}"
    if kind == "compare_done":
        return f"comparison finished: {event.get('run_dir')}"
    return None


class JobManager:
    """Starts jobs in a worker thread (one at a time), stops them, and reports their state."""

    def __init__(self):
        self._lock = threading.Lock()
        self.job: Job | None = None  # the current or last job

    def start(self, name: str, function: JobFunction, run_dir: Path | None = None, config: dict | None = None) -> Job:
        """Start `function` in a new worker thread; JobBusy while another job is running or stopping."""
        with self._lock:  # check-and-start is atomic: two clicks arriving together start one job
            if self.job is not None and self.job.thread is not None and self.job.thread.is_alive():
                raise JobBusy(f"a run is already {self.job.status()} ({self.job.name}); stop it or wait for it to finish")
            job = Job(name=name, run_dir=run_dir, config=config or {})
            job.thread = threading.Thread(target=self._work, args=(job, function), name=f"job-{name}", daemon=True)
            self.job = job
            job.add_log(f"started {name}")
            job.thread.start()
            return job

    def _work(self, job: Job, function: JobFunction) -> None:
        try:
            result = function(job.add_event, job.stop)
            with job.lock:
                job.result, job.stopped = result, job.stop.is_set()
        except BaseException as err:  # noqa: BLE001 — whatever ends the worker must show up as "failed"
            message = str(err).strip() or type(err).__name__
            with job.lock:
                job.error = message
            job.add_log("failed: " + message)
            if not isinstance(err, (ValueError, OSError, RunDied)):  # those say all in their one line
                job.add_log(traceback.format_exc(limit=3).strip())
        finally:
            # The model and optimizer die with the function's frame; collect them now so a stop frees memory.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            with job.lock:
                job.ended_at = time.time()
                outcome = "failed" if job.error is not None else "stopped" if job.stopped else "done"
            job.add_log(f"ended: {outcome}")  # job.status() would still say "running": this thread is alive

    def stop(self) -> str:
        """Ask the running job to stop (the trainer checks the flag before every micro-batch)."""
        job = self.job
        if job is None or job.thread is None or not job.thread.is_alive():
            return "no run in progress"
        job.stop.set()
        job.add_log("stop requested")
        return "stopping"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current job's thread ends (tests and shutdown); True when it has."""
        job = self.job
        if job is None or job.thread is None:
            return True
        job.thread.join(timeout)
        return not job.thread.is_alive()

    def snapshot(self) -> dict:
        """Everything the UI shows about the current job, copied under its lock."""
        job = self.job
        if job is None:
            return {"status": "idle", "name": None, "run_dir": None, "curves": [], "progress": None,
                    "current_run": None, "log": [], "config": {}, "result": None, "elapsed_s": 0.0}
        status = job.status()
        with job.lock:
            return {
                "status": status,
                "name": job.name,
                "run_dir": str(job.run_dir) if job.run_dir else None,
                "curves": list(job.curves),
                "progress": dict(job.progress) if job.progress else None,
                "current_run": job.current_run,
                "log": list(job.log),
                "config": job.config,
                "result": job.result,
                "elapsed_s": (job.ended_at or time.time()) - job.started_at,
            }
