"""Checkpoint directories: ``config.json`` + ``model.safetensors`` + ``tokenizer.model``.

Layout of a checkpoint directory::

    config.json         {"format": "speechllama-checkpoint", "version": 1,
                         "model": ModelConfig.to_dict(),
                         "tokenizer": {"file": "tokenizer.model", "vocab_size": V, "sha256": ...},
                         "weights": {"file": "model.safetensors", "dtype": "float32",
                                     "encoder": "checkpoint" | "source"},
                         "training": {data, steps, git_commit, date, ...}}
    model.safetensors   the trained parameters (encoder omitted when "encoder" is "source":
                        a frozen encoder whose weights come from ``model.encoder.source``;
                        likewise the LLM's weights when "decoder" is "source")
    tokenizer.model     the SentencePiece model (absent with a sourced decoder: the tokenizer
                        then comes with the LLM, "tokenizer": {"source": ..., "vocab_size": V})
    train_state.json    optional, for --resume: optimizer/scheduler/sampler state with tensors
    train_state.safetensors   replaced by names (JSON + safetensors, never pickle)

Why a directory written atomically: the files are written into a sibling ``NAME.tmp-XXXX``
directory that is renamed into place only once complete, so a crash mid-save never leaves a
directory that looks loadable; loaders refuse ``*.tmp-*`` names and directories without
``config.json``. Why only safetensors and JSON: loading a checkpoint must never execute code.
A loaded checkpoint is first checked on a shadow model (``speechllama.shadow``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from speechllama.model.config import ModelConfig
from speechllama.shadow import (
    CheckpointError,
    check_memory,
    check_weights,
    load_weights,
    shapes_only,
    stored_tensors,
)

FORMAT = "speechllama-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
TMP_MARK = ".tmp-"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_CONFIG_BYTES = 1 << 20
"""A config.json is a few kB; a larger one is not read (it would be parsed into memory)."""


def encoder_from_source(config: ModelConfig) -> bool:
    """True when the encoder weights are not stored: frozen and loadable from their source."""
    return config.encoder.source is not None and config.encoder.frozen


def sourced_encoder_names(model: torch.nn.Module, config: ModelConfig) -> set[str]:
    """State-dict names of the encoder tensors that come from its source, not the checkpoint:
    all of a frozen sourced encoder's but those of its trained top blocks (``train_top``)."""
    if not encoder_from_source(config):
        return set()
    prefixes = getattr(model.encoder, "top_prefixes", lambda: ())()
    kept = tuple(f"encoder.{p}" for p in prefixes)
    return {k for k in model.state_dict() if k.startswith("encoder.") and not k.startswith(kept)}


def trained_state(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: everything, minus the encoder (but its trained top
    blocks) and the LLM decoder when they come from source."""
    from speechllama.model.sourced import sourced_decoder_names

    skip = sourced_decoder_names(config) | sourced_encoder_names(model, config)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write ``model`` (a SpeechLLaMA), ``tokenizer`` and ``meta`` (training provenance) to the
    directory ``out_dir`` atomically, replacing an existing checkpoint there.

    ``dtype`` (float32 | bfloat16 | float16) is the storage type of floating tensors; loading
    casts back to the model's type. ``train_state`` (nested dicts/lists of tensors and JSON
    values, e.g. optimizer.state_dict()) is stored for resumption. Returns the final path."""
    if dtype not in _DTYPES:
        raise ValueError(f"checkpoint dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    config: ModelConfig = model.config
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}{TMP_MARK}", dir=out.parent))
    try:
        state = {
            k: (v.to(_DTYPES[dtype]) if v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in trained_state(model, config).items()
        }
        save_file(_unshare(state), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        sourced_llm = config.decoder.source is not None
        if sourced_llm:  # the LLM's own tokenizer, read from its source at load time
            tok_doc = {"source": config.decoder.source, "vocab_size": int(tokenizer.vocab_size)}
        else:
            proto: bytes = tokenizer.model_proto
            (tmp / TOKENIZER_FILE).write_bytes(proto)
            tok_doc = {
                "file": TOKENIZER_FILE,
                "vocab_size": int(tokenizer.vocab_size),
                "sha256": hashlib.sha256(proto).hexdigest(),
            }
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "model": config.to_dict(),
            "tokenizer": tok_doc,
            "weights": {
                "file": WEIGHTS_FILE,
                "dtype": dtype,
                "encoder": "source" if encoder_from_source(config) else "checkpoint",
                "decoder": "source" if sourced_llm else "checkpoint",
            },
            "training": meta or {},
        }
        if train_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            encoded = _encode(train_state, tensors)
            save_file(_unshare(tensors), str(tmp / STATE_TENSORS))
            _write_json(tmp / STATE_JSON, encoded)
        _write_json(tmp / CONFIG_FILE, doc)  # last: its presence marks a complete checkpoint
        _fsync_dir(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of checkpoint directory ``path``, validated; nothing allocated."""
    root = Path(path)
    if TMP_MARK in root.name:
        raise CheckpointError(f"{root}: an incomplete checkpoint (interrupted save), not loading")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing; {root} is not a complete checkpoint")
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{cfg_path}: {size} bytes, more than a config holds; not reading it")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{cfg_path}: not valid JSON ({reason})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a speechllama checkpoint config")
    for key in ("weights", "tokenizer", "training"):
        if not isinstance(doc.get(key, {}), dict):
            raise CheckpointError(f"{cfg_path}: '{key}' must be a JSON object")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{cfg_path}: unsupported checkpoint version {doc.get('version')!r}")
    try:
        ModelConfig.from_dict(doc.get("model"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from None
    return doc


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", merge_lora: bool = False
) -> tuple[Any, Any, dict]:
    """Load a checkpoint directory -> ``(SpeechLLaMA in eval mode, Tokenizer, config.json dict)``.

    ``merge_lora``: fold the decoder's LoRA deltas into its weights (inference: a decoder call
    then costs what it cost without LoRA); the model can then no longer be trained or saved.

    The config is validated before any tensor is allocated; tensor names and shapes are checked
    against the model before any is copied. A sourced encoder or LLM decoder (and its
    tokenizer) is loaded from its source."""
    from speechllama.model.sourced import (
        load_sourced_decoder,
        source_tokenizer,
        sourced_decoder_names,
    )
    from speechllama.model.speechllama import SpeechLLaMA
    from speechllama.text import Tokenizer

    root = Path(path)
    doc = read_checkpoint_config(root)
    config = ModelConfig.from_dict(doc["model"])
    weights = doc.get("weights", {})
    sourced_llm = weights.get("decoder") == "source" and config.decoder.source is not None
    tok_path = root / TOKENIZER_FILE
    if sourced_llm:
        try:
            tokenizer = source_tokenizer(config)
        except ValueError as exc:
            raise CheckpointError(f"{root / CONFIG_FILE}: {exc}") from None
    elif not tok_path.is_file():
        raise CheckpointError(f"{tok_path}: missing")
    else:
        tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size > config.decoder.vocab_size:
        raise CheckpointError(
            f"{tok_path}: vocabulary of {tokenizer.vocab_size} exceeds the model's "
            f"{config.decoder.vocab_size}"
        )
    sourced = weights.get("encoder") == "source"
    skip = sourced_decoder_names(config) if sourced_llm else set()
    try:
        with shapes_only():  # checked before anything is allocated
            shadow = SpeechLLaMA(config)
    except Exception as exc:  # whatever a hostile config trips inside the model code
        raise CheckpointError(f"{root / CONFIG_FILE}: cannot build this model ({exc})") from None
    check_memory(shadow, root / CONFIG_FILE)
    if sourced:
        skip = skip | sourced_encoder_names(shadow, config)
    shapes = {k: tuple(v.shape) for k, v in stored_tensors(shadow, None, skip)}
    check_weights(root / WEIGHTS_FILE, shapes)
    del shadow
    model = SpeechLLaMA(config)
    if sourced:  # first, so that the stored top blocks (encoder.train_top) land over them
        from speechllama.model.weights import load_encoder_weights

        load_encoder_weights(model.encoder, config.encoder.source)
    load_weights(model, root / WEIGHTS_FILE, None, skip)
    if sourced_llm:
        load_sourced_decoder(model, fresh=False)
    if merge_lora:
        from speechllama.model.lora import merge_lora as merge

        merge(model.decoder)
    model.to(device).eval()
    return model, tokenizer, doc


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The ``train_state`` saved with checkpoint ``path`` (tensors on CPU)."""
    root = Path(path)
    read_checkpoint_config(root)
    js, ts = root / STATE_JSON, root / STATE_TENSORS
    if not js.is_file() or not ts.is_file():
        raise CheckpointError(f"{root}: no training state saved (cannot resume from it)")
    try:
        encoded = json.loads(js.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{js}: not valid JSON ({exc})") from None
    try:
        with safe_open(str(ts), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:
        raise CheckpointError(f"{ts}: unreadable safetensors file ({exc})") from None
    return _decode(encoded, tensors, js)


def list_checkpoints(root: str | Path, prefix: str = "step-") -> list[Path]:
    """Complete checkpoints ``root/PREFIX*`` in name order (zero-padded steps sort by step);
    interrupted ``*.tmp-*`` saves and directories without ``config.json`` are skipped."""
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(
        p
        for p in base.iterdir()
        if p.is_dir()
        and p.name.startswith(prefix)
        and TMP_MARK not in p.name
        and (p / CONFIG_FILE).is_file()
    )


# --- internals ----------------------------------------------------------------------------------


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-encodable mirror of ``obj``; tensors move to ``tensors`` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
        return {"__items__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], file: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, file) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        name = obj["__tensor__"]
        if name not in tensors:
            raise CheckpointError(f"{file}: refers to tensor {name!r} that is not stored")
        return tensors[name]
    if "__dict__" in obj:
        return {k: _decode(v, tensors, file) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {k: _decode(v, tensors, file) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, file) for v in obj["__tuple__"])
    raise CheckpointError(f"{file}: malformed training state")


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush the files' data and the directory entry so the rename publishes complete files."""
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is first renamed aside (to a ``.tmp-`` name,
    which loaders ignore) and removed afterwards, since rename cannot replace a non-empty dir."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}{TMP_MARK}old-{os.getpid()}-{os.urandom(3).hex()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
