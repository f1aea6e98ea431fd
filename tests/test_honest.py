"""Honest comparisons on tiny models: several seeds, equal learning-rate tuning on validation, per-example
predictions, intervals, paired VeRA − LoRA differences, resuming, and the refusals."""
import json

import pytest
import torch
from helpers import colours, sentiment, tiny_bert, tiny_llama

from vera_core.lab.compare import compare
from vera_core.adapters.config import LoraConfig, VeraConfig
from vera_core.lab.report import head_rate_line, load_run, pair_line, setting_table, tuning_lines
from vera_core.lab.request import RunRequest
from vera_core.lab.runs import list_runs, run_summary
from vera_core.lab.stats import t_interval
from vera_core.lab import tune
from vera_core.lab.train import DEFAULT_LR, TrainConfig

TINY = TrainConfig(steps=2, batch_size=4, max_length=16)


GRIDS = {"lr_scale": [0.5, 2.0], "head_lr_scale": [1.0, 4.0]}  # the adapters' grid and head-only's own


def _compare(tokenizer, out, **kw):
    return compare((tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer), sentiment(),
                   methods=("base", "head", "vera", "lora"), vera=VeraConfig(r=16), lora=LoraConfig(r=4),
                   out_dir=out, train=TINY, samples=1, progress=False, **kw)


def test_seeds_and_tuning_give_intervals_pairs_and_chosen_rates(tokenizer, tmp_path):
    events = []
    _compare(tokenizer, tmp_path, seeds=(0, 1), tune=GRIDS, tune_steps=2, on_event=events.append)
    data, histories = load_run(tmp_path)
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == ["base", "head-s0", "head-s1", "vera-r16-s0", "vera-r16-s1", "lora-r4-s0", "lora-r4-s1"]
    assert [runs[n]["seed"] for n in ("vera-r16-s0", "vera-r16-s1")] == [0, 1] and data["seeds"] == [0, 1]
    assert data["seed"] == 0 and runs["lora-r4-s1"]["setting"] == "lora-r4"
    # every run and tuning point records its process CPU seconds beside its wall time (the cost on a shared machine)
    timed = [*runs.values(), *(p for entry in data["tuning"].values() for p in entry["grid"])]
    assert all(0 < t["cpu_s"] <= t["wall_s"] * torch.get_num_threads() + 1 for t in timed)
    # tuning: head-only first on its own grid, then the adapters on theirs, the same steps for all; the lowest
    # validation loss wins unless a second seed (the request's seed 1) finds a near-tie and the mean over both decides
    tuning = data["tuning"]
    assert list(tuning) == ["head", "vera-r16", "lora-r4"]
    defaults = {"head": DEFAULT_LR["head"], "vera-r16": DEFAULT_LR["vera"], "lora-r4": DEFAULT_LR["lora"]}
    second_points = set()
    for setting, entry in tuning.items():
        grid = GRIDS["head_lr_scale" if setting == "head" else "lr_scale"]
        assert [p["scale"] for p in entry["grid"]] == grid and all(p["steps"] == 2 for p in entry["grid"])
        assert [p["lr"] for p in entry["grid"]] == pytest.approx([defaults[setting][0] * s for s in grid])
        best, other = sorted(entry["grid"], key=lambda p: p["val_loss"])
        tie = entry["tie"]
        again = {p["scale"]: p["val_loss"] for p in tie["val_loss_second_seed"]}
        assert tie["seed"] == 1
        assert tie["spread"] == pytest.approx(abs(best["val_loss"] - again[best["scale"]]) / 2 ** 0.5)
        assert tie["near"] == ([other["scale"]] if other["val_loss"] - best["val_loss"] < tie["spread"] else [])
        assert set(again) == {best["scale"], *tie["near"]}
        mean = {x: (next(p["val_loss"] for p in entry["grid"] if p["scale"] == x) + again[x]) / 2 for x in again}
        assert entry["scale"] == (min(mean, key=mean.get) if tie["near"] else best["scale"])
        assert entry["lr"] == next(p["lr"] for p in entry["grid"] if p["scale"] == entry["scale"])
        assert runs[f"{setting}-s1"]["lr"] == pytest.approx(entry["lr"])
        second_points |= {f"{setting}-x{x:g}-s1" for x in again}
    # one head rate: head-only's choice, for every run's head and every adapter grid point's (the head-only
    # grid's own points move it with their scale)
    assert data["head_lr"] == pytest.approx(DEFAULT_LR["head"][1] * tuning["head"]["scale"])
    assert [runs[n]["head_lr"] for n in runs if n != "base"] == [data["head_lr"]] * 6
    assert [p["head_lr"] for p in tuning["head"]["grid"]] == pytest.approx(
        [DEFAULT_LR["head"][1] * x for x in GRIDS["head_lr_scale"]])
    assert {p["head_lr"] for s in ("vera-r16", "lora-r4") for p in tuning[s]["grid"]} == {data["head_lr"]}
    starts = [e["run"] for e in events if e["type"] == "tune_start"]
    assert starts[:2] == ["head", "head"] and "head" not in starts[starts.index("vera-r16"):]
    assert json.loads((tmp_path / "tuning.json").read_text()) == tuning
    points = sorted(p.name for p in (tmp_path / "tune").iterdir())
    assert points == sorted({f"{s}-x{x:g}" for s in tuning
                             for x in GRIDS["head_lr_scale" if s == "head" else "lr_scale"]} | second_points)
    assert all([f.name for f in (tmp_path / "tune" / p).iterdir()] == ["tune.json"] for p in points)  # no adapter
    assert not any(n.startswith("tune/") for n in histories)  # tuning curves stay out of the runs' histories
    assert {e["run"] for e in events if e.get("phase") == "tune" and e["type"] == "step"} == {
        f"tune/{p}" for p in points}
    # every run's predictions: one row per test example, their scores giving its accuracy
    for name, run in runs.items():
        rows = [json.loads(line) for line in (tmp_path / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [0, 1]
        assert 100 * sum(r["score"] for r in rows) / 2 == run["eval"]["accuracy"]
    settings = {s["setting"]: s for s in data["settings"]}
    vera = settings["vera-r16"]
    values = [runs["vera-r16-s0"]["eval"]["accuracy"], runs["vera-r16-s1"]["eval"]["accuracy"]]
    assert vera["values"] == values and vera["seeds"] == [0, 1] and vera["ci_kind"] == "t over seeds"
    assert vera["mean"] == sum(values) / 2 and vera["ci95"] == pytest.approx(list(t_interval(values)))
    assert settings["base"]["ci_kind"] == "bootstrap over test examples" and settings["base"]["std"] is None
    [pair] = data["pairs"]
    assert (pair["vera"], pair["lora"], pair["seeds"], pair["param_ratio"]) == ("vera-r16", "lora-r4", [0, 1],
                                                                                 1024 / 192)
    assert pair["diff_mean"] == pytest.approx(vera["mean"] - settings["lora-r4"]["mean"])
    assert pair["ci95"][0] <= pair["diff_mean"] <= pair["ci95"][1]
    assert pair_line(pair).startswith(f"vera-r16 − lora-r4 = {pair['diff_mean']:+.1f} points [")
    assert setting_table([vera])[0]["mean ± std"].startswith("accuracy ") and " ± " in setting_table([vera])[0][
        "mean ± std"]
    md = (tmp_path / "report.md").read_text()
    assert "the data split (seed 0) and VeRA's projection seed stay fixed" in md and pair["verdict"] in md
    assert "vera-r16: lr" in md and "validation loss by scale" in md
    assert f"Classifier head: one rate for every method, {data['head_lr']:.2g} (head-only's tuned rate)" in md
    untuned = head_rate_line({**data, "tuning": {}})
    assert untuned.startswith(f"Classifier head: one rate for every method, {data['head_lr']:.2g} (not tuned")
    assert "add head-only with tuning when the head matters" in untuned
    assert json.loads((tmp_path / "config.json").read_text())["run_seeds"]["vera-r16-s1"] == 1  # load_run_model's
    entry = run_summary(tmp_path)  # what list_runs shows: each method's best setting by its mean over seeds
    assert entry["best"]["vera"] == vera["mean"] and entry["best"]["lora"] == settings["lora-r4"]["mean"]
    # resumed: finished tuning points and runs are reused, nothing trains again
    again = []
    _compare(tokenizer, tmp_path, seeds=(0, 1), tune=GRIDS, tune_steps=2, on_event=again.append, exists="resume")
    assert not [e for e in again if e["type"] == "step"] and load_run(tmp_path)[0]["tuning"] == tuning


def test_one_seed_generation_bootstraps_over_test_groups(tokenizer, tmp_path):
    def run(**kw):
        compare((tiny_llama(tokenizer=tokenizer), tokenizer), colours(), methods=("vera", "lora"),
                vera=VeraConfig(r=8), lora=LoraConfig(r=2), out_dir=tmp_path, eval_generate=2, samples=1,
                progress=False, train=TrainConfig(steps=1, batch_size=2, max_length=24), tune={"lr_scale": [1, 2]},
                tune_steps=1, **kw)

    run()
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["vera-r8", "lora-r2"] and data["seeds"] == [0]
    rows = [json.loads(line) for line in (tmp_path / "predictions" / "vera-r8.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all(len(r["bleu_stats"]) == 10 for r in rows)
    vera = data["settings"][0]
    assert vera["ci_kind"] == "bootstrap over test examples" and vera["metric"] == "bleu"
    assert vera["ci95"][0] <= vera["mean"] <= vera["ci95"][1]
    assert data["pairs"][0]["seeds"] == [0] and data["pairs"][0]["verdict"] in (
        "matches within 1 point", "behind", "cannot tell")
    # resumed: a causal LM's runs record no head rate, and they are kept all the same (nothing trains again)
    again = []
    run(exists="resume", on_event=again.append)
    assert not [e for e in again if e["type"] == "step"] and load_run(tmp_path)[0]["runs"] == data["runs"]


def test_scored_tuning_records_each_points_test_metric_and_chooses_as_before(tokenizer, tmp_path):
    def run(out, **kw):
        events = []
        compare((tiny_llama(tokenizer=tokenizer), tokenizer), colours(), methods=("vera",), vera=VeraConfig(r=8),
                out_dir=out, eval_generate=2, samples=0, progress=False, on_event=events.append,
                train=TrainConfig(steps=1, batch_size=2, max_length=24), tune={"lr_scale": [1, 2]}, tune_steps=1,
                **kw)
        return json.loads((out / "tuning.json").read_text())["vera-r8"], events

    plain, _ = run(tmp_path / "plain")
    scored, _ = run(tmp_path / "scored", score_tuning=True)
    # the choice reads validation loss only: scoring the test split changes no loss and no choice
    assert [p["val_loss"] for p in scored["grid"]] == [p["val_loss"] for p in plain["grid"]]
    assert scored["scale"] == plain["scale"] and "test" not in plain["grid"][0]
    for point in scored["grid"]:
        assert set(point["test"]) == {"loss", "bleu", "rougeL"} and point["test"]["loss"] > 0
        rows = [json.loads(line) for line in
                (tmp_path / "scored" / "tune" / f"vera-r8-x{point['scale']:g}" / "predictions.jsonl").open()]
        assert [r["id"] for r in rows] == [0, 1]  # eval_generate's two test groups
        assert sum(r["score"] for r in rows) / 2 == pytest.approx(point["test"]["rougeL"])
    # a point recorded without a test score is trained again when the request asks for one; a scored one is kept
    (tmp_path / "plain" / "report.json").unlink()
    again, events = run(tmp_path / "plain", score_tuning=True, exists="resume")
    assert all("test" in p for p in again["grid"])
    assert {"tune/vera-r8-x1", "tune/vera-r8-x2"} <= {e["run"] for e in events
                                                      if e["type"] == "step" and e.get("phase") == "tune"}
    _, events = run(tmp_path / "plain", score_tuning=True, exists="resume")
    assert not [e for e in events if e["type"] == "step"]


def _scripted_tuning(tokenizer, tmp_path, losses: dict) -> dict:
    """tune_rates on a tiny BERT whose grid points return `losses[(seed, scale)]` instead of training."""
    trained = []

    def point(spec, scale, head_scale, work):
        trained.append((spec.seed, scale, work.name))
        return {"scale": scale, "lr": 1e-2 * scale, "head_lr": 1e-3, "val_loss": losses[spec.seed, scale],
                "steps": 2, "wall_s": 0.0}
    request = RunRequest((tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer), sentiment(), methods=("vera",),
                         vera=VeraConfig(r=16), train=TINY, seeds=[3], tune={"lr_scale": [1, 2, 4]})
    chosen = tune.tune_rates(request, tmp_path, point, emit=lambda e: None)["vera-r16"]
    return {**chosen, "trained": trained}


def test_a_near_tie_is_broken_by_a_second_seed(tokenizer, tmp_path):
    # Seed 3: x2 0.40 beats x4 0.41 by 0.01. Seed 4 (the first seed plus one): x2 0.44, so the spread is
    # 0.04 / sqrt(2) = 0.028 > 0.01: x4 (0.40 on seed 4) is a near-tie, x1 (0.10 behind) is not. Means: x2 0.42,
    # x4 0.405, so x4 is chosen.
    losses = {(3, 1.0): 0.50, (3, 2.0): 0.40, (3, 4.0): 0.41, (4, 2.0): 0.44, (4, 4.0): 0.40}
    tied = _scripted_tuning(tokenizer, tmp_path, losses)
    assert (tied["scale"], tied["lr"], tied["head_lr"]) == (4.0, 4e-2, 1e-3)
    assert tied["tie"]["seed"] == 4 and tied["tie"]["near"] == [4.0]
    assert tied["tie"]["spread"] == pytest.approx(0.04 / 2 ** 0.5)
    assert tied["trained"][3:] == [(4, 2.0, "vera-r16-x2-s4"), (4, 4.0, "vera-r16-x4-s4")]
    line = tuning_lines({"vera-r16": tied})[0]
    assert line.endswith("a near-tie with x4 (within the seed spread 0.0283), chosen on the mean of two seeds "
                         "(seed 4: x2 0.4400, x4 0.4000)")
    # The same grid with seeds that agree (x2 0.401 on seed 4): spread 0.0007 < 0.01, one extra run, x2 stays.
    clear = _scripted_tuning(tokenizer, tmp_path, {**losses, (4, 2.0): 0.401})
    assert clear["scale"] == 2.0 and clear["tie"]["near"] == [] and len(clear["trained"]) == 4
    assert "near-tie" not in tuning_lines({"vera-r16": clear})[0]


def test_head_only_is_tuned_first_and_its_rate_is_every_adapter_points_head_rate(tokenizer, tmp_path):
    # Head-only's grid (x2 best) runs to its end, second seed included, before any adapter point; each adapter point
    # then trains its head at head-only's choice, whatever its own scale. Rates come from the real RunRequest.rates.
    trained = []
    losses = {"head": {1.0: 0.6, 2.0: 0.5, 4.0: 0.7}, "vera-r16": {0.5: 0.4, 2.0: 0.3}}

    def point(spec, scale, head_scale, work):
        lr, head_lr = request.rates(spec, scale, head_scale)
        trained.append((work.name, head_lr))
        loss = losses[spec.setting][scale] + 0.001 * (spec.seed - 3)  # seeds agree: no near-tie
        return {"scale": scale, "lr": lr, "head_lr": head_lr, "val_loss": loss, "steps": 2, "wall_s": 0.0}

    request = RunRequest((tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer), sentiment(),
                         methods=("vera", "head"), vera=VeraConfig(r=16), train=TINY, seeds=[3], lrs={"head": 1e-3},
                         tune={"lr_scale": [0.5, 2], "head_lr_scale": [1, 2, 4]})  # head grid: x 1e-3, as given
    chosen = tune.tune_rates(request, tmp_path, point, emit=lambda e: None)
    assert trained == [("head-x1", 1e-3), ("head-x2", 2e-3), ("head-x4", 4e-3), ("head-x2-s4", 2e-3),
                       ("vera-r16-x0.5", 2e-3), ("vera-r16-x2", 2e-3), ("vera-r16-x2-s4", 2e-3)]
    assert (chosen["head"]["scale"], chosen["head"]["lr"], chosen["vera-r16"]["lr"]) == (2.0, 2e-3, 8e-2)
    assert request.rates(request.plan()[0], 2.0, 2.0) == (8e-2, 2e-3)  # a seed run: its scale, the one head rate
    assert request.rates(request.plan()[1], 2.0, 2.0) == (2e-3, 2e-3)  # head-only: the head rate is its rate
    untuned = RunRequest(request.model, sentiment(), methods=("vera", "full"), train=TrainConfig(head_lr=3e-3))
    assert untuned.rates(untuned.plan()[0], 4.0) == (DEFAULT_LR["vera"][0] * 4, 3e-3)  # unscaled, as given
    assert untuned.rates(untuned.plan()[1], 4.0) == (DEFAULT_LR["full"][0] * 4,) * 2  # full: one rate, head too


def test_bad_seeds_grids_and_too_many_runs_are_refused(tokenizer):
    model = (tiny_bert(tokenizer=tokenizer, num_labels=2), tokenizer)

    def request(**kw):
        return RunRequest(model, sentiment(), methods=("vera", "lora"), **kw)

    with pytest.raises(ValueError, match=r"seeds \[0, 1, 0\] repeat a seed"):
        request(seeds=[0, 1, 0])
    with pytest.raises(ValueError, match="non-empty list"):
        request(seeds=[])
    with pytest.raises(ValueError, match="tuning grid is empty"):
        request(tune={"lr_scale": []})
    with pytest.raises(ValueError, match="repeats a scale"):
        request(tune={"lr_scale": [1, 1.0]})
    with pytest.raises(ValueError, match="tune must be"):
        request(tune={"lr": [1]})
    with pytest.raises(ValueError, match="tune must be"):
        request(tune={"head_lr_scale": [1]})
    with pytest.raises(ValueError, match=r"tuning grid is empty \(head_lr_scale\)"):
        request(tune={"lr_scale": [1], "head_lr_scale": []})
    with pytest.raises(ValueError, match=r"makes 96 runs \(60 final, 36 tuning with their second seeds\), more "
                                         r"than the limit of 60; pass max_runs=96"):
        request(seeds=range(10), tune={"lr_scale": [0.5, 1, 2, 3, 4]}, vera=[VeraConfig(r=r) for r in range(1, 6)])
    ok = request(seeds=[3, 4], tune={"lr_scale": [0.5, 2]}, tune_steps=5)
    assert [s.name for s in ok.plan()] == ["vera-r256-s3", "vera-r256-s4", "lora-r8-s3", "lora-r8-s4"]
    assert [(s.setting, s.seed, x) for s, x in ok.tuning_plan()] == [("vera-r256", 3, 0.5), ("vera-r256", 3, 2.0),
                                                                     ("lora-r8", 3, 0.5), ("lora-r8", 3, 2.0)]
    # each setting's winner is retrained on a second seed; a near-tie retrains the other point too
    assert ok.tie_runs() == (2, 4) and ok.run_count() == 4 + 4 + 2
    head = RunRequest(model, sentiment(), methods=("lora", "head"), tune={"lr_scale": [0.5], "head_lr_scale": [4, 8]})
    assert [(s.setting, x) for s, x in head.tuning_plan()] == [("head", 4.0), ("head", 8.0), ("lora-r8", 0.5)]
    assert head.tie_runs() == (1, 2)  # a one-point grid has nothing to break
    estimate = ok.time_estimate({"vera-r256": 2.0, "lora-r8": 1.0})
    assert estimate["runs"]["vera-r256-s4"] == 100 * 2.0 and estimate["runs"]["tune/lora-r8-x0.5"] == 5 * 1.0
    assert estimate["runs"]["tune/vera-r256-second-seed"] == 5 * 2.0
    assert estimate["total_s"] == 2 * 100 * 3.0 + 2 * 5 * 3.0 + 5 * 3.0  # the finals, the grid, the second seeds
    assert "4 tuning runs of 5 steps and 2 second-seed runs (up to 4 if grid points tie)" in estimate["based_on"]


def test_a_stopped_multi_seed_run_stays_readable(tokenizer, tmp_path):
    import threading

    stop = threading.Event()

    def on_event(event):
        if event["type"] == "run_done" and event["run"] == "vera-r16-s1":
            stop.set()

    _compare(tokenizer, tmp_path / "run", seeds=(0, 1), on_event=on_event, stop=stop)
    data, _ = load_run(tmp_path / "run")
    assert data["stopped"] and [r["name"] for r in data["runs"]][-1] == "vera-r16-s1"
    assert [s["setting"] for s in data["settings"]] == ["base", "head", "vera-r16"] and data["pairs"] == []
    [entry] = list_runs(tmp_path)
    assert entry["status"] == "stopped" and set(entry["best"]) == {"base", "head", "vera"}


def test_figures_draw_the_spread_over_seeds():
    from matplotlib.container import BarContainer

    from vera_core.lab.plots import metric_figure
    from vera_core.lab.report import tradeoff_rows

    runs = [{"name": f"vera-r16-s{s}", "setting": "vera-r16", "seed": s, "method": "vera", "r": 16,
             "trainable_params": 192, "eval": {"loss": 0.5, "accuracy": acc}} for s, acc in ((0, 70.0), (1, 74.0))]
    report = {"runs": runs, "seeds": [0, 1], "seed": 0}
    [row] = tradeoff_rows(report)  # one row per setting: the mean, and the std as its error bar
    assert (row["name"], row["accuracy"], row["accuracy_err"]) == ("vera-r16", 72.0, pytest.approx(2 * 2 ** 0.5))
    settings = [{"setting": "vera-r16", "metric": "accuracy", "mean": 72.0, "std": 2.0}]
    def bars(fig):
        return next(c for c in fig.axes[0].containers if isinstance(c, BarContainer))

    spread = bars(metric_figure(runs, "classification", settings))
    assert [b.get_height() for b in spread] == [72.0] and spread.errorbar is not None
    assert bars(metric_figure(runs, "classification")).errorbar is None  # one bar per run, no spread


def test_a_rate_chosen_at_an_end_of_the_grid_says_so():
    from vera_core.lab.report import tuning_lines

    def entry(scale):
        grid = [{"scale": s, "val_loss": 0.7 - 0.01 * s} for s in (0.5, 1.0, 2.0)]
        return {"scale": scale, "lr": 1e-3 * scale, "head_lr": 1e-3, "grid": grid}

    top, middle, bottom = tuning_lines({"vera-r16": entry(2.0), "lora-r2": entry(1.0), "head": entry(0.5)})
    assert top.startswith("vera-r16: lr 0.002 (x2); validation loss by scale: x0.5 0.6950, x1 0.6900, x2 0.6800")
    assert top.endswith("at the top of the grid: a higher rate may do better")
    assert "grid" not in middle.split("scale:")[1] and bottom.endswith("a lower rate may do better")


def test_the_pair_line_says_when_matches_is_really_a_lead_or_a_small_lag():
    pair = {"vera": "vera-r256", "lora": "lora-r8", "metric": "accuracy", "seeds": [0, 1, 2], "param_ratio": 9.6,
            "verdict": "matches within 1 point"}
    lead = pair_line({**pair, "diff_mean": 3.8, "ci95": [1.7, 5.8]})
    assert lead == ("vera-r256 − lora-r8 = +3.8 points [+1.7, +5.8] (accuracy, 3 seeds; 9.6x fewer parameters): "
                    "matches within 1 point (vera-r256 ahead: the whole interval is above 0)")
    assert pair_line({**pair, "diff_mean": -0.5, "ci95": [-0.9, -0.1]}).endswith("slightly behind: the whole "
                                                                                  "interval is below 0)")
    assert pair_line({**pair, "diff_mean": 0.9, "ci95": [-0.8, 2.6]}).endswith("matches within 1 point")


def test_a_resume_with_another_grid_retrains_only_the_runs_whose_rate_changed(tokenizer, tmp_path):
    def run(scales):
        done = []
        _compare(tokenizer, tmp_path / "run", tune={"lr_scale": scales}, tune_steps=2, exists="resume"
                 if (tmp_path / "run").is_dir() else "refuse",
                 on_event=lambda e: done.append(e["run"]) if e["type"] == "run_done" else None)
        return done, {r["name"]: r["lr"] for r in load_run(tmp_path / "run")[0]["runs"]}

    first, rates = run([0.5])
    assert first == ["base", "head", "vera-r16", "lora-r4"]
    assert rates["vera-r16"] == pytest.approx(DEFAULT_LR["vera"][0] / 2)
    assert run([0.5])[0] == []  # the same grid: every finished run is kept
    again, rates = run([2.0])  # another grid chooses another rate: the trained runs run again at it
    assert again == ["head", "vera-r16", "lora-r4"]
    assert rates["vera-r16"] == pytest.approx(DEFAULT_LR["vera"][0] * 2)
    # A run recorded under another head rate (as the rule that scaled the head with the adapter did) is trained
    # again, so one comparison never mixes two head rates.
    path = tmp_path / "run" / "report.json"
    data = json.loads(path.read_text())
    data["runs"] = [{**r, "head_lr": DEFAULT_LR["head"][1]} if r["name"] == "lora-r4" else r for r in data["runs"]]
    path.write_text(json.dumps(data))
    assert run([2.0])[0] == ["lora-r4"]
    assert {r["head_lr"] for r in load_run(tmp_path / "run")[0]["runs"] if r["method"] != "base"} == {
        2 * DEFAULT_LR["head"][1]}
