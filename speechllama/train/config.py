"""Frozen training configuration: every knob of one ``speechllama train`` run.

Stored in each checkpoint's provenance (``config.json`` -> ``training.train_config``) so a model
says how it was made, and compared on ``--resume`` so a resumed run cannot silently change the
data order or the schedule it is continuing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Fields that may differ between a run and its --resume without changing what is replayed.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "epochs", "eval_every", "save_every", "keep_last", "log_every", "threads",
     "eval_max_utterances", "progress", "num_workers", "resume"}
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and data of one run. Durations in seconds, rates per optimizer step.

    ``tokenizer``: a SentencePiece file; without it one of ``vocab_size`` pieces is trained on
    the ``text`` files (or on the training transcripts). ``num_heads``/``head_kind``/
    ``head_loss_weights`` override the model's multi-token heads (None: keep them);
    ``heads_from`` (a checkpoint with the same heads) then gives the new heads its weights, all
    but the trunk's shared un-embedding. ``freeze``
    names parts (encoder, adapter, decoder, ctc_head) that get no gradient; a frozen encoder's
    outputs are cached like a pretrained one's. Freezing encoder, adapter and decoder is
    heads-only training: head 1 stays frozen too unless ``train_head_one`` (None: frozen exactly
    when the trunk is; see ``train/freeze.py``), and with ``cache`` and ``hidden_cache`` the
    trunk's final hidden states are cached once and the heads train on them alone (position-wise
    head kinds only; no SpecAugment, no CTC; see ``train/hidden.py``).
    ``max_duration`` is the audio seconds per micro-batch; an optimizer step sees
    ``grad_accum`` micro-batches. ``total_steps`` (the schedule's length) is ``max_steps`` when
    given, else ``epochs`` passes over the data. ``ctc_weight`` None means 0.3 when the model
    has a CTC head and 0 otherwise. ``cache_copies`` applies only with a frozen encoder: copy 0 of
    every utterance is clean, copies 1.. are waveform-augmented (see ``train/cache.py``).
    ``fsdp``: under torchrun, shard parameters, gradients and optimizer state across the ranks
    (FSDP) instead of replicating them (DDP); see ``train/distributed.py`` for its limits.
    ``mwer``: minimum word error rate fine-tuning of the ``init`` model on its own
    ``mwer_nbest``-best lists from the beam search ``mwer_beam_strategy`` (``prefix-beam``,
    which is ``beam`` for a one-head model, or ``beam``), loss = MWER + ``mwer_ce_weight`` * the
    usual loss; ``mwer_add_reference`` puts the reference into every list (``train/mwer.py``).
    ``lm_text``: corpus files whose sentences, without audio, train the decoder as a language
    model: each step adds ``lm_batch_size`` of them and ``lm_weight`` * their loss
    (``train/text_only.py``).
    """

    train_manifest: str
    out_dir: str
    dev_manifest: str | None = None
    preset: str | None = "tiny"
    init: str | None = None
    tokenizer: str | None = None
    text: tuple[str, ...] = ()
    vocab_size: int = 512
    num_heads: int | None = None
    head_kind: str | None = None
    head_loss_weights: tuple[float, ...] | None = None
    heads_from: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    freeze: tuple[str, ...] = ()
    train_head_one: bool | None = None
    hidden_cache: bool = True
    seed: int = 0
    max_steps: int | None = None
    epochs: int = 10
    max_duration: float = 120.0
    max_batch_size: int | None = None
    num_buckets: int = 10
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 500
    weight_decay: float = 0.01
    # Learning rate of a pretrained encoder's trained top blocks (model encoder.train_top), as
    # a multiple of ``lr``: they start from weights that already work and should move slowly.
    encoder_lr_scale: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_accum: int = 1
    clip: float = 1.0
    bf16: bool = True
    ctc_weight: float | None = None
    spec_augment: bool = True
    augment: dict[str, Any] | None = None
    cache: bool = True
    cache_dir: str | None = None
    cache_copies: int = 1
    eval_every: int = 1000
    eval_max_utterances: int = 200
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 20
    save_dtype: str = "float32"
    threads: int | None = None
    num_workers: int = 0
    progress: bool = True
    resume: bool = False
    fsdp: bool = False
    mwer: bool = False
    mwer_nbest: int = 4
    mwer_ce_weight: float = 0.01
    mwer_beam_strategy: str = "prefix-beam"
    mwer_add_reference: bool = False
    lm_text: tuple[str, ...] = ()
    lm_batch_size: int = 32
    lm_weight: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {
            "max_duration": self.max_duration,
            "lr": self.lr,
            "grad_accum": self.grad_accum,
            "epochs": self.epochs,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
            "keep_last": self.keep_last,
            "log_every": self.log_every,
            "cache_copies": self.cache_copies,
            "num_buckets": self.num_buckets,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"train option {name} must be positive, got {value}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"train option max_steps must be positive, got {self.max_steps}")
        if not self.encoder_lr_scale > 0:
            raise ValueError(f"encoder_lr_scale must be positive, got {self.encoder_lr_scale}")
        if self.warmup < 0 or self.clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup, clip and weight_decay must not be negative")
        if self.ctc_weight is not None and not 0.0 <= self.ctc_weight < 1.0:
            raise ValueError(f"ctc_weight must lie in [0, 1), got {self.ctc_weight}")
        if (self.preset is None) == (self.init is None):
            raise ValueError("give exactly one of a preset or an --init checkpoint")
        if self.fsdp and (self.freeze or self.mwer):
            raise ValueError("--fsdp does not combine with --freeze or --mwer")
        if self.mwer:
            self._check_mwer()
        if self.lm_text:
            self._check_lm()
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"save_dtype must be float32, bfloat16 or float16, not {self.save_dtype}"
            )

    def _check_mwer(self) -> None:
        if self.init is None:
            raise ValueError("--mwer fine-tunes a trained model: give it with --init")
        if self.mwer_nbest < 2 - self.mwer_add_reference:
            raise ValueError(f"--mwer-nbest {self.mwer_nbest}: MWER needs at least 2 hypotheses")
        if self.mwer_ce_weight < 0:
            raise ValueError(f"--mwer-ce-weight must not be negative, got {self.mwer_ce_weight}")
        if self.mwer_beam_strategy not in ("beam", "prefix-beam"):
            raise ValueError(
                f"--mwer-beam-strategy {self.mwer_beam_strategy!r}: choose beam or prefix-beam"
            )

    def _check_lm(self) -> None:
        if self.lm_batch_size <= 0:
            raise ValueError(f"--lm-batch-size must be positive, got {self.lm_batch_size}")
        if not self.lm_weight > 0:
            raise ValueError(f"--lm-weight must be positive, got {self.lm_weight}")
        if self.mwer:
            raise ValueError("--lm-text does not combine with --mwer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown train config keys: {sorted(unknown)}")
        values = dict(data)
        for key in ("betas", "text", "head_loss_weights", "freeze", "lm_text"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    def replay_differences(self, other: TrainConfig) -> list[str]:
        """Fields that differ from ``other`` and would change what a resumed run replays."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k])
