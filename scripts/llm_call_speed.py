"""Per-call decoder time of a pretrained-LLM model: ours against ``transformers``, same weights.

Usage:
    .venv/bin/python scripts/llm_call_speed.py                    # smollm, 2 threads
    .venv/bin/python scripts/llm_call_speed.py --dtypes float32 int8   # int8 against fp32
    .venv/bin/python scripts/llm_call_speed.py --model DIR --dtypes float32 --repeats 50

One decoder call = k new tokens after a context of ``--context`` positions (the audio embeddings
plus the transcript so far), batch 1, head 1 only. Ours is :meth:`SpeechLLaMA.step` on the static
KV cache rolled back after each call; theirs is ``LlamaForCausalLM.forward`` with a
``DynamicCache`` cropped back after each call and logits for the k new positions (what
``generate()`` runs per step, and what a verification step needs), built from our weights by
:func:`speechllama.bench_hf.to_hf_llama`. k = 1 is a greedy step; k = 4 a verification step of
K = 4 heads. Calls are timed in interleaved rounds (see ``time_decoder.interleaved``).

The floor: a call reads every decoder weight and the output layer once (the cache is small
next to them), so it cannot take less than bytes of weights / memory bandwidth; the bandwidth
is measured here as the time to sum a 1 GiB tensor with the same threads.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
from time_decoder import interleaved, show

from speechllama.bench_hf import to_hf_llama
from speechllama.model.precision import DECODE_PRECISIONS


def bandwidth_gb_s(repeats: int = 5) -> float:
    """Read bandwidth (GB/s): the fastest of ``repeats`` sums over a 1 GiB fp32 tensor."""
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def weight_bytes(model: torch.nn.Module, precision: str) -> int:
    """Bytes a decoder call reads: every decoder matrix (not the embedding table, of which a
    call reads k rows) plus the output layer; int8 counts one byte per weight (its per-channel
    scales are negligible)."""
    d = model.config.decoder
    per_elem = 1 if precision == "int8" else torch.finfo(getattr(torch, precision)).bits // 8
    params = sum(p.numel() for n, p in model.decoder.named_parameters() if n != "embed.weight")
    return (params + d.vocab_size * d.d_model) * per_elem


@torch.inference_mode()
def time_precision(model: torch.nn.Module, precision: str, args: argparse.Namespace) -> dict:
    """Interleaved per-call times of ours at ``precision`` and of transformers in the same
    dtype; for int8 (ours only) transformers runs in fp32."""
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    model.set_decode_precision(precision)  # int8 keeps the fp32 weights, which hf copies
    hf = to_hf_llama(model)
    vocab = model.config.decoder.vocab_size
    g = torch.Generator().manual_seed(0)
    context = torch.randint(4, vocab, (1, args.context), generator=g)
    audio = model.decoder.embed(context[:, :-1])  # any embeddings: speed does not depend on them
    cache = model.new_cache(1, args.context + max(args.ks) + 1, dtype=dtype)
    model.prefill(audio, torch.tensor([args.context - 1]), cache, num_heads=1)
    base = cache.lengths.clone()
    from transformers import DynamicCache

    hf_cache = DynamicCache()
    # transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns until 5.40).
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    hf(input_ids=context, use_cache=True, logits_to_keep=1, **{key: hf_cache})

    def ours(k: int):
        fed = torch.randint(4, vocab, (1, k), generator=g)

        def run():
            model.step(fed, cache, num_heads=1)
            cache.truncate(base)

        return run

    def theirs(k: int):
        fed = torch.randint(4, vocab, (1, k), generator=g)

        def run():
            hf(input_ids=fed, use_cache=True, logits_to_keep=k, **{key: hf_cache})
            hf_cache.crop(-k)  # transformers 5: a negative count removes that many

        return run

    fns = {
        f"{who}{k}": (ours if who == "ours" else theirs)(k)
        for who in ("ours", "hf")
        for k in args.ks
    }
    return interleaved(fns, args.repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm", help="a checkpoint directory or a sourced preset")
    p.add_argument("--dtypes", nargs="+", default=list(DECODE_PRECISIONS),
                   choices=DECODE_PRECISIONS,
                   help="our decoder's precision; transformers runs int8 rows in fp32")  # fmt: skip
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--context", type=int, default=100, help="positions already in the cache")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from speechllama.transcribe import load_model

    model = load_model(args.model).model
    bw = bandwidth_gb_s()
    med = statistics.median
    d = model.config.decoder
    head = f"{d.n_layers} layers, d={d.d_model}, vocab {d.vocab_size}; batch 1, {args.threads}"
    print(f"== {args.model}: {head} threads, context {args.context}; read {bw:.1f} GB/s")
    print(
        "| dtype | k | ours ms/call | transformers ms/call | ours faster | floor ms | ours/floor |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        times = time_precision(model, name, args)
        floor = weight_bytes(model, name) / (bw * 1e9) * 1000
        for k in args.ks:
            ours, hf = times[f"ours{k}"], times[f"hf{k}"]
            ratio = med(h / o for h, o in zip(hf, ours, strict=True))
            print(f"| {name} | {k} | {med(ours):.1f} | {med(hf):.1f} | {ratio:.2f}x "
                  f"| {floor:.1f} | {med(ours) / floor:.2f}x |")  # fmt: skip
        for k in args.ks:
            print(f"  {name} k={k}: ours {show(times[f'ours{k}'])}, hf {show(times[f'hf{k}'])}")


if __name__ == "__main__":
    main()
