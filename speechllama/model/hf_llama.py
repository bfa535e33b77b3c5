"""Hugging Face LLaMA directories (config.json + *.safetensors) -> :class:`LlamaDecoder`.

Why a separate module: reading someone else's checkpoint format (field names, refused variants,
sharded indexes, per-file error messages) is a different concern from the decoder's maths, and
``bench_hf`` needs the same name mapping in reverse, so :data:`HF_LAYER_NAMES` is public here.
Only safetensors are read; pickled ``*.bin`` weights never are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from speechllama.model.config import DecoderConfig, ModelConfig
from speechllama.model.decoder import LlamaDecoder

# HF per-layer tensor name (after ``model.layers.<i>.``) -> ours (after ``layers.<i>.``).
HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "mlp.w_gate.weight",
    "mlp.up_proj.weight": "mlp.w_up.weight",
    "mlp.down_proj.weight": "mlp.w_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
}


class HFCheckpointError(ValueError):
    """A Hugging Face directory this decoder cannot represent; the message names the file."""


def hf_decoder_config(path: str | Path) -> DecoderConfig:
    """Read a HF LLaMA ``config.json`` into a :class:`DecoderConfig` (refusing variants we do
    not implement: biases, non-default rope scaling, a decoupled head_dim, other activations)."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HFCheckpointError(f"{file}: cannot read a JSON config ({err})") from err
    if not isinstance(raw, dict):
        raise HFCheckpointError(f"{file}: not a JSON object")
    try:
        d_model, n_heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        unsupported = {
            "model_type": raw.get("model_type", "llama") != "llama",
            "hidden_act": raw.get("hidden_act", "silu") != "silu",
            "attention_bias": bool(raw.get("attention_bias", False)),
            "mlp_bias": bool(raw.get("mlp_bias", False)),
            "rope_type": rope_type != "default",
            "head_dim": raw.get("head_dim") not in (None, d_model // n_heads),
        }
        bad = [key for key, is_bad in unsupported.items() if is_bad]
        if bad:
            raise HFCheckpointError(f"{file}: unsupported LLaMA variant ({', '.join(bad)})")
        cfg = DecoderConfig(
            vocab_size=int(raw["vocab_size"]),
            d_model=d_model,
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            d_ff=int(raw["intermediate_size"]),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10_000.0))),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(raw.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    except HFCheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise HFCheckpointError(f"{file}: missing or malformed field {err}") from err
    try:  # size limits are checked before anything is allocated
        ModelConfig(decoder=cfg).validate()
    except ValueError as err:
        raise HFCheckpointError(f"{file}: {err}") from err
    return cfg


def _safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise HFCheckpointError(f"{index}: not a safetensors index ({err})") from err
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    raise HFCheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json")


def load_hf_llama(path: str | Path) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """Load a HF LLaMA directory -> (config, state dict in :class:`LlamaDecoder` names).

    The untied output matrix, when the model has one, is returned as ``"lm_head.weight"`` (it
    belongs to the heads, not the trunk). Pickled ``*.bin`` weights are never read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    cfg = hf_decoder_config(root)
    ours: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(root):
        try:
            tensors = load_file(file)
        except (OSError, SafetensorError) as err:
            raise HFCheckpointError(f"{file}: cannot read safetensors ({err})") from err
        for name, tensor in tensors.items():
            key = _map_hf_name(name, cfg)
            if key is None:
                continue
            if key == "?":
                raise HFCheckpointError(f"{file}: unexpected tensor {name!r} for a LLaMA decoder")
            ours[key] = tensor
    expected = _expected_shapes(cfg)
    missing, extra = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or extra:
        raise HFCheckpointError(f"{root}: missing weights {missing[:4]}, unexpected {extra[:4]}")
    for key, shape in expected.items():
        if tuple(ours[key].shape) != shape:
            raise HFCheckpointError(
                f"{root}: {key} has shape {tuple(ours[key].shape)}, config.json implies {shape}"
            )
    return cfg, ours


def _map_hf_name(name: str, cfg: DecoderConfig) -> str | None:
    """Our key for a HF tensor name; None to skip it, "?" if it is not a LLaMA weight."""
    if name.endswith("rotary_emb.inv_freq"):
        return None  # older checkpoints store the rope table; we recompute it
    if name == "lm_head.weight":
        return None if cfg.tie_embeddings else name
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_LAYER_NAMES:
        return f"layers.{parts[2]}.{HF_LAYER_NAMES[parts[3]]}"
    return "?"


def _expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    d, f, kv = cfg.d_model, cfg.d_ff, cfg.n_kv_heads * cfg.head_dim
    per_layer = {
        "attn.wq.weight": (d, d), "attn.wk.weight": (kv, d), "attn.wv.weight": (kv, d),
        "attn.wo.weight": (d, d), "mlp.w_gate.weight": (f, d), "mlp.w_up.weight": (f, d),
        "mlp.w_down.weight": (d, f), "attn_norm.weight": (d,), "mlp_norm.weight": (d,),
    }  # fmt: skip
    shapes = {"embed.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def decoder_from_hf(path: str | Path) -> tuple[LlamaDecoder, torch.Tensor | None]:
    """A ready :class:`LlamaDecoder` from a HF directory, plus the untied output matrix (V, d)
    or None when the model ties it to the embedding."""
    cfg, state = load_hf_llama(path)
    lm_head = state.pop("lm_head.weight", None)
    decoder = LlamaDecoder(cfg)
    decoder.load_state_dict(state, strict=True)
    return decoder, lm_head
