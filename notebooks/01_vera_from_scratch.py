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
# # 01 · VeRA from scratch
#
# **What you will learn:** what VeRA (Vector-based Random Matrix Adaptation, Kopiczko et al., ICLR 2024) changes in a
# layer, how to write it in a dozen lines, why one integer seed replaces two matrices, and why VeRA trains so few
# parameters compared with LoRA, and what a training step does to it. Full mode: 1 min on this 2-core CPU
# (measured while other jobs loaded it).

# %%
# %matplotlib inline
from lab_setup import setup

QUICK = setup()  # offline defaults, quiet transformers; prints the mode (quick when VERA_LAB_QUICK=1)

# %% [markdown]
# ## 1. The idea in one picture
#
# LoRA adds a trained low-rank update to a frozen weight $W_0$: $h = W_0x + \frac{\alpha}{r} B A x$, with **A and B
# trained for every layer**.
#
# VeRA keeps the low-rank shape but **freezes A and B**: they are random, generated from one seed, and **shared by every
# adapted layer**. Each layer only trains two vectors, a scaling $d \in \mathbb{R}^r$ inside and $b \in
# \mathbb{R}^{out}$ outside:
#
# $$h = W_0 x + \Lambda_b B \Lambda_d A x = W_0 x + b \odot \big(B\,(d \odot (A x))\big)$$
#
# $b$ starts at 0 (the model is unchanged at step 0); $d$ starts at a small constant `d_init` (0.1 by default).

# %% tags=["expect-image"]
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

def box(ax, x, y, w, h, text, colour):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=colour, ec="black"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10)

def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.3))

frozen, shared, trained = "#d9d9d9", "#9ecae1", "#fdae6b"
fig, ax = plt.subplots(figsize=(10, 3.6))
box(ax, 0.0, 1.4, 0.9, 0.6, "x\n(in)", "white")
box(ax, 2.0, 2.4, 2.0, 0.7, "W0  (out × in)\nfrozen, per layer", frozen)
box(ax, 1.5, 0.3, 1.3, 0.7, "A  (r × in)\nfrozen, shared", shared)
box(ax, 3.1, 0.3, 0.9, 0.7, "⊙ d  (r)\ntrained", trained)
box(ax, 4.3, 0.3, 1.3, 0.7, "B  (out × r)\nfrozen, shared", shared)
box(ax, 5.9, 0.3, 0.9, 0.7, "⊙ b  (out)\ntrained", trained)
box(ax, 7.2, 1.4, 0.6, 0.6, "+", "white")
box(ax, 8.2, 1.4, 0.9, 0.6, "h\n(out)", "white")
arrow(ax, 0.9, 1.8, 2.0, 2.7); arrow(ax, 0.9, 1.6, 1.5, 0.7)
arrow(ax, 2.8, 0.65, 3.1, 0.65); arrow(ax, 4.0, 0.65, 4.3, 0.65); arrow(ax, 5.6, 0.65, 5.9, 0.65)
arrow(ax, 6.8, 0.65, 7.3, 1.4); arrow(ax, 4.0, 2.75, 7.3, 2.0); arrow(ax, 7.8, 1.7, 8.2, 1.7)
ax.text(4.5, -0.25, "A and B: one pair for the whole model, regenerated from a seed — never trained, never stored",
        ha="center", fontsize=9, style="italic")
ax.set(xlim=(-0.2, 9.3), ylim=(-0.5, 3.3)); ax.axis("off"); ax.set_title("A VeRA layer: h = W0 x + b ⊙ (B (d ⊙ (A x)))")
plt.show()

# %% [markdown]
# ## 2. A VeRA layer from scratch
#
# The whole method, for one `nn.Linear`. A and B are drawn from a seeded CPU generator, **A first, then B**,
# Kaiming-uniform with bound $\sqrt{6 / \text{fan\_in}}$ — exactly how Hugging Face PEFT draws them, so adapters
# move between libraries. (With several layers of different shapes, one pair is drawn at the largest shape and each
# layer uses its top-left slice; one layer keeps this example short.)

# %%
import copy, math
import torch
from torch import nn

class ScratchVera(nn.Module):
    """h = base(x) + b * (B (d * (A x))): A, B random and frozen; b, d trained."""
    def __init__(self, base: nn.Linear, r: int, d_init: float, seed: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        n_in, n_out = base.in_features, base.out_features
        g = torch.Generator().manual_seed(seed)
        bound_a, bound_b = math.sqrt(6 / n_in), math.sqrt(6 / r)
        self.register_buffer("A", torch.empty(r, n_in).uniform_(-bound_a, bound_a, generator=g))   # (r, in)
        self.register_buffer("B", torch.empty(n_out, r).uniform_(-bound_b, bound_b, generator=g))  # (out, r)
        self.d = nn.Parameter(torch.full((r,), d_init))  # (r,)
        self.b = nn.Parameter(torch.zeros(n_out))        # (out,) zero: no change at step 0

    def forward(self, x):
        u = x @ self.A.T                                 # (..., r)
        return self.base(x) + self.b * ((self.d * u) @ self.B.T)   # (..., out)


# %% [markdown]
# Now the same layer with `vera_core`. `add_adapter` wraps the chosen layers in place; we give `b` the same random
# values in both (at b = 0 both would trivially equal the base layer) and check that the outputs agree — once for a
# batch of many tokens (`vera_core` then folds the update into the weight) and once for a single token (the per-token
# path).

# %%
from vera_core import VeraConfig, add_adapter, count_parameters, generate_projections

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 48)
    def forward(self, x):
        return self.proj(x)

torch.manual_seed(0)
tiny = Tiny()
scratch = ScratchVera(copy.deepcopy(tiny.proj), r=16, d_init=0.1, seed=0)
model = add_adapter(copy.deepcopy(tiny), VeraConfig(r=16, d_init=0.1, projection_seed=0, target_modules=["proj"]))

b = torch.randn(48) * 0.1
with torch.no_grad():
    scratch.b.copy_(b)
    model.proj.vera_lambda_b["default"].copy_(b)

A, B = generate_projections(r=16, max_in=64, max_out=48, seed=0)
assert torch.equal(A, scratch.A) and torch.equal(B, scratch.B), "seeded A/B differ from vera_core's"
for x in (torch.randn(4, 10, 64), torch.randn(1, 64)):       # many tokens (folded path), one token (per-token path)
    assert torch.allclose(scratch(x), model(x), atol=1e-6), "outputs differ"
print("from-scratch layer == vera_core VeraLayer  ✓")
print("trainable parameters:", count_parameters(model))
print(model.proj)

# %% [markdown]
# ## 3. Training it by hand: what receives a gradient, and how far a step moves
#
# A few optimizer steps on the from-scratch layer, fitting a target that differs from the base layer by a small
# low-rank change. Read the printed lines:
#
# - **Step 0:** `b` is 0, so the update $b \odot (\dots)$ is 0 and so is `d`'s gradient (it is multiplied by `b`);
#   `b`'s gradient is proportional to `d`. After the first step `b` is no longer 0 and `d` receives a gradient too.
# - **d_init = 0:** then `b`'s gradient is 0 as well — both vectors start without a gradient, Adam never moves them,
#   and the layer can never train. That is why `d` starts at a small constant, never at 0.
# - **The step size:** Adam divides each gradient by its own running size, so a step moves *every* parameter by about
#   the learning rate, however small its gradient. LoRA's step moves entries of B, and B·A is a free matrix; VeRA's
#   step moves `b` and `d`, which only rescale fixed random directions ($b_i$ scales a whole row, $d_k$ a whole
#   rank-one direction, both already multiplied by small values). At one learning rate, one VeRA step therefore
#   changes the layer's $\Delta W$ far less than one LoRA step: that ratio is why VeRA's default rate is tens of times
#   LoRA's (the printed `DEFAULT_LR`, tuned on the project's own runs).

# %%
import torch.nn.functional as F
from vera_core.lab.train import DEFAULT_LR

torch.manual_seed(0)
x_fit = torch.randn(256, 64)
with torch.no_grad():
    target = tiny.proj(x_fit) + x_fit @ (0.04 * torch.randn(48, 2) @ torch.randn(2, 64)).T  # base + a rank-2 change

def grads_at_step0(d_init: float) -> tuple[float, float]:
    """|grad b| and |grad d| (L2 norms) of a fresh layer's first backward pass."""
    layer = ScratchVera(copy.deepcopy(tiny.proj), r=16, d_init=d_init, seed=0)
    F.mse_loss(layer(x_fit), target).backward()
    return layer.b.grad.norm().item(), layer.d.grad.norm().item()

for d_init in (0.1, 1e-7, 0.0):
    gb, gd = grads_at_step0(d_init)
    print(f"d_init = {d_init:<6g} step 0: |grad b| = {gb:.2e}, |grad d| = {gd:.2e}")

def delta_w(layer) -> torch.Tensor:
    """The layer's update as a matrix: ΔW = diag(b) B diag(d) A, (out, in)."""
    return (layer.b[:, None] * layer.B * layer.d) @ layer.A

layer = ScratchVera(copy.deepcopy(tiny.proj), r=16, d_init=0.1, seed=0)
opt = torch.optim.Adam([layer.b, layer.d], lr=1e-2)
for step in range(4):
    before = [layer.b.detach().clone(), layer.d.detach().clone()]
    opt.zero_grad()
    loss = F.mse_loss(layer(x_fit), target)
    loss.backward()
    grad_b, grad_d = layer.b.grad.norm().item(), layer.d.grad.norm().item()
    opt.step()
    moved_b, moved_d = ((p.detach() - q).abs().mean().item() for p, q in zip((layer.b, layer.d), before))
    print(f"step {step}: loss {loss.item():.4f} | |grad b| {grad_b:.2e} |grad d| {grad_d:.2e} | "
          f"mean |move| b {moved_b:.4f} d {moved_d:.4f} (lr 0.01)")

# %% [markdown]
# One step at the same learning rate, VeRA (this layer, r = 16) against LoRA (r = 8, alpha = 16, B starting at 0 as
# usual) on the same layer and data: how far each parameter moves, and how far $\Delta W$ moves.

# %%
from vera_core import LoraConfig

def one_adam_step(config, lr: float = 1e-3) -> tuple[float, float]:
    """(mean |move| of the parameters that moved, |change of ΔW|) after one Adam step from the adapter's init."""
    torch.manual_seed(0)
    m = add_adapter(copy.deepcopy(tiny), config)
    params = [p for p in m.parameters() if p.requires_grad]
    eye = torch.eye(64)
    weight = lambda: (m(eye) - tiny(eye)).T.detach()  # ΔW read off the adapted layer, (out, in)
    before, w0 = [p.detach().clone() for p in params], weight()
    opt = torch.optim.Adam(params, lr=lr)
    F.mse_loss(m(x_fit), target).backward()
    opt.step()
    moves = torch.cat([(p.detach() - q).abs().flatten() for p, q in zip(params, before)])
    return moves[moves > 0].mean().item(), (weight() - w0).norm().item()

vera_move, vera_dw = one_adam_step(VeraConfig(r=16, d_init=0.1, target_modules=["proj"]))
lora_move, lora_dw = one_adam_step(LoraConfig(r=8, alpha=16, target_modules=["proj"]))
print(f"lr 1e-3, one Adam step: VeRA parameters move {vera_move:.1e}, |Δ(ΔW)| = {vera_dw:.2e}")
print(f"                        LoRA parameters move {lora_move:.1e}, |Δ(ΔW)| = {lora_dw:.2e}")
print(f"LoRA's step changes ΔW {lora_dw / vera_dw:.0f}x more at the same rate; DEFAULT_LR: VeRA "
      f"{DEFAULT_LR['vera'][0]:g}, LoRA {DEFAULT_LR['lora'][0]:g} ({DEFAULT_LR['vera'][0] / DEFAULT_LR['lora'][0]:.0f}x)")

# %% [markdown]
# **What r means for VeRA.** $\Delta W = \sum_k d_k \,(b \odot B_{:,k})\, A_{k,:}$: a weighted sum of r fixed random
# rank-one directions, and `d` chooses how much of each to use. A larger r gives `d` more directions to choose among,
# at one extra parameter per layer each. But $\Delta W$ is an (out × in) matrix, so its rank can never exceed
# min(in, out), however large r is:

# %%
for r in (4, 16, 64, 256):
    vera_r = ScratchVera(copy.deepcopy(tiny.proj), r=r, d_init=0.1, seed=0)
    with torch.no_grad():
        vera_r.b.normal_(); vera_r.d.normal_()  # trained-looking vectors, nothing zero
    rank = torch.linalg.matrix_rank(delta_w(vera_r).detach()).item()
    print(f"r = {r:>3}: rank of ΔW = {rank:>2}   (min(in, out) = {min(64, 48)})")

# %% [markdown]
# ## 4. The seed *is* the matrices
#
# A and B are never trained, so an adapter file does not need them: the seed regenerates them bit for bit. `vera_core`
# stores the seed plus a SHA-256 fingerprint of (A, B), and refuses to load if a future PyTorch ever drew different
# numbers. A different seed gives different matrices.

# %%
import tempfile
from pathlib import Path
from vera_core import save_adapter
from vera_core.adapters.projections import fingerprint

A0, B0 = generate_projections(16, 64, 48, seed=0)
A0_again, B0_again = generate_projections(16, 64, 48, seed=0)
A1, _ = generate_projections(16, 64, 48, seed=1)
print("same seed, same A and B:", torch.equal(A0, A0_again) and torch.equal(B0, B0_again))
print("seed 1 gives another A: ", not torch.equal(A0, A1))
print("fingerprint(seed 0):     ", fingerprint(A0, B0)[:16], "…")

with tempfile.TemporaryDirectory() as tmp:
    path = save_adapter(model, Path(tmp) / "tiny-vera")
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir())}
print("adapter files (bytes):", files)
print(f"A and B would add {4 * (A0.numel() + B0.numel()):,} bytes if stored; b and d take {4 * (48 + 16):,} bytes")

# %% [markdown]
# ## 5. Trainable parameters, VeRA vs LoRA, across ranks
#
# Per adapted layer LoRA trains $r\,(in + out)$ parameters, VeRA trains $out + r$. Raising VeRA's rank adds **one**
# parameter per layer, so VeRA affords r = 256 … 1024 where LoRA uses 4 … 64. `estimate_parameters` computes these from
# a model's config alone (no weights). Below: RoBERTa-base with query and value adapted, as in the paper.

# %%
import pandas as pd
from vera_core import LoraConfig, estimate_parameters
from vera_core.lab.calculator import KNOWN_MODELS, parameter_table

def param_row(model_name: str, r: int) -> dict:
    """Trainable parameters of VeRA and LoRA at rank r on a known model (shapes only)."""
    known = KNOWN_MODELS[model_name]
    vera = estimate_parameters(known.config, VeraConfig(r=r, target_modules=known.targets))["trainable"]
    lora = estimate_parameters(known.config, LoraConfig(r=r, target_modules=known.targets))["trainable"]
    return {"model": model_name, "r": r, "vera": vera, "lora": lora, "lora / vera": round(lora / vera, 1)}

RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
ranks_table = pd.DataFrame([param_row("roberta-base", r) for r in RANKS])
ranks_table

# %% tags=["expect-image"]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(ranks_table["r"], ranks_table["lora"], "o-", label="LoRA: r·(in+out) per layer")
ax.plot(ranks_table["r"], ranks_table["vera"], "s-", label="VeRA: out + r per layer")
ax.set(xscale="log", yscale="log", xlabel="rank r (log)", ylabel="trainable parameters (log)",
       title="RoBERTa-base, query + value: trainable parameters vs rank")
ax.legend(); ax.grid(alpha=0.3, which="both")
plt.show()

# %% [markdown]
# Try it yourself: the slider calls the same `param_row` function as the table above (the static table is what you
# see on a code host, where widgets do not render).

# %%
import ipywidgets as widgets
from IPython.display import display

model_pick = widgets.Dropdown(options=list(KNOWN_MODELS), value="roberta-base", description="model")
rank_pick = widgets.SelectionSlider(options=RANKS, value=256, description="r")
out = widgets.Output()

def show_row(_=None):
    out.clear_output()
    with out:
        display(pd.DataFrame([param_row(model_pick.value, rank_pick.value)]))

model_pick.observe(show_row, "value"); rank_pick.observe(show_row, "value")
display(widgets.VBox([widgets.HBox([model_pick, rank_pick]), out])); show_row()

# %% [markdown]
# ## 6. The paper's Table 1, reproduced from configs
#
# `parameter_table` builds each model on the meta device (shapes only) and counts. The paper prints truncated numbers
# ("36.8K") and has one slip: RoBERTa-large VeRA r=16 is printed 49.5K, the formula gives 49,920 (and the paper's own
# byte column, 195 KB, agrees with 49,920). The asserts check the exact integers.

# %%
rows = []
for name in ("roberta-base", "roberta-large"):
    known = KNOWN_MODELS[name]
    for row in parameter_table(known.config, known.targets, vera_ranks=(1, 16, 256), lora_ranks=(1, 16, 256)):
        rows.append({"model": name, **row})
table1 = pd.DataFrame(rows).pivot_table(index=["model", "method"], columns="r", values="trainable")
expected = {("roberta-base", "lora"): [36864, 589824, 9437184], ("roberta-base", "vera"): [18456, 18816, 24576],
            ("roberta-large", "lora"): [98304, 1572864, 25165824], ("roberta-large", "vera"): [49200, 49920, 61440]}
for key, values in expected.items():
    assert list(table1.loc[key]) == values, (key, list(table1.loc[key]))
print("paper Table 1 reproduced exactly ✓")
table1

# %% [markdown]
# ## Exercises
#
# 1. Change `d_init` in the from-scratch check to 1.0 and `b` back to zeros. Does the output still equal the base
#    layer's? Why?
# 2. For SmolLM2-135M-Instruct (`"smollm2-135m-instruct"`, all 7 projections), at which VeRA rank does VeRA train as
#    many parameters as LoRA r = 8?
# 3. Extend `ScratchVera` to two layers of different shapes sharing one (A, B) pair (hint: draw at the largest shape,
#    slice `A[:, :in]`, `B[:out, :]`) and check against `add_adapter` on a model with two Linears.
#
# The solutions are in the next cell (collapsed: click to expand).

# %% jupyter={"source_hidden": true} tags=["solution"]
# Solution 1: with b = 0 the update b * (...) is zero whatever d is: VeRA starts exactly at the base model.
with torch.no_grad():
    scratch.b.zero_(); scratch.d.fill_(1.0)
x = torch.randn(2, 64)
assert torch.allclose(scratch(x), scratch.base(x))

# Solution 2: VeRA trains sum(out) + L*r; solve for r against LoRA r=8.
known = KNOWN_MODELS["smollm2-135m-instruct"]
lora8 = estimate_parameters(known.config, LoraConfig(r=8, target_modules=known.targets))["trainable"]
vera1 = estimate_parameters(known.config, VeraConfig(r=1, target_modules=known.targets))["trainable"]
vera2 = estimate_parameters(known.config, VeraConfig(r=2, target_modules=known.targets))["trainable"]
per_rank = vera2 - vera1                      # = number of adapted layers
r_equal = 1 + (lora8 - vera1) / per_rank
print(f"LoRA r=8: {lora8:,}; VeRA equals it at r ≈ {r_equal:,.0f} ({per_rank} adapted layers)")
# Such an r only counts parameters: each layer's ΔW has rank at most min(in, out), far below it.
cfg = known.config
widest = max(min(a, b) for a, b in ((cfg.hidden_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size)))
print(f"the largest min(in, out) among SmolLM2's projections is {widest}: above that r adds parameters (one per "
      f"layer) and random directions for d, but no rank")

# Solution 3: two layers of different shapes share one pair, each uses its top-left slice.
class Two(nn.Module):
    def __init__(self):
        super().__init__(); self.p = nn.Linear(64, 48); self.q = nn.Linear(48, 32)
    def forward(self, x):
        return self.q(self.p(x))
torch.manual_seed(1)
two = Two()
vm = add_adapter(copy.deepcopy(two), VeraConfig(r=8, target_modules=["p", "q"]))
A, B = generate_projections(8, max_in=64, max_out=48, seed=0)
bp, bq = torch.randn(48), torch.randn(32)
with torch.no_grad():
    vm.p.vera_lambda_b["default"].copy_(bp); vm.q.vera_lambda_b["default"].copy_(bq)
def layer(lin, x, b, d):
    return lin(x) + b * ((d * (x @ A[:, :lin.in_features].T)) @ B[:lin.out_features, :].T)
x = torch.randn(3, 64)
d = torch.full((8,), 0.1)
assert torch.allclose(vm(x), layer(two.q, layer(two.p, x, bp, d), bq, d), atol=1e-5)
print("two shapes, one shared pair ✓")
