"""Command line: `python -m vera_core <command> --help`.

    compare   every method side by side on one model and data set: a run directory with report, figures, samples
    train     one method (a compare of one): an adapter directory and its report
    generate  answers of a causal LM, with or without an adapter
    evaluate  an adapter's scores on a data set split
    export    an adapter as native, PEFT, exact-LoRA or merged-model files
    params    the VeRA vs LoRA parameter calculator
"""
from __future__ import annotations

import argparse
import sys

from .calculator import KNOWN_MODELS, known_model, parameter_table

EXPORT_FORMATS = ("native", "peft", "lora", "merged")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 8,64, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"ranks must be positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,1.0, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table, numbers with thousands separators."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def cmd_params(args) -> int:
    names = list(KNOWN_MODELS) if args.model == "all" else [args.model]
    for name in names:
        known = known_model(name)
        targets = args.targets.split(",") if args.targets else known.targets
        rows = parameter_table(known.config, targets, args.vera_r, args.lora_r, args.save_projection)
        for row in rows:
            row["stored_kib"] = row["stored_bytes"] / 1024
            row["lora_ratio"] = f"{row['lora_ratio']:.1f}x" if row["lora_ratio"] else "-"
        print(f"\n{name} — targets: {','.join(targets) if args.targets else known.note}")
        print(format_table(rows, ["method", "r", "trainable", "stored_kib", "lora_ratio"]))
    print("\nlora_ratio = trainable parameters of the first LoRA row / this row's. Stored = fp32 payload "
          "(VeRA regenerates A and B from a seed unless --save-projection).")
    return 0


def _vera_configs(args) -> list:
    from .config import VeraConfig

    return [VeraConfig(r=r, d_init=d, target_modules=args.targets) for r in args.vera_r for d in args.d_init]


def _lora_config(args):
    from .config import LoraConfig

    return LoraConfig(r=args.lora_r, alpha=args.lora_alpha if args.lora_alpha else 2 * args.lora_r,
                      target_modules=args.targets)


def _train_config(args):
    from .train import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                       eval_every=args.eval_every, eval_batches=args.eval_batches, device=args.device)


class _Progress:
    """tqdm bars for compare events: the memory estimate when a run starts, then one bar per run."""

    def __init__(self):
        self.bar = None
        self.loss = None  # the last train loss, shown beside each eval loss

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["type"]
        if kind == "run_start":
            est = event.get("memory_estimate")
            note = ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in est.items()) + " MiB" if est else "no estimate"
            tqdm.write(f"{event['run']}: {event['trainable_params']:,} trainable (head excluded); estimated memory: {note}")
        elif kind == "start":
            self.bar = tqdm(total=event["total"], desc=event["run"], unit="step", leave=True)
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            self.loss = f"{event['loss']:.3f}"
            self.bar.set_postfix(loss=self.loss)
        elif kind == "eval" and self.bar is not None:
            self.bar.set_postfix({"loss": self.loss, "eval_loss": f"{event['eval_loss']:.3f}"})  # kwargs get sorted
        elif kind in ("done", "stopped") and self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_compare(args, methods: list[str]) -> int:
    from .compare import SUMMARY_COLUMNS, compare, parameter_ratios, summary_rows

    lrs = {m: v for m, v in (("vera", args.vera_lr), ("lora", args.lora_lr)) if v is not None}
    report = compare(args.model, args.dataset, methods=methods, vera=_vera_configs(args), lora=_lora_config(args),
                     train=_train_config(args), out_dir=args.out, on_event=_Progress(), lrs=lrs,
                     isolate=not args.in_process, eval_generate=args.eval_generate, samples=args.samples,
                     max_rows=args.max_rows)
    print()
    print(format_table(summary_rows(report), SUMMARY_COLUMNS))
    for line in parameter_ratios(report):
        print(line)
    print(f"peak memory: {report.memory_mode}; run directory: {report.run_dir}")
    return 0


def cmd_compare(args) -> int:
    return _run_compare(args, [m.strip() for m in args.methods.split(",") if m.strip()])


def cmd_train(args) -> int:
    return _run_compare(args, [args.method])


def _load_with_adapter(model_name: str, adapter: str | None, task: str | None, num_labels: int = 2):
    from .io import load_adapter
    from .models import load_model

    model, tokenizer = load_model(model_name, task=task, num_labels=num_labels)
    if adapter:
        model = load_adapter(model, adapter)
    return model, tokenizer


def cmd_generate(args) -> int:
    from .models import generate

    model, tokenizer = _load_with_adapter(args.model, args.adapter, "causal-lm")
    answers = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    print(format_table([{"prompt": p, "answer": a} for p, a in zip(args.prompt, answers)], ["prompt", "answer"]))
    return 0


def cmd_evaluate(args) -> int:
    from .compare import score_split
    from .data import load_dataset

    dataset = load_dataset(args.dataset, seed=args.seed, max_rows=args.max_rows)
    model, tokenizer = _load_with_adapter(args.model, args.adapter, dataset.task,
                                          len(dataset.labels) if dataset.labels else 2)
    scores, _ = score_split(model, tokenizer, dataset, _train_config(args), args.eval_generate, 0, args.split)
    if scores is None:
        raise ValueError(f"the {args.split} split of {dataset.name!r} is empty.")
    print(format_table([{"split": args.split, "rows": len(getattr(dataset, args.split)), **scores}],
                       ["split", "rows", *scores]))
    return 0


def cmd_export(args) -> int:
    from .files import atomic_directory, check_target
    from .inject import remove_adapter
    from .io import export_peft, save_adapter

    check_target(args.out, args.overwrite)  # before the model load, which can take long
    model, tokenizer = _load_with_adapter(args.model, args.adapter, args.task)
    if args.format == "native":
        save_adapter(model, args.out, overwrite=args.overwrite)
    elif args.format in ("peft", "lora"):
        export_peft(model, args.out, as_lora=args.format == "lora", overwrite=args.overwrite)
    else:  # a plain transformers model folder with the update baked into the weights
        with atomic_directory(args.out, args.overwrite) as tmp:
            remove_adapter(model, merge=True).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    print(format_table([{"format": args.format, "directory": args.out}], ["format", "directory"]))
    return 0


def _model_data_args(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    p.add_argument("--model", required=True, help="offline name (minilm-l6, smollm2-135m-instruct), folder or Hub id")
    if dataset:
        p.add_argument("--dataset", required=True, help="rotten-tomatoes, synthetic-restaurants, a .jsonl/.csv file or Hub id")
        p.add_argument("--max-rows", type=int, default=None, help="cap every split at this many rows (quick runs)")
        p.add_argument("--seed", type=int, default=0, help="data split, head init and training seed")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="tokens per row")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: ~5 per run)")
    p.add_argument("--eval-batches", type=int, default=None, help="cap each validation at N batches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--eval-generate", type=int, default=32, help="test inputs scored with BLEU / ROUGE-L (causal LM)")


def _compare_args(p: argparse.ArgumentParser) -> None:
    _model_data_args(p)
    _train_args(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<time>-<model>)")
    p.add_argument("--vera-r", type=_ints, default=[256], help="VeRA ranks, e.g. 256,1024")
    p.add_argument("--d-init", type=_floats, default=[0.1], help="VeRA d initial values, e.g. 0.1,1.0")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * lora-r")
    p.add_argument("--targets", type=lambda t: t if t == "all-linear" else t.split(","), default=None,
                   help="comma-separated module names or all-linear (default: the architecture's query,value)")
    p.add_argument("--vera-lr", type=float, default=None, help="default 1e-2 (the VeRA paper's range)")
    p.add_argument("--lora-lr", type=float, default=None, help="default 2e-4")
    p.add_argument("--samples", type=int, default=8, help="test inputs written to samples.jsonl")
    p.add_argument("--in-process", action="store_true",
                   help="run all methods in this process (faster start; CPU peak memory then less clean)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vera_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="VeRA vs LoRA trainable parameters and stored bytes for known model shapes")
    p.add_argument("--model", default="smollm2-135m-instruct", choices=[*KNOWN_MODELS, "all"])
    p.add_argument("--targets", default=None, help="comma-separated module names (default: the table's preset)")
    p.add_argument("--vera-r", type=_ints, default=[256, 1024], help="VeRA ranks, e.g. 256,1024")
    p.add_argument("--lora-r", type=_ints, default=[8, 64], help="LoRA ranks, e.g. 8,64")
    p.add_argument("--save-projection", action="store_true", help="count A and B as stored too")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("compare", help="train and evaluate several methods side by side; writes a run directory")
    _compare_args(p)
    p.add_argument("--methods", default="base,vera,lora", help="comma-separated: base, head, vera, lora, full")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train one method; writes adapters/<run>/ and report.json under --out")
    _compare_args(p)
    p.add_argument("--method", default="vera", choices=["vera", "lora", "head", "full"])
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="greedy answers of a causal LM (with --adapter: the adapted model)")
    _model_data_args(p, dataset=False)
    p.add_argument("--adapter", default=None, help="adapter directory (native or PEFT)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="loss and accuracy or BLEU / ROUGE-L of a model (+ adapter) on a split")
    _model_data_args(p)
    _train_args(p)
    p.add_argument("--adapter", default=None, help="adapter directory (native or PEFT)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write an adapter as native, PEFT, exact LoRA or a merged model folder")
    _model_data_args(p, dataset=False)
    p.add_argument("--adapter", required=True, help="adapter directory (native or PEFT)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="native | peft | lora (VeRA as the exact rank-r LoRA) | merged (full model folder)")
    p.add_argument("--task", default=None, choices=["causal-lm", "classification"], help="default: the model's own")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it holds files VeRA Lab did not write (all of them are deleted)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
