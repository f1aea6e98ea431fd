"""The README's "Results at a glance": one row per headline number, each read from a benchmark's record and linked to
its page, written between two markers in README.md. No number in that table is typed by hand.

    python benchmarks/summary.py            # rewrite the table from the records
    python benchmarks/summary.py --check    # exit 1, showing the difference, when the README's table is out of date

Reads benchmarks/results/{quality,speed,memory,serve}.json. Units: training memory in MiB (2**20 bytes); adapters
held in MB (10**6 bytes) next to MiB, against serve.py's target in GB (10**9 bytes), so a number just over the target
never rounds to it; times as ratios of medians measured side by side in one run.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from harness import RESULTS, ROOT, SMOLLM2, TARGETS
from serve import TARGET_BANK, UNRECORDED, megabytes, run_headlines, run_ids

from vera_core.adapters.files import write_text
from vera_core.lab.report import pair_line

START, END = "<!-- summary:start -->", "<!-- summary:end -->"
RECORDS = ("quality", "speed", "memory", "serve")
TASKS = {"sst2": "SST-2", "rotten-tomatoes": "Rotten Tomatoes", "e2e": "E2E NLG"}
MODELS = {"minilm-l6": "all-MiniLM-L6-v2", SMOLLM2: "SmolLM2-135M-Instruct"}
GROUPS = {"qv": "query+value", "all": "every linear layer"}  # reproduce.py's target groups, the pairs' suffixes
PAGES = "benchmarks/results"  # links are relative to the README


def _link(page: str, date: str | None = None) -> str:
    return f"[{page}]({PAGES}/{page})" + (f", {date}" if date else "")


def _targets(targets) -> str:
    return "all 7 projections" if sorted(targets) == sorted(TARGETS) else ", ".join(targets)


def _x(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}x"


def quality_rows(quality: dict) -> list[tuple[str, str, str]]:
    """Trainable parameters on SmolLM2 (E2E's runs), then every VeRA - LoRA pair as recorded, with its interval and
    verdict."""
    rows = []
    e2e = {r["name"]: r for r in quality["tasks"].get("e2e", [])}
    for pair in quality.get("pairs", {}).get("e2e", [])[:1]:
        vera, lora = e2e[pair["vera"]], e2e[pair["lora"]]
        rows.append((f"Trainable parameters, {MODELS.get(vera['model'], vera['model'])}, {_targets(vera['targets'])}",
                     f"{pair['vera']} {vera['trainable_params']:,} vs {pair['lora']} {lora['trainable_params']:,}: "
                     f"{lora['trainable_params'] / vera['trainable_params']:.1f}x fewer", _link("reproduction.md")))
    for task, pairs in quality.get("pairs", {}).items():
        model = next((r["model"] for r in quality["tasks"].get(task, [])), None)
        for pair in pairs:
            group = GROUPS.get(pair["vera"].rsplit("-", 1)[-1], "")
            rows.append((f"Quality, {TASKS.get(task, task)} ({MODELS.get(model, model)}, {group}): VeRA − LoRA, "
                         "paired by seed and test row", pair_line(pair) + _before(quality, task, pair),
                         _link("quality.md")))
    return rows + sensitivity_rows(quality)


def _before(quality: dict, task: str, pair: dict) -> str:
    """The same pair in the record this one replaced (reproduce.py --previous), when it differs: what a reader of the
    earlier README was told; quality.md's "what changed" section has the rest."""
    old = next((p for p in (quality.get("previous") or {}).get("pairs", {}).get(task, [])
                if (p["vera"], p["lora"]) == (pair["vera"], pair["lora"])), None)
    if old is None or (old["diff_mean"], old["ci95"], old["seeds"]) == (pair["diff_mean"], pair["ci95"], pair["seeds"]):
        return ""
    heads = {old.get("vera_head_lr"), old.get("lora_head_lr")} - {None}
    return (f"; the previous record: {old['diff_mean']:+.1f} [{old['ci95'][0]:+.1f}, {old['ci95'][1]:+.1f}], "
            f"{len(old['seeds'])} seeds{', heads at two rates' if len(heads) > 1 else ''}")


def sensitivity_rows(quality: dict) -> list[tuple[str, str, str]]:
    """Per task whose grid points were scored on the test split (reproduce.py's SCORE_TUNING): the test metric at
    each grid rate of each tuned adapter setting, the chosen rate starred: how much a copied rate can cost."""
    rows = []
    for task, task_rows in quality["tasks"].items():
        scored = [r for r in task_rows if r.get("lr_grid") and r.get("tuned_lr")
                  and all("test" in p for p in r["lr_grid"]) and r.get("method") in ("vera", "lora")]
        if not scored:
            continue
        metric = scored[0]["metric_name"]
        text = "; ".join(f"{r['name']}: " + ", ".join(
            f"{p['lr']:.2g}{'*' if p['lr'] == r['tuned_lr'] else ''} "
            + (f"{p['test'][metric]:.1f}" if p["test"].get(metric) is not None else "-") for p in r["lr_grid"])
            for r in scored)
        rows.append((f"Rate sensitivity, {TASKS.get(task, task)}: test {metric} at each rate of the tuning grid "
                     "(first seed, full budget; * chosen on validation loss)", text, _link("quality.md")))
    return rows


def speed_rows(speed: dict) -> list[tuple[str, str, str]]:
    ratios, link = speed["summary"]["ratios"], _link("speed.md", speed.get("date"))
    step = "; ".join(f"{tokens}: r=256 {_x(ratios.get(f'vera_r256{suffix}_step_ours_over_peft'))}, r=1024 "
                     f"{_x(ratios.get(f'vera_r1024{suffix}_step_ours_over_peft'))}"
                     for tokens, suffix in (("4 x 128 tokens", ""), ("4 x 512", "_seq512")))
    return [("Training step time, our VeRA ÷ PEFT's VeRA (SmolLM2, all 7 projections, medians)", step, link),
            ("Inference latency ÷ the base model (SmolLM2, VeRA r=256)",
             f"merged {_x(ratios.get('merged_over_base_latency'))}; unmerged: ours "
             f"{_x(ratios.get('ours_unmerged_over_base_latency'))}, PEFT "
             f"{_x(ratios.get('peft_unmerged_over_base_latency'))}", link)]


def _memory_row(rows: list[dict], method: str, r: int) -> dict | None:
    """The SmolLM2 all-linear 4 x 128 fp32 row (no checkpointing, no quantization) of one method and rank."""
    return next((row for row in rows if row["model"] == SMOLLM2 and row["method"] == method and row["r"] == r
                 and row["targets"] == "all-linear" and (row["batch_size"], row["seq_len"]) == (4, 128)
                 and row["dtype"] == "float32" and not row["grad_checkpointing"] and not row["quantization"]), None)


def _keeping(vera: dict, lora_bytes: int) -> str:
    """What VeRA would hold keeping its folded weights for backward (prefer="speed"), where the row records it."""
    folds = vera.get("fold_estimates")
    if not folds or folds["keep"] == vera["measured_peak_bytes"]:
        return ""
    return (f" (keeping its folded weights for backward, prefer=\"speed\": {folds['keep'] / 2**20:,.1f} MiB estimated, "
            f"{folds['keep'] / lora_bytes:.2f}x)")


def _profiler(rows: list[dict]) -> str:
    """The tracker's largest difference from the profiler's peak, over the rows that have one."""
    profiled = [row for row in rows if row.get("profiler_peak_bytes")]
    if not profiled:
        return "; profiler: not measured"
    differences = [row["measured_peak_bytes"] / row["profiler_peak_bytes"] - 1 for row in profiled]
    models, methods = (sorted({row[k] for row in profiled}) for k in ("model", "method"))
    return (f"; tracker vs profiler: largest difference {100 * max(differences, key=abs):+.2f}% over {len(profiled)} "
            f"configurations ({', '.join(models)}; {', '.join(methods)})")


def memory_rows(memory: dict) -> list[tuple[str, str, str]]:
    link, out = _link("memory.md", memory.get("date")), []
    vera, lora = _memory_row(memory["rows"], "vera", 256), _memory_row(memory["rows"], "lora", 8)
    if vera and lora:
        v, lo = vera["measured_peak_bytes"], lora["measured_peak_bytes"]
        out.append(("Training peak memory, measured (tensor tracker; SmolLM2, all linear layers, 4 x 128, fp32, "
                    "the library's default fold policy)",
                    f"VeRA r=256 {v / 2**20:,.1f} MiB, LoRA r=8 {lo / 2**20:,.1f} MiB: VeRA {v / lo:.2f}x LoRA's"
                    + _keeping(vera, lo), link))
    faked = [row for row in memory["rows"] if row["estimate_kind"] == "fake step"]
    if faked:
        errors = [row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1 for row in faked]
        worst = max(errors, key=abs)
        out.append(("Memory estimate (one step on fake tensors) against the measured peak; the tracker against "
                    "torch.profiler's allocator events (whole-run peak, weights included)",
                    f"largest error {100 * worst:+.2f}% over {len(faked)} configurations" + _profiler(memory["rows"]),
                    link))
    return out


def _serve_runs(serve: dict) -> str:
    """Which run(s) the serving headline comes from: a ratio of rows from different runs carries the drift between
    them, so a mixed record says so and adds each run's own ratios where one run measured both sides."""
    runs = run_ids(serve)
    if runs == {UNRECORDED}:
        return ""
    if len(runs) == 1:
        threads = serve.get("runs", {}).get(next(iter(runs)), {}).get("omp_num_threads")
        return " (one run" + (f", OMP_NUM_THREADS={threads})" if threads else ")")
    lora, vera = "ours-vera K=64 / peft-lora K=64", "ours-vera K=64 / peft-vera-grouped K=64"
    within = [f"; within run {run} alone: {_x(values[lora])} and {_x(values[vera])}"
              for run, values in sorted(run_headlines(serve).items()) if lora in values and vera in values]
    return f" (mixed record: rows from {len(runs)} runs, marked in serve.md{''.join(within)})"


def serve_rows(serve: dict) -> list[tuple[str, str, str]]:
    tps = {(row["impl"], row["K"]): row["tokens_per_s"] for row in serve["rows"]}
    ours = tps.get(("ours-vera", 64))
    link = _link("serve.md", serve.get("date"))

    def over(impl: str) -> str:
        theirs = tps.get((impl, 64))
        return _x(ours / theirs if ours and theirs else None)

    measured = _serve_runs(serve)
    out = [(f"Serving 64 adapters in one batch (SmolLM2, {serve['settings']['prompts']} prompts x "
            f"{serve['settings']['tokens']} new tokens, {serve['mode']} mode): our VeRA's tokens/s ÷",
            f"PEFT LoRA's mixed batch {over('peft-lora')}; PEFT VeRA, grouped by adapter {over('peft-vera-grouped')}"
            f"{measured}", link)]
    bank = serve.get("bank_1000_bytes", {})
    if "vera" in bank:
        vera, lora, over = bank["vera"], bank["lora"], bank["vera"] / TARGET_BANK - 1
        target = f"missed by {100 * over:.1f}%" if over > 0 else f"met, {-100 * over:.1f}% under"
        out.append(("Memory held by 1,000 adapters on one base (SmolLM2, all 7 projections)",
                    f"VeRA r=256 {megabytes(vera)}, measured (RSS); target {TARGET_BANK / 1e9:g} GB (10^9 bytes): "
                    f"{target}. LoRA r=8 {megabytes(lora)}, computed from its shapes", link))
    return out


def table(records: dict[str, dict]) -> str:
    rows = (quality_rows(records["quality"]) + speed_rows(records["speed"]) + memory_rows(records["memory"])
            + serve_rows(records["serve"]))
    devices = [f"{name}: {records[name].get(key)}" for name, key in (("speed", "machine"), ("memory", "device"),
                                                                      ("serve", "device"))]
    devices.append("quality: " + ", ".join(sorted({row.get("device") or "?" for rows_ in
                                                   records["quality"]["tasks"].values() for row in rows_})))
    lines = ["| what | headline (from the record) | record |", "|---|---|---|"]
    lines += [f"| {what} | {headline} | {link} |" for what, headline, link in rows]
    lines += ["", "Measured on " + "; ".join(devices) + ". Written by `python benchmarks/summary.py` from the "
              "records; intervals are 95%, verdicts as the records state them."]
    return "\n".join(lines)


def load_records(results: Path) -> dict[str, dict]:
    return {name: json.loads((results / f"{name}.json").read_text()) for name in RECORDS}


def with_table(readme: str, text: str) -> str:
    """The README with `text` between the markers; a README without both markers is refused."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(f"error: the README needs one {START} line followed by one {END} line around the table")
    head, rest = readme.split(START)
    return f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when the README's table differs")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder holding the four records")
    args = parser.parse_args(argv)
    old = args.readme.read_text()
    new = with_table(old, table(load_records(args.results)))
    if not args.check:
        if new != old:
            write_text(args.readme, new)
        print(f"{args.readme}: results table {'rewritten' if new != old else 'already up to date'}")
        return 0
    if new == old:
        return 0
    diff = difflib.unified_diff(old.splitlines(), new.splitlines(), "README.md", "from the records", lineterm="", n=0)
    print(f"{args.readme}: the results table differs from the records; run python benchmarks/summary.py\n"
          + "\n".join(diff))
    return 1


if __name__ == "__main__":
    sys.exit(main())
