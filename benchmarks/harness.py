"""What the benchmark scripts share: where results go, the model and targets they measure, and the one way they run
a configuration in a child process (the only place in benchmarks/ that starts processes).

A script hands `run_child` a JSON-able configuration; the child is the same script started with `--child <json>`,
which calls `parse_or_serve`: the script's work function returns one dict or yields several, and each goes back as one
JSON line, read by the parent as it is printed. A child that exits non-zero, or prints no result, raises ChildFailed.
Each configuration runs in its own process so that peak memory and timings are that configuration's alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run as files (`python benchmarks/speed.py`) and import vera_core
    sys.path.insert(0, str(ROOT))

from vera_core.adapters.files import write_text  # noqa: E402
from vera_core.lab.calculator import KNOWN_MODELS, LLAMA_PROJECTIONS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SMOLLM2 = "smollm2-135m-instruct"
TARGETS = LLAMA_PROJECTIONS  # SmolLM2's seven projections per block: every benchmark adapts all of them
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ERROR_TAIL = 2000  # characters of a failed child's stderr kept in the record
# Below this line a results page holds what was written by hand about its record (how to read it, what it meant on
# the day); the script that writes the page above it keeps it.
NOTES_MARKER = "<!-- Written by hand below this line; the benchmark script keeps it when it rewrites the record. -->"


class ChildFailed(RuntimeError):
    """A child process exited non-zero or printed no result; `tail` is the end of its stderr."""

    def __init__(self, cfg: dict, returncode: int, tail: str):
        last = (tail.strip().splitlines() or [f"exit code {returncode}, no output"])[-1]
        super().__init__(last)
        self.cfg, self.returncode, self.tail = cfg, returncode, tail


def run_child(script: str | Path, cfg: dict, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Run `python <script> --child <cfg as JSON>` and return the dicts it printed, in order; `on_result` is called
    with each one as it arrives, so a long child's finished rows are recorded even if a later one fails."""
    # stderr goes to a file, not a pipe: a child's warnings could fill a pipe nobody reads while stdout is read.
    with tempfile.TemporaryFile("w+") as stderr:
        command = [sys.executable, str(Path(script).resolve()), "--child", json.dumps(cfg)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
                                env={**os.environ, **CHILD_ENV})
        results = []
        for line in proc.stdout:
            if line.startswith("{"):
                results.append(json.loads(line))
                if on_result is not None:
                    on_result(results[-1])
        if proc.wait() != 0 or not results:
            stderr.seek(0)
            raise ChildFailed(cfg, proc.returncode, stderr.read()[-ERROR_TAIL:])
    return results


def command_line(doc: str, record: str) -> argparse.ArgumentParser:
    """A script's parser with what every benchmark has: --fresh (ignore the record, `record`, and start over) and the
    hidden --child flag that `run_child` starts the script with."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help=f"ignore what {record} holds and start over")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def parse_or_serve(parser: argparse.ArgumentParser,
                   work: Callable[[dict], dict | Iterator[dict]]) -> argparse.Namespace | None:
    """The parsed command line; or, started by `run_child`, the child's side: run `work(cfg)`, print its result (or
    each result it yields) as one JSON line and return None."""
    args = parser.parse_args()
    if not args.child:
        return args
    result = work(json.loads(args.child))
    for row in [result] if isinstance(result, dict) else result:
        print(json.dumps(row), flush=True)
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB), model loading included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine(torch, device: str) -> str:
    """The device ("cuda" or "cpu") a record was measured on, in words, with torch's version."""
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return f"{where}, torch {torch.__version__}"


def committed_file(commit: str, path: str) -> str:
    """The text of `path` (relative to the repository) as of `commit`; ValueError with git's own words when the
    commit or the file does not exist."""
    done = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], capture_output=True, text=True)
    if done.returncode:
        raise ValueError(done.stderr.strip())
    return done.stdout


def source_commit() -> str:
    """The commit the benchmark code was run from (short hash, "+dirty" with uncommitted changes), so that a record
    names the code that measured it; "unknown" outside a git checkout."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"


def smollm2_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) of SmolLM2-135M's seven projections per block, from its config: k and v are its key/value heads
    (grouped-query attention), gate and up widen to the MLP's size, down comes back."""
    config = KNOWN_MODELS[SMOLLM2].config
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    return {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden), "gate": (hidden, mlp),
            "up": (hidden, mlp), "down": (mlp, hidden)}


def smollm2_layers() -> int:
    return KNOWN_MODELS[SMOLLM2].config.num_hidden_layers


def write_page(path: Path, record: str) -> None:
    """Write a results page: the script's `record`, then the hand-written notes the page already holds (kept)."""
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else ""
    write_text(path, record.rstrip("\n") + "\n\n" + notes if notes else record)


@contextlib.contextmanager
def beside_sampler(log: Path) -> Iterator[None]:
    """While the block runs, benchmarks/beside.sh appends to `log` every 5 minutes what else runs on the machine (this
    process group, its children included, left out): a long run's record can say what shared its cores."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sampler = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "beside.sh"), str(log), str(os.getpgid(0))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield
    finally:
        os.killpg(sampler.pid, signal.SIGTERM)  # its own group: the sampler and the sleep it waits in


STOPPED = 3  # the exit status of a benchmark that SIGTERM stopped at a step: its run is checkpointed, a rerun resumes


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """An event that SIGTERM sets instead of killing the process (the previous handler is restored after): a
    compare() given it ends within one optimizer step and checkpoints the run, so the next start resumes that step
    instead of training the run again — what a session's end costs a long benchmark."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
