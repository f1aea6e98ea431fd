"""Command line: `python -m vera_core <command> --help`."""
from __future__ import annotations

import argparse
import sys

from .calculator import KNOWN_MODELS, known_model, parameter_table


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 8,64, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"ranks must be positive integers, got {text!r}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
