"""`speechllama train`: argument parsing only; the run itself is ``speechllama.train.loop``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from speechllama.model.config import PRESETS, SOURCED_PRESETS

_EPILOG = """examples:
  speechllama train --train data/train.jsonl --dev data/dev.jsonl --text data/text.txt \\
      --preset small --out exp/small --max-steps 20000
  speechllama train --train data/train.jsonl --dev data/dev.jsonl --out exp/small --resume \\
      --preset small --text data/text.txt --max-steps 20000    # same options, continue
  speechllama train --train data/train.jsonl --init exp/small/best --heads 4 \\
      --head-kind latent --out exp/mtp4 --lr 3e-4
  speechllama train --train data/train.jsonl --dev data/dev.jsonl --init exp/small/best \\
      --heads 4 --head-kind latent --freeze encoder adapter decoder --out exp/heads4
      # heads only: head 1 and the trunk stay as they are, the trunk runs once per utterance
  speechllama train --train data/train.jsonl --dev data/dev.jsonl --init exp/mtp4/best \\
      --mwer --mwer-nbest 4 --max-steps 500 --lr 1e-4 --warmup 50 --out exp/mtp4-mwer
  speechllama train --train data/train.jsonl --dev data/dev.jsonl --init exp/mtp4/best \\
      --lm-text data/text/train.txt --out exp/mtp4-lm    # + 32 text-only sentences a step
  torchrun --nproc_per_node 4 -m speechllama train --train data/train.jsonl \\
      --dev data/dev.jsonl --preset small --text data/text.txt --out exp/small4
      # 4 processes (GPUs, or CPU with gloo): --max-duration is per rank and micro-batch

Writes OUT/step-NNNNNNNN/ checkpoints (the last --keep-last, with optimizer state for
--resume), OUT/best/ (lowest dev WER), OUT/metrics.jsonl and OUT/tokenizer.model if trained."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a Speech-LLaMA model",
        description="Train (or fine-tune, or resume) a Speech-LLaMA model on a NeMo JSONL "
        "manifest: AdamW, warmup + cosine, duration-bucketed batches, bf16 autocast.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--train", required=True, metavar="MANIFEST", help="training manifest")
    data.add_argument("--dev", metavar="MANIFEST", help="dev manifest (loss and greedy WER)")
    data.add_argument("--tokenizer", metavar="FILE", help="SentencePiece model to use")
    data.add_argument(
        "--text",
        nargs="+",
        default=[],
        metavar="FILE",
        help="train a tokenizer on these text files (default without --tokenizer: on the "
        "training transcripts)",
    )
    data.add_argument("--vocab-size", type=int, default=512, metavar="N", help="(default: 512)")
    data.add_argument("--out", required=True, metavar="DIR", help="run directory")

    model = p.add_argument_group("model")
    start = model.add_mutually_exclusive_group(required=True)
    start.add_argument(
        "--preset", choices=(*PRESETS, *SOURCED_PRESETS), help="train this preset from scratch"
    )
    start.add_argument("--init", metavar="CKPT", help="fine-tune this checkpoint directory")
    model.add_argument(
        "--heads",
        type=int,
        metavar="K",
        help="multi-token heads; with --init, its next-token output layer seeds them (--heads 1 "
        "--head-kind linear: a multi-token --init continues as its next-token trunk)",
    )
    model.add_argument(
        "--head-kind", metavar="KIND", help="linear | projection | latent | medusa | layer"
    )
    model.add_argument(
        "--head-loss-weights", type=float, nargs="+", metavar="W", help="one weight per head"
    )
    model.add_argument(
        "--heads-from",
        metavar="CKPT",
        help="start the multi-token heads from this checkpoint's (same heads config): e.g. "
        "the heads of the model whose trunk --init continued (--heads 1 --head-kind linear)",
    )
    model.add_argument(
        "--model-set",
        action="append",
        metavar="KEY=VALUE",
        help="change one key of the preset's model config (JSON value), repeatable: "
        "adapter.norm=rms, decoder.dropout=0.2, adapter.hidden=768",
    )
    model.add_argument(
        "--freeze",
        nargs="+",
        default=[],
        choices=("encoder", "adapter", "decoder", "ctc_head"),
        metavar="PART",
        help="parts not to train: encoder, adapter, decoder, ctc_head (the first three: "
        "heads-only training, which keeps head 1 frozen and caches the trunk's hidden states)",
    )
    model.add_argument(
        "--train-head-one",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train head 1 (the next-token output layer) too; default: frozen in heads-only "
        "training (so greedy transcripts stay the same), trained otherwise",
    )
    model.add_argument(
        "--hidden-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="heads-only training: cache the frozen trunk's final hidden states once and train "
        "the heads on them without running the trunk (not for --head-kind layer; no "
        "SpecAugment or CTC) (default: on)",
    )

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: epochs)")
    opt.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    opt.add_argument(
        "--max-duration",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="audio seconds per micro-batch (default: %(default)s)",
    )
    opt.add_argument("--max-batch-size", type=int, metavar="N", help="utterances per batch cap")
    opt.add_argument("--buckets", type=int, default=10, help="duration buckets (default: 10)")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    opt.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor (0.05)")
    opt.add_argument("--warmup", type=int, default=500, metavar="STEPS", help="(default: 500)")
    opt.add_argument("--weight-decay", type=float, default=0.01, help="(default: 0.01)")
    opt.add_argument(
        "--encoder-lr-scale",
        type=float,
        default=0.1,
        metavar="X",
        help="learning rate of the encoder's trained top blocks (--model-set "
        "encoder.train_top=N) as a multiple of --lr (default: 0.1)",
    )
    opt.add_argument("--grad-accum", type=int, default=1, metavar="N", help="(default: 1)")
    opt.add_argument("--clip", type=float, default=1.0, help="grad-norm clip, 0 = off (1.0)")
    opt.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the model; losses stay fp32 (default: on)",
    )
    opt.add_argument(
        "--ctc-weight",
        type=float,
        metavar="W",
        help="auxiliary CTC loss weight (default: 0.3 if the model has a CTC head, else 0)",
    )
    opt.add_argument("--seed", type=int, default=0)

    mw = p.add_argument_group("minimum word error rate (MWER) fine-tuning")
    mw.add_argument(
        "--mwer",
        action="store_true",
        help="fine-tune the --init model on its own N-best lists (beam search, no gradient): "
        "loss = expected word errors relative to the list mean + --mwer-ce-weight x the usual "
        "loss",
    )
    mw.add_argument("--mwer-nbest", type=int, default=4, metavar="N", help="list size (4)")
    mw.add_argument(
        "--mwer-ce-weight", type=float, default=0.01, metavar="W", help="CE weight (0.01)"
    )
    mw.add_argument(
        "--mwer-beam-strategy",
        choices=("prefix-beam", "beam"),
        default="prefix-beam",
        help="the search that makes the lists: prefix beam search over the heads' multi-token "
        "blocks (plain beam for a one-head model), or next-token beam (default: prefix-beam)",
    )
    mw.add_argument(
        "--mwer-add-reference",
        action="store_true",
        help="add the reference to every list that lacks it (default: lists as decoded)",
    )

    lm = p.add_argument_group("text-only language-model batches")
    lm.add_argument(
        "--lm-text",
        nargs="+",
        default=[],
        metavar="FILE",
        help="sentences without audio (one per line, .gz or id<TAB>text .tsv) that train the "
        "decoder as an LM alongside the speech; the dev set's sentences are dropped from them",
    )
    lm.add_argument(
        "--lm-batch-size", type=int, default=32, metavar="N", help="sentences per step (32)"
    )
    lm.add_argument(
        "--lm-weight", type=float, default=0.3, metavar="W", help="their loss weight (0.3)"
    )

    aug = p.add_argument_group("augmentation and encoder cache")
    aug.add_argument(
        "--spec-augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SpecAugment masks (time masks only on cached encoder outputs) (default: on)",
    )
    aug.add_argument(
        "--augment",
        nargs="*",
        metavar="KEY=VALUE",
        help="waveform augmentation; bare --augment uses the defaults, KEY=VALUE (JSON values) "
        "sets AugmentConfig fields, e.g. speeds=[0.9,1.1] noise_prob=0.8 reverb_prob=0",
    )
    aug.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cache a frozen encoder's outputs on disk (default: on)",
    )
    aug.add_argument("--cache-dir", metavar="DIR", help="(default: OUT/encoder_cache)")
    aug.add_argument(
        "--cache-copies",
        type=int,
        default=1,
        metavar="K",
        help="cached copies per utterance: 1 clean + K-1 augmented (default: 1)",
    )

    run = p.add_argument_group("evaluation, checkpoints, resources")
    run.add_argument("--eval-every", type=int, default=1000, metavar="STEPS")
    run.add_argument("--eval-utterances", type=int, default=200, metavar="N", help="for WER")
    run.add_argument("--save-every", type=int, default=1000, metavar="STEPS")
    run.add_argument("--keep-last", type=int, default=3, metavar="N")
    run.add_argument("--log-every", type=int, default=20, metavar="STEPS")
    run.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    run.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    run.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard weights, gradients and optimizer state across ranks (FSDP) "
        "instead of replicating them (DDP); the full weights must still fit on one device",
    )
    run.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    run.add_argument("--workers", type=int, default=0, metavar="N", help="data loader workers")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def parse_augment(items: list[str] | None) -> dict[str, Any] | None:
    """``None`` (flag absent) -> None; ``[]`` -> {} (defaults); KEY=VALUE with JSON values."""
    if items is None:
        return None
    return {k.replace("-", "_"): v for k, v in parse_key_values(items, "--augment").items()}


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE strings -> {KEY: JSON value, or the raw string when it is not JSON}."""
    spec: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            spec[key] = json.loads(raw)
        except json.JSONDecodeError:
            spec[key] = raw
    return spec


def _run(args: argparse.Namespace) -> int:
    from speechllama.train.config import TrainConfig
    from speechllama.train.distributed import launched_rank
    from speechllama.train.loop import train
    from speechllama.train.metrics import dev_line

    cfg = TrainConfig(
        train_manifest=args.train,
        dev_manifest=args.dev,
        out_dir=args.out,
        preset=args.preset,
        init=args.init,
        tokenizer=args.tokenizer,
        text=tuple(args.text),
        vocab_size=args.vocab_size,
        num_heads=args.heads,
        head_kind=args.head_kind,
        heads_from=args.heads_from,
        head_loss_weights=tuple(args.head_loss_weights) if args.head_loss_weights else None,
        model_overrides=parse_key_values(args.model_set or [], "--model-set"),
        freeze=tuple(args.freeze),
        train_head_one=args.train_head_one,
        hidden_cache=args.hidden_cache,
        seed=args.seed,
        max_steps=args.max_steps,
        epochs=args.epochs,
        max_duration=args.max_duration,
        max_batch_size=args.max_batch_size,
        num_buckets=args.buckets,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        encoder_lr_scale=args.encoder_lr_scale,
        grad_accum=args.grad_accum,
        clip=args.clip,
        bf16=args.bf16,
        ctc_weight=args.ctc_weight,
        spec_augment=args.spec_augment,
        augment=parse_augment(args.augment),
        cache=args.cache,
        cache_dir=args.cache_dir,
        cache_copies=args.cache_copies,
        eval_every=args.eval_every,
        eval_max_utterances=args.eval_utterances,
        save_every=args.save_every,
        keep_last=args.keep_last,
        log_every=args.log_every,
        save_dtype=args.save_dtype,
        threads=args.threads,
        num_workers=args.workers,
        progress=not args.no_progress,
        resume=args.resume,
        fsdp=args.fsdp,
        mwer=args.mwer,
        mwer_nbest=args.mwer_nbest,
        mwer_ce_weight=args.mwer_ce_weight,
        mwer_beam_strategy=args.mwer_beam_strategy,
        mwer_add_reference=args.mwer_add_reference,
        lm_text=tuple(args.lm_text),
        lm_batch_size=args.lm_batch_size,
        lm_weight=args.lm_weight,
    )
    result = train(cfg)
    if launched_rank():
        return 0  # under torchrun, rank 0 reports
    print(
        f"trained {result.steps} steps, {result.audio_hours:.3f} audio hours "
        f"({result.audio_h_per_h:.1f} audio-h per h), final train loss {result.train_loss:.4f}"
    )
    if result.dev:
        print(dev_line(result.dev))
    print(f"last checkpoint: {result.last_checkpoint}")
    if result.best_checkpoint:
        print(f"best checkpoint: {result.best_checkpoint}")
    return 0
