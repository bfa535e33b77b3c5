"""The training loop: ``train(TrainConfig) -> TrainResult``.

One optimizer step = ``grad_accum`` micro-batches from the duration-bucketing sampler, AdamW with
warmup + cosine, gradient clipping, bf16 autocast for the model (losses in fp32). Every
``eval_every`` steps: dev loss, per-head top-1 accuracy (``dev_head_acc``) and greedy WER; every
``save_every`` steps: an atomic checkpoint directory ``OUT/step-NNNNNNNN`` with the training
state (the last ``keep_last`` are kept), plus ``OUT/best`` whenever the dev WER improves.
Metrics go to ``OUT/metrics.jsonl``.

Resumption (``resume``) restarts from the newest complete ``step-*`` checkpoint: weights,
optimizer, schedule, torch RNG and the sampler position ``(epoch, batches_done)``, so the run
sees the same batches in the same order as if it had never stopped. Checkpoints are only taken
at optimizer-step boundaries, where no accumulated gradient is pending.

Throughput (``audio_h_per_h``) is training audio hours per wall-clock hour of training,
data loading included, evaluation and checkpoint writing excluded.

Under ``torchrun`` each process is one rank of a data-parallel run (``train/distributed.py``):
its own share of the batches, gradients averaged across ranks, metrics over all ranks, files
written and dev sets evaluated by rank 0 alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from speechllama.checkpoint import list_checkpoints, save_checkpoint
from speechllama.data.sampler import DurationBucketSampler
from speechllama.train import distributed, resume
from speechllama.train.build import build_model, fresh_model, provenance
from speechllama.train.config import TrainConfig
from speechllama.train.data import Batch, collate
from speechllama.train.freeze import plan_run
from speechllama.train.metrics import dev_line
from speechllama.train.mwer import MwerObjective
from speechllama.train.schedule import build_optimizer, build_scheduler
from speechllama.train.setup import prepare_data
from speechllama.train.step import compute_loss
from speechllama.train.text_only import TextCorpus
from speechllama.train.validate import validate


@dataclass(frozen=True)
class TrainResult:
    steps: int
    epochs_done: float
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    train_loss: float
    audio_hours: float
    audio_h_per_h: float
    dev: dict[str, Any] | None


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training that ``cfg`` describes; see the module docstring."""
    with distributed.session() as ctx:
        return Trainer(cfg, ctx).run()


class Trainer:
    """One run's state: model, data, optimizer, counters. ``run()`` executes it."""

    def __init__(self, cfg: TrainConfig, ctx: distributed.DistContext | None = None) -> None:
        self.cfg = cfg
        self.dist = ctx or distributed.current()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            resume.remove_stale_tmp(out)
        self.device = self.dist.device
        torch.manual_seed(cfg.seed)

        self.resumed_from, state = resume.resume_point(cfg, out)
        if self.resumed_from is not None:
            model, tokenizer = build_model(None, str(self.resumed_from), None, ctc=False)
        else:
            with distributed.main_first(self.dist):  # rank 0 may write the tokenizer
                model, tokenizer = fresh_model(cfg, out, self.dist.is_main)
        distributed.seed_rank(cfg.seed, self.dist)
        self.model, self.tokenizer = model, tokenizer
        model.to(self.device).train()
        plan = plan_run(cfg, model)
        self.pin, self.ctc_weight = plan.pin, plan.ctc_weight
        self.head_weights = tuple(model.config.heads.loss_weights)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                "nothing to train: every parameter is frozen (heads-only training of a "
                "next-token model freezes its one head; add heads with --heads K)"
            )

        with distributed.main_first(self.dist):  # rank 0 builds the caches, the others read
            self.data = prepare_data(cfg, model, tokenizer, self.device, out, hidden=plan.hidden)
        self.mwer = MwerObjective.for_run(cfg, tokenizer, self.data) if cfg.mwer else None
        self.text = self._text_corpus()
        self._pin_frozen()  # building caches may have changed train/eval modes
        unused = getattr(model, "ctc_head", None) is not None and not self.ctc_weight
        self.wrapped = distributed.Trainable(
            model, self._loss, self.dist, fsdp=cfg.fsdp, find_unused=unused
        )
        self.params = self.wrapped.parameters(self.params)
        self.sampler = DurationBucketSampler(
            self.data.train.durations,
            cfg.max_duration,
            num_buckets=cfg.num_buckets,
            seed=cfg.seed,
            max_batch_size=cfg.max_batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        per_epoch = max(1, math.ceil(len(self.sampler.epoch_batches(0)) / cfg.grad_accum))
        self.total_steps = cfg.max_steps or cfg.epochs * per_epoch

        encoder = model.encoder.parameters() if self._encoder_top() else ()
        self.optimizer = build_optimizer(cfg, self.params, encoder)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.warmup, self.total_steps, cfg.min_lr_ratio
        )
        # Counters: optimizer steps, the sampler position, audio and time consumed.
        self.step = self.epoch = self.batches_done = 0
        self.audio_seconds = self.train_seconds = 0.0
        self.best: dict[str, Any] = {}
        self._accum = 0  # micro-batches whose gradients are pending
        self._mark = time.perf_counter()
        # (loss, ce, ctc, text_ce) per micro-batch; the step's own, this rank's
        self.window: list[tuple[float, ...]] = []
        self._step_window: list[tuple[float, ...]] = []
        self._step_audio = 0.0
        self.last_loss = math.nan
        self.grad_norm = math.nan
        self.per_head: tuple[float, ...] = ()
        if state:
            resume.restore(self, state)
        self.log = distributed.main_log(out / "metrics.jsonl", self.dist)

    def _text_corpus(self) -> TextCorpus | None:
        """The text-only sentences (``--lm-text``), without the dev set's."""
        if not self.cfg.lm_text:
            return None
        if self.data.hidden is not None:
            raise ValueError("--lm-text needs the trunk to run: not with cached hidden states")
        return TextCorpus(self.cfg.lm_text, self.tokenizer, exclude=self.data.dev_texts or ())

    def _pin_frozen(self) -> None:
        for part in self.cfg.freeze:
            getattr(self.model, part).eval()

    def _loss(self, model: torch.nn.Module, batch: Batch, **kwargs: Any) -> Any:
        """The training objective: what DDP/FSDP run as the wrapped model's forward."""
        return (self.mwer or compute_loss)(model, batch, **kwargs)

    def _encoder_top(self) -> bool:
        """Whether this run trains the top blocks of a frozen pretrained encoder."""
        from speechllama.train.step import encoder_split

        return encoder_split(self.model.encoder)

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, data = self.cfg, self.data
        self.log.write(
            "start",
            step=self.step,
            total_steps=self.total_steps,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            train_utterances=len(data.train),
            train_hours=sum(data.train.durations) / 3600,
            skipped=data.skipped,
            encoder_cache=data.cache_stats,
            hidden_cache=data.hidden_stats,
            head_one_frozen=self.pin is not None,
            params=sum(p.numel() for p in self.params),
            device=str(self.device),
            world_size=self.dist.world_size,  # processes; each trains on its share of batches
            ctc_weight=self.ctc_weight,
            **self._text_stats(),
        )
        quiet = not cfg.progress or not self.dist.is_main
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=quiet)
        last_dev: dict[str, Any] | None = None
        last_saved = self.step if self.resumed_from else -1
        try:
            # A resumed run that already reached its last step has nothing left to train.
            pending = self._micro_batches() if self.step < self.total_steps else iter(())
            for batch in pending:
                if not self._train_micro_batch(batch):
                    continue  # gradients still accumulating
                rate = self.audio_seconds / max(self.train_seconds, 1e-9)  # audio h per h
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_loss:.3f}", ah_per_h=f"{rate:.0f}")
                final = self.step >= self.total_steps
                if self.step % cfg.log_every == 0 or final:
                    self._log_train(rate)
                if data.dev_batches and (self.step % cfg.eval_every == 0 or final):
                    last_dev = self._evaluate()
                    self._pin_frozen()  # evaluation put the whole model back in train mode
                    if last_dev is not None:  # rank 0's
                        bar.write(f"step {self.step}: {dev_line(last_dev)}")
                if self.step % cfg.save_every == 0 or final:
                    self._save_step()
                    last_saved = self.step
                self._mark = time.perf_counter()  # evaluating and saving is not training time
                if final:
                    break
            if last_saved != self.step:
                self._save_step()
            self.log.write(
                "end",
                step=self.step,
                audio_hours=self.audio_seconds / 3600,
                train_seconds=self.train_seconds,
            )
        finally:
            bar.close()
            self.log.close()
        steps = list_checkpoints(self.out, resume.STEP_PREFIX)
        return TrainResult(
            steps=self.step,
            epochs_done=self._epochs_done(),
            last_checkpoint=steps[-1] if steps else None,
            best_checkpoint=self.out / "best" if (self.out / "best").is_dir() else None,
            train_loss=self.last_loss,
            audio_hours=self.audio_seconds / 3600,
            audio_h_per_h=self.audio_seconds / max(self.train_seconds, 1e-9),
            dev=last_dev,
        )

    def _text_stats(self) -> dict[str, Any]:
        if self.text is None:
            return {}
        return {"lm_sentences": len(self.text), "lm_excluded": self.text.excluded,
                "lm_too_long": self.text.too_long}  # fmt: skip

    def _micro_batches(self) -> Iterator[Batch]:
        """Micro-batches from the sampler position on, epoch after epoch, forever; the counters
        (epoch, batches_done) always say where the next batch comes from."""
        encoded, hidden = self.data.cache is not None, self.data.hidden is not None
        self._mark = time.perf_counter()
        while True:
            self.data.train.set_epoch(self.epoch)
            loader = DataLoader(
                self.data.train,
                batch_sampler=self.sampler.epoch_batches(self.epoch)[self.batches_done :],
                collate_fn=partial(collate, encoded=encoded, hidden=hidden),
                num_workers=self.cfg.num_workers,
                # Its own generator: creating an iterator must not draw from the global RNG, or
                # a resumed run (one more iterator) would get other dropout/SpecAugment masks.
                generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch),
            )
            for batch in loader:
                self.batches_done += 1
                yield batch
            self.epoch += 1
            self.batches_done = 0

    def _train_micro_batch(self, batch: Batch) -> bool:
        """Forward/backward one micro-batch; True when it completed an optimizer step."""
        cfg = self.cfg
        batch = batch.to(self.device)
        text = {}
        if self.text is not None:
            draw = (cfg.lm_batch_size, cfg.seed, self.step, self._accum, self.dist.rank)
            text = {"text": self.text.batch(*draw).to(self.device), "text_weight": cfg.lm_weight}
        with self.wrapped.accumulating(sync=self._accum + 1 == cfg.grad_accum):
            out = self.wrapped.forward(
                batch,
                ctc_weight=self.ctc_weight,
                head_weights=self.head_weights,
                bf16=cfg.bf16,
                spec_augment=self.data.spec_augment,
                **text,
            )
            finite = distributed.all_finite(out.total, self.dist)  # every rank skips, or none
            self.wrapped.backward(out.total / cfg.grad_accum, finite, self.params)
        if finite:
            entry = (float(out.total.detach()), out.ce, out.ctc, getattr(out, "text_ce", 0.0))
            self._step_window.append(entry)
            self.per_head = out.per_head
        else:
            self.log.write("skipped_batch", step=self.step, indices=batch.indices)
        self._step_audio += batch.audio_seconds
        self._accum += 1
        if self._accum < cfg.grad_accum:
            return False
        self._accum = 0
        entries, self.per_head, audio = distributed.gather_step(
            self._step_window, self.per_head, self._step_audio, self.dist
        )  # all ranks' micro-batches
        self.window.extend(entries)
        self.audio_seconds += audio
        self._step_window, self._step_audio = [], 0.0
        self.grad_norm = self.wrapped.clip_grad_norm(self.params, cfg.clip or math.inf)
        self.optimizer.step()
        if self.pin is not None:
            self.pin.restore()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        now = time.perf_counter()
        self.train_seconds += now - self._mark
        self._mark = now
        if self.window:
            self.last_loss = sum(w[0] for w in self.window) / len(self.window)
        return True

    # --- logging, evaluation, checkpoints ------------------------------------------------------

    def _log_train(self, rate: float) -> None:
        n = max(len(self.window), 1)
        self.log.write(
            "train",
            step=self.step,
            epoch=self.epoch,
            loss=self.last_loss,
            ce=sum(w[1] for w in self.window) / n,
            ctc=sum(w[2] for w in self.window) / n,
            **({"text_ce": sum(w[3] for w in self.window) / n} if self.text else {}),
            per_head=self.per_head,
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=self.grad_norm,
            audio_hours=self.audio_seconds / 3600,
            train_seconds=self.train_seconds,
            audio_h_per_h=rate,
            **(self.mwer.pop_metrics() if self.mwer else {}),
        )
        self.window.clear()

    def _evaluate(self) -> dict[str, Any] | None:
        """Dev metrics, measured by rank 0 (None on the other ranks, which wait for it)."""
        model = self.wrapped.full_model()
        metrics = self._evaluate_on(model) if model is not None else None
        distributed.barrier(self.dist)
        return metrics

    def _evaluate_on(self, model: torch.nn.Module) -> dict[str, Any]:
        metrics = validate(
            model,
            self.tokenizer,
            self.data.dev_batches,
            self.data.dev_texts,
            ctc_weight=self.ctc_weight,
            head_weights=self.head_weights,
            bf16=self.cfg.bf16,
            max_utterances=self.cfg.eval_max_utterances,
            decode_batches=self.data.dev_decode_batches,
        )
        self.log.write("eval", step=self.step, **metrics)
        key = (metrics["dev_wer"], metrics["dev_loss"])
        if not self.best or key < (self.best["dev_wer"], self.best["dev_loss"]):
            self.best = {"step": self.step, "dev_wer": key[0], "dev_loss": key[1]}
            save_checkpoint(
                model, self.tokenizer, self.out / "best", self._meta(), None,
                dtype=self.cfg.save_dtype,
            )  # fmt: skip
            self.log.write("best", step=self.step, path=str(self.out / "best"))
        return metrics

    def _save_step(self) -> Path:
        """A resumable checkpoint, written by rank 0 (the other ranks wait); always float32, so
        resuming loses no precision."""
        path = resume.step_path(self.out, self.step)
        model = self.wrapped.full_model()  # the collectives first, on every rank
        optimizer = self.wrapped.optimizer_state(self.optimizer)
        rank_rng = distributed.rank_rng_states(self.dist)
        if model is None:
            distributed.barrier(self.dist)
            return path
        save_checkpoint(
            model, self.tokenizer, path, self._meta(), resume.snapshot(self, optimizer, rank_rng)
        )
        resume.prune(self.out, self.cfg.keep_last)
        self.log.write("checkpoint", step=self.step, path=str(path))
        distributed.barrier(self.dist)
        return path

    def _epochs_done(self) -> float:
        return self.epoch + self.batches_done / max(1, len(self.sampler.epoch_batches(self.epoch)))

    def _meta(self) -> dict[str, Any]:
        cfg, train_set = self.cfg, self.data.train
        return provenance(
            cfg.to_dict(),
            steps=self.step,
            epochs=self._epochs_done(),
            audio_hours=self.audio_seconds / 3600,
            data={
                "train_manifest": cfg.train_manifest,
                "dev_manifest": cfg.dev_manifest,
                "train_utterances": len(train_set),
                "train_hours": sum(train_set.durations) / 3600,
            },
            dev=self.best or None,
        )
