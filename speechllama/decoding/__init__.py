"""Decoding strategies. Strategy ``name`` lives in module ``speechllama.decoding.<name>`` (with
``-`` spelled ``_``: ``prefix-beam`` is ``prefix_beam.py``), which sets ``STRATEGY`` to its
``Strategy`` subclass; adding a strategy needs no registry edit.

Kept import-light (no torch) so the CLI can list strategies in ``--help`` quickly.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from speechllama.decoding.options import DecodingOptions, DecodingResult

if TYPE_CHECKING:
    from speechllama.decoding.base import Strategy

# Modules of this package that are not strategies.
_NOT_STRATEGIES = frozenset(
    {"base", "beam_search", "drafting", "nbest", "options", "state", "tree_shape"}
)

__all__ = [
    "DecodingOptions",
    "DecodingResult",
    "available_strategies",
    "decode",
    "get_strategy",
]


def available_strategies() -> list[str]:
    """Names of the strategies installed in this package, greedy first."""
    names = [
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(__path__)
        if not m.ispkg and not m.name.startswith("_") and m.name not in _NOT_STRATEGIES
    ]
    return sorted(names, key=lambda n: (n != "greedy", n))


def get_strategy(options: DecodingOptions, model: Any = None) -> Strategy:
    """Instantiate the strategy ``options.strategy`` names; unknown names raise ``ValueError``.
    ``model`` (the SpeechLLaMA it will decode with) resolves ``draft_threshold="auto"``."""
    if model is not None:
        from speechllama.decoding.drafting import resolve

        options = resolve(options, model)
    name = options.strategy
    known = available_strategies()
    if name not in known:
        raise ValueError(f"unknown decoding strategy {name!r}; choose one of {', '.join(known)}")
    module = importlib.import_module(f"speechllama.decoding.{name.replace('-', '_')}")
    return module.STRATEGY(options)


def __getattr__(name: str) -> Any:
    if name == "decode":
        from speechllama.decoding.base import decode

        return decode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
