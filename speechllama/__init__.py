"""speechllama: fast LLM-based speech recognition with multi-token prediction.

    import speechllama
    model = speechllama.load_model()            # or load_model("path/to/checkpoint")
    result = model.transcribe("audio.wav")      # a DecodingResult
    print(result.text, result.decoder_calls)

Attributes are imported on first use so that ``import speechllama`` stays light (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

__all__ = ["DecodingOptions", "DecodingResult", "__version__", "load_model"]

_LAZY = {
    "load_model": "speechllama.transcribe",
    "DecodingOptions": "speechllama.decoding.options",
    "DecodingResult": "speechllama.decoding.options",
}

if TYPE_CHECKING:
    from speechllama.decoding.options import DecodingOptions, DecodingResult
    from speechllama.transcribe import load_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'speechllama' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
