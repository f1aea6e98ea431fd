"""`python -m app [--host 127.0.0.1] [--port 7860] [--runs-dir runs]`: start the lab."""
from __future__ import annotations

import argparse

from .ui import build_app, launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description="VeRA Lab: VeRA vs LoRA fine-tuning, side by side.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the lab)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--runs-dir", default="runs", help="where runs are written and read (default: runs)")
    args = parser.parse_args(argv)
    launch(build_app(args.runs_dir), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
