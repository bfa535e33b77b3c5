"""Command-line front end: argument parsing only; each sub-command lives in its own module.

Every sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable ``(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# OpenMP's wait policy, set before torch is imported; a user's own setting wins.
# - PASSIVE (sleep between parallel regions) where torch shares the cores with other work:
#   training's data-loader processes (spinning threads made 2-thread training of `small` 4x
#   slower on a shared 2-core machine: 59 -> 14 audio-h/h) and the server's request threads.
# - The runtime's default (spin a little, then sleep) for decoding in the foreground. A batch-1
#   decoder call is about 50 short parallel regions, and waking sleeping threads for each one
#   cost `small` 9% on greedy and turned exact verification's 1.29x speed-up over greedy into
#   0.94x (real-smoke, 2 threads, session 8; docs/heads.md).
PASSIVE_COMMANDS = frozenset({"train", "campaign", "serve"})


def omp_wait_policy(argv: list[str]) -> str | None:
    """The OpenMP wait policy for a command line (None: the runtime's default)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    return "PASSIVE" if command in PASSIVE_COMMANDS else None


if (_policy := omp_wait_policy(sys.argv[1:])) is not None:
    os.environ.setdefault("OMP_WAIT_POLICY", _policy)

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
