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
# # 04 · VeRA on a 4-bit base (QLoRA-style)
#
# **Idea:** store the frozen base in 4-bit NF4 (bitsandbytes), train only the adapter in fp32. The base weights shrink
# about 8× for the quantized Linear layers; the adapter is unchanged. VeRA's adapter is already tiny, so on a 4-bit
# base almost all of the memory is the base itself and the activations.
#
# What you will see: weight memory fp32 vs 4-bit (measured and estimated), a training-memory estimate per method, and
# VeRA vs LoRA quality on the 4-bit base next to the fp32 base, with the same budget. Last, why merging into a 4-bit
# base is refused.

# %%
# %matplotlib inline
from lab_setup import setup

QUICK = setup()  # offline defaults, quiet transformers; prints the mode (quick when VERA_LAB_QUICK=1)

# %%
import time
from pathlib import Path
import pandas as pd
import ipywidgets as widgets
from IPython.display import display
from vera_core import (LoraConfig, TrainConfig, VeraConfig, add_adapter, compare, count_parameters, estimate_memory,
                       load_model, merge_adapter)
from vera_core.lab.report import (
    SETTING_COLUMNS,
    SUMMARY_COLUMNS,
    memory_differences,
    pair_line,
    setting_table,
    summary_rows,
    tuning_lines,
)
from vera_core.lab import plots

BUDGET = (dict(max_rows=32, seeds=(0, 1), scales=[0.5, 2], tune_steps=2,
               train=TrainConfig(steps=3, batch_size=8, max_length=48, eval_batches=2, seed=0)) if QUICK
          else dict(max_rows=600, seeds=(0, 1, 2), scales=[0.25, 1, 4], tune_steps=20,
                    train=TrainConfig(steps=100, batch_size=16, max_length=64, eval_batches=8, seed=0)))
VERA, LORA = VeraConfig(r=256, d_init=0.1), LoraConfig(r=8, alpha=16)

# %% [markdown]
# ## 1. Weight memory: measured
#
# `load_model(..., quantization="4bit")` quantizes the encoder's Linear layers to NF4 while loading (the classifier
# head stays in full precision). `get_memory_footprint()` counts the bytes the parameters and buffers take.

# %%
t0 = time.perf_counter()
fp32_model, tok = load_model("minilm-l6")
q4_model, _ = load_model("minilm-l6", quantization="4bit")
print(f"loaded both in {time.perf_counter() - t0:.1f} s")
print("a quantized layer:", q4_model.bert.encoder.layer[0].attention.self.query)
measured = pd.DataFrame([
    {"base": "fp32", "weights MiB": fp32_model.get_memory_footprint() / 2**20},
    {"base": "nf4 (4-bit)", "weights MiB": q4_model.get_memory_footprint() / 2**20},
]).round(1)
measured


# %% [markdown]
# The whole model shrinks far less than 8× because the embeddings (about half of MiniLM's 22.7M weights) and the
# LayerNorms stay in full precision; only the Linear layers inside the encoder are quantized.
#
# ## 2. Training memory: estimated from shapes
#
# `estimate_memory` breaks one training step into weights, adapter (VeRA counts its shared A and B here), gradients +
# AdamW state, and activations. Try other settings with the widgets; the static table below uses the defaults.

# %%
def memory_table(batch_size=16, seq_len=64, vera_r=256, lora_r=8):
    rows = []
    for quant in (None, "4bit"):
        for name, cfg in (("vera", VeraConfig(r=vera_r)), ("lora", LoraConfig(r=lora_r)), ("full", "full")):
            if quant and cfg == "full":
                continue   # a quantized base cannot be fully fine-tuned
            est = estimate_memory("minilm-l6", cfg, batch_size, seq_len, quantization=quant)
            rows.append({"base": quant or "fp32", "method": name,
                         **{k: round(v / 2**20, 2) for k, v in est.items()}})
    return pd.DataFrame(rows).rename(columns=lambda c: c if c in ("base", "method") else c + " MiB")

bs = widgets.IntSlider(value=16, min=1, max=64, description="batch")
sl = widgets.IntSlider(value=64, min=16, max=512, step=16, description="seq len")
vr = widgets.SelectionSlider(options=[16, 64, 256, 1024], value=256, description="VeRA r")
lr_ = widgets.SelectionSlider(options=[1, 4, 8, 16, 64], value=8, description="LoRA r")
box = widgets.Output()
def show(_=None):
    box.clear_output()
    with box:
        display(memory_table(bs.value, sl.value, vr.value, lr_.value))
for w in (bs, sl, vr, lr_):
    w.observe(show, "value")
display(widgets.VBox([widgets.HBox([bs, sl]), widgets.HBox([vr, lr_]), box])); show()

# %% tags=["expect-image"]
estimates = memory_table()
display(estimates)
ax = estimates.set_index(estimates.base + " · " + estimates.method)[
    ["weights MiB", "adapter MiB", "gradients MiB", "optimizer MiB", "activations MiB", "temporaries MiB"]].plot.barh(stacked=True, figsize=(8, 3.5))
ax.set(xlabel="MiB (estimate)", title="One training step, MiniLM-L6, batch 16 × 64 tokens")
ax.figure.tight_layout()

# %% [markdown]
# ## 3. Quality: VeRA vs LoRA on the 4-bit and the fp32 base
#
# Same data and budget for every run; each method's learning rate is tuned on validation with the same grid on each
# base, then runs with every seed. Quantization perturbs the frozen weights, so the question is whether the adapters
# still learn on top of them, and whether VeRA − LoRA changes when the base is 4-bit.

# %%
t0 = time.perf_counter()
reports = {}
for quant in ("4bit", None):
    label = quant or "fp32"
    reports[label] = compare("minilm-l6", "rotten-tomatoes", methods=("vera", "lora"), vera=VERA, lora=LORA,
                             train=BUDGET["train"], max_rows=BUDGET["max_rows"], quantization=quant,
                             out_dir=Path("runs") / f"04-{label}", samples=0, exists="overwrite",
                             seeds=BUDGET["seeds"], tune={"lr_scale": BUDGET["scales"]},
                             tune_steps=BUDGET["tune_steps"])
print(f"{sum(len(r.runs) for r in reports.values())} runs (after tuning) in {time.perf_counter() - t0:.0f} s")
display(pd.concat([pd.DataFrame(setting_table(r.settings), columns=SETTING_COLUMNS).assign(base=label)
                   for label, r in reports.items()])[["base"] + SETTING_COLUMNS])
for label, r in reports.items():
    for line in [pair_line(p) for p in r.pairs] + tuning_lines(r.tuning):
        print(f"{label}: {line}")
quality = pd.concat([pd.DataFrame(summary_rows(r), columns=SUMMARY_COLUMNS).assign(base=label)
                     for label, r in reports.items()])
quality[["base"] + SUMMARY_COLUMNS]

# %% tags=["expect-image"]
# Mean ± std over seeds per setting, both bases in one figure.
runs = [{**r, "name": f"{label} {r['name']}"} for label, rep in reports.items() for r in rep.to_dict()["runs"]]
settings = [{**s, "setting": f"{label} {s['setting']}"} for label, rep in reports.items() for s in rep.settings]
plots.metric_figure(runs, "classification", settings)

# %% tags=["expect-image"]
plots.memory_figure(runs)

# %%
for label, rep in reports.items():
    for line in memory_differences(rep):
        print(f"{label}: {line}")

# %% [markdown]
# The measured peaks are the live tensor storage of the first training steps (`peak_memory_kind` "tensors"), counted
# the same way on CPU and GPU and whatever ran before in the process; `est_mib` in the table is the prediction made
# from shapes alone. Fake tensors cannot run bitsandbytes, so a 4-bit base is predicted from the unquantized step with
# the weights counted at 4 bits; what bitsandbytes allocates inside its layers is not seen, so expect a few % error. In quick mode the accuracies are noise (a few dozen test reviews after 3 steps); in full mode read VeRA − LoRA
# from the paired lines above, whose intervals say how much of a difference 600 test reviews and 3 seeds can resolve.
# The tuning lines show each rate's 20-step validation loss: close to ln 2 ≈ 0.693 (chance), so a weak signal, and a
# rate chosen at the grid's edge may have a better one beyond it.
#
# ## 4. Merging into a 4-bit base is refused
#
# Adding the adapter's small update to NF4 weights and re-quantizing would mostly round it away. `vera_core` refuses
# and says what to do instead: load the base in fp32/bf16, load the adapter, merge.

# %%
q4_vera = add_adapter(q4_model, VeraConfig(r=256))
print("trainable on the 4-bit base:", count_parameters(q4_vera)["trainable_adapter"])
try:
    merge_adapter(q4_vera)
except NotImplementedError as err:
    print("merge refused:", err)

# %% [markdown]
# ## 5. CPU and GPU notes
#
# - **CPU:** bitsandbytes (0.50.2 here) runs 4-bit and 8-bit forward and backward on CPU (this notebook). Each
#   quantized Linear dequantizes its weight on every call, so do not expect a speed-up: on a CPU, 4-bit is about
#   memory. (The step times in the table above come from a shared, loaded machine; they do not rank the methods.)
# - **GPU:** the same code (`load_model(..., quantization="4bit", device="cuda")`, `TrainConfig(device="auto")`)
#   runs the NF4 kernels on CUDA; the tracker measures the same tensor peaks there, and reports record
#   `torch.cuda.max_memory_allocated` beside them (`cuda_max_allocated_bytes`) as a cross-check. This is how QLoRA
#   fits large bases on one GPU; VeRA's gradients and optimizer state are then ~10× smaller than LoRA r=8's (7,680 vs 73,728 parameters here).
#   Not run in this notebook: this machine has no GPU.
# - Sequence classification keeps the classifier head out of quantization (`llm_int8_skip_modules=["classifier"]`,
#   set by `load_model`), so the head trains in full precision.
#
# ## Exercises
#
# 1. With the memory widget, find the batch size at which activations exceed the 4-bit weights for VeRA.
# 2. Load the 4-bit base with `quantization="8bit"` instead and compare `get_memory_footprint()`.
# 3. How would you ship a VeRA adapter trained on a 4-bit base for fp32 serving?
#
# Solutions: next cell (collapsed).

# %% jupyter={"source_hidden": true} tags=["solution"]
# 1: scan the estimate
for b in (1, 2, 4, 8, 16, 32, 64):
    e = estimate_memory("minilm-l6", VeraConfig(r=256), b, 64, quantization="4bit")
    if e["activations"] > e["weights"]:
        print("1: activations exceed 4-bit weights from batch", b, "at 64 tokens"); break
# 2:
q8, _ = load_model("minilm-l6", quantization="8bit")
print(f"2: 8-bit weights {q8.get_memory_footprint() / 2**20:.1f} MiB")
# 3: save_adapter(q4_vera, dir) stores b, d and the seed; load_adapter(fp32_base, dir) then merge_adapter
#    (the adapter was trained against the dequantized weights, so expect a small shift; evaluate after merging).
print("3: save_adapter on the 4-bit model, load_adapter onto an fp32 base, merge_adapter there")
