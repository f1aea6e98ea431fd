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
# # 05 · Many adapters, one base: mixed-adapter batches
#
# **Idea:** every VeRA adapter of a model uses the *same* frozen random matrices A and B; an adapter is only its two
# vectors b and d per layer. So a batch in which every row has its **own** adapter costs about one adapter:
#
#     h_i = W0 x_i + b[a_i] ⊙ B (d[a_i] ⊙ (A x_i))          a_i = the adapter of row i
#
# `A x` and the product with `B` are one matmul each for the whole batch; `d[a_i]` and `b[a_i]` are row-wise gathers
# from the adapters' stacked vectors. LoRA cannot do this: each adapter has its own A and B, so a mixed LoRA batch
# runs one sub-batch per adapter (that is what PEFT's `adapter_names` does).
#
# What you will do: train three small VeRA adapters on different behaviours, serve them **mixed in one batch**, check
# that each row equals running it alone with its adapter, and read throughput against the number of distinct
# adapters K from the recorded benchmark (`benchmarks/serve.py`).

# %%
# %matplotlib inline
from lab_setup import setup

QUICK = setup()  # offline defaults, quiet transformers; prints the mode (quick when VERA_LAB_QUICK=1)

# %%
import json
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

import vera_core
from vera_core import TrainConfig, VeraConfig, add_adapter, load_adapters, load_model, set_active_adapter
from vera_core.lab.chat import format_prompt
from vera_core.lab.data import TextDataset, load_dataset
from vera_core.adapters.fused import fast_vera
from vera_core.lab.models import generate
from vera_core.lab.train import train

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VERA = VeraConfig(r=256, target_modules=TARGETS)  # the same seed and r for all three: they share one A and B
BUDGET = (TrainConfig(steps=2, batch_size=2, max_length=48, eval_batches=1, seed=0) if QUICK
          else TrainConfig(steps=60, batch_size=8, max_length=96, eval_batches=4, seed=0))
ROWS = 16 if QUICK else 200
WORK = Path(tempfile.mkdtemp(prefix="many-adapters-"))

# %% [markdown]
# ## 1. Three behaviours, three adapters
#
# - **chef**: the built-in restaurant descriptions (a meaning representation in, one fluent sentence out);
# - **critic**: Rotten Tomatoes reviews, used as *text* to write ("Write a short film review." → a review);
# - **terse**: one-word answers to simple questions.
#
# Each adapter is trained on its own fresh copy of the base, as different people would, and saved to a directory.

# %%
def causal(name: str, pairs: list[tuple[str, str]]) -> TextDataset:
    rows = [{"prompt": p, "response": r, "group": i} for i, (p, r) in enumerate(pairs)]
    cut = max(1, len(rows) // 8)
    return TextDataset(name, "causal-lm", rows[2 * cut:], rows[:cut], rows[cut:2 * cut])


reviews = load_dataset("rotten-tomatoes", max_rows=ROWS, seed=0)
QA = [("What colour is the sky on a clear day?", "Blue."), ("How many legs does a spider have?", "Eight."),
      ("What is frozen water called?", "Ice."), ("Which planet do we live on?", "Earth."),
      ("What do bees make?", "Honey."), ("How many days are in a week?", "Seven."),
      ("What is the opposite of hot?", "Cold."), ("Which animal says moo?", "Cow."),
      ("What colour is grass?", "Green."), ("How many hours are in a day?", "Twenty-four."),
      ("What do you call a baby cat?", "Kitten."), ("Which season comes after winter?", "Spring.")] * 4
DATA = {
    "chef": load_dataset("synthetic-restaurants", max_rows=ROWS, seed=0),
    "critic": causal("critic", [("Write a short film review.", r["text"]) for r in reviews.train]),
    "terse": causal("terse", QA),
}
adapter_dirs = {}
for name, data in DATA.items():
    model, tok = load_model(MODEL)
    add_adapter(model, VERA)
    t0 = time.perf_counter()
    result = train(model, tok, data, BUDGET, run_name=name, out_dir=WORK / name, progress=False)
    adapter_dirs[name] = WORK / name / "adapter"
    print(f"{name:7s} trained {BUDGET.steps} steps in {time.perf_counter() - t0:5.1f} s -> {adapter_dirs[name]}")
    del model

# %% [markdown]
# The same 60 steps take different times because the rows differ in length: a chef row is ~60 tokens, a review ~31, a
# question with its answer ~12 (SmolLM2's tokenizer, before the chat template), and on a CPU the step time follows.
#
# ## 2. Load them onto one base and serve a mixed batch
#
# `load_adapters` loads every directory onto the same base (checking that they share seed, r and projection shape)
# and stacks their vectors per layer. Then one name per row: `adapter_names=[...]`, with `"__base__"` for no adapter.

# %%
base, tok = load_model(MODEL)
t0 = time.perf_counter()
load_adapters(base, adapter_dirs)
print(f"loaded {len(adapter_dirs)} adapters in {time.perf_counter() - t0:.2f} s")
PROMPTS = ["Describe a restaurant: name[The Mill], food[Italian], area[riverside].",
           "Write a short film review.", "What colour is a banana?"]
names = list(adapter_dirs) + ["__base__"]
rows = [(p, n) for p in PROMPTS for n in names]  # every adapter x every prompt: 12 rows, one batch
t0 = time.perf_counter()
outputs = generate(base, tok, [p for p, _ in rows], max_new_tokens=12 if QUICK else 32,
                   adapter_names=[n for _, n in rows], batch_size=len(rows))
print(f"{len(rows)} rows, {len(names)} adapters, one batch: {time.perf_counter() - t0:.1f} s")
pd.set_option("display.max_colwidth", 90)
display(pd.DataFrame({"prompt": [p for p, _ in rows], "adapter": [n for _, n in rows], "output": outputs}))

# %% [markdown]
# ## 3. Exactness: each row equals running it alone with its adapter
#
# The mixed forward computes each row with its own b and d. Running the *whole* batch once per adapter with
# `set_active_adapter` and keeping that adapter's rows must give the same logits (to float rounding). One adapter
# alone may take the fast path, which folds the update into W for long inputs (exact, but rounded differently);
# `fast_vera(False)` runs it as the formula is written, the same arithmetic as the mixed rows.

# %%
tok.padding_side = "left"
enc = tok([format_prompt(tok, p) for p, _ in rows], return_tensors="pt", padding=True, add_special_tokens=False)
enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
row_names = [n for _, n in rows]
with torch.inference_mode():
    mixed = base(**enc, adapter_names=row_names).logits
    worst = 0.0
    for name in names:
        set_active_adapter(base, None if name == "__base__" else name)
        with fast_vera(False):
            alone = base(**enc).logits
        idx = [i for i, n in enumerate(row_names) if n == name]
        worst = max(worst, (mixed[idx] - alone[idx]).abs().max().item())
set_active_adapter(base, list(adapter_dirs)[-1])
scale = mixed.abs().max().item()
print(f"max |mixed - one adapter at a time| over all rows and logits: {worst:.2e} (logits up to {scale:.1f})")
assert worst < 1e-5 * max(scale, 1.0)

# %% [markdown]
# ## 4. Throughput against K
#
# Left: the recorded benchmark (`python benchmarks/serve.py`, SmolLM2, 64 prompts, all 7 projections; its mode
# and machine are in the title — a `--quick` record is a short-decode run on a shared CPU). Right: a small live
# measurement here: the same rows as one mixed batch with K = 1 and K = 3 adapters, and one adapter at a time.

# %% tags=["expect-image"]
record = Path(vera_core.__file__).resolve().parents[1] / "benchmarks" / "results" / "serve.json"
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
if record.is_file():
    data = json.loads(record.read_text())
    for impl in ("ours-vera", "peft-lora", "peft-vera-grouped", "merged-grouped", "ours-lora"):
        pts = sorted((r["K"], r["tokens_per_s"]) for r in data["rows"] if r["impl"] == impl)
        if pts:
            left.plot(*zip(*pts), marker="o", label=impl)
    for r in data["rows"]:
        if r["impl"] in ("base", "ours-vera-single"):
            left.axhline(r["tokens_per_s"], linestyle="--", color="gray" if r["impl"] == "base" else "green",
                         label=r["impl"])
    left.set_xscale("log", base=2)
    left.set_title(f"recorded: {data['mode']} mode, {data['device'][:40]}", fontsize=9)
    left.legend(fontsize=7)
else:
    left.text(0.5, 0.5, "no benchmarks/results/serve.json yet", ha="center")
left.set_xlabel("distinct adapters K")
left.set_ylabel("generated tokens / s")

n_rows, n_new = (6, 4) if QUICK else (24, 16)
live_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_rows)]
live_enc = tok([format_prompt(tok, p) for p in live_prompts], return_tensors="pt", padding=True,
               add_special_tokens=False)
live_enc = {k: live_enc[k] for k in ("input_ids", "attention_mask")}
adapters = list(adapter_dirs)


def tokens_per_s(run) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        run()
    return n_rows * n_new / (time.perf_counter() - t0)


gen_args = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)


def one_at_a_time():
    for name in adapters:
        set_active_adapter(base, name)
        idx = [i for i in range(n_rows) if adapters[i % 3] == name]
        base.generate(**{k: v[idx] for k, v in live_enc.items()}, **gen_args)


live = {"mixed K=1": tokens_per_s(lambda: base.generate(**live_enc, adapter_names=[adapters[0]] * n_rows, **gen_args)),
        "mixed K=3": tokens_per_s(lambda: base.generate(**live_enc, adapter_names=[adapters[i % 3] for i in
                                                                                   range(n_rows)], **gen_args)),
        "one adapter at a time, K=3": tokens_per_s(one_at_a_time)}
right.barh(list(live), list(live.values()))
right.set_xlabel(f"generated tokens / s ({n_rows} rows x {n_new} tokens, this machine, now)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What to take away
#
# - A mixed VeRA batch computes `A x` and the `B` product once for all rows; only two gathers depend on the adapter,
#   so its cost hardly moves with K, while grouped serving (one adapter at a time, or merging per group) pays per
#   group, and LoRA's mixed batch pays per distinct adapter.
# - The vectors are held once, stacked per layer: about Σ(out + r) × 4 bytes per adapter (0.84 MB for SmolLM2's seven
#   projections at r=256), so a thousand adapters fit beside one base.
# - Mixed batches are for inference: training, merging and beam search stay one adapter at a time.
#
# ## Exercises
#
# 1. Serve the three adapters with `"__base__"` rows in between and check the base rows equal the plain model.
# 2. How many bytes do the three adapters take? Compute Σ(out + r) × 4 from the layers and compare with the saved files.
# 3. Why would adding a fourth adapter trained with another `projection_seed` be refused?
#
# Solutions: next cell (collapsed).

# %% jupyter={"source_hidden": true} tags=["solution"]
# 1: "__base__" rows run without any adapter
with torch.inference_mode():
    mixed = base(**live_enc, adapter_names=["__base__", adapters[0]] * (n_rows // 2)).logits
    with vera_core.disabled_adapter(base):
        plain = base(**live_enc).logits
print("1: base rows equal the plain model:", torch.allclose(mixed[0::2], plain[0::2], atol=1e-5))
# 2: b (out) and d (r) per adapted layer, fp32
from vera_core.adapters.inject import adapter_layers
per_adapter = sum((layer.out_features + VERA.r) * 4 for _, layer in adapter_layers(base))
files = {n: (d / "adapter.safetensors").stat().st_size for n, d in adapter_dirs.items()}
print(f"2: {per_adapter / 1e6:.2f} MB per adapter in memory; files {files}")
# 3: a mixed batch shares one A and B; another seed regenerates another pair, so load_adapter refuses it.
print("3: the adapters share one (A, B), regenerated from one seed; another seed would need another A and B")
