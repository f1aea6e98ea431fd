"""The Many adapters tab: several adapters of one base served in one mixed batch (each row its own adapter),
beside one adapter at a time: outputs, times, memory. Adapters come from the lab's runs or uploaded zips."""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import gradio as gr
import pandas as pd

from vera_core.lab.many import load_many, serve_batch
from vera_core.lab.models import OFFLINE_MODELS
from vera_core.lab.runs import list_runs as vera_list_runs
from vera_core.lab.runs import read_config

from .common import Lab

MANY_BASE = "__base__"
ADAPTER_FILES = ("vera_lab_adapter.json", "adapter_config.json")  # native, PEFT
# Limits on an uploaded zip, which fit every real adapter (the largest the lab makes, LoRA r=64 on every SmolLM2
# projection, is about 76 MiB) and keep a small upload from filling the disk.
MAX_ZIP_ENTRIES = 1000
MAX_UNZIPPED_BYTES = 256 * 2**20
MAX_ZIP_RATIO = 100  # unpacked bytes / the archive's bytes; trained weights barely compress


def run_adapters(runs_dir: Path) -> list[str]:
    """"<run directory>/<adapter run>" for every saved adapter of the lab's runs, newest run first."""
    out = []
    for run in vera_list_runs(runs_dir):
        path = Path(run["run_dir"])
        out += [f"{path.name}/{name}" for name in run["settings"] if (path / "adapters" / name).is_dir()]
    return out


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def unzip_adapter(archive: Path, target: Path) -> Path:
    """Extract an uploaded adapter zip into `target` and return the folder that holds the adapter files (the zip's
    root, or its one folder). Before anything is written, the entries are checked against the limits (count,
    unpacked bytes, compression ratio) and their names (none may land outside `target`); the extraction counts the
    bytes it writes and stops at the limit, since a zip's declared sizes can lie. It unpacks into a folder beside
    `target` that becomes `target` only when complete: after a refusal nothing is left. An existing `target` is
    a complete earlier extraction of the same archive and is used as it is."""
    if not target.is_dir():
        partial = target.with_name(f"{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            with zipfile.ZipFile(archive) as zf:
                members = _checked_members(archive, zf, partial)
                partial.mkdir(parents=True)
                _extract(archive, zf, members, partial)
        except zipfile.BadZipFile as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise ValueError(f"{archive.name} is not a readable zip file ({err}); upload an adapter folder zipped "
                             "(e.g. from the Export tab).") from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(target)
        made = True
    else:
        made = False
    candidates = [target] + sorted(p for p in target.rglob("*") if p.is_dir())
    found = next((p for p in candidates if any((p / f).is_file() for f in ADAPTER_FILES)), None)
    if found is None:
        if made:
            shutil.rmtree(target)
        raise ValueError(f"{archive.name} holds no adapter: neither {' nor '.join(ADAPTER_FILES)} is in it.")
    return found


def _checked_members(archive: Path, zf: zipfile.ZipFile, into: Path) -> list[zipfile.ZipInfo]:
    """The archive's entries, once they are within the limits by what the archive declares."""
    members = zf.infolist()
    if len(members) > MAX_ZIP_ENTRIES:
        raise ValueError(f"{archive.name} has {len(members):,} entries, more than the limit of {MAX_ZIP_ENTRIES:,}; "
                         "an adapter folder holds a few files.")
    declared = sum(m.file_size for m in members)
    if declared > MAX_UNZIPPED_BYTES:
        raise ValueError(f"{archive.name} unpacks to {_mib(declared)}, more than the limit of "
                         f"{_mib(MAX_UNZIPPED_BYTES)}.")
    packed = max(archive.stat().st_size, 1)
    if declared / packed > MAX_ZIP_RATIO:
        raise ValueError(f"{archive.name} is compressed {declared / packed:,.0f}x ({_mib(packed)} unpacking to "
                         f"{_mib(declared)}), more than the limit of {MAX_ZIP_RATIO}x; adapter weights barely "
                         "compress.")
    for member in members:
        if not (into / member.filename).resolve().is_relative_to(into.resolve()):
            raise ValueError(f"{archive.name}: refusing the entry {member.filename!r} (it points outside the folder).")
    return members


def _extract(archive: Path, zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], into: Path) -> None:
    """Write the entries, counting every byte: past MAX_UNZIPPED_BYTES in all, or past an entry's declared size,
    it stops with an error."""
    written = 0
    for member in members:
        path = into / member.filename
        if member.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = 0
        with zf.open(member) as source, open(path, "wb") as out:
            while chunk := source.read(2**20):
                entry, written = entry + len(chunk), written + len(chunk)
                if written > MAX_UNZIPPED_BYTES or entry > member.file_size:
                    raise ValueError(f"{archive.name}: the entry {member.filename!r} unpacks to more than its header "
                                     f"says ({_mib(member.file_size)}), past {_mib(min(written, entry))}; the "
                                     f"archive is damaged or forged (limit {_mib(MAX_UNZIPPED_BYTES)} in all).")
                out.write(chunk)


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size:,} bytes"


def assign_rows(prompts: list[str], adapters: list[str], assignment: str, every: bool,
                limit: int) -> list[tuple[str, str]]:
    """(prompt, adapter label) per row: every adapter x every prompt, or one adapter per prompt from
    `assignment` (one label a line, in the prompts' order; "base" for no adapter; a run's adapter may be named by
    its last part alone when that is unique), or, when `assignment` is empty, the adapters in turn."""
    if not prompts:
        raise ValueError("enter at least one prompt (one a line).")
    if not adapters:
        raise ValueError("choose at least one adapter (a run's adapter or an uploaded zip).")
    if every:
        rows = [(p, a) for p in prompts for a in adapters]
    else:
        wanted = prompt_lines(assignment)
        if not wanted:
            rows = [(p, adapters[i % len(adapters)]) for i, p in enumerate(prompts)]
        else:
            if len(wanted) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(wanted)} adapter lines; give one adapter a line, "
                                 "one per prompt (or leave it empty to take the adapters in turn).")
            rows = [(p, _label(w, adapters)) for p, w in zip(prompts, wanted)]
    if len(rows) > limit:
        raise ValueError(f"{len(rows)} rows is more than this lab serves in one batch ({limit}); use fewer prompts "
                         "or adapters.")
    return rows


def _label(wanted: str, adapters: list[str]) -> str:
    if wanted in ("base", MANY_BASE):
        return MANY_BASE
    if wanted in adapters:
        return wanted
    short = [a for a in adapters if a.rsplit("/", 1)[-1] == wanted]
    if len(short) == 1:
        return short[0]
    raise ValueError(f"unknown adapter {wanted!r}" + (" (more than one adapter has that name)" if short else "")
                     + f"; choose one of {adapters} or 'base'.")


def many_summary(result: dict, labels: dict[str, str], rows: int) -> str:
    """The batch's time beside one adapter at a time, whether they agree, and the adapters' memory."""
    batch, single = result["batch_s"], result["one_at_a_time_s"]
    same = sum(a == b for a, b in zip(result["outputs"], result["outputs_one_at_a_time"]))
    memory = result["memory"]
    per = ", ".join(f"{labels.get(n, n)} {b / 1024:.1f} KiB" for n, b in memory["per_adapter"].items())
    pairs = "the shared A and B" if memory["pairs"] == 1 else f"every layer's own A and B ({memory['pairs']} pairs)"
    shared = f" + {pairs} {memory['shared'] / 2**20:.2f} MiB, once for all" if memory["shared"] else ""
    return (f"**One mixed batch**: {rows} rows in {batch:.2f} s · **one adapter at a time**: {single:.2f} s "
            f"({single / batch:.1f}× the batch's time) · same outputs both ways: {same}/{rows} rows\n\n"
            f"**Adapter memory**: {len(memory['per_adapter'])} adapters, {memory['adapters_total'] / 1024:.1f} KiB "
            f"({per}){shared}.")


class ManyTab:
    """Handlers and layout of the Many adapters tab."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self._loaded: tuple | None = None  # (key, model, tokenizer) of the adapters loaded last

    def many_choices(self, current: list[str] | None = None):
        choices = run_adapters(self.lab.runs_dir)
        return gr.update(choices=choices, value=[c for c in current or [] if c in choices])

    def _sources(self, picked: list[str], uploads: list[str] | None) -> dict[str, Path]:
        """{label: adapter directory}: the chosen runs' adapters (inside runs_dir only) and the uploaded zips."""
        sources: dict[str, Path] = {}
        known = run_adapters(self.lab.runs_dir)
        for label in picked or []:
            if label not in known:
                raise gr.Error(f"{label!r} is not an adapter of a run in {self.lab.runs_dir}; press Refresh and "
                               "choose from the list.")
            run_dir, _, run = label.partition("/")
            path = self.lab.run_dir(str(self.lab.runs_dir / run_dir))
            if not (path / "adapters" / run).is_dir():
                raise gr.Error(f"{label}: this run saved no adapter {run!r}")
            sources[label] = path / "adapters" / run
        for upload in uploads or []:
            archive = Path(upload)
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
            try:
                sources[f"upload:{archive.stem}"] = unzip_adapter(
                    archive, self.lab.runs_dir / ".many-uploads" / f"{archive.stem}-{digest}")
            except ValueError as err:
                raise gr.Error(str(err)) from None
        return sources

    def _base(self, picked: list[str], base_model: str) -> dict:
        """The base the chosen run adapters were trained on (one for all of them), else `base_model`."""
        bases = {}
        for label in picked or []:
            config = read_config(self.lab.runs_dir / label.partition("/")[0])
            bases[label] = {"model": config["model"], "task": config["task"], "seed": config["train"]["seed"],
                            "quantization": config.get("quantization"), "labels": config.get("labels")}
        models = {b["model"] for b in bases.values()}
        if len(models) > 1:
            first = next(iter(bases))
            other = next(k for k, b in bases.items() if b["model"] != bases[first]["model"])
            raise gr.Error(f"{first} was trained on {bases[first]['model']} but {other} on {bases[other]['model']}: "
                           "one batch runs on one base model; choose adapters of one base.")
        if bases:
            return next(iter(bases.values()))
        if base_model not in OFFLINE_MODELS:
            raise gr.Error(f"choose a base model for the uploaded adapters ({list(OFFLINE_MODELS)})")
        return {"model": base_model, "task": OFFLINE_MODELS[base_model].tasks[0], "seed": 0, "quantization": None,
                "labels": None}

    def many(self, picked: list[str], uploads: list[str] | None, base_model: str, prompts: str, assignment: str,
             every: bool, max_tokens: int):
        """The rows (prompt, adapter) as one mixed batch, then one adapter at a time: outputs, times, memory."""
        picked = list(picked or [])
        sources = self._sources(picked, uploads)
        try:
            rows = assign_rows(prompt_lines(prompts), list(sources), assignment, every,
                                     self.lab.max_batch_rows)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        base = self._base(picked, base_model)
        names = {label: f"a{i}" for i, label in enumerate(sources)}  # adapter names without "." or "/"
        key = (json.dumps(base, sort_keys=True), tuple((names[k], str(v)) for k, v in sources.items()))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous set first
            try:
                model, tokenizer = load_many(base["model"], base["task"], base["seed"],
                                             {names[k]: v for k, v in sources.items()},
                                             quantization=base["quantization"],
                                             num_labels=len(base["labels"] or [0, 1]))
            except ValueError as err:
                message = str(err)
                for label, name in names.items():  # the library names its adapters a0, a1, ...: show the labels
                    message = message.replace(repr(name), repr(label))
                raise gr.Error(message) from None
            self._loaded = (key, model, tokenizer)
        _, model, tokenizer = self._loaded
        try:
            result = serve_batch(model, tokenizer, [p for p, _ in rows],
                                 [names.get(a, MANY_BASE) for _, a in rows], task=base["task"],
                                 max_new_tokens=int(max_tokens), labels=base["labels"])
        except ValueError as err:
            raise gr.Error(str(err)) from None
        table = pd.DataFrame({"prompt": [p for p, _ in rows], "adapter": [a for _, a in rows],
                              "output": result["outputs"]})
        summary = many_summary(result, {v: k for k, v in names.items()}, len(rows))
        return table, summary

    def build(self) -> None:
        with gr.Tab("Many adapters", id="many") as self.tab:
            gr.Markdown("Serve several adapters of one base in **one batch**: every row (a prompt) uses its own "
                        "adapter. VeRA adapters share one A and B, so a mixed batch costs about one adapter; the "
                        "same rows run one adapter at a time for comparison.")
            with gr.Row():
                self.pick = gr.Dropdown(run_adapters(self.lab.runs_dir), multiselect=True, scale=4,
                                        allow_custom_value=True, label="Adapters trained in the lab (run/adapter)",
                                        elem_id="many-pick")
                refresh_btn = gr.Button("Refresh", scale=1)
            with gr.Row():
                upload = gr.File(label="…or adapter zip files (e.g. from the Export tab)", file_count="multiple",
                                 file_types=[".zip"], height=100)
                base = gr.Dropdown(list(OFFLINE_MODELS), value="smollm2-135m-instruct",
                                   label="Base model for uploads alone (runs bring their own)")
            with gr.Row():
                prompts = gr.Textbox(label="Prompts, one a line", lines=5, elem_id="many-prompts")
                assign = gr.Textbox(label="Adapter per prompt, one a line (empty: in turn; 'base': none)", lines=5,
                                    elem_id="many-assign")
            with gr.Row():
                every = gr.Checkbox(False, label="Every adapter × every prompt")
                tokens = gr.Slider(4, 128, value=32, step=4, label="Max new tokens")
            run_btn = gr.Button("Run as one batch", variant="primary")
            summary = gr.Markdown(elem_id="many-summary")
            table = gr.Dataframe(pd.DataFrame(columns=["prompt", "adapter", "output"]), label="Outputs",
                                 interactive=False, wrap=True, elem_id="many-table")
        self.refresh(refresh_btn.click)
        run_btn.click(self.many, [self.pick, upload, base, prompts, assign, every, tokens], [table, summary],
                      api_name="many_adapters", concurrency_limit=1)

    def refresh(self, trigger) -> None:
        """On `trigger` (the tab opening, a job ending, Refresh), the list shows the adapters there are now."""
        trigger(self.many_choices, self.pick, self.pick, api_visibility="private")
