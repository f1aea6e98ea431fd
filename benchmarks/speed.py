"""Speed and memory of our VeRA against PEFT's, on SmolLM2-135M, each configuration in its own process.

    python benchmarks/speed.py --quick      # headline ratios, ≤ 15 min on a 2-core CPU
    python benchmarks/speed.py              # + r and sequence-length sweeps, adapter load, cold model load
    python benchmarks/speed.py --sweep      # only the sweeps, added to the results already in speed.json
    python benchmarks/speed.py --policy --beside "what else ran"   # VeRA's fold policy: the default vs the old one
    python benchmarks/speed.py --policy --quick    # the same at 4 x 128 only, two repeats

Results go to benchmarks/results/speed.json (resumable: configurations already there are skipped; --fresh
starts over), speed.md and PNG plots. Peak memory is the child's `resource.getrusage(RUSAGE_SELF).ru_maxrss`
(peak RSS of the whole process, model load included). Repeats are interleaved so that load from other processes
on a shared machine hits every configuration alike; medians, min–max spread and ratios are reported.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time

from harness import (RESULTS, SMOLLM2, TARGETS, ChildFailed, command_line, machine, parse_or_serve, peak_rss_bytes,
                     run_child, smollm2_layers, smollm2_shapes, write_page)


# ---------------------------------------------------------------------------------------------- child process
def _model(device: str, dtype: str):
    import torch

    from vera_core.lab.models import load_model

    model, _ = load_model(SMOLLM2, dtype=dtype, device=device)
    return model.train(), torch


def _adapt(model, method: str, impl: str, r: int):
    """Attach the adapter; "frozen" gets a tiny trainable probe on the embeddings so backward still runs through
    every layer (the lower bound for any adapter)."""
    import peft
    import torch

    import vera_core

    if method == "frozen":
        model.requires_grad_(False)
        probe = torch.nn.Parameter(torch.ones(model.config.hidden_size, device=model.device))
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * probe)
        return model, [probe]
    if impl == "peft":
        cfg = (peft.VeraConfig(r=r, target_modules=TARGETS, d_initial=0.1) if method == "vera"
               else peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
        model = peft.get_peft_model(model, cfg)
    else:
        cfg = (vera_core.VeraConfig(r=r, target_modules=TARGETS) if method == "vera"
               else vera_core.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS))
        vera_core.add_adapter(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # b = 0 / lora_B = 0 at init: give the update a value so nothing is trivially zero
        for p in params:
            p.add_(0.01)
    return model, params


def old_default_keep(tokens: int, in_features: int, out_features: int, r: int) -> bool:
    """The fold policy "auto" had before it weighed memory: keep W' for backward wherever keeping it beats
    rebuilding it by FLOPs alone, 4·in·out > N·(in + out) (fused.keep_folded's signature, to stand in for it)."""
    return 4 * in_features * out_features > tokens * (in_features + out_features)


def child_train(cfg: dict) -> dict:
    import contextlib
    from unittest import mock

    from vera_core.adapters import fused

    model, torch = _model(cfg["device"], cfg["dtype"])
    model, params = _adapt(model, cfg["method"], cfg["impl"], cfg["r"])
    # "ours" folds with the library's default (rebuild W' in backward since 2026-12-05; the 2026-11-26 rows kept it
    # at 4 x 128); "ours-rebuild" always rebuilds; "ours-old-default" decides as "auto" did before 2026-12-05
    # (old_default_keep).
    old = (mock.patch.object(fused, "keep_folded", old_default_keep) if cfg["impl"] == "ours-old-default"
           else contextlib.nullcontext())
    policy = {"ours-rebuild": "rebuild", "ours-old-default": "auto"}.get(cfg["impl"], fused.FOLDED_BACKWARD[0])
    with old, fused.fast_vera(True, policy):
        return _train_loop(model, params, cfg, torch)


def _train_loop(model, params, cfg: dict, torch) -> dict:
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (cfg["batch"], cfg["seq"]), generator=g).to(model.device)
    times = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - start)
    out = {"step_s": times, "peak_rss_mb": peak_rss_bytes() / 2**20}  # MiB; the key keeps its name so records stay comparable
    if cfg["device"] == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_infer(cfg: dict) -> dict:
    """Forward latency (no grad) of the base, our unmerged VeRA, our merged VeRA and PEFT's unmerged VeRA."""
    import copy

    import peft

    import vera_core

    base, torch = _model(cfg["device"], cfg["dtype"])
    base.eval()
    ours = vera_core.add_adapter(copy.deepcopy(base), vera_core.VeraConfig(r=cfg["r"], target_modules=TARGETS))
    merged = vera_core.merge_adapter(copy.deepcopy(ours))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=cfg["r"], target_modules=TARGETS)).eval()
    ids = torch.randint(0, base.config.vocab_size, (cfg["batch"], cfg["seq"]), generator=torch.Generator().manual_seed(0))
    models = {"base": base, "ours_unmerged": ours, "ours_merged": merged, "peft_unmerged": theirs}
    times = {k: [] for k in models}
    with torch.inference_mode():
        for rep in range(1 + cfg["steps"]):  # interleaved; the first round is warm-up
            for name, m in models.items():
                start = time.perf_counter()
                m(input_ids=ids)
                if rep:
                    times[name].append(time.perf_counter() - start)
    return {"latency_s": times}


def child_load(cfg: dict) -> dict:
    """Adapter load (regenerate A and B, check the fingerprint, copy b and d) and cached vs cold model load."""
    import vera_core
    from vera_core.lab.models import load_model

    out = {}
    start = time.perf_counter()
    model, _ = load_model(SMOLLM2)
    out["model_load_cached_s"] = time.perf_counter() - start
    vera_core.add_adapter(model, vera_core.VeraConfig(r=cfg["r"], target_modules=TARGETS))
    with tempfile.TemporaryDirectory() as tmp:
        vera_core.save_adapter(model, tmp)
        base = vera_core.remove_adapter(model)
        loads = []
        for _ in range(cfg["steps"]):
            start = time.perf_counter()
            vera_core.load_adapter(base, tmp)
            loads.append(time.perf_counter() - start)
            vera_core.remove_adapter(base)
        out["adapter_load_s"] = loads
    if cfg.get("cold"):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["VERA_LAB_CACHE"] = cache  # an empty cache: the GGUF is converted again
            start = time.perf_counter()
            load_model(SMOLLM2)
            out["model_load_cold_s"] = time.perf_counter() - start
    return out


CHILDREN = {"train": child_train, "infer": child_infer, "load": child_load}


# ---------------------------------------------------------------------------------------------- parent
def key(cfg: dict) -> str:
    return "|".join(f"{k}={cfg[k]}" for k in sorted(cfg) if k != "repeat") + f"|repeat={cfg['repeat']}"


def configs(quick: bool, device: str, sweep_only: bool = False) -> list[dict]:
    gpu = device == "cuda"
    common = {"device": device, "dtype": "bfloat16" if gpu else "float32", "batch": 16 if gpu else 4, "seq": 128,
              "warmup": 1, "steps": 3 if quick else 5}
    train = [("frozen", "none", 0), ("vera", "ours", 256), ("vera", "ours-rebuild", 256), ("vera", "peft", 256),
             ("vera", "ours", 1024), ("vera", "ours-rebuild", 1024), ("vera", "peft", 1024), ("lora", "ours", 8),
             ("lora", "peft", 8)]
    if not quick:
        train += [("lora", "ours", 64), ("lora", "peft", 64)]

    def train_run(method: str, impl: str, r: int, repeat: int = 0, **override) -> dict:
        return {"kind": "train", "method": method, "impl": impl, "r": r, "repeat": repeat, **common, **override}

    frozen = ("frozen", "none", 0)
    # Step time and memory against r and sequence length, ours vs PEFT, one repeat each (the FLOP line is drawn
    # through these points in speed_vs_r.png).
    sweep = [train_run("vera", impl, r) for r in (16, 64, 512, 2048) for impl in ("ours", "peft")]
    sweep += [train_run(*run, seq=32) for run in (("vera", "ours", 256), ("vera", "peft", 256), frozen)]
    if sweep_only:
        return sweep
    out = [train_run(*run, repeat=repeat) for repeat in range(2 if quick else 3) for run in train]  # interleaved
    # Longer sequences (4 x 512 tokens): the folded path's W' costs the same per step while the per-token work grows
    # 4x, and "auto" switches to rebuilding W'. One repeat of two steps keeps --quick within its budget.
    out += [train_run(*run, seq=512, steps=2) for run in (frozen, ("vera", "ours", 256), ("vera", "peft", 256),
                                                          ("vera", "ours", 1024), ("vera", "peft", 1024))]
    out.append({"kind": "infer", "r": 256, "repeat": 0, **common, "steps": 5})
    out.append({"kind": "load", "r": 256, "repeat": 0, "steps": 5, "cold": not quick})
    return out if quick else out + sweep


# (seq, r, repeats, steps) at 4 x seq tokens, sized to ~15 min on the 2-core CPU at one thread. Only 4 x 128 r=256
# has the policies choose differently (layers_keeping); 4 x 512 shows the measurement's noise.
POLICY_GROUPS = ((128, 256, 4, 3), (512, 256, 1, 1))
POLICY_QUICK = ((128, 256, 2, 3),)  # --policy --quick: the one size where the policies differ, two repeats


def policy_configs(groups=POLICY_GROUPS) -> list[dict]:
    """VeRA's default fold policy against the old one, on CPU (`groups`, POLICY_GROUPS by default):
    repeats interleaved, the order within each pair alternating so that neither side always runs first."""
    out = []
    for repeat in range(max(g[2] for g in groups)):
        for seq, r, repeats, steps in groups:
            if repeat < repeats:
                pair = ("ours", "ours-old-default")[::1 if repeat % 2 == 0 else -1]
                out += [{"kind": "train", "method": "vera", "impl": impl, "r": r, "repeat": repeat, "device": "cpu",
                         "dtype": "float32", "batch": 4, "seq": seq, "warmup": 1, "steps": steps} for impl in pair]
    return out


def layers_keeping(seq: int, r: int) -> dict:
    """How many of SmolLM2's folded layers keep W' for backward at 4 x seq tokens under each policy."""
    from vera_core.adapters.fused import keep_folded

    tokens, shapes = 4 * seq, smollm2_shapes().values()
    folded = [(i, o) for i, o in shapes if tokens * (i + o) > i * o]  # the layers that fold (fused.foldable)
    new = sum(keep_folded(tokens, i, o, r) for i, o in folded)
    old = sum(old_default_keep(tokens, i, o, r) for i, o in folded)
    return {"default": new * smollm2_layers(), "old_default": old * smollm2_layers(),
            "folded": len(folded) * smollm2_layers()}


def summarise_policy(policy: dict) -> dict:
    """Per (seq, r): median step of the default and of the old default over all their steps and repeats, and the
    ratio default / old paired by repeat (the two runs of a repeat are adjacent in time, so they share the machine's
    load): its median and range over the repeats."""
    out = {}
    for seq, r, _, _ in POLICY_GROUPS:
        runs = [res for res in policy["results"].values() if "error" not in res
                and (res["config"]["seq"], res["config"]["r"]) == (seq, r)]
        steps = {impl: [t for res in runs if res["config"]["impl"] == impl for t in res["step_s"]]
                 for impl in ("ours", "ours-old-default")}
        by_repeat = {}
        for res in runs:
            by_repeat.setdefault(res["config"]["repeat"], {})[res["config"]["impl"]] = statistics.median(res["step_s"])
        paired = [p["ours"] / p["ours-old-default"] for p in by_repeat.values() if len(p) == 2]
        if paired:
            out[f"r{r}_seq{seq}"] = {"seq": seq, "r": r, "default_median_s": statistics.median(steps["ours"]),
                                     "old_default_median_s": statistics.median(steps["ours-old-default"]),
                                     "ratio": statistics.median(paired), "ratio_range": [min(paired), max(paired)],
                                     "repeats": len(paired), "steps": {k: len(v) for k, v in steps.items()},
                                     "layers_keeping": layers_keeping(seq, r)}
    return out


def run_policy(data: dict, beside: str, groups=POLICY_GROUPS) -> None:
    """Measure policy_configs into data["fold_policy"][<threads>] (always afresh: the ratios must come from one
    run); one record per thread count, as the two policies' costs scale differently with threads."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    policy = data.setdefault("fold_policy", {})[threads] = {
        "date": datetime.date.today().isoformat(), "machine": machine(torch, "cpu"), "threads": threads,
        "beside": beside, "load_avg_start": [round(x, 2) for x in os.getloadavg()], "results": {}}
    for cfg in policy_configs(groups):
        print(f"running {key(cfg)}", flush=True)
        load_1m = round(os.getloadavg()[0], 2)
        policy["results"][key(cfg)] = {"config": cfg, "load_1m_at_start": load_1m, **measure(cfg)}
        policy["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        policy["summary"] = summarise_policy(policy)
        write_report(data)  # a run cut short keeps what it measured


def policy_lines(policy: dict) -> list[str]:
    """speed.md's section on the fold policy at one thread count, from data["fold_policy"]."""
    lines = ["", f"## VeRA's default fold policy against the old default (CPU, {policy['threads']} thread(s))", "",
             f"Date: {policy['date']}. Machine: {policy['machine']}, OMP_NUM_THREADS={policy['threads']}. Load "
             f"average (1, 5, 15 min) at start {policy['load_avg_start']}, at end {policy.get('load_avg_end')}. Ran "
             f"beside: {policy['beside']}. Command: `OMP_NUM_THREADS={policy['threads']} python benchmarks/speed.py "
             "--policy`. Each configuration in its own process, repeats interleaved (the order within a pair "
             "alternating). "
             "Default: rebuild W' in backward (`fast_vera`'s and `prefer=\"memory\"`'s); old default: keep W' "
             "wherever 4·in·out > N·(in + out).", "",
             "| B x T | r | layers keeping W': default / old | default median step (s) | old default (s) | steps | "
             "default / old, paired by repeat: median [range] | repeats |", "|---|---|---|---|---|---|---|---|"]
    for row in policy["summary"].values():
        keeping, (low, high) = row["layers_keeping"], row["ratio_range"]
        lines.append(f"| 4 x {row['seq']} | {row['r']} | {keeping['default']} / {keeping['old_default']} of "
                     f"{keeping['folded']} | {row['default_median_s']:.2f} | {row['old_default_median_s']:.2f} | "
                     f"{row['steps']['ours']} + {row['steps']['ours-old-default']} | {row['ratio']:.3f} "
                     f"[{low:.3f}–{high:.3f}] | {row['repeats']} |")
    r256 = policy["summary"].get("r256_seq128")
    if r256:
        verdict = "within" if r256["ratio"] <= 1.03 else "over"
        lines += ["", f"At r=256, 4 x 128 the default's step is {100 * (r256['ratio'] - 1):+.1f}% against the old "
                  f"default's: {verdict} the 3% allowed."]
    same = [row for row in policy["summary"].values()
            if row["layers_keeping"]["default"] == row["layers_keeping"]["old_default"]]
    if same:
        lines += ["", "Both policies make the same choice for every layer at " + ", ".join(
            f"4 x {row['seq']} r={row['r']}" for row in same) + ": the ratio there (" + ", ".join(
            f"{row['ratio']:.3f}" for row in same) + ") is the measurement's noise."]
    return lines


def measure(cfg: dict) -> dict:
    """One configuration's result in its own process; a failure is recorded (and retried on the next run)."""
    try:
        return run_child(__file__, cfg)[-1]
    except ChildFailed as err:
        return {"error": err.tail}


def adapter_flops(r: int, tokens: int, method: str) -> float:
    """Forward + backward FLOPs of the adapter path of PEFT's formula, summed over SmolLM2's adapted layers."""
    per_layer = sum(4 * tokens * r * (i + o) for i, o in smollm2_shapes().values())
    return smollm2_layers() * per_layer if method != "frozen" else 0.0


def summarise(results: dict) -> dict:
    """Medians over steps and repeats per configuration, and the headline ratios."""
    groups: dict[str, dict] = {}
    for cfg_key, res in results.items():
        cfg = res["config"]
        if cfg["kind"] != "train" or "error" in res:
            continue
        name = f"{cfg['method']}|{cfg['impl']}|r={cfg['r']}|seq={cfg['seq']}"
        g = groups.setdefault(name, {"config": cfg, "steps": [], "rss": []})
        g["steps"] += res["step_s"]
        g["rss"].append(res["peak_rss_mb"])
    table = {n: {"median_step_s": statistics.median(g["steps"]), "min_step_s": min(g["steps"]),
                 "max_step_s": max(g["steps"]), "peak_rss_mb": statistics.median(g["rss"]), "n": len(g["steps"]),
                 **{k: g["config"][k] for k in ("method", "impl", "r", "seq")}} for n, g in groups.items()}
    ratios = {}
    for seq, r, impl in ((128, 256, "ours"), (128, 1024, "ours"), (128, 256, "ours-rebuild"),
                         (128, 1024, "ours-rebuild"), (512, 256, "ours"), (512, 1024, "ours"),
                         *((128, r, "ours") for r in (16, 64, 512, 2048))):
        frozen = table.get(f"frozen|none|r=0|seq={seq}")
        ours, theirs = table.get(f"vera|{impl}|r={r}|seq={seq}"), table.get(f"vera|peft|r={r}|seq={seq}")
        name = f"vera_r{r}" + ("_rebuild" if impl == "ours-rebuild" else "") + ("_seq512" if seq == 512 else "")
        if ours and theirs:
            ratios[f"{name}_step_ours_over_peft"] = ours["median_step_s"] / theirs["median_step_s"]
            ratios[f"{name}_rss_ours_over_peft"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
            if frozen and theirs["peak_rss_mb"] > frozen["peak_rss_mb"]:
                ratios[f"{name}_rss_overhead_ours_over_peft"] = (
                    (ours["peak_rss_mb"] - frozen["peak_rss_mb"]) / (theirs["peak_rss_mb"] - frozen["peak_rss_mb"]))
    for r in (8, 64):
        ours, theirs = table.get(f"lora|ours|r={r}|seq=128"), table.get(f"lora|peft|r={r}|seq=128")
        if ours and theirs:
            ratios[f"lora_r{r}_step_ours_over_peft"] = ours["median_step_s"] / theirs["median_step_s"]
    for res in results.values():
        if res["config"]["kind"] == "infer" and "error" not in res:
            lat = {k: statistics.median(v) for k, v in res["latency_s"].items()}
            ratios["merged_over_base_latency"] = lat["ours_merged"] / lat["base"]
            ratios["ours_unmerged_over_base_latency"] = lat["ours_unmerged"] / lat["base"]
            ratios["peft_unmerged_over_base_latency"] = lat["peft_unmerged"] / lat["base"]
        if res["config"]["kind"] == "load" and "error" not in res:
            ratios["adapter_load_median_s"] = statistics.median(res["adapter_load_s"])
            ratios["model_load_cached_s"] = res["model_load_cached_s"]
            if "model_load_cold_s" in res:
                ratios["model_load_cold_s"] = res["model_load_cold_s"]
    return {"table": table, "ratios": ratios}


def write_report(data: dict) -> None:
    summary = summarise(data["results"])
    data["summary"] = summary
    (RESULTS / "speed.json").write_text(json.dumps(data, indent=1))
    lines = ["# Speed and memory: our VeRA vs PEFT (SmolLM2-135M, all 7 projections)", "",
             f"Machine: {data['machine']}. Date: {data['date']}. Mode: {data['mode']}. "
             "Peak memory: child-process `ru_maxrss` (peak RSS, model load included).", "",
             "| method | impl | r | seq | median step (s) | min–max (s) | steps | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(summary["table"].values(), key=lambda t: (t["seq"], t["method"], t["r"], t["impl"])):
        lines.append(f"| {row['method']} | {row['impl']} | {row['r']} | {row['seq']} | {row['median_step_s']:.2f} | "
                     f"{row['min_step_s']:.2f}–{row['max_step_s']:.2f} | {row['n']} | {row['peak_rss_mb']:.0f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in summary["ratios"].items()]
    for policy in data.get("fold_policy", {}).values():
        lines += policy_lines(policy)
    write_page(RESULTS / "speed.md", "\n".join(lines) + "\n")
    plot(summary)


def plot(summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [t for t in summary["table"].values() if t["seq"] == 128]
    rows.sort(key=lambda t: (t["method"], t["r"], t["impl"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{t['method']} {t['impl']} r={t['r']}" for t in rows]
    axes[0].barh(labels, [t["median_step_s"] for t in rows],
                 xerr=[[t["median_step_s"] - t["min_step_s"] for t in rows],
                       [t["max_step_s"] - t["median_step_s"] for t in rows]])
    axes[0].set_xlabel("training step (s), median and min–max")
    axes[1].barh(labels, [t["peak_rss_mb"] for t in rows])
    axes[1].set_xlabel("peak RSS (MiB)")
    fig.tight_layout()
    fig.savefig(RESULTS / "speed_step_memory.png", dpi=100)
    plt.close(fig)
    sweep = [t for t in summary["table"].values() if t["method"] == "vera" and t["seq"] == 128]
    if len({t["r"] for t in sweep}) > 2:
        fig, ax = plt.subplots(figsize=(6, 4))
        frozen = summary["table"].get("frozen|none|r=0|seq=128")
        for impl in ("ours", "peft"):
            pts = sorted((t["r"], t["median_step_s"]) for t in sweep if t["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        if frozen:
            peft_pts = sorted((t["r"], t["median_step_s"]) for t in sweep if t["impl"] == "peft")
            # The FLOP-count line: frozen time plus PEFT's adapter FLOPs at the rate PEFT reached at its largest r.
            r_max, t_max = peft_pts[-1]
            rate = adapter_flops(r_max, 512, "vera") / (t_max - frozen["median_step_s"])
            rs = [p[0] for p in peft_pts]
            ax.plot(rs, [frozen["median_step_s"] + adapter_flops(r, 512, "vera") / rate for r in rs], "k--",
                    label="FLOP count (PEFT formula)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("r")
        ax.set_ylabel("training step (s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "speed_vs_r.png", dpi=100)
        plt.close(fig)


def main() -> None:
    parser = command_line(__doc__, "speed.json")
    parser.add_argument("--quick", action="store_true", help="headline ratios only (≤ 15 min on CPU)")
    parser.add_argument("--sweep", action="store_true",
                        help="only the r (16 ... 2048) and sequence-length sweep, added to the results already there")
    parser.add_argument("--policy", action="store_true",
                        help="only VeRA's default fold policy against the old one (CPU, ~15 min at one thread), "
                             "recorded in its own section")
    parser.add_argument("--beside", default="not recorded", help="with --policy: what else ran on the machine")
    args = parse_or_serve(parser, lambda cfg: CHILDREN[cfg["kind"]](cfg))
    if args is None:
        return
    if args.policy:
        path = RESULTS / "speed.json"
        data = json.loads(path.read_text())
        run_policy(data, args.beside, POLICY_QUICK if args.quick else POLICY_GROUPS)
        print("\n".join(line for policy in data["fold_policy"].values() for line in policy_lines(policy)))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "speed.json"
    data = json.loads(path.read_text()) if path.exists() and not args.fresh else {"results": {}}
    mode = "quick" if args.quick else "full"
    if args.sweep:
        mode = data.get("mode", "none").removesuffix(" + r/seq sweep") + " + r/seq sweep"
    data.update(machine=machine(torch, device), mode=mode, date=datetime.date.today().isoformat())
    for cfg in configs(args.quick, device, sweep_only=args.sweep):
        k = key(cfg)
        if k in data["results"] and "error" not in data["results"][k]:
            continue  # resumable
        print(f"running {k}", flush=True)
        data["results"][k] = {"config": cfg, **measure(cfg)}
        write_report(data)
    write_report(data)
    print((RESULTS / "speed.md").read_text())


if __name__ == "__main__":
    main()
