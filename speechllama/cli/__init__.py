"""Command-line front end: argument parsing only; each sub-command lives in its own module.

Every sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable ``(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# OpenMP threads that spin while waiting steal the cores from everything else; on a shared
# 2-core machine that made 2-thread training 4x slower (14 -> 59 audio-h/h for `small` with
# PASSIVE). Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Sub-command modules, in the order `speechllama --help` lists them.
_COMMANDS = (
    "transcribe",
    "evaluate",
    "bench",
    "train",
    "export",
    "info",
    "tokenizer",
    "data",
    "serve",
    "campaign",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechllama",
        description="Fast LLM-based speech recognition (Speech-LLaMA with multi-token prediction).",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"speechllama.cli.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet
            if exc.name != f"speechllama.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def _version() -> str:
    from speechllama import __version__

    return f"speechllama {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("speechllama: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"speechllama {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
