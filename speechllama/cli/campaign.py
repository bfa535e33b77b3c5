"""``speechllama campaign``: the accuracy campaign (``speechllama.campaign``): run the spec's
runs, render the write-up, or carve the locked FSDD set out of fsdd-train."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

_EPILOG = """examples:
  speechllama campaign run recipes/synthetic/conf/campaign.toml --data data/synthetic \\
      --exp exp/synthetic-small/campaign --tokenizer exp/synthetic-small/tokenizer.model \\
      --cache-dir exp/synthetic-small/encoder_cache
  speechllama campaign run SPEC ... --only baseline no-ctc      # just these rows
  speechllama campaign report --exp exp/synthetic-small/campaign --doc docs/accuracy.md \\
      --plot docs/accuracy_real.png --spec recipes/synthetic/conf/campaign.toml
  speechllama campaign lock-fsdd data/synthetic   # fsdd-locked out of fsdd-train"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "campaign",
        help="accuracy campaign: fixed-budget training runs, one results row each",
        description="Train one fixed-budget run per row of a campaign spec (TOML), score each "
        "on the eval sets, collect EXP/results.jsonl; render the table and figure.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = sub.add_parser("run", help="run the spec's unfinished runs")
    r.add_argument("spec", type=Path, help="campaign TOML file")
    r.add_argument("--data", type=Path, required=True, help="data folder (DATA/SET/manifest.jsonl)")
    r.add_argument("--exp", type=Path, required=True, help="campaign folder")
    r.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece model, shared")
    r.add_argument(
        "--cache-dir", type=Path, help="encoder-output cache (default: EXP/encoder_cache)"
    )
    r.add_argument("--device", default="cpu", help="evaluate's device (default: cpu)")
    r.add_argument("--threads", type=int, help="torch CPU threads for train and evaluate")
    r.add_argument("--only", nargs="+", default=[], metavar="NAME", help="only these runs")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one protocol value (JSON value, repeatable), e.g. steps=20, preset=tiny, "
        "'train=[\"/work/exp/train_cached.jsonl\"]' (a .jsonl name is a manifest path)",
    )
    r.set_defaults(func=_run)
    rep = sub.add_parser("report", help="render the results table and figure")
    rep.add_argument("--exp", type=Path, required=True, help="campaign folder")
    rep.add_argument("--doc", type=Path, default=Path("docs/accuracy.md"))
    rep.add_argument("--plot", type=Path, default=Path("docs/accuracy_real.png"))
    rep.add_argument("--spec", type=Path, help="campaign TOML (its protocol.plot sets)")
    rep.set_defaults(func=_report)
    lock = sub.add_parser("lock-fsdd", help="DATA/fsdd-locked out of DATA/fsdd-train")
    lock.add_argument("data", type=Path, help="data folder")
    lock.set_defaults(func=_lock)


def _run(args: argparse.Namespace) -> int:
    from speechllama.campaign import Settings, load_spec, run_campaign
    from speechllama.cli.train import parse_key_values

    protocol, runs = load_spec(args.spec)
    changes = parse_key_values(args.set, "--set")
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    try:
        protocol = dataclasses.replace(protocol, **changes)
    except TypeError as exc:
        raise ValueError(f"--set: {exc}") from exc
    settings = Settings(
        data=args.data,
        exp=args.exp,
        tokenizer=args.tokenizer,
        cache_dir=args.cache_dir,
        device=args.device,
        threads=args.threads,
    )
    failed = run_campaign(protocol, runs, settings, only=args.only)
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from speechllama.campaign import load_results, load_spec
    from speechllama.campaign_report import render

    sets: tuple[str, ...] = ()
    if args.spec is not None:
        sets = load_spec(args.spec)[0].plot
    results = load_results(args.exp)
    render(results, args.doc, args.plot, sets)
    print(f"{len(results)} run(s) -> {args.doc}" + (f", {args.plot}" if results else ""))
    return 0


def _lock(args: argparse.Namespace) -> int:
    from speechllama.data.locked import LOCKED, SOURCE, lock_fsdd

    locked, left = lock_fsdd(args.data)
    print(f"{args.data / LOCKED}: {locked} recordings; {args.data / SOURCE}: {left} left")
    return 0
