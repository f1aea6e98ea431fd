"""The Calculator tab: trainable parameters and stored bytes from shapes alone, and "will it fit?": the largest
training batch within a memory budget."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from vera_core.adapters.config import LoraConfig, VeraConfig
from vera_core.lab.calculator import KNOWN_MODELS, known_model, parameter_table
from vera_core.lab.memory import largest_batch
from vera_core.lab.parse import int_list
from vera_core.lab.plots import breakdown_figure, calculator_figure


def calculator_rows(models: list[str], vera_ranks: str, lora_ranks: str, save_projection: bool) -> list[dict]:
    """`parameter_table` for each known model: trainable parameters, stored KiB, and LoRA's first row over each."""
    if not models:
        raise ValueError("choose at least one model shape.")
    vera_r, lora_r = int_list(vera_ranks, "VeRA ranks"), int_list(lora_ranks, "LoRA ranks")
    rows = []
    for name in models:
        known = known_model(name)
        for row in parameter_table(known.config, known.targets, vera_r, lora_r, save_projection):
            rows.append({"model": name, "targets": known.note, "method": row["method"], "r": row["r"],
                         "trainable": row["trainable"], "stored (KiB)": round(row["stored_bytes"] / 1024, 1),
                         "LoRA first rank / this": round(row["lora_ratio"], 1) if row["lora_ratio"] else None})
    return rows


def fit_rows(model: str, budget_gib: float, seq_len: int, vera_r: int, lora_r: int,
             dtype: str) -> tuple[list[dict], list]:
    """"Will it fit?": the largest training batch for VeRA and LoRA on one known model within a memory budget, and the
    (label, breakdown) bars of each answer."""
    known = known_model(model)
    try:
        budget = float(budget_gib)  # typed into the dropdown, it arrives as text
    except (TypeError, ValueError):
        budget = float("nan")
    if not budget > 0:
        raise ValueError(f"the memory budget must be a positive number of GiB, got {budget_gib!r}.")
    rows, bars = [], []
    for config in (VeraConfig(r=int(vera_r), target_modules=known.targets),
                   LoraConfig(r=int(lora_r), target_modules=known.targets)):
        fit = largest_batch(known.config, config, int(budget * 2**30), int(seq_len), dtype)
        label = f"{config.method} r={config.r}"
        rows.append({"method": label, "largest batch": fit.batch_size,
                     "predicted peak (GiB)": round(fit.breakdown["total"] / 2**30, 2),
                     "per extra row (MiB)": round(fit.per_row_bytes / 2**20, 1),
                     "fixed (MiB)": round(fit.fixed_bytes / 2**20, 1), "answer": fit.message})
        bars.append((f"{label}\nbatch {fit.batch_size or 1}", fit.breakdown))
    return rows, bars


class CalculatorTab:
    """Handlers and layout of the Calculator tab (it needs no lab state)."""

    def calculator(self, models: list[str], vera_ranks: str, lora_ranks: str, save_projection: bool):
        try:
            rows = calculator_rows(models, vera_ranks, lora_ranks, save_projection)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return pd.DataFrame(rows).rename(columns={"trainable": "trainable params"}), calculator_figure(rows)

    def will_it_fit(self, model: str, budget_gib: float, seq_len: int, vera_r: int, lora_r: int, dtype: str):
        try:
            rows, bars = fit_rows(model, budget_gib, seq_len, vera_r, lora_r, dtype)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        title = f"Predicted peak at the largest batch that fits {budget_gib} GiB ({seq_len} tokens)"
        return pd.DataFrame(rows), breakdown_figure(bars, title)

    def build(self, demo: gr.Blocks) -> None:
        with gr.Tab("Calculator", id="calculator"):
            gr.Markdown("Trainable parameters and stored bytes from the architectures' shapes alone — no weights "
                        "are downloaded. RoBERTa-base LoRA r=8 vs VeRA r=1024 and RoBERTa-large LoRA r=8 vs "
                        "VeRA r=256 are the paper's Table 1.")
            with gr.Row():
                models = gr.CheckboxGroup(list(KNOWN_MODELS), value=list(KNOWN_MODELS), label="Models")
                vera = gr.Textbox("256,1024", label="VeRA ranks")
                lora = gr.Textbox("8,64", label="LoRA ranks")
                save = gr.Checkbox(False, label="VeRA stores A and B too")
            calc_btn = gr.Button("Compute", variant="primary")
            table = gr.Dataframe(interactive=False, elem_id="calc-table")
            plot = gr.Plot()
            gr.Markdown("### Will it fit?\nThe largest training batch for VeRA and LoRA within a memory budget, "
                        "predicted by running training steps on fake tensors (shapes only, no weights, no "
                        "compute; a few seconds each): weights, adapter, gradients, AdamW state, activations "
                        "saved for backward and temporaries at the step's peak. The same tracker measures real "
                        "runs, so the two can be compared on the Results tab. Three or four fake steps per "
                        "method: about half a minute for a 30-layer model on a quiet 2-core CPU.")
            with gr.Row():
                fit_model = gr.Dropdown(list(KNOWN_MODELS), value="smollm2-135m-instruct", label="Model shape",
                                        elem_id="fit-model")
                fit_budget = gr.Dropdown([8, 16, 24, 80], value=8, allow_custom_value=True,
                                         label="Memory budget (GiB)")
                fit_seq = gr.Number(256, precision=0, minimum=1, label="Sequence length (tokens)")
                fit_vera = gr.Number(256, precision=0, minimum=1, label="VeRA rank")
                fit_lora = gr.Number(8, precision=0, minimum=1, label="LoRA rank")
                fit_dtype = gr.Radio(["float32", "bfloat16"], value="float32", label="Weights dtype")
            fit_btn = gr.Button("Will it fit?", variant="primary")
            fit_table = gr.Dataframe(interactive=False, elem_id="fit-table")
            fit_plot = gr.Plot()
        calc_inputs = [models, vera, lora, save]
        calc_btn.click(self.calculator, calc_inputs, [table, plot], api_name="calculator")
        demo.load(self.calculator, calc_inputs, [table, plot], api_visibility="private")
        fit_btn.click(self.will_it_fit, [fit_model, fit_budget, fit_seq, fit_vera, fit_lora, fit_dtype],
                      [fit_table, fit_plot], api_name="will_it_fit", concurrency_limit=1)
