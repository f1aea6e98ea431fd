"""The Export tab: one adapter of a run as a native, PEFT, exact-LoRA or merged folder, handed over as a zip."""
from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr

from vera_core.lab.runs import export

from .common import Lab, list_runs

EXPORT_FORMATS = {
    "native (VeRA Lab: vectors + seed)": "native",
    "PEFT (loads with peft.PeftModel)": "peft",
    "exact LoRA (PEFT LoRA; VeRA as d·A, b·B)": "lora",
    "merged model (save_pretrained folder)": "merged",
}


class ExportTab:
    """Handlers and layout of the Export tab."""

    def __init__(self, lab: Lab):
        self.lab = lab

    def adapters(self, run_dir: str | None):
        names = self.lab.adapter_runs(self.lab.run_dir(run_dir)) if run_dir else []
        return gr.update(choices=names, value=names[0] if names else None)

    def export(self, run_dir: str | None, run: str | None, fmt: str) -> str:
        """Write the chosen export inside the run directory and hand it over as one zip file."""
        path = self.lab.run_dir(run_dir)
        if run not in self.lab.adapter_runs(path):
            raise gr.Error("choose an adapter of this run")
        kind = EXPORT_FORMATS[fmt]
        target = path / "exports" / f"{run}-{kind}"
        if kind == "native":
            source = path / "adapters" / run
        else:
            model, tokenizer = self.lab.model(path, run)
            if kind == "merged":  # merging takes the adapter out of the cached model: drop it from the cache
                self.lab.forget(path, run)
            try:
                source = export(model, tokenizer, target, kind, overwrite=True)
            except ValueError as err:  # e.g. merging into a 4-bit base is refused
                raise gr.Error(str(err)) from None
        archive = Path(shutil.make_archive(str(target), "zip", root_dir=source))
        if archive.resolve().parent != (path / "exports").resolve():
            raise gr.Error("refusing to serve a file outside the run directory")
        return str(archive)

    def build(self) -> None:
        with gr.Tab("Export", id="export") as self.tab:
            self.pick = gr.Dropdown(label="Run", choices=list_runs(self.lab.runs_dir), allow_custom_value=True)
            adapter = gr.Dropdown(label="Adapter", allow_custom_value=True)
            fmt = gr.Radio(list(EXPORT_FORMATS), value=next(iter(EXPORT_FORMATS)), label="Format")
            export_btn = gr.Button("Export", variant="primary")
            file = gr.File(label="Download", interactive=False, height=100, elem_id="export-file")
        self.pick.change(self.adapters, self.pick, adapter, api_visibility="private")
        export_btn.click(self.export, [self.pick, adapter, fmt], file, api_name="export", concurrency_limit=1)

    def refresh(self, trigger) -> None:
        """On `trigger` (the tab opening, a job ending), the run picker lists the runs there are now."""
        trigger(self.lab.run_choices, self.pick, self.pick, api_visibility="private")
