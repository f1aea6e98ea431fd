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
#
# **Time:** full mode takes 6 min on this 2-core CPU when a benchmark holds the other core (4.8 min of the kernel's
# CPU time; the recorded run took 7.1 min of wall time while two benchmark jobs held both cores); quick mode
# (`VERA_LAB_QUICK=1`, CI) trains 2 steps, so its outputs are noise.

# %%
# %matplotlib inline
from lab_setup import setup

QUICK = setup()  # offline defaults, quiet transformers; prints the mode (quick when VERA_LAB_QUICK=1)

# %%
import json
import tempfile
from dataclasses import replace
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import vera_core
from vera_core import (LoraConfig, TrainConfig, VeraConfig, add_adapter, load_adapters, load_model, save_adapter,
                       set_active_adapter)
from vera_core.lab.chat import format_prompt
from vera_core.lab.data import TextDataset, load_dataset
from vera_core.lab.evaluate import evaluate
from vera_core.adapters.fused import fast_vera
from vera_core.lab.models import generate
from vera_core.lab.train import train
from vera_core.lab import plots

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VERA = VeraConfig(r=256, target_modules=TARGETS)  # the same seed and r for all three: they share one A and B
# A CPU budget: 40 steps of 4 rows each fits the notebook's 10 minutes (three adapters on a 135M model); it is far
# from what the behaviours need, and section 2 prints what it does and does not achieve.
BUDGET = (TrainConfig(steps=2, batch_size=2, max_length=48, eval_batches=1, eval_every=2, seed=0) if QUICK
          else TrainConfig(steps=40, batch_size=4, max_length=64, eval_batches=4, eval_every=40, seed=0))
ROWS = 16 if QUICK else 200
VAL_ROWS = 4 if QUICK else 24  # validation rows scored before and after training, the same rows for both
WORK = Path(tempfile.mkdtemp(prefix="many-adapters-"))

# %% [markdown]
# ## 1. Three behaviours, three adapters
#
# - **chef**: the built-in restaurant descriptions (a meaning representation in, one fluent sentence out);
# - **critic**: Rotten Tomatoes reviews, used as *text* to write ("Write a short film review." → a review);
# - **terse**: one-word answers to simple questions.
#
# Each adapter is trained on its own fresh copy of the base, as different people would, and saved to a directory.
# Its validation loss (on its own task, the same rows before and after) says whether training moved it at all.

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
adapter_dirs, val_loss = {}, {}
for name, data in DATA.items():
    model, tok = load_model(MODEL)
    add_adapter(model, VERA)
    scored = replace(data, validation=data.validation[:VAL_ROWS])
    before = evaluate(model, tok, scored, BUDGET)["eval_loss"]  # b = 0 at the start: the base model's loss
    t0 = time.perf_counter()
    train(model, tok, data, BUDGET, run_name=name, out_dir=WORK / name, progress=False)
    seconds = time.perf_counter() - t0
    val_loss[name] = (before, evaluate(model, tok, scored, BUDGET)["eval_loss"])
    adapter_dirs[name] = WORK / name / "adapter"
    print(f"{name:7s} trained {BUDGET.steps} steps x {BUDGET.batch_size} rows in {seconds:5.1f} s; validation loss "
          f"on its task {val_loss[name][0]:.3f} -> {val_loss[name][1]:.3f} ({val_loss[name][1] / val_loss[name][0] - 1:+.0%})")
    del model

# %% [markdown]
# The same number of steps takes different times because the rows differ in length: a chef row is ~60 tokens, a
# review ~31, a question with its answer ~12 (SmolLM2's tokenizer, before the chat template), and on a CPU the step
# time follows. With the chat template every chef row passes `max_length=64`, so its end is cut (the warning above): a
# budget choice that keeps the three trainings inside the notebook's time. The terse adapter's validation rows repeat
# its 12 training questions (the list is used four times), so its loss near 0 is memory of those answers, not a skill;
# the banana question below is new to it.
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
said = dict(zip(rows, outputs))
for p in PROMPTS:
    print(f"\n{p}")
    for n in names:
        print(f"  {n:>8s}: {said[p, n]!r}")

# %% [markdown]
# ### Does each adapter do its job at this budget?
#
# Each behaviour has a check a reader can see in the text: the chef should name the restaurant's three facts, the
# critic should write a review (no chat preamble such as "Here is"), the terse adapter should answer in
# one word, correctly. The lines below apply each check to the adapter's own prompt and to the base model's answer.

# %%
chef_facts = ["the mill", "italian", "riverside"]
PREAMBLE = ("here is", "here's", "sure", "certainly", "i'm", "i am", "i'd", "i will")  # a chat reply, not a review
critic_words = sorted(len(r["response"].split()) for r in DATA["critic"].train)
checks = {
    "chef": (PROMPTS[0], lambda t: f"names {sum(f in t.lower() for f in chef_facts)} of its 3 facts",
             lambda t: sum(f in t.lower() for f in chef_facts) == 3),
    "critic": (PROMPTS[1], lambda t: f"{len(t.split())} words, chat preamble: {t.lower().startswith(PREAMBLE)}",
               lambda t: not t.lower().startswith(PREAMBLE)),
    "terse": (PROMPTS[2], lambda t: f"{len(t.split())} word(s), says yellow: {'yellow' in t.lower()}",
              lambda t: len(t.split()) <= 2 and "yellow" in t.lower()),
}
for name, (prompt, describe, ok) in checks.items():
    mine, base_says = said[prompt, name], said[prompt, "__base__"]
    print(f"{name:6s}: adapter {describe(mine)}; base {describe(base_says)} -> "
          + ("does its job" if ok(mine) else "does not do its job yet" + (" (the base does)" if ok(base_says) else "")))
print(f"(training reviews are {critic_words[len(critic_words) // 2]} words at the median)")
lower = [n for n, (b, a) in val_loss.items() if a < b]
print(f"Training lowered the validation loss of {len(lower)} of {len(val_loss)} adapters ({', '.join(lower) or 'none'}); "
      f"{BUDGET.steps} steps x {BUDGET.batch_size} rows is a CPU demonstration budget, not enough to learn these "
      "behaviours well. What follows does not depend on it: mixing, exactness and speed are the same for any b and d.")

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
# Left: the recorded benchmark (`python benchmarks/serve.py`, SmolLM2, 64 prompts, all 7 projections; its mode and
# machine are in the title). Right: a small live measurement here, the same rows served three ways with K = 3
# adapters: VeRA as one mixed batch, VeRA one adapter at a time, and LoRA r=8 as one mixed batch (our LoRA runs one
# sub-batch per adapter). The LoRA adapters are untrained (B = 0): speed does not depend on what an adapter learned.

# %% tags=["expect-image"]
LABELS = {"ours-vera": "VeRA (ours, mixed batch)", "ours-lora": "LoRA (ours, mixed batch)",
          "peft-lora": "PEFT LoRA (mixed batch, adapter_names)", "peft-vera-grouped": "PEFT VeRA (one adapter at a time)",
          "merged-grouped": "VeRA merged into W (one adapter at a time)", "base": "base model, no adapter",
          "ours-vera-single": "VeRA (ours, one adapter, plain path)"}
STYLE = {"ours-vera": "-", "merged-grouped": "-.", "peft-vera-grouped": ":", "ours-lora": "-", "peft-lora": "--"}
record = Path(vera_core.__file__).resolve().parents[1] / "benchmarks" / "results" / "serve.json"
serve = json.loads(record.read_text())
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
for impl in ("ours-vera", "peft-lora", "ours-lora", "peft-vera-grouped", "merged-grouped"):
    pts = sorted((r["K"], r["tokens_per_s"]) for r in serve["rows"] if r["impl"] == impl)
    left.plot(*zip(*pts), marker="o", label=LABELS[impl], color=plots.method_colour("lora" if "lora" in impl else "vera"),
              ls=STYLE[impl])
tps = {r["impl"]: r["tokens_per_s"] for r in serve["rows"] if r["impl"] in ("base", "ours-vera-single")}
left.axhline(tps["base"], color="0.3", lw=1, label=LABELS["base"])
left.set_xscale("log", base=2)
left.set(xlabel="distinct adapters K in the batch", ylabel="generated tokens / s",
         title=f"Recorded: {serve['mode']} mode, {serve['device'][:40]}")
left.title.set_fontsize(9)
left.set_ylim(0, None)
left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=2)  # below: the curves fill the axes

n_rows, n_new = (6, 4) if QUICK else (24, 16)
live_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_rows)]
live_enc = tok([format_prompt(tok, p) for p in live_prompts], return_tensors="pt", padding=True,
               add_special_tokens=False)
live_enc = {k: live_enc[k] for k in ("input_ids", "attention_mask")}
adapters = list(adapter_dirs)
mixed_names = [adapters[i % 3] for i in range(n_rows)]


def tokens_per_s(run) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        run()
    return n_rows * n_new / (time.perf_counter() - t0)


gen_args = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)


def one_at_a_time():
    for name in adapters:
        set_active_adapter(base, name)
        idx = [i for i in range(n_rows) if mixed_names[i] == name]
        base.generate(**{k: v[idx] for k, v in live_enc.items()}, **gen_args)


lora_base, _ = load_model(MODEL)
add_adapter(lora_base, LoraConfig(r=8, alpha=16, target_modules=TARGETS))
for name in adapters:
    save_adapter(lora_base, WORK / "lora" / name)
lora_base, _ = load_model(MODEL)
load_adapters(lora_base, {name: WORK / "lora" / name for name in adapters})
live = {"VeRA, mixed batch": tokens_per_s(lambda: base.generate(**live_enc, adapter_names=mixed_names, **gen_args)),
        "VeRA, one adapter at a time": tokens_per_s(one_at_a_time),
        "LoRA r=8, mixed batch": tokens_per_s(lambda: lora_base.generate(**live_enc, adapter_names=mixed_names,
                                                                          **gen_args))}
right.barh(list(live), list(live.values()), color=[plots.method_colour(m.split(" ")[0].split(",")[0].lower())
                                                   for m in live])
right.bar_label(right.containers[0], labels=[f"{v:.0f}" for v in live.values()], fontsize=8)
right.set(xlabel="generated tokens / s", title=f"Live, this machine now: K = 3, {n_rows} rows x {n_new} tokens")
right.title.set_fontsize(9)
fig.tight_layout()
plt.show()

# %% [markdown]
# The live bars are one short measurement on a shared machine at K = 3: read them beside the recorded curves at
# K = 4, which the lines at the end of this notebook print.
#
# ## What to take away
#
# - A mixed VeRA batch computes `A x` and the `B` product once for all rows; only two gathers depend on the adapter,
#   so its cost hardly moves with K, while grouped serving (one adapter at a time, or merging per group) pays per
#   group, and LoRA's mixed batch pays per distinct adapter.
# - The vectors are held once, stacked per layer (Σ(out + r) × 4 bytes per adapter), so a thousand adapters fit beside
#   one base where a thousand LoRA adapters would not.
# - Mixed batches are for inference: training, merging and beam search stay one adapter at a time.
#
# The recorded benchmark's numbers behind these points:

# %%
by = {(r["impl"], r["K"]): r["tokens_per_s"] for r in serve["rows"]}
ks = sorted(k for impl, k in by if impl == "ours-vera")
ahead = [k for k in ks if by["ours-vera", k] > by["peft-lora", k]]
stays = next(k for k in ks if all(j in ahead for j in ks if j >= k))
bank = serve["bank_1000_detail"]
print(f"One VeRA adapter runs at {tps['ours-vera-single'] / tps['base']:.2f}x the base model's speed "
      f"({tps['ours-vera-single']:.0f} vs {tps['base']:.0f} tokens/s): the adapter's extra products cost that much.")
print(f"VeRA's mixed batch vs PEFT LoRA's, tokens/s at K = {', '.join(map(str, ks))}: "
      + ", ".join(f"{by['ours-vera', k]:.0f} vs {by['peft-lora', k]:.0f}" for k in ks)
      + f"; VeRA stays ahead from K = {stays}"
      + (f" (also ahead at K = {', '.join(str(k) for k in ahead if k < stays)})" if any(k < stays for k in ahead) else "")
      + f", and at K = {ks[-1]} runs {by['ours-vera', ks[-1]] / by['peft-lora', ks[-1]]:.1f}x PEFT LoRA's speed.")
lora_ahead = [k for k in ks if by["ours-lora", k] > by["ours-vera", k]]
print("Our LoRA r=8 mixed batch vs VeRA's, tokens/s at the same K: "
      + ", ".join(f"{by['ours-lora', k]:.0f} vs {by['ours-vera', k]:.0f}" for k in ks)
      + (f": LoRA is faster at K = {', '.join(map(str, lora_ahead))} (few sub-batches, and r = 8 products against "
         "VeRA's r = 256), VeRA from there on, because its cost stays flat while LoRA's grows with K." if lora_ahead
         else ": VeRA is ahead at every K."))
print(f"{bank['count']:,} VeRA adapters held in memory: {bank['vera_vector_bytes'] / 1e6:,.0f} MB of vectors "
      f"({bank['vera_vector_bytes'] / bank['count'] / 1e6:.2f} MB each), the process grew by "
      f"{bank['vera_rss_bytes'] / 1e6:,.0f} MB (measured); {bank['count']:,} LoRA r=8 adapters would take "
      f"{bank['lora_computed_bytes'] / 1e9:.1f} GB (computed).")

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
