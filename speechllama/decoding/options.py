"""Frozen decoding options and results (the contract between strategies and their callers)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode. Strategies read only what they need.

    ``max_tokens_per_second`` bounds the transcript length by the audio duration (plus
    ``max_tokens_min``), so no strategy can loop forever on silence or noise.
    """

    strategy: str = "greedy"
    batch_size: int = 8
    max_tokens_per_second: float = 12.0
    max_tokens_min: int = 16
    num_heads: int | None = None  # K used at decode time; None: all heads of the model
    threshold: float = 0.9
    verify: str = "exact"  # exact | topk
    topk: int = 3
    # verify, tree: feed proposals whose chained confidence >= this; "auto": measured, see
    # decoding/drafting.py (resolved by get_strategy(options, model))
    draft_threshold: float | str = 0.0
    tree: tuple[int, ...] = (3, 2, 1)
    tree_max_nodes: int = 64  # per-call cap on tree candidates: a 65-token call is not free
    beam_size: int = 4
    length_penalty: float = 1.0  # beam strategies rank by log-prob / length**length_penalty
    prefix_rescore: bool = False  # prefix-beam: rescore each fed block with head 1 (no extra call)
    fp16: bool = False


@dataclass(frozen=True)
class DecodingResult:
    """One utterance's transcript and what it cost.

    ``accepted_per_call[i]`` counts the decoder calls that emitted ``i`` tokens.
    Seconds are wall-clock; the encoder share of a batch is split by audio duration.
    """

    text: str
    tokens: tuple[int, ...]
    decoder_calls: int
    accepted_per_call: tuple[int, ...] = ()
    encoder_seconds: float = 0.0
    decoder_seconds: float = 0.0
    audio_seconds: float = 0.0
    audio_filepath: str | None = None
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_call(self) -> float:
        return len(self.tokens) / self.decoder_calls if self.decoder_calls else 0.0

    @property
    def rtf(self) -> float:
        secs = self.encoder_seconds + self.decoder_seconds
        return secs / self.audio_seconds if self.audio_seconds else 0.0
