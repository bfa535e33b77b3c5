"""Self-distillation targets: a manifest whose transcripts are a model's own greedy output.

Why: exact verification (``decoding/verify.py``) accepts head k's guess for token t + k only when
it equals what greedy decoding will emit there. Heads trained on the reference transcripts learn
what was *said*; verification pays for predicting what the model will *say*. Where the trunk is
often wrong (synthetic-to-real mismatch, short training), the two targets differ in every
errorful stretch, and the heads' errors compound with the trunk's. Training the heads on the
trunk's own greedy transcripts (Medusa's self-distillation, Cai et al. 2024) makes their target
the quantity verification checks, and on the greedy path head 1's argmax *is* the label, so head
1's loss on these labels is zero by construction for a frozen trunk.

Input: the manifest and the ``hypotheses.jsonl`` that ``speechllama evaluate --decoding greedy``
wrote for it (joined on the utterance key). Output rows keep everything but ``text``; the old
transcript moves to ``reference_text`` so the provenance stays in the file, and the greedy token
ids go to ``token_ids``: a model's output is not always the canonical tokenisation of its text
(11% of the `small` model's training-set transcripts are not), and the trainer uses these ids
when they spell the text (``train/data.py``). Rows whose greedy output is empty or has no words
after normalisation cannot be training rows (the manifest reader refuses empty text) and are
dropped and counted, as are rows with no hypothesis.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from speechllama.data.manifest import Utterance
from speechllama.text import normalize

__all__ = ["RelabelStats", "relabel"]


@dataclass(frozen=True)
class RelabelStats:
    """Counts of one relabelling: ``changed`` of the ``kept`` rows got another transcript."""

    kept: int
    changed: int
    empty: int
    missing: int
    hours: float

    def summary(self) -> str:
        """One line for a log."""
        share = 100 * self.changed / max(self.kept, 1)
        return (
            f"{self.kept} rows relabelled ({self.hours:.2f} h), {self.changed} ({share:.1f}%) "
            f"differ from the reference; dropped: {self.empty} empty hypotheses, "
            f"{self.missing} without a hypothesis"
        )


def relabel(
    utterances: Sequence[Utterance], hypotheses: Iterable[Mapping[str, Any]]
) -> tuple[list[Utterance], RelabelStats]:
    """Utterances with ``text`` replaced by their greedy hypothesis, in manifest order.

    ``hypotheses``: rows with ``key`` (``Utterance.key``), ``hypothesis`` (the raw decoded
    text, not the scoring normalisation) and optionally ``token_ids`` (the greedy ids, EOS
    excluded). A key seen twice keeps its last row, as a resumed evaluation's log would.
    """
    by_key: dict[str, tuple[str, Any]] = {}
    for row in hypotheses:
        key, text = row.get("key"), row.get("hypothesis")
        if isinstance(key, str) and isinstance(text, str):
            by_key[key] = (text, row.get("token_ids"))
    kept: list[Utterance] = []
    changed = empty = missing = 0
    seconds = 0.0
    for utt in utterances:
        found = by_key.get(utt.key)
        if found is None:
            missing += 1
            continue
        text, ids = found
        words = normalize(text)
        if not words:
            empty += 1
            continue
        changed += words != normalize(utt.text)
        extra = {**utt.extra, "reference_text": utt.extra.get("reference_text", utt.text)}
        extra.pop("token_ids", None)  # an earlier relabelling's ids spell another text
        if isinstance(ids, list) and ids:
            extra["token_ids"] = ids
        kept.append(dataclasses.replace(utt, text=text.strip(), extra=extra))
        seconds += utt.duration
    stats = RelabelStats(len(kept), changed, empty, missing, seconds / 3600)
    return kept, stats


def default_hypotheses(path: str | os.PathLike[str]) -> str:
    """``path`` itself, or ``path/hypotheses.jsonl`` when it names an evaluation folder."""
    return os.path.join(path, "hypotheses.jsonl") if os.path.isdir(path) else os.fspath(path)
