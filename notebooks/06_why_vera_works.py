# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Why VeRA works: what b and d do, why random directions suffice, the paper's ablations
#
# **Question:** VeRA trains only two vectors per layer around frozen *random* matrices. Why does that work at all, and
# which part matters — both vectors, their initialization, the random matrices' distribution, sharing them?
#
# Set-up: all-MiniLM-L6-v2 on Rotten Tomatoes, query and value adapted. Four parts: (1) what each vector does, on a
# real layer's tensors; (2) how well r random directions with VeRA's two vectors reconstruct the ΔW a LoRA adapter
# learned, trained here live; (3) three variants trained live (default, only d, only b); (4) the recorded ablation
# study (`benchmarks/ablations.py`: eight variants x 5 seeds, the rank sweep, the per-layer picture) beside the
# paper's numbers.
#
# **Time:** full mode takes 10 min on this 2-core CPU (measured with other work running beside it); quick mode
# (`VERA_LAB_QUICK=1`, CI) about a minute.
#
# The paper (Kopiczko et al., ICLR 2024, Tables 6-7): dropping either vector hurts, d_init = 1.0 and a uniform
# [0, 0.1] initialization of the random matrices hurt badly, Kaiming normal and unique matrices per layer change
# little. The conclusions below are printed from this notebook's own numbers, with what they can and cannot tell.

# %%
# %matplotlib inline
from lab_setup import setup

QUICK = setup()  # offline defaults, quiet transformers; prints the mode (quick when VERA_LAB_QUICK=1)

# %%
import copy
import json
import time
from pathlib import Path
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Image, display
from torch import nn
from vera_core import LoraConfig, TrainConfig, VeraConfig, add_adapter, evaluate, load_dataset, load_model, train
from vera_core.adapters.inject import adapter_layers
from vera_core.adapters.projections import generate_projections

START = time.perf_counter()
torch.manual_seed(0)
RECORD = Path("../benchmarks/results/ablations.json")  # benchmarks/ablations.py's record, read in part 4
if QUICK:   # CI: every part runs for real, with tiny budgets
    BUDGET = dict(max_rows=48, lora_steps=4, steps=3, batch_size=8, max_length=48, seeds=[0], ranks=[4, 64],
                  fit_layers=2, fit_iters=5)
else:       # full: LoRA 120 steps, each variant 2 seeds x 80 steps; every query and value layer fitted
    BUDGET = dict(max_rows=600, lora_steps=120, steps=80, batch_size=16, max_length=64, seeds=[0, 1],
                  ranks=[1, 4, 16, 64, 256, 1024], fit_layers=None, fit_iters=10)
BUDGET

# %% [markdown]
# ## 1. What each vector does
#
# One VeRA layer computes h = W0 x + Λ_b B Λ_d A x: A (r × in) and B (out × r) are frozen random matrices, d (r) and
# b (out) train. So ΔW = Λ_b B Λ_d A = Σ_k d_k · (b ⊙ B[:, k]) A[k, :]: **d_k turns the k-th random direction (a
# rank-1 matrix) up or down, b_i scales output row i of the whole update.** Below, on a real layer built by
# `add_adapter`: setting one d_k leaves exactly that direction; setting one b_i scales exactly row i.

# %%
layer_model = add_adapter(nn.Sequential(nn.Linear(6, 5)), VeraConfig(r=3, target_modules=["0"], d_init=0.1))
(_, layer), = adapter_layers(layer_model)
A_s, B_s = layer.slices  # (3, 6), (5, 3): the frozen random pair
b, d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
print(f"at the start: b = {b.tolist()} (ΔW = 0: the model starts unchanged), d = {d.tolist()}")
with torch.no_grad():
    b.fill_(1.0)
    d.copy_(torch.tensor([0.0, 2.0, 0.0]))  # only direction k=1, doubled
    one_direction = 2.0 * torch.outer(B_s[:, 1], A_s[1, :])  # (5, 6): rank 1
    assert torch.allclose(layer.delta_weight("default"), one_direction, atol=1e-6)
    print("d = [0, 2, 0], b = 1:  ΔW == 2 · B[:, 1] A[1, :]  (rank",
          int(torch.linalg.matrix_rank(layer.delta_weight("default"))), ")")
    before = layer.delta_weight("default").clone()
    b[3] = -0.5
    after = layer.delta_weight("default")
    assert torch.allclose(after[3], -0.5 * before[3], atol=1e-6) and torch.equal(after[:3], before[:3])
    print("b[3] = -0.5:           row 3 of ΔW is -0.5 x what it was, every other row unchanged")
    d.copy_(torch.tensor([0.3, -1.0, 0.7]))
    print("d = [0.3, -1, 0.7]:    ΔW's rank", int(torch.linalg.matrix_rank(layer.delta_weight("default"))),
          f"(at most r = 3) from {b.numel() + d.numel()} trained numbers; a dense ΔW has {A_s.shape[1] * B_s.shape[0]}")

# %% [markdown]
# ## 2. Why random directions suffice
#
# Train a small LoRA adapter (r = 8, query and value) live, take its ΔW in every adapted layer, and ask: with r random
# directions A, B (drawn as VeRA draws them), how close can VeRA's form Λ_b B Λ_d A get to that ΔW? The fit below is
# alternating least squares, exact at each step: for fixed d, each b_i is a one-number least squares on row i; for
# fixed b, d solves an r-unknown linear least squares (its normal equations are (Bᵀ Λ_b² B) ∘ (A Aᵀ) d = diag(Bᵀ Λ_b
# ΔW Aᵀ)). The error can only fall from step to step, but the fit may stop at a local optimum, so it is an upper bound
# on the best VeRA error. Beside it: the best any rank-r matrix can do (the truncated SVD), and the trainable numbers
# each needs per layer (VeRA out + r, a rank-r factorization r · (in + out)).

# %%
model, tokenizer = load_model("minilm-l6", "classification")
data = load_dataset("rotten-tomatoes", max_rows=BUDGET["max_rows"], seed=0)
print(f"Rotten Tomatoes: train {len(data.train)}, validation {len(data.validation)}, test {len(data.test)} reviews")


def run(adapter, steps, seed):
    """A fresh copy of the base with `adapter` trained for `steps` at the lab's default rates (the head at the same
    rate under every adapter); (model, test accuracy in %)."""
    m = add_adapter(copy.deepcopy(model), adapter)
    cfg = TrainConfig(steps=steps, batch_size=BUDGET["batch_size"], max_length=BUDGET["max_length"], seed=seed,
                      eval_every=steps, eval_batches=2)
    train(m, tokenizer, data, cfg, progress=False)
    return m, evaluate(m, tokenizer, data, cfg, split="test")["eval_accuracy"]


t0 = time.perf_counter()
lora_model, lora_acc = run(LoraConfig(r=8, alpha=16, target_modules=["query", "value"]), BUDGET["lora_steps"], 0)
deltas = {path: layer.delta_weight("default").detach() for path, layer in adapter_layers(lora_model)}  # (out, in)
deltas = dict(list(deltas.items())[: BUDGET["fit_layers"]])
print(f"LoRA r=8 trained in {time.perf_counter() - t0:.0f} s: test accuracy {lora_acc:.1f}%; "
      f"{len(deltas)} ΔW to fit, each {tuple(next(iter(deltas.values())).shape)}")


# %%
def fit_vera(delta, r, iters, seed=0, init="kaiming_uniform"):
    """b (out), d (r) minimising ||ΔW − Λ_b B Λ_d A||_F around VeRA's random A (r, in), B (out, r): alternating exact
    least squares from d = 1. Returns the relative error ||ΔW − fit|| / ||ΔW||."""
    A, B = generate_projections(r, delta.shape[1], delta.shape[0], seed, init)
    d = torch.ones(r)
    for _ in range(iters):
        M = (B * d) @ A  # (out, in): B Λ_d A
        b = (delta * M).sum(1) / (M * M).sum(1).clamp_min(1e-30)  # row i: <ΔW_i, M_i> / ||M_i||²
        bB = b[:, None] * B  # (out, r): Λ_b B
        gram = (bB.T @ bB) * (A @ A.T)  # (r, r)
        d = torch.linalg.lstsq(gram, ((bB.T @ delta) * A).sum(1)[:, None]).solution[:, 0]
    return float(((delta - (bB * d) @ A).norm() / delta.norm()))


def svd_error(delta, r):
    s = torch.linalg.svdvals(delta)
    return float(s[r:].norm() / s.norm())


t0 = time.perf_counter()
rows = []
for r in BUDGET["ranks"]:
    errs = [fit_vera(dw, r, BUDGET["fit_iters"]) for dw in deltas.values()]
    out, inp = next(iter(deltas.values())).shape
    rows.append({"r": r, "VeRA fit: relative error": sum(errs) / len(errs), "VeRA trained numbers": out + r,
                 "best rank-r (SVD): relative error": sum(svd_error(dw, min(r, out)) for dw in deltas.values())
                 / len(deltas), "rank-r trained numbers": r * (inp + out)})
fits = pd.DataFrame(rows).set_index("r")
print(f"fitted {len(deltas)} layers x {len(BUDGET['ranks'])} ranks in {time.perf_counter() - t0:.0f} s "
      "(mean over layers):")
display(fits.round(3))

# %% tags=["expect-image"]
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.plot(fits.index, fits["VeRA fit: relative error"], "o-", color="tab:blue", label="VeRA: b, d around random A, B")
left.plot(fits.index, fits["best rank-r (SVD): relative error"], "s--", color="tab:orange",
          label="best rank-r matrix (SVD)")
left.set(xscale="log", xlabel="r", ylabel="||ΔW − fit|| / ||ΔW|| (mean over layers)",
         title="reconstructing a trained LoRA r=8 ΔW")
right.plot(fits["VeRA trained numbers"], fits["VeRA fit: relative error"], "o-", color="tab:blue", label="VeRA")
right.plot(fits["rank-r trained numbers"], fits["best rank-r (SVD): relative error"], "s--", color="tab:orange",
           label="rank-r factorization")
right.set(xscale="log", xlabel="trained numbers per layer", ylabel="relative error", title="error against size")
for ax in (left, right):
    ax.legend()
    ax.set_ylim(0, 1.05)
fig.tight_layout()
plt.show()

# %%
first, last = fits.iloc[0], fits.iloc[-1]
print(f"At r = {fits.index[0]}, VeRA's fit leaves {100 * first['VeRA fit: relative error']:.0f}% of ΔW's norm; at "
      f"r = {fits.index[-1]}, {100 * last['VeRA fit: relative error']:.0f}%, still with only "
      f"{int(last['VeRA trained numbers']):,} trained numbers per layer. A rank-{fits.index[-1]} factorization "
      f"would train {int(last['rank-r trained numbers']):,} and the SVD reaches "
      f"{100 * last['best rank-r (SVD): relative error']:.0f}% (LoRA's ΔW has rank 8, so any r ≥ 8 is exact).")
fell = first["VeRA fit: relative error"] - last["VeRA fit: relative error"]
print(f"More random directions lowered the error by {100 * fell:.0f} points: each direction is one more rank-1 piece for "
      "d to weigh, at one trained number each." if fell > 0.01 else
      "More random directions did not lower the error measurably here.")
if last["VeRA fit: relative error"] > 0.5:
    print("So VeRA's form cannot copy this LoRA ΔW: a rank-8 update has about 8 · (in + out) free numbers, VeRA "
          f"{int(last['VeRA trained numbers']):,}. Random directions suffice not because they rebuild what LoRA "
          "learned, but because the task can be served by other updates, and training finds one inside VeRA's form.")
print("What this does not say: a weight-space error is not an accuracy loss. VeRA trained on the task finds its own "
      "ΔW, not LoRA's. Parts 3 and 4 measure accuracy.")

# %% [markdown]
# ## 3. Three variants, trained live
#
# `VeraConfig(train_vectors=...)`: "both" (default), "d" (only d trains, b is held at 1 and d starts at 0, as the
# paper does) or "b" (only b trains, d is held at d_init). Same data, steps, rates and seeds for each; test accuracy
# on the held-out reviews.

# %%
VARIANTS = {"default": {}, "only_d": {"train_vectors": "d"}, "only_b": {"train_vectors": "b"}}
COLOURS = {"default": "tab:blue", "only_d": "tab:green", "only_b": "tab:red"}
t0 = time.perf_counter()
live = []
for variant, fields in VARIANTS.items():
    for seed in BUDGET["seeds"]:
        _, acc = run(VeraConfig(r=256, target_modules=["query", "value"], **fields), BUDGET["steps"], seed)
        live.append({"variant": variant, "seed": seed, "accuracy": acc})
live = pd.DataFrame(live)
summary = live.groupby("variant", sort=False)["accuracy"].agg(["mean", "min", "max"])
print(f"{len(live)} runs in {time.perf_counter() - t0:.0f} s")
display(summary.round(1))

# %% tags=["expect-image"]
fig, ax = plt.subplots(figsize=(6, 3.5))
for i, (variant, row) in enumerate(summary.iterrows()):
    ax.errorbar(i, row["mean"], yerr=[[row["mean"] - row["min"]], [row["max"] - row["mean"]]], fmt="o", capsize=5,
                color=COLOURS[variant], label=variant)
    ax.scatter([i] * (live.variant == variant).sum(), live[live.variant == variant]["accuracy"], s=12,
               color=COLOURS[variant], alpha=0.5)
ax.axhline(lora_acc, color="grey", ls="--", lw=1, label=f"LoRA r=8, {BUDGET['lora_steps']} steps (part 2)")
ax.legend(fontsize=8)
ax.set_xticks(range(len(summary)), summary.index)
ax.set(ylabel="test accuracy (%)", title=f"live runs: mean, bars min–max over {len(BUDGET['seeds'])} seed(s)")
fig.tight_layout()
plt.show()

# %%
n_test = len(data.test)
p = summary["mean"].mean() / 100
margin = 1.96 * 100 * (p * (1 - p) / n_test) ** 0.5
best, worst = summary["mean"].idxmax(), summary["mean"].idxmin()
gap = summary["mean"].max() - summary["mean"].min()
print(f"Highest mean: {best} ({summary['mean'].max():.1f}%), lowest: {worst} ({summary['mean'].min():.1f}%), a gap of "
      f"{gap:.1f} points. On {n_test} test reviews one accuracy alone is uncertain by about ±{margin:.1f} points "
      "(a binomial 95% interval), before seed-to-seed variation.")
print(f"With {len(BUDGET['seeds'])} seed(s) this "
      + ("cannot separate the variants: the gap is inside that uncertainty." if gap < margin else
         "gap is larger than one accuracy's uncertainty, but so few seeds cannot say how much of it a new seed would "
         "move; the recorded study below (5 seeds, paired intervals) is the place to read a direction from."))
print(f"Every run here trains {BUDGET['steps']} steps at the lab's default rates, not tuned per variant (the record "
      f"tunes each): a variant that learns slower at this rate looks worse here than it would tuned. LoRA r=8 reached "
      f"{lora_acc:.1f}% in part 2; chance is about 50%.")

# %% [markdown]
# ## 4. The ablation record
#
# `benchmarks/ablations.py` runs the paper's ablations on a CPU-sized task (MiniLM on SST-2, query + value, r = 256):
# eight variants x 5 seeds, each variant's rate tuned on a 3-point grid around default VeRA's, every run's classifier
# head at one rate; each variant's paired difference to default with a two-level interval (seeds and test rows
# resampled), the paper's numbers beside; the rank sweep (VeRA r = 1 … 1024 against LoRA r = 1 … 64, 3 seeds); and the
# per-layer picture of a trained default adapter. It takes several CPU hours, so this part reads its record.

# %%
if not RECORD.is_file():
    print(f"The ablation record ({RECORD.name}) has not been run yet; it is made by "
          "`.venv/bin/python benchmarks/ablations.py --data-dir ../shared/data` (several CPU hours).")
else:
    record = json.loads(RECORD.read_text())
    print(f"{record['model']} on {record['task']}, r = {record['r']}, seeds {record['seeds']}, every head at "
          f"{record.get('head_lr')}{' (a --quick smoke run: not a result)' if record['quick'] else ''}")
    table = pd.DataFrame([{
        "variant": r["variant"], "accuracy": r["metric_mean"], "95% CI": f"[{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]",
        "− default": r["diff"], "paired 95% CI": r["diff_ci95"] and f"[{r['diff_ci95'][0]:+.1f}, "
                                                                   f"{r['diff_ci95'][1]:+.1f}]",
        "paper MRPC": r["paper"]["MRPC"]["mean"], "paper RTE": r["paper"]["RTE"]["mean"],
        "direction reproduces?": r["direction"]} for r in record["rows"]])
    display(table.round(2))
    for verdict in sorted({r["direction"] for r in record["rows"] if r["direction"]}):
        print(f"- {verdict}: {', '.join(r['variant'] for r in record['rows'] if r['direction'] == verdict)}")
    display(Image(str(RECORD.with_suffix(".png"))))  # drawn by ablations.py: colour = variant, error bars
print(f"(parts 1-4 ran in {(time.perf_counter() - START) / 60:.1f} min on this machine, now)")

# %% [markdown]
# ## What to take away
#
# - d_k weighs the k-th random rank-1 direction, b_i scales output row i: out + r trained numbers per layer shape a
#   ΔW of rank up to r.
# - Part 2 measures how much of a trained LoRA ΔW VeRA's form can rebuild from random directions, beside the best
#   rank-r matrix and the trained numbers each needs; its printed lines say what this run found. Weight-space error is
#   not accuracy: VeRA trains its own update, and parts 3 and 4 measure accuracy, with what their seeds can tell.
# - Few seeds and a few hundred test reviews cannot separate variants a few points apart; the record's paired
#   intervals say which of the paper's directions this small model and task reproduce.
#
# ## Exercises
#
# 1. In part 1, set d = 0 and any b: what is ΔW, and which vector then gets a gradient? (Why does only_d start d at 0
#    but hold b at 1?)
# 2. Fit ΔW of the first layer with uniform [0, 0.1] random matrices (`generate_projections(..., init="uniform")`)
#    at r = 64: is the error higher than with Kaiming uniform? Compare with the paper's init_uniform row.
# 3. How many trained numbers does only_b have per layer of MiniLM, against default?
#
# Solutions: next cell (collapsed).

# %% jupyter={"source_hidden": true} tags=["solution"]
# 1: ΔW = Λ_b B Λ_d A = 0 when d = 0; the gradient reaches d (through b ≠ 0) but not b (its factor Λ_d A x is 0).
with torch.no_grad():
    d.zero_()
    print("1: ΔW with d = 0:", float(layer.delta_weight("default").abs().max()))
# 2: a weight-space fit of LoRA's ΔW, not training: it need not show the paper's accuracy gap
dw = next(iter(deltas.values()))
uniform, kaiming = fit_vera(dw, 64, BUDGET["fit_iters"], init="uniform"), fit_vera(dw, 64, BUDGET["fit_iters"])
print(f"2: r = 64, relative error: uniform [0, 0.1] {uniform:.3f}, Kaiming uniform {kaiming:.3f}: uniform is "
      f"{'higher' if uniform > kaiming else 'not higher'} here; the paper's init_uniform row (MRPC 68.9 against 90.5) "
      "is about training, where the draw's scale and common mean change how b and d learn")
# 3: only_b trains b (out = 384) per layer; default trains b and d (384 + 256)
width = next(iter(deltas.values())).shape[0]
print(f"3: only_b trains b, {width} per layer; default b and d, {width} + 256 = {width + 256}")
