"""A full disk and a killed training process: one line naming what failed and what was kept, whole files on disk,
no process left behind, and a lab that keeps serving."""
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from gradio_client import Client
from helpers import TINY_LAB_RUN, free_port, sentiment, tiny_bert, wait_for_first_step, wait_for_job
from matplotlib.figure import Figure
from safetensors import SafetensorError

from app import build_app, launch
from app.form import RunForm
from vera_core.adapters.config import LoraConfig, VeraConfig
from vera_core.adapters.files import WriteError, write_json
from vera_core.lab.cli import main
from vera_core.lab.compare import _EventLog, compare
from vera_core.lab.train import TrainConfig, _save_state

ROOT = Path(__file__).resolve().parents[1]
FULL = "No space left on device"
QUICK = dict(methods=("vera", "lora"), vera=VeraConfig(r=8), lora=LoraConfig(r=2),
             train=TrainConfig(steps=2, batch_size=4, max_length=16))


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, FULL)


def _run_files(run_dir: Path) -> dict:
    """report.json (it must parse), every metrics.jsonl line (each must parse) and any temporary left behind."""
    return {"report": json.loads((run_dir / "report.json").read_text()),
            "events": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "temporaries": sorted(str(p) for p in run_dir.rglob(".*tmp*"))}


# ---------------------------------------------------------------------------------------------- the writers

def test_a_write_error_names_the_path_and_what_was_kept_and_survives_a_process_boundary(tmp_path):
    err = WriteError(tmp_path / "loss.png", "no space left on device", "the finished runs are in report.json")
    assert str(err) == f"no space left on device writing {tmp_path / 'loss.png'}; the finished runs are in report.json"
    assert isinstance(err, OSError) and str(pickle.loads(pickle.dumps(err))) == str(err)
    assert str(err.keeping("nothing else")).endswith("loss.png; nothing else")


def test_a_json_file_that_cannot_be_written_keeps_its_last_good_version(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json(path, {"runs": ["vera"]})
    monkeypatch.setattr(Path, "write_text", _no_space)
    with pytest.raises(WriteError) as failed:
        write_json(path, {"runs": ["vera", "lora"]})
    assert str(failed.value) == f"no space left on device writing {path}; the earlier report.json is kept"
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"runs": ["vera"]} and os.listdir(tmp_path) == ["report.json"]


def test_torch_state_and_the_event_log_report_a_full_disk_as_such(tmp_path):
    """/dev/full fails every write with ENOSPC: torch's own writer would only say "unexpected pos"."""
    with pytest.raises(OSError) as failed:
        _save_state({"state": torch.zeros(100_000)}, Path("/dev/full"))
    assert failed.value.errno == errno.ENOSPC
    seen = []
    log = _EventLog(Path("/dev/full"), seen.append)
    with pytest.raises(WriteError, match="^no space left on device writing /dev/full$"):
        log({"type": "step"})
    log({"type": "error"})  # the log is broken now: later events reach on_event without raising again
    log.close()
    assert seen == [{"type": "error"}]


# ---------------------------------------------------------------------------------------------- compare, in-process

@pytest.mark.parametrize("where", ["lora adapter", "figure", "second report.json"])
def test_a_full_disk_in_a_comparison_is_one_write_error_keeping_the_finished_runs(tokenizer, tmp_path, monkeypatch,
                                                                                  where):
    import vera_core.adapters.io as adapter_io

    if where == "lora adapter":  # safetensors reports the OS error inside its own message
        real = adapter_io.save_file

        def save_file(tensors, path, metadata=None):
            if "lora" in path:
                raise SafetensorError(f"Error while serializing: I/O error: {FULL} (os error 28)")
            return real(tensors, path, metadata=metadata)

        monkeypatch.setattr(adapter_io, "save_file", save_file)
        failed_path, kept_runs = tmp_path / "train" / "lora-r2" / "adapter", ["vera-r8"]
    elif where == "figure":  # the case: PIL failing to write a PNG
        monkeypatch.setattr(Figure, "savefig", _no_space)
        failed_path, kept_runs = tmp_path / "loss.png", ["vera-r8", "lora-r2"]
    else:  # the first report.json is written, every later one fails
        real, calls = Path.write_text, []

        def write_text(self, text, *args, **kwargs):
            calls.extend([self.name] if self.name.startswith(".report.json.tmp") else [])
            if len(calls) >= 2:
                _no_space()
            return real(self, text, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
        failed_path, kept_runs = tmp_path / "report.json", ["vera-r8"]
    with pytest.raises(WriteError) as failed:
        compare((tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer), sentiment(), **QUICK, out_dir=tmp_path)
    monkeypatch.undo()
    message = str(failed.value)
    assert "\n" not in message and message.startswith("no space left on device writing ")
    assert failed.value.path == str(failed_path)
    assert message.endswith(f"; the finished runs ({', '.join(kept_runs)}) are in {tmp_path / 'report.json'}")
    files = _run_files(tmp_path)
    assert [r["name"] for r in files["report"]["runs"]] == kept_runs and files["temporaries"] == []
    assert files["events"][-1]["type"] == "error" and files["events"][-1]["message"].startswith("no space left")
    if where != "second report.json":  # report.json could be written after the error: it carries it
        assert files["report"]["error"] == files["events"][-1]["message"]
    assert (tmp_path / "loss.png").is_file() == (where != "figure")  # figures are best-effort after an error


def test_the_cli_in_process_prints_one_line_and_exits_2(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Figure, "savefig", _no_space)
    argv = ["compare", "--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl"), "--methods",
            "vera", "--steps", "1", "--batch-size", "4", "--max-length", "16", "--vera-r", "8", "--in-process",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == [f"error: no space left on device writing {tmp_path / 'run' / 'loss.png'}; the finished runs "
                   f"(vera-r8) are in {tmp_path / 'run' / 'report.json'}"]


# ---------------------------------------------------------------------------------------------- a real full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only: skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vera_core", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _family(proc: subprocess.Popen) -> list[int]:
    return [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]


def _left_behind(family: list[int]) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line
            or "warn" in line.lower() and "longer than max_length" not in line]


def _long_comparison(assets, out, *extra):
    """A CLI comparison (base, then VeRA for 3,000 steps; `extra` CLI arguments) started and past its first
    training step: (process, family)."""
    proc = _cli("compare", "--model", str(assets / "bert"), "--dataset", str(assets / "sentiment.jsonl"),
                "--methods", "base,vera", "--steps", "3000", "--batch-size", "2", "--max-length", "16",
                "--vera-r", "8", "--eval-every", "3000", "--out", str(out), *extra)
    wait_for_first_step(out, proc)
    return proc, _family(proc)


@pytest.mark.integration  # a CLI process and a child per method, on a tmpfs that fills up mid-run
def test_a_disk_that_fills_during_an_isolated_comparison_ends_in_one_line(assets, small_disk):
    out = small_disk / "run"
    proc, family = _long_comparison(assets, out)
    _fill(small_disk)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert _error_lines(err) == [f"error: no space left on device writing {out / 'metrics.jsonl'}; the finished "
                                 f"runs (base) are in {out / 'report.json'}"], err[-3000:]
    files = _run_files(out)  # every file parses: the failed line was cut off again
    assert [r["name"] for r in files["report"]["runs"]] == ["base"] and files["temporaries"] == []
    assert _left_behind(family) == []


# ---------------------------------------------------------------------------------------------- a killed process

@pytest.mark.integration  # a CLI process and a child per method; the child is killed as the OOM killer would
def test_a_killed_training_process_fails_the_comparison_in_one_line(assets, tmp_path):
    out = tmp_path / "run"
    proc, family = _long_comparison(assets, out)
    [child] = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    child.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    line = "the process of vera-r8 ended by signal 9 (SIGKILL: memory may have run out)"
    assert proc.returncode == 2
    assert _error_lines(err) == [f"error: {line}; the finished runs (base) are in {out / 'report.json'}"], err[-3000:]
    files = _run_files(out)
    assert files["report"]["error"] == line and [r["name"] for r in files["report"]["runs"]] == ["base"]
    assert files["events"][-1] == {"type": "error", "message": line, "run_dir": str(out), "runs": ["base"]}
    assert _left_behind(family) == []


@pytest.mark.integration  # a CLI process and its child; the CLI is killed as the OOM killer would
def test_the_child_of_a_killed_cli_saves_and_exits(assets, tmp_path):
    out = tmp_path / "run"
    proc, family = _long_comparison(assets, out)
    wait_for_first_step(out, proc)
    time.sleep(3)  # events enough to fill the queue's pipe, which nobody will read
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert _left_behind(family) == []  # it stopped within a step instead of hanging as an orphan
    assert (out / "adapters" / "vera-r8" / "adapter.safetensors").is_file()


@pytest.mark.integration  # a CLI process and a child per tuning point, killed as the OOM killer would
def test_a_killed_tuning_process_fails_the_comparison_in_one_line(assets, tmp_path):
    out = tmp_path / "run"
    proc, family = _long_comparison(assets, out, "--tune", "1,2")  # the first point trains 3,000 steps
    [child] = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    child.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert _error_lines(err) == [f"error: the process of tune/vera-r8-x1 ended by signal 9 (SIGKILL: memory may have "
                                 f"run out); no run had finished, so {out} holds no results"], err[-3000:]
    assert _left_behind(family) == []
    # report.json says why the comparison ended
    assert json.loads((out / "report.json").read_text())["error"].startswith("the process of tune/vera-r8-x1")


# ---------------------------------------------------------------------------------------------- the lab

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    demo = build_app(tmp_path_factory.mktemp("runs"), defaults=RunForm(**TINY_LAB_RUN))
    launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, Client(demo.local_url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    demo.lab.manager.stop()
    demo.lab.manager.wait(60)
    demo.close()


def _still_serves(client, run_dir: str, runs: list[str]) -> None:
    """The lab answers after the failed job and shows the runs it kept."""
    assert wait_for_job(client, 5)["run_dir"] == run_dir
    summary, table, *_ = client.predict(run_dir, api_name="/show_run")
    assert [row[0] for row in table["data"]] == runs


@pytest.mark.integration  # the real offline MiniLM, a child process per method
def test_a_killed_training_process_fails_the_lab_job_and_the_lab_keeps_serving(lab):
    demo, client = lab
    assert client.predict(**{**TINY_LAB_RUN, "methods": ["base", "vera"], "steps": 3000},
                          api_name="/start_run").startswith("started ")
    deadline = time.monotonic() + 180
    while not (client.predict(api_name="/job_state")["progress"] or {}).get("step"):
        assert time.monotonic() < deadline, "no training step within the time limit"
        time.sleep(0.2)
    [child] = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
    child.send_signal(signal.SIGKILL)
    state = wait_for_job(client, 120)
    run_dir = state["run_dir"]
    assert state["status"] == ("failed: the process of vera-r16 ended by signal 9 (SIGKILL: memory may have run "
                               f"out); the finished runs (base) are in {Path(run_dir) / 'report.json'}")
    assert _left_behind([child.pid]) == []
    _still_serves(client, run_dir, ["base"])


@pytest.mark.integration  # the real offline MiniLM, a child process per method
def test_a_full_disk_fails_the_lab_job_in_one_line_and_the_lab_keeps_serving(lab, monkeypatch):
    real = Figure.savefig

    def savefig(self, target, *args, **kwargs):  # a file fails (the disk is full); the page's images still draw
        if isinstance(target, (str, Path)):
            _no_space()
        return real(self, target, *args, **kwargs)

    demo, client = lab
    monkeypatch.setattr(Figure, "savefig", savefig)
    assert client.predict(**TINY_LAB_RUN, api_name="/start_run").startswith("started ")
    state = wait_for_job(client, 240)
    run_dir = Path(state["run_dir"])
    assert state["status"] == (f"failed: no space left on device writing {run_dir / 'loss.png'}; the finished runs "
                               f"(base, vera-r16, lora-r2) are in {run_dir / 'report.json'}")
    assert json.loads((run_dir / "report.json").read_text())["error"] == (
        f"no space left on device writing {run_dir / 'loss.png'}")
    monkeypatch.undo()
    _still_serves(client, str(run_dir), ["base", "vera-r16", "lora-r2"])
