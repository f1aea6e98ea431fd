"""The lab through its API (gradio_client), end to end on the real offline MiniLM with a few rows and steps, and its
job manager on plain functions."""
import json
import threading
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import TINY_LAB_RUN, free_port, wait_for_job

from app import build_app, launch
from app.jobs import JobBusy, JobManager
from app.form import CONFIRM_ABOVE, UPLOAD, RunForm, run_request
from vera_core.lab.calculator import KNOWN_MODELS
from vera_core.adapters.config import LoraConfig, VeraConfig
from vera_core.lab.memory import largest_batch


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    demo = build_app(tmp_path_factory.mktemp("runs"), defaults=RunForm(**TINY_LAB_RUN))
    launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    assert demo.local_url.startswith("http://127.0.0.1:"), "the lab must bind 127.0.0.1 by default"
    client = Client(demo.local_url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    yield demo, client
    demo.lab.manager.stop()
    demo.lab.manager.wait(60)
    demo.close()


@pytest.mark.integration
def test_comparison_through_the_api_matches_report_json(lab):
    demo, client = lab
    estimate = client.predict(**TINY_LAB_RUN, api_name="/estimate")
    by_method = {row[0]: dict(zip(estimate["headers"], row)) for row in estimate["data"]}
    assert by_method["vera"]["trainable params"] == 6 * 2 * (384 + 16)  # 6 layers x query, value: out + r each
    assert by_method["lora"]["trainable params"] == 6 * 2 * 2 * (384 + 384)

    assert client.predict(**TINY_LAB_RUN, api_name="/start_run").startswith("started ")
    state = wait_for_job(client)
    assert state["status"] == "done", state
    run_dir = Path(state["run_dir"])
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["base", "vera-r16", "lora-r2"]

    summary, table, *_figures, note, tradeoff, dinit, _sweep, saved = client.predict(str(run_dir), api_name="/show_run")
    assert "minilm-l6" in summary and "rotten-tomatoes" in summary
    assert "not a sweep" in note and not tradeoff["visible"] and not dinit["visible"]  # one setting per method
    rows = [dict(zip(table["headers"], row)) for row in table["data"]]
    assert [r["run"] for r in rows] == [r["name"] for r in report["runs"]]
    for row, run in zip(rows, report["runs"]):
        assert row["trainable params"] == run["trainable_params"]
        assert row["head params"] == run["head_params"]
        assert row["test loss"] == pytest.approx(run["eval"]["loss"], abs=1e-4)
        assert row["test metric"] == f"accuracy {run['eval']['accuracy']:.1f}%"
        if run["method"] != "base":
            assert row["adapter file (KiB)"] == pytest.approx(run["adapter_bytes"] / 1024, abs=0.05)
            assert row["peak memory (MiB)"] == pytest.approx(run["peak_memory_bytes"] / 2**20, abs=0.05)
            assert row["step time (s)"] == pytest.approx(run["step_time_s"], abs=1e-3)
            assert row["tokens/s"] == pytest.approx(run["tokens_per_s"], abs=0.05)
    assert saved["lab form"]["vera_r"] == "16" and saved["compare config.json"]["train"]["steps"] == 2

    # The saved settings re-open into the form.
    reopened = client.predict(str(run_dir), api_name="/reopen_run")
    assert reopened[0] == "minilm-l6" and reopened[list(RunForm.__dataclass_fields__).index("lora_r")] == "2"

    # Outputs side by side: class probabilities from base, VeRA and LoRA; merged VeRA answers like unmerged.
    outputs = client.predict(str(run_dir), "a moving, beautifully acted film", False, 16, 1.0, api_name="/outputs")
    assert [r[0] for r in outputs["data"]] == ["base", "vera-r16", "lora-r2"]
    for _, text in outputs["data"]:
        probs = [float(part.split()[-1]) for part in text.split(", ")]
        assert sum(probs) == pytest.approx(1.0, abs=2e-3) and {"rotten", "fresh"} <= set(text.replace(",", "").split())
    assert "same output ✓" in client.predict(str(run_dir), "a dull film", 16, api_name="/merged_check")

    # Exports are zip files written inside the run directory.
    for fmt, member in (("native (VeRA Lab: vectors + seed)", "adapter.safetensors"),
                        ("PEFT (loads with peft.PeftModel)", "adapter_model.safetensors"),
                        ("exact LoRA (PEFT LoRA; VeRA as d·A, b·B)", "adapter_config.json")):
        downloaded = client.predict(str(run_dir), "vera-r16", fmt, api_name="/export")
        assert member in zipfile.ZipFile(downloaded).namelist()
    assert len(list((run_dir / "exports").glob("*.zip"))) == 3


@pytest.mark.integration
def test_a_sweep_through_the_api_reports_every_setting(lab):
    demo, client = lab
    sweep = {**TINY_LAB_RUN, "vera_r": "8,16", "vera_d_init": "0.1,1", "lora_r": "2,4", "lora_alpha": None}
    plan = client.predict(**sweep, api_name="/time_estimate")
    assert plan.startswith("**7 runs**: base, vera-r8-d0.1, vera-r8-d1, vera-r16-d0.1, vera-r16-d1, lora-r2, lora-r4")
    assert "Estimated training time" in plan and "measured on this device" in plan

    assert client.predict(**sweep, api_name="/start_run").startswith("started ")
    state = wait_for_job(client)
    assert state["status"] == "done", state
    run_dir = Path(state["run_dir"])
    report = json.loads((run_dir / "report.json").read_text())
    assert [(r["name"], r["r"], r["d_init"], r["alpha"]) for r in report["runs"]] == [
        ("base", None, None, None), ("vera-r8-d0.1", 8, 0.1, None), ("vera-r8-d1", 8, 1.0, None),
        ("vera-r16-d0.1", 16, 0.1, None), ("vera-r16-d1", 16, 1.0, None), ("lora-r2", 2, None, 4.0),
        ("lora-r4", 4, None, 8.0)]
    assert all(r["eval"] is not None and r["steps"] in (None, 2) for r in report["runs"])

    *_, note, tradeoff, dinit, table, _saved = client.predict(str(run_dir), api_name="/show_run")
    assert note.startswith("### Sweep") and tradeoff["visible"] and dinit["visible"] and table["visible"]
    assert tradeoff["value"] is not None and dinit["value"] is not None
    table = table["value"]
    rows = [dict(zip(table["headers"], row)) for row in table["data"]]
    accuracy = [float(r["test metric"].split()[1].rstrip("%")) for r in rows]
    assert accuracy == sorted(accuracy, reverse=True) and len(rows) == 7
    assert {(r["run"], r["r"], r["d_init"]) for r in rows} >= {("vera-r16-d1", 16, 1.0), ("lora-r4", 4, None)}

    # Two run directories side by side: the sweep and a second one.
    first = sorted(p for p in demo.lab.runs_dir.iterdir() if (p / "report.json").is_file() and p != run_dir)
    if first:
        _plot, side = client.predict([str(run_dir), str(first[0])], api_name="/overlay_runs")
        assert {row[0] for row in side["data"]} == {run_dir.name, first[0].name}
    with pytest.raises(AppError, match="select two or more runs"):
        client.predict([str(run_dir)], api_name="/overlay_runs")


@pytest.mark.integration
def test_delete_removes_only_a_run_of_this_lab_after_a_confirmation(lab, tmp_path):
    demo, client = lab
    doomed = demo.lab.runs_dir / "20260101-000000-doomed"
    doomed.mkdir()
    (doomed / "config.json").write_text("{}")
    outside = tmp_path / "outside-run"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    link = demo.lab.runs_dir / "20260101-000000-link"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(AppError, match="tick"):
        client.predict([str(doomed)], False, api_name="/delete_run")
    for path in (outside, link, demo.lab.runs_dir / ".." / doomed.name, demo.lab.runs_dir):
        with pytest.raises(AppError, match="is not a run directory of this lab"):
            client.predict([str(path)], True, api_name="/delete_run")
    assert outside.is_dir() and link.is_symlink() and doomed.is_dir()
    assert client.predict([str(doomed)], True, api_name="/delete_run") == f"deleted {doomed.name}"
    assert not doomed.exists()
    link.unlink()


@pytest.mark.integration
@pytest.mark.parametrize("change, message", [
    ({"vera_r": 0}, "VeRA r must be positive integers; got '0'"),
    ({"vera_d_init": "nan"}, "VeRA d_init must be finite numbers; got 'nan'"),
    ({"vera_r": "256,,x"}, "VeRA r has an empty item in '256,,x'"),
    ({"lora_r": "4,x"}, "LoRA r must be comma-separated integers"),
    ({"vera_r": "16,16"}, "duplicate settings: VeraConfig"),
    ({"vera_r": "1,2,3,4,5", "vera_d_init": "0.1,0.2,0.3,0.4,0.5"}, "this sweep makes 27 runs, more than 24; tick"),
    ({"model": "no-such-org/no-such-model"}, "unknown model 'no-such-org/no-such-model'"),
    ({"dataset": UPLOAD, "upload": "bad.jsonl"}, "columns found"),
    ({"dataset": UPLOAD, "upload": "notes.txt"}, "Invalid file type"),
    ({"methods": ["base"]}, "choose at least one method to train"),
    ({"max_length": 100000}, r"max_length 100000 is longer than the model takes \(max_position_embeddings = 512\)"),
])
def test_bad_input_shows_an_error_and_the_lab_stays_usable(lab, tmp_path, change, message):
    demo, client = lab
    before = client.predict(api_name="/job_state")
    runs_before = sorted(demo.lab.runs_dir.iterdir())
    if "upload" in change:
        path = tmp_path / change["upload"]
        path.write_text('{"question": "a", "answer": "b"}\n')
        change = {**change, "upload": handle_file(str(path))}
    with pytest.raises(AppError, match=message):
        client.predict(**{**TINY_LAB_RUN, **change}, api_name="/start_run")
    assert client.predict(api_name="/job_state")["name"] == before["name"], "a rejected start must not start a job"
    assert sorted(demo.lab.runs_dir.iterdir()) == runs_before, "a rejected start must not leave a run directory"
    assert len(client.predict(**TINY_LAB_RUN, api_name="/estimate")["data"]) == 3


@pytest.mark.integration
@pytest.mark.parametrize("field, value, message", [
    ("vera_lr", float("nan"), "the vera learning rate must be a positive number, got nan"),
    ("lora_lr", float("inf"), "the lora learning rate must be a positive number, got inf"),
    ("lora_alpha", float("nan"), "alpha must be a finite number, got nan"),
])
def test_non_finite_numbers_through_the_api_are_refused_before_a_run_exists(lab, field, value, message):
    """gradio_client will not encode NaN, but any HTTP client can send it (Python's json writes NaN / Infinity)."""
    demo, _ = lab
    runs_before = sorted(demo.lab.runs_dir.iterdir())
    form = {**asdict(RunForm(**TINY_LAB_RUN)), field: value}
    body = json.dumps({"data": [None, *(form[name] for name in demo.lab.form_fields)]})
    call = httpx.post(demo.local_url + "gradio_api/call/start_run", content=body,
                      headers={"content-type": "application/json"})
    with httpx.stream("GET", demo.local_url + f"gradio_api/call/start_run/{call.json()['event_id']}") as stream:
        answer = stream.read().decode()
    assert "event: error" in answer and message in answer and "started" not in answer
    assert sorted(demo.lab.runs_dir.iterdir()) == runs_before


@pytest.mark.integration
def test_an_estimate_beyond_this_machine_warns_before_start(lab):
    demo, client = lab
    huge = {**TINY_LAB_RUN, "batch_size": 200_000, "max_length": 512}
    estimate = client.predict(**huge, api_name="/estimate")
    warnings = [dict(zip(estimate["headers"], row))["warning"] for row in estimate["data"]]
    assert all("is more than this machine's" in w and "lower the batch size" in w for w in warnings[1:]), warnings


def test_a_lab_on_another_interface_warns_and_can_ask_for_a_password(monkeypatch, capsys):
    from app import __main__ as entry

    launched = []
    monkeypatch.setattr(entry, "build_app", lambda runs_dir: runs_dir)
    monkeypatch.setattr(entry, "launch", lambda demo, **kwargs: launched.append(kwargs))
    entry.main(["--host", "0.0.0.0"])
    assert "WARNING: the lab listens on 0.0.0.0" in capsys.readouterr().err and launched[-1]["auth"] is None
    entry.main(["--host", "0.0.0.0", "--auth", "ada:s3cret"])
    err = capsys.readouterr().err
    assert "asks for the --auth password" in err and launched[-1]["auth"] == ("ada", "s3cret")
    for host in ("127.0.0.1", "localhost", "::1"):
        entry.main(["--host", host])
        assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        entry.main(["--auth", "no-colon"])


@pytest.mark.integration
def test_double_start_makes_one_run_and_stop_stops_it(lab):
    demo, client = lab
    long_run = {**TINY_LAB_RUN, "methods": ["vera"], "steps": 500}
    jobs = [client.submit(**long_run, api_name="/start_run") for _ in range(2)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result())
        except AppError as err:
            outcomes.append(str(err))
    assert sum(o.startswith("started") for o in outcomes) == 1, outcomes
    assert any("already running" in o for o in outcomes), outcomes

    deadline = time.monotonic() + 120
    while (client.predict(api_name="/job_state")["progress"] or {}).get("step", 0) < 1:
        assert time.monotonic() < deadline, "training never reached its first step"
        time.sleep(0.3)
    assert client.predict(api_name="/stop_run") == "stopping"
    t0 = time.monotonic()
    state = wait_for_job(client, timeout=60)
    assert state["status"] == "stopped" and time.monotonic() - t0 < 30
    assert state["progress"]["step"] < 500
    report = json.loads((Path(state["run_dir"]) / "report.json").read_text())
    assert report["stopped"] is True and report["runs"][0]["stopped"] is True


@pytest.mark.integration
def test_uploads_over_the_size_limit_are_refused(lab, tmp_path):
    demo, client = lab
    big = tmp_path / "big.jsonl"
    row = '{"text": "%s", "label": "fresh"}\n' % ("x" * 1000)
    big.write_text(row * 21_000)  # 21 MB, over the lab's 20 MB limit
    # The limit is the server's (launch(max_file_size=...)); the client reads it from the app's config and refuses.
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):
        client.predict(**{**TINY_LAB_RUN, "dataset": UPLOAD, "upload": handle_file(str(big))}, api_name="/start_run")
    assert client.predict(api_name="/job_state")["status"] != "running"


def test_calculator_reproduces_table_1(lab):
    demo, client = lab
    table, _plot = client.predict(["roberta-base", "roberta-large"], "256,1024", "8", False, api_name="/calculator")
    rows = {(r[0], r[2], r[3]): dict(zip(table["headers"], r)) for r in table["data"]}
    # VeRA paper, Table 1: RoBERTa-base LoRA r=8 0.3M vs VeRA r=1024 0.043M; large LoRA r=8 0.8M vs VeRA r=256 0.061M.
    assert rows[("roberta-base", "lora", 8)]["trainable params"] == 294_912
    assert rows[("roberta-base", "vera", 1024)]["trainable params"] == 43_008
    assert rows[("roberta-large", "lora", 8)]["trainable params"] == 786_432
    assert rows[("roberta-large", "vera", 256)]["trainable params"] == 61_440
    with pytest.raises(AppError, match="positive integers"):
        client.predict(["roberta-base"], "0", "8", False, api_name="/calculator")


def test_will_it_fit_answers_the_largest_batch_for_vera_and_lora(lab):
    demo, client = lab
    table, _plot = client.predict("minilm-l6", 1, 128, 256, 8, "float32", api_name="/will_it_fit")
    rows = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    known = KNOWN_MODELS["minilm-l6"]
    for label, config in (("vera r=256", VeraConfig(r=256, target_modules=known.targets)),
                          ("lora r=8", LoraConfig(r=8, target_modules=known.targets))):
        fit = largest_batch(known.config, config, 2**30, 128)
        assert rows[label]["largest batch"] == fit.batch_size > 0
        assert rows[label]["answer"] == fit.message
    with pytest.raises(AppError, match="memory budget must be a positive number of GiB, got 0"):
        client.predict("minilm-l6", 0, 128, 256, 8, "float32", api_name="/will_it_fit")
    table, _plot = client.predict("minilm-l6", 0.05, 128, 256, 8, "float32", api_name="/will_it_fit")
    assert all(row[1] == 0 and row[-1].startswith("does not fit: one sequence of 128 tokens needs")
               for row in table["data"])


# ---------------------------------------------------------------------------------------------- job manager

def test_job_status_follows_the_thread():
    manager = JobManager()
    assert manager.snapshot()["status"] == "idle"
    release = threading.Event()

    def work(on_event, stop):
        on_event({"type": "step", "run": "r", "step": 1, "total": 2, "loss": 1.0})
        release.wait(10)
        return "result"

    manager.start("one", work)
    assert manager.snapshot()["status"] == "running"
    with pytest.raises(JobBusy):
        manager.start("two", work)
    release.set()
    assert manager.wait(10)
    snap = manager.snapshot()
    assert snap["status"] == "done" and snap["result"] == "result" and snap["progress"]["step"] == 1


def test_a_crash_is_reported_as_failed_never_done():
    manager = JobManager()

    def crash(on_event, stop):
        raise FloatingPointError("the training loss became nan at step 3")

    manager.start("crash", crash)
    assert manager.wait(10)
    assert manager.snapshot()["status"] == "failed: the training loss became nan at step 3"
    assert manager.snapshot()["log"][-1].endswith("ended: failed")
    manager.start("after", lambda on_event, stop: None)  # the manager stays usable
    assert manager.wait(10) and manager.snapshot()["status"] == "done"


def test_stop_sets_the_flag_and_the_job_reports_stopped():
    manager = JobManager()

    def loop(on_event, stop):
        while not stop.wait(0.01):
            pass

    manager.start("loop", loop)
    assert manager.stop() == "stopping"
    assert manager.wait(5)
    assert manager.snapshot()["status"] == "stopped"
    assert manager.stop() == "no run in progress"


def test_the_form_plans_seeds_and_tuning_and_asks_before_too_many_runs():
    from app.train_tab import plan_text

    form = RunForm(**{**TINY_LAB_RUN, "seed": 3}, seeds=2, tune_lr=True)
    request = run_request(form, None)
    assert request.seeds == [3, 4] and request.tune == {"lr_scale": [0.25, 0.5, 1.0, 2.0, 4.0]}
    assert plan_text(request).startswith("**17 runs**: base, vera-r16, lora-r2, each trained with seeds 3, 4, "
                                         "after 10 tuning runs (learning rate x 0.25, 0.5, 1, 2, 4) and 2 second-seed "
                                         "runs (up to 10 if grid points tie)")
    estimate = request.time_estimate({"vera-r16": 1.0, "lora-r2": 2.0})
    # 2 steps a run, tuning included, and each tuned setting's second-seed run
    assert estimate["total_s"] == 2 * (2 * 1.0 + 2 * 2.0) + 2 * 5 * (1.0 + 2.0) + 2 * (1.0 + 2.0)
    assert "Estimated training time ≈ 0.8 min" in plan_text(request, estimate)  # 48 s
    # The lab's tick is the library's run cap at CONFIRM_ABOVE (runs made for sure: finals, grid, one second seed
    # per tuned setting): 24 need no tick, 29 do.
    assert run_request(RunForm(**{**TINY_LAB_RUN, "methods": ["base", "vera"]}, seeds=8, tune_lr=True),
                       None).run_count() == 1 + 8 + 5 + 1 <= CONFIRM_ABOVE
    assert run_request(RunForm(**{**TINY_LAB_RUN, "methods": ["vera", "lora"]}, seeds=12), None).run_count() == 24
    with pytest.raises(ValueError, match="this sweep makes 29 runs, more than 24; tick"):
        run_request(RunForm(**TINY_LAB_RUN, seeds=8, tune_lr=True), None)
    big = run_request(RunForm(**TINY_LAB_RUN, seeds=8, tune_lr=True, confirm_runs=True), None)
    assert big.run_count() == 27 + 2 and big.tie_runs() == (2, 10) and big.max_runs is None
    with pytest.raises(ValueError, match="seeds is how many training seeds to run, a whole number >= 1; got 0"):
        run_request(RunForm(**TINY_LAB_RUN, seeds=0), None)
    # head-only: the baseline a classifier's adapters must beat; its own, wider grid; the form's head rate is every
    # method's head rate (and the centre of head-only's grid)
    head = run_request(RunForm(**{**TINY_LAB_RUN, "methods": ["head", "vera"]}, head_lr=0.02, tune_lr=True), None)
    assert head.tune == {"lr_scale": [0.25, 0.5, 1.0, 2.0, 4.0], "head_lr_scale": [0.25, 1.0, 4.0, 16.0, 64.0]}
    assert head.head_rate() == 0.02 and head.rates(head.plan()[1])[1] == 0.02
    assert "10 tuning runs (learning rate x 0.25, 0.5, 1, 2, 4; head-only x 0.25, 1, 4, 16, 64)" in plan_text(head)


@pytest.mark.integration
def test_several_seeds_show_mean_std_and_the_paired_line_in_results(lab):
    _demo, client = lab
    assert client.predict(**{**TINY_LAB_RUN, "seeds": 2}, api_name="/start_run").startswith("started ")
    state = wait_for_job(client)
    assert state["status"] == "done", state
    report = json.loads((Path(state["run_dir"]) / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["base", "vera-r16-s0", "vera-r16-s1", "lora-r2-s0", "lora-r2-s1"]
    summary, *_ = client.predict(state["run_dir"], api_name="/show_run")
    [pair] = report["pairs"]
    assert f"vera-r16 − lora-r2 = {pair['diff_mean']:+.1f} points [{pair['ci95'][0]:+.1f}, " in summary
    vera = next(s for s in report["settings"] if s["setting"] == "vera-r16")
    assert f"accuracy {vera['mean']:.1f} ± {vera['std']:.1f}" in summary and pair["verdict"] in summary
