"""The Outputs tab: the test inputs a comparison answered, one prompt through the base and every adapter of a
run, and the check that a merged VeRA adapter answers as the unmerged one."""
from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from vera_core import merge_adapter, unmerge_adapter
from vera_core.lab.data import shorten
from vera_core.lab.models import generate, predict

from .common import Lab, list_runs, read_lab_meta


def samples_table(rows: list[dict], labels: list[str] | None, width: int = 160) -> pd.DataFrame:
    """samples.jsonl as text: the input, its label or references, and each run's answer (probabilities named)."""
    def answer(value) -> str:
        if isinstance(value, list):  # class probabilities
            names = labels or [str(i) for i in range(len(value))]
            return ", ".join(f"{n} {p:.2f}" for n, p in zip(names, value))
        return shorten(value, width)

    table = []
    for row in rows:
        if "text" in row:
            label = row["label"]
            first = {"input": shorten(row["text"], width), "label": labels[label] if labels else str(label)}
        else:
            first = {"input": shorten(row["prompt"], width), "reference": shorten(" | ".join(row["reference"]), width)}
        keys = [k for k in row if k not in ("text", "label", "prompt", "reference")]
        table.append({**first, **{k: answer(row[k]) for k in keys}})
    return pd.DataFrame(table)


class OutputsTab:
    """Handlers and layout of the Outputs tab."""

    def __init__(self, lab: Lab):
        self.lab = lab

    def samples(self, run_dir: str | None) -> pd.DataFrame:
        """The test inputs the comparison already answered, one column per run."""
        if not run_dir:
            return pd.DataFrame()
        path = self.lab.run_dir(run_dir)
        rows = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
        table = samples_table(rows, read_lab_meta(path).get("labels"))
        # Fixed widths: left to itself, a wrapped long input column pushes the answers out of view.
        rest = len(table.columns) - 1
        return gr.Dataframe(table, column_widths=["34%"] + [f"{66 // max(rest, 1)}%"] * rest)

    def outputs(self, run_dir: str | None, prompt: str, sampled: bool, max_tokens: int, temperature: float):
        """The prompt through the base model and every adapter of the run: generations or class probabilities."""
        path = self.lab.run_dir(run_dir)
        if not prompt or not prompt.strip():
            raise gr.Error("enter a prompt")
        report = json.loads((path / "report.json").read_text())
        labels = read_lab_meta(path).get("labels")
        rows = []
        for run in ["base", *self.lab.adapter_runs(path)]:
            model, tokenizer = self.lab.model(path, run)
            if report["task"] == "classification":
                probs = predict(model, tokenizer, [prompt])[0].tolist()
                names = labels or [str(i) for i in range(len(probs))]
                rows.append({"model": run, "output": ", ".join(f"{n} {p:.3f}" for n, p in zip(names, probs))})
            else:
                text = generate(model, tokenizer, [prompt], max_new_tokens=int(max_tokens), do_sample=sampled,
                                temperature=temperature)[0]
                rows.append({"model": run, "output": text})
        return pd.DataFrame(rows)

    def merged_check(self, run_dir: str | None, prompt: str, max_tokens: int) -> str:
        """Each VeRA adapter, merged into the weights, must answer exactly as when it runs beside them."""
        path = self.lab.run_dir(run_dir)
        prompt = prompt.strip() or "Hello"
        report = json.loads((path / "report.json").read_text())
        saved = self.lab.adapter_runs(path)
        veras = [r["name"] for r in report["runs"] if r["method"] == "vera" and r["name"] in saved]
        if not veras:
            raise gr.Error("this run has no VeRA adapter")
        lines = []
        for run in veras:
            model, tokenizer = self.lab.model(path, run)
            if report["task"] == "classification":
                outputs = [predict(model, tokenizer, [prompt])]
                merge_adapter(model)
                try:
                    outputs.append(predict(model, tokenizer, [prompt]))
                finally:
                    unmerge_adapter(model)
                diff = float((outputs[0] - outputs[1]).abs().max())
                lines.append(f"- **{run}**: max |p_unmerged - p_merged| = {diff:.2e} — "
                             + ("same output ✓" if diff < 1e-4 else "DIFFERENT ✗"))
            else:
                outputs = [generate(model, tokenizer, [prompt], max_new_tokens=int(max_tokens))[0]]
                merge_adapter(model)
                try:
                    outputs.append(generate(model, tokenizer, [prompt], max_new_tokens=int(max_tokens))[0])
                finally:
                    unmerge_adapter(model)
                same = outputs[0] == outputs[1]
                lines.append(f"- **{run}**: greedy generation unmerged vs merged — "
                             + ("identical ✓" if same else f"DIFFERENT ✗\n  - unmerged: {outputs[0]!r}\n"
                                                            f"  - merged: {outputs[1]!r}"))
        return "\n".join(lines)

    def build(self) -> None:
        with gr.Tab("Outputs", id="outputs") as self.tab:
            self.pick = gr.Dropdown(label="Run", choices=list_runs(self.lab.runs_dir), allow_custom_value=True)
            samples = gr.Dataframe(label="Test inputs answered during the comparison", interactive=False,
                                   wrap=True, elem_id="samples")
            prompt = gr.Textbox(label="Prompt (or text to classify)", lines=3)
            with gr.Row():
                sampled = gr.Checkbox(False, label="Sample (else greedy)")
                max_tokens = gr.Slider(8, 256, value=48, step=8, label="Max new tokens")
                temperature = gr.Slider(0.1, 2.0, value=0.8, step=0.1, label="Temperature (sampling)")
            with gr.Row():
                generate_btn = gr.Button("Run base | VeRA | LoRA", variant="primary")
                merged_btn = gr.Button("Check merged VeRA = unmerged")
            side_by_side = gr.Dataframe(pd.DataFrame(columns=["model", "output"]), label="Outputs",
                                        interactive=False, wrap=True, column_widths=["20%", "80%"],
                                        elem_id="side-by-side")
            merged_result = gr.Markdown()
        self.pick.change(self.samples, self.pick, samples, api_visibility="private")
        generate_btn.click(self.outputs, [self.pick, prompt, sampled, max_tokens, temperature], side_by_side,
                           api_name="outputs", concurrency_limit=1)
        merged_btn.click(self.merged_check, [self.pick, prompt, max_tokens], merged_result, api_name="merged_check",
                         concurrency_limit=1)

    def refresh(self, trigger) -> None:
        """On `trigger` (the tab opening, a job ending), the run picker lists the runs there are now."""
        trigger(self.lab.run_choices, self.pick, self.pick, api_visibility="private")
