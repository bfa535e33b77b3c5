"""Minimum word error rate (MWER) training on the model's own N-best lists.

Prabhavalkar et al. (2018), "Minimum Word Error Rate Training for Attention-based
Sequence-to-Sequence Models": for utterance x with N-best list y_1..y_N (decoded without
gradient), the model's sequence probabilities are renormalised over the list,
P(y_i) = exp s_i / sum_j exp s_j with s_i = log p(y_i | x), and the loss is the expected number of
word errors relative to the list's mean:

    L_mwer(x) = sum_i P(y_i) (W(y_i) - mean_j W(y_j))

Subtracting the mean changes no gradient (it is a constant under the softmax's sum-to-one) but
centres the loss at 0, which is the usual variance reduction. dL/ds_j = P(y_j)(W(y_j) - E_P[W]):
hypotheses with fewer errors than the expected count are pushed up. The batch loss is the mean
over utterances whose list holds at least two hypotheses (one hypothesis has P = 1 whatever the
model does, so it carries no signal and would only dilute the mean), interpolated with the
run's usual cross-entropy: total = L_mwer + ``ce_weight`` * CE (the paper uses 0.01), where CE
is exactly the loss of ``compute_loss`` (all K heads, CTC if the run has it), so the heads keep
their training signal.

Word errors W are substitutions + deletions + insertions from jiwer on text passed through
:func:`speechllama.text.normalize`, exactly as ``evaluate`` counts them, so "Two" and "2" are
the same word here as in every reported WER.

The reference is not added to the list by default (``add_reference=False``), as in the paper:
the list is what the model would output, and the CE term already pulls towards the reference.
With ``add_reference`` it joins every list that lacks it (W = 0), which gives a signal even
when the whole list is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jiwer
import torch
from torch.nn.utils.rnn import pad_sequence

from speechllama.text import BOS_ID, PAD_ID, normalize
from speechllama.train.data import Batch
from speechllama.train.freeze import heads_only, wants_head_one_frozen
from speechllama.train.step import StepLoss, autocast, compute_loss, embed

if TYPE_CHECKING:
    from speechllama.train.config import TrainConfig
    from speechllama.train.setup import RunData

# (model, audio embeddings (B, S, d), lens (B,), durations) -> per utterance, token tuples
# (no BOS/EOS), best first.
NBestFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Sequence[float]], list[list[Any]]]


@dataclass(frozen=True)
class MwerStats:
    """What one batch's N-best lists looked like. Errors are word-error counts summed over the
    batch's utterances: ``expected`` under the renormalised model distribution, ``oracle`` of
    the best hypothesis in each list, ``top`` of the first (the search's best); ``words``
    reference words. ``loss`` is the MWER term (before ``ce_weight``), ``lists`` how many
    utterances had at least two hypotheses."""

    loss: float
    expected: float
    oracle: float
    top: float
    words: int
    utterances: int
    lists: int
    hypotheses: int
    nbest_seconds: float


def word_errors(reference: str, hypotheses: Sequence[str]) -> list[int]:
    """S + D + I of each hypothesis against ``reference``, both normalised, as ``evaluate``
    counts them. One jiwer call for the whole list; per-pair counts come from its alignments."""
    if not hypotheses:
        return []
    ref = normalize(reference)
    out = jiwer.process_words([ref] * len(hypotheses), [normalize(h) for h in hypotheses])
    counts = []
    for chunks in out.alignments:
        errors = 0
        for c in chunks:
            if c.type in ("substitute", "delete"):
                errors += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                errors += c.hyp_end_idx - c.hyp_start_idx
        counts.append(errors)
    return counts


def mwer_loss(
    log_scores: torch.Tensor, errors: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance MWER loss over padded N-best lists.

    log_scores (B, N) sequence log-probabilities (differentiable), errors (B, N) word errors,
    valid (B, N) bool (False: padding of a shorter list). Returns (loss (B,), probs (B, N)):
    loss_b = sum_i P_bi (W_bi - mean W_b) with P the softmax over the valid entries, 0 for a
    row without any. Invalid entries get probability 0 and no gradient."""
    any_valid = valid.any(dim=-1, keepdim=True)
    masked = log_scores.float().masked_fill(~valid, -math.inf)
    masked = torch.where(any_valid, masked, torch.zeros_like(masked))  # no all -inf softmax
    probs = masked.softmax(dim=-1) * valid
    w = errors.to(probs.dtype) * valid
    mean = w.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return (probs * (w - mean) * valid).sum(-1), probs


def hypothesis_batch(
    audio: torch.Tensor,
    audio_lens: torch.Tensor,
    owners: Sequence[int],
    hypotheses: Sequence[Sequence[int]],
    eos_id: int,
) -> tuple[torch.Tensor, ...]:
    """Teacher-forcing inputs for M hypotheses: hypothesis m (tokens without BOS/EOS) of the
    utterance ``owners[m]`` of ``audio`` (B, S, d), ``audio_lens`` (B,).

    Returns audio (M, S, d), audio_lens (M,), tokens (M, U) = [BOS] y, labels (M, U) = y EOS,
    label_lens (M,), padded with the pad id: the layout of a training ``Batch``."""
    index = torch.as_tensor(list(owners), dtype=torch.long, device=audio.device)
    longest = max(len(h) for h in hypotheses) + 1
    tokens = torch.full((len(hypotheses), longest), PAD_ID, dtype=torch.long)
    labels = torch.full_like(tokens, PAD_ID)
    for m, hyp in enumerate(hypotheses):
        y = torch.as_tensor(list(hyp), dtype=torch.long)
        tokens[m, 0] = BOS_ID
        tokens[m, 1 : len(y) + 1] = y
        labels[m, : len(y)] = y
        labels[m, len(y)] = eos_id
    label_lens = torch.tensor([len(h) + 1 for h in hypotheses], dtype=torch.long)
    device = audio.device
    return (
        audio.index_select(0, index),
        audio_lens.to(device).index_select(0, index),
        tokens.to(device),
        labels.to(device),
        label_lens.to(device),
    )


def sequence_log_probs(
    model: torch.nn.Module,
    audio: torch.Tensor,
    audio_lens: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    label_lens: torch.Tensor,
    bf16: bool = False,
) -> torch.Tensor:
    """log p(y EOS | audio) of each row by one teacher-forced pass, with gradient: (M,).

    Inputs as :func:`hypothesis_batch` returns them. The score is the sum of **head 1**'s
    token log-probabilities, EOS included. Heads 2..K do not contribute: the model's sequence
    distribution is head 1's next-token factorisation (greedy and verify decoding output what
    head 1 accepts), whereas a sequence's score under the other heads depends on how a search
    happened to split it into multi-token prefixes, so it is not a property of the hypothesis.
    Heads 2..K keep learning from the CE term, and share the trunk that MWER moves. The model
    runs under bf16 autocast when ``bf16``; the log-softmax is fp32."""
    with autocast(tokens.device, bf16):
        logits = model(audio, audio_lens, tokens, label_lens)  # (M, U, K, V)
    log_probs = logits[:, :, 0].float().log_softmax(dim=-1)
    picked = log_probs.gather(-1, labels[..., None])[..., 0]  # (M, U)
    scored = torch.arange(labels.shape[1], device=labels.device)[None] < label_lens[:, None]
    return (picked * scored).sum(dim=-1)


def default_nbest(n: int, strategy: str = "prefix-beam") -> NBestFn:
    """N-best lists from the project's beam searches (``speechllama.decoding.nbest``, imported
    when first used): ``prefix-beam`` (``beam`` for a one-head model) or ``beam``, beam size n,
    on the audio embeddings the training step computes (features or cached encoder outputs)."""
    from speechllama.decoding.nbest import nbest
    from speechllama.decoding.options import DecodingOptions

    options = DecodingOptions(strategy=strategy, beam_size=n)

    def run(
        model: torch.nn.Module,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        durations: Sequence[float],
    ) -> list[list[tuple[int, ...]]]:
        found = nbest(model, audio, audio_lens, options, n, durations=durations)
        return [[h.tokens for h in hyps] for hyps in found]

    return run


class MwerObjective:
    """The MWER training loss of one run; called like :func:`compute_loss` (same keywords,
    a :class:`StepLoss` back, whose ``total`` is L_mwer + ``ce_weight`` * CE) and collects a
    :class:`MwerStats` per call for the training log (:meth:`pop_metrics`).

    ``references[i]``: the raw transcript of training-set index i (``Batch.indices``).
    ``nbest_fn`` returns each utterance's N-best token tuples; ``add_reference``: see the module
    docstring. N-best lists are decoded in eval mode (no dropout) and in full precision; the
    model's train/eval modes are restored afterwards."""

    def __init__(
        self,
        tokenizer: Any,
        references: Sequence[str],
        nbest_fn: NBestFn,
        *,
        ce_weight: float = 0.01,
        add_reference: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.references = list(references)
        self.nbest_fn = nbest_fn
        self.ce_weight = ce_weight
        self.add_reference = add_reference
        self.window: list[MwerStats] = []

    @classmethod
    def for_run(cls, cfg: TrainConfig, tokenizer: Any, data: RunData) -> MwerObjective:
        """The objective ``cfg`` (``mwer_*`` fields) asks for, on ``data``'s training set."""
        if data.hidden is not None:
            raise ValueError(
                "--mwer decodes with the whole model, which heads-only training on cached "
                "hidden states does not run; pass --no-hidden-cache"
            )
        if heads_only(cfg.freeze) and wants_head_one_frozen(cfg.train_head_one, cfg.freeze):
            raise ValueError(
                "--mwer scores hypotheses with head 1, which this run freezes with the trunk: "
                "nothing would learn from it (add --train-head-one)"
            )
        return cls(
            tokenizer,
            [u.text for u in data.train.utterances],
            default_nbest(cfg.mwer_nbest, cfg.mwer_beam_strategy),
            ce_weight=cfg.mwer_ce_weight,
            add_reference=cfg.mwer_add_reference,
        )

    def lists(self, model: torch.nn.Module, batch: Batch) -> list[list[tuple[int, ...]]]:
        """Each utterance's N-best token tuples, duplicates dropped, the reference appended
        when asked for and missing."""
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                emb, emb_lens, _, _ = embed(model, batch)
                found = self.nbest_fn(model, emb, emb_lens, batch.durations)
        finally:
            for module, training in modes:
                module.training = training
        out = []
        for b, hyps in enumerate(found):
            unique = list(dict.fromkeys(tuple(int(t) for t in h) for h in hyps))
            if self.add_reference:
                ref = tuple(batch.labels[b, : int(batch.label_lens[b]) - 1].tolist())
                if ref not in unique:
                    unique.append(ref)
            out.append(unique)
        return out

    def __call__(
        self, model: torch.nn.Module, batch: Batch, *, bf16: bool = False, **ce_options: Any
    ) -> StepLoss:
        t0 = time.perf_counter()
        lists = self.lists(model, batch)
        nbest_seconds = time.perf_counter() - t0
        refs = [self.references[i] for i in batch.indices]
        errors = [
            word_errors(ref, [self.tokenizer.decode(list(h)) for h in hyps])
            for ref, hyps in zip(refs, lists, strict=True)
        ]
        mwer, expected = self.score(model, batch, lists, errors, bf16)
        ce = compute_loss(model, batch, bf16=bf16, **ce_options)
        self.window.append(
            MwerStats(
                loss=float(mwer.detach()),
                expected=sum(expected),
                oracle=float(sum(min(e) for e in errors if e)),
                top=float(sum(e[0] for e in errors if e)),
                words=sum(len(normalize(r).split()) for r in refs),
                utterances=len(lists),
                lists=sum(len(h) >= 2 for h in lists),
                hypotheses=sum(len(h) for h in lists),
                nbest_seconds=nbest_seconds,
            )
        )
        return dataclasses.replace(ce, total=mwer + self.ce_weight * ce.total)

    def score(
        self,
        model: torch.nn.Module,
        batch: Batch,
        lists: Sequence[Sequence[tuple[int, ...]]],
        errors: Sequence[Sequence[int]],
        bf16: bool = False,
    ) -> tuple[torch.Tensor, list[float]]:
        """(MWER loss averaged over the lists of two or more hypotheses, differentiable; each
        utterance's expected word errors under the renormalised distribution). All those lists'
        hypotheses are scored in one padded teacher-forced pass."""
        rows = [b for b, hyps in enumerate(lists) if len(hyps) >= 2]
        expected = [float(e[0]) if len(e) == 1 else 0.0 for e in errors]
        if not rows:
            return torch.zeros((), device=batch.tokens.device), expected
        owners = [b for b in rows for _ in lists[b]]
        emb, emb_lens, _, _ = embed(model, batch)
        inputs = hypothesis_batch(
            emb, emb_lens, owners, [h for b in rows for h in lists[b]], model.config.eos_id
        )
        flat = sequence_log_probs(model, *inputs, bf16=bf16)  # (M,)
        sizes = [len(lists[b]) for b in rows]
        scores = pad_sequence(list(flat.split(sizes)), batch_first=True)  # (R, N)
        valid = torch.arange(scores.shape[1])[None] < torch.tensor(sizes)[:, None]
        err = pad_sequence([torch.tensor(errors[b], dtype=torch.float) for b in rows], True)
        per_utt, probs = mwer_loss(scores, err.to(scores.device), valid.to(scores.device))
        for r, b in enumerate(rows):
            expected[b] = float((probs[r].detach().cpu() * err[r]).sum())
        return per_utt.mean(), expected

    def pop_metrics(self) -> dict[str, float]:
        """Training-log fields for the calls since the last pop: ``mwer_loss`` (mean over
        calls), ``mwer_expected_wer``, ``mwer_oracle_wer`` and ``mwer_top_wer`` (word errors /
        reference words over all their utterances), ``mwer_hyps`` (mean list length),
        ``mwer_nbest_seconds`` (decoding time, summed)."""
        w, self.window = self.window, []
        if not w:
            return {}
        words = max(sum(s.words for s in w), 1)
        utts = max(sum(s.utterances for s in w), 1)
        return {
            "mwer_loss": sum(s.loss for s in w) / len(w),
            "mwer_expected_wer": sum(s.expected for s in w) / words,
            "mwer_oracle_wer": sum(s.oracle for s in w) / words,
            "mwer_top_wer": sum(s.top for s in w) / words,
            "mwer_hyps": sum(s.hypotheses for s in w) / utts,
            "mwer_lists": sum(s.lists for s in w),
            "mwer_nbest_seconds": sum(s.nbest_seconds for s in w),
        }
