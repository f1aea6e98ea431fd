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
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from .calculator import KNOWN_MODELS, known_model, parameter_table
from .parse import float_list, int_list, seed_list
from .report import format_table
from .progress import ProgressBar
from .runs import EXPORT_FORMATS

def _ints(text: str) -> list[int]:
    try:
        return int_list(text, "values")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seeds(text: str) -> list[int]:
    try:
        return seed_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _floats(text: str) -> list[float]:
    try:
        return float_list(text, "values")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_params(args) -> int:
    names = list(KNOWN_MODELS) if args.model == "all" else [args.model]
    for name in names:
        known = known_model(name)
        targets = args.targets.split(",") if args.targets else known.targets
        rows = parameter_table(known.config, targets, args.vera_r, args.lora_r, args.save_projection)
        for row in rows:
            row["stored_kib"] = round(row["stored_bytes"] / 1024, 1)
            row["lora_ratio"] = f"{row['lora_ratio']:.1f}x" if row["lora_ratio"] else "-"
        print(f"\n{name} — targets: {','.join(targets) if args.targets else known.note}")
        print(format_table(rows, ["method", "r", "trainable", "stored_kib", "lora_ratio"]))
    print("\nlora_ratio = trainable parameters of the first LoRA row / this row's. Stored = fp32 payload "
          "(VeRA regenerates A and B from a seed unless --save-projection).")
    return 0


def _request(args, methods: list[str]):
    """The RunRequest of a compare / train command line (checked before anything runs)."""
    from ..adapters.config import lora_grid, vera_grid
    from .request import RunRequest

    return RunRequest(
        args.model, args.dataset, methods,
        vera=vera_grid(r=args.vera_r, d_init=args.d_init, target_modules=args.targets),
        lora=lora_grid(r=args.lora_r, alpha=args.lora_alpha, target_modules=args.targets),
        train=_train_config(args),
        lrs={m: v for m, v in (("vera", args.vera_lr), ("lora", args.lora_lr), ("head", args.head_lr))
             if v is not None},
        max_rows=args.max_rows, isolate=not args.in_process, eval_generate=args.eval_generate, samples=args.samples,
        seeds=args.seeds, tune=_tune(args, methods), tune_steps=args.tune_steps,
        max_runs=args.max_runs)


def _tune(args, methods: list[str]) -> dict | None:
    """The request's tuning grids: --tune for every method, and head-only's own (--head-tune, else HEAD_LR_SCALES)
    when head-only runs."""
    from .tune import tuning_grids

    if args.tune is None:
        if args.head_tune is not None:
            raise ValueError("--head-tune sets head-only's grid within tuning; add --tune SCALES (the other methods' "
                             "grid) as well.")
        return None
    return tuning_grids(methods, args.tune, args.head_tune)


def _train_config(args):
    from .config import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                       eval_every=args.eval_every, eval_batches=args.eval_batches, device=args.device,
                       prefer=args.prefer)


class _Progress(ProgressBar):
    """The trainer's bars, and one line per run when it starts: its trainable parameters and memory estimate."""

    def __call__(self, event: dict) -> None:
        if event["type"] == "run_start":
            from tqdm.auto import tqdm

            est = event.get("memory_estimate")
            note = ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in est.items()) + " MiB" if est else "no estimate"
            tqdm.write(f"{event['run']}: {event['trainable_params']:,} trainable (head excluded); estimated memory "
                       f"(upper bound: every row at max_length): {note}")
        super().__call__(event)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """Ctrl-C or SIGTERM sets `stop`: the current run ends within a step and saves. A second one stops at once."""
    received: list[int] = []

    def handle(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving (again to stop at once)",
              file=sys.stderr)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_compare(args, methods: list[str]) -> int:
    from .compare import run_request
    from .report import SUMMARY_COLUMNS, parameter_ratios, seed_summary_lines, summary_rows

    if args.resume:
        from .request import RunRequest
        from .runs import read_config

        saved = read_config(args.resume).get("request")
        if saved is None:
            raise ValueError(f"{args.resume!r} was started from Python with a model or data set object; resume it "
                             "there with run_request(request, out_dir, exists='resume').")
        request, out, exists = RunRequest.from_dict(saved), args.resume, "resume"
    else:
        if args.model is None or args.dataset is None:
            raise ValueError(f"{args.command} needs --model and --dataset (or --resume RUN_DIR).")
        request, out, exists = _request(args, methods), args.out, "refuse"
    stop = threading.Event()
    with _stop_on_signals(stop) as received:
        report = run_request(request, out_dir=out, on_event=_Progress(), stop=stop, exists=exists)
    print()
    print(format_table(summary_rows(report), SUMMARY_COLUMNS))
    for line in parameter_ratios(report):
        print(line)
    for line in seed_summary_lines(report):
        print(line)
    print(f"peak memory: {report.memory_mode}; run directory: {report.run_dir}")
    if report.stopped:
        print(f"stopped; the adapter and a checkpoint are saved. Continue with: python -m vera_core {args.command} "
              f"--resume {report.run_dir}", file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    return 0


def cmd_compare(args) -> int:
    return _run_compare(args, [m.strip() for m in args.methods.split(",") if m.strip()])


def cmd_train(args) -> int:
    return _run_compare(args, [args.method])


def _load_with_adapter(model_name: str, adapter: str | None, task: str | None, num_labels: int = 2):
    from ..adapters.io import load_adapter
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
    from .data import load_dataset
    from .evaluate import score_split

    dataset = load_dataset(args.dataset, seed=args.seed, max_rows=args.max_rows)
    model, tokenizer = _load_with_adapter(args.model, args.adapter, dataset.task,
                                          len(dataset.labels) if dataset.labels else 2)
    scores, _, _ = score_split(model, tokenizer, dataset, _train_config(args), args.eval_generate, 0, args.split)
    if scores is None:
        raise ValueError(f"the {args.split} split of {dataset.name!r} is empty.")
    scores = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
    print(format_table([{"split": args.split, "rows": len(getattr(dataset, args.split)), **scores}],
                       ["split", "rows", *scores]))
    return 0


def cmd_export(args) -> int:
    from ..adapters.files import check_target
    from .runs import export

    check_target(args.out, args.overwrite)  # before the model load, which can take long
    model, tokenizer = _load_with_adapter(args.model, args.adapter, args.task)
    export(model, tokenizer, args.out, args.format, overwrite=args.overwrite)
    print(format_table([{"format": args.format, "directory": args.out}], ["format", "directory"]))
    return 0


def _model_data_args(p: argparse.ArgumentParser, dataset: bool = True, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="offline name (minilm-l6, smollm2-135m-instruct), folder or Hub id")
    if dataset:
        p.add_argument("--dataset", required=required,
                       help="rotten-tomatoes, synthetic-restaurants, a .jsonl/.csv file or Hub id")
        p.add_argument("--max-rows", type=int, default=None, help="cap every split at this many rows (quick runs)")
        p.add_argument("--seed", type=int, default=0, help="data split, head init and training seed")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="tokens per row")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: ~5 per run)")
    p.add_argument("--eval-batches", type=int, default=None, help="cap each validation at N batches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--prefer", choices=("memory", "speed"), default="memory",
                   help="VeRA's folded weights: rebuild them in backward unless keeping saves >= 10%% of the step "
                        "(memory, the default) or always keep them (speed: faster, more memory)")
    p.add_argument("--eval-generate", type=int, default=32, help="test inputs scored with BLEU / ROUGE-L (causal LM)")


def _compare_args(p: argparse.ArgumentParser) -> None:
    _model_data_args(p, required=False)  # required unless --resume
    _train_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="a new run directory (default: runs/<time>-<model>)")
    where.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue a stopped run directory with its own settings (other options are ignored)")
    p.add_argument("--vera-r", type=_ints, default=[256], help="VeRA ranks, e.g. 256,1024")
    p.add_argument("--d-init", type=_floats, default=[0.1], help="VeRA d initial values, e.g. 0.1,1.0")
    p.add_argument("--lora-r", type=_ints, default=[8], help="LoRA ranks, e.g. 4,8,16")
    p.add_argument("--lora-alpha", type=_floats, default=None,
                   help="one alpha per LoRA rank, e.g. 8,16,32, or one for all (default: 2 * r each)")
    p.add_argument("--targets", type=lambda t: t if t == "all-linear" else t.split(","), default=None,
                   help="comma-separated module names or all-linear (default: the architecture's query,value)")
    p.add_argument("--vera-lr", type=float, default=None,
                   help="default: DEFAULT_LR['vera'] in lab/train.py (from the tuned records)")
    p.add_argument("--lora-lr", type=float, default=None,
                   help="default: DEFAULT_LR['lora'] in lab/train.py (from the tuned records)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="the one classifier-head rate of every method (and head-only's grid centre when tuned); "
                        "default: DEFAULT_LR['head'] in lab/train.py (benchmarks/results/head_rate.md)")
    p.add_argument("--samples", type=int, default=8, help="test inputs written to samples.jsonl")
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="training seeds, e.g. 0,1,2: every setting once per seed on the same split (default: --seed)")
    p.add_argument("--tune", type=_floats, default=None, metavar="SCALES",
                   help="tune each method's learning rates on validation: default x each scale, e.g. 0.25,0.5,1,2,4")
    p.add_argument("--head-tune", type=_floats, default=None, metavar="SCALES",
                   help="head-only's own grid, x the head rate (default 0.25,1,4,16,64: a new head's best rate moves "
                        "with the model); its choice is every method's head rate")
    p.add_argument("--tune-steps", type=int, default=None, help="steps of each tuning run (default: --steps)")
    p.add_argument("--max-runs", type=int, default=60,
                   help="refuse more runs than this (seeds x settings + tuning, one second-seed run per tuned setting)")
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
    """Run a command; bad input, a failed write (a full disk) and a method's process that died end as one
    `error:` line and exit code 2."""
    from ..adapters.files import WriteError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .compare import RunDied  # the comparison machinery loads only for the commands that use it

        if not isinstance(err, RunDied):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
