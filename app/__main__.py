"""`python -m app [--host 127.0.0.1] [--port 7860] [--runs-dir runs] [--auth USER:PASS]`: start the lab."""
from __future__ import annotations

import argparse
import ipaddress
import sys

from .layout import build_app, launch


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may be reachable from elsewhere
        return False


def credentials(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth must be USER:PASS, both non-empty")
    return user, password


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description="VeRA Lab: VeRA vs LoRA fine-tuning, side by side.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the lab)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--runs-dir", default="runs", help="where runs are written and read (default: runs)")
    parser.add_argument("--auth", type=credentials, default=None, metavar="USER:PASS",
                        help="ask for this user name and password (use it whenever --host is not 127.0.0.1)")
    args = parser.parse_args(argv)
    if not is_loopback(args.host):
        print(f"WARNING: the lab listens on {args.host}, so other machines can reach it. Its API loads models from "
              "local paths and can run a model's remote code when asked"
              + ("; it asks for the --auth password." if args.auth else
                 ". Anyone who can reach it can do that: add --auth USER:PASS, or bind 127.0.0.1."), file=sys.stderr)
    launch(build_app(args.runs_dir), host=args.host, port=args.port, auth=args.auth)


if __name__ == "__main__":
    main()
