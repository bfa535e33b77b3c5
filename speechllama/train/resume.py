"""Resumable training state: what a ``step-*`` checkpoint carries besides the weights, and how
a run finds and restores it.

A run is resumable at optimizer-step boundaries only (no accumulated gradient is pending
there). The state holds the optimizer and schedule, the RNGs (global and per rank) and the
counters that say where the sampler stands ``(epoch, batches_done)``, so a resumed run sees the
same batches in the same order as one that never stopped. The training config is stored too:
resuming with settings that change what the run computes is refused rather than silently
mixing two runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from speechllama.checkpoint import TMP_MARK, list_checkpoints, load_train_state
from speechllama.train import distributed
from speechllama.train.config import TrainConfig

if TYPE_CHECKING:
    from speechllama.train.loop import Trainer

STEP_PREFIX = "step-"
# The Trainer attributes that locate a run in its schedule and data.
COUNTERS = ("step", "epoch", "batches_done", "audio_seconds", "train_seconds")


def resume_point(cfg: TrainConfig, out: Path) -> tuple[Path | None, dict[str, Any]]:
    """The newest complete ``step-*`` checkpoint of ``out`` and its training state when
    ``cfg.resume`` asks for one, else ``(None, {})``. Refuses to train over checkpoints without
    ``resume``, and to resume with a config whose differences change the run."""
    existing = list_checkpoints(out, STEP_PREFIX)
    if existing and not cfg.resume:
        raise ValueError(
            f"{out}: already holds checkpoints ({existing[-1].name}); pass --resume to "
            "continue that run, or choose a new --out"
        )
    if not cfg.resume:
        return None, {}
    if not existing:
        print(f"speechllama train: nothing to resume in {out}; starting afresh")
        return None, {}
    path = existing[-1]
    state = load_train_state(path)
    changed = cfg.replay_differences(TrainConfig.from_dict(state["train_config"]))
    if changed:
        raise ValueError(f"{path}: cannot resume with changed {changed}")
    return path, state


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    """Put a loaded training state back into ``trainer`` (optimizer, schedule, RNGs,
    counters, best dev result)."""
    trainer.wrapped.load_optimizer_state(trainer.optimizer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    distributed.restore_rng(state, trainer.dist, trainer.resumed_from)
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for key in COUNTERS:
        setattr(trainer, key, state[key])
    trainer.best = state.get("best") or {}


def snapshot(
    trainer: Trainer, optimizer: dict[str, Any], rank_rng: list[torch.Tensor]
) -> dict[str, Any]:
    """The training state to save with a step checkpoint. ``optimizer`` and ``rank_rng`` are
    gathered by the caller on every rank first (collectives), then passed in on rank 0."""
    return {
        **{key: getattr(trainer, key) for key in COUNTERS},
        "best": trainer.best,
        "train_config": trainer.cfg.to_dict(),
        "optimizer": optimizer,
        "scheduler": trainer.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "rank_rng": rank_rng,
        "world_size": trainer.dist.world_size,
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def step_path(out: Path, step: int) -> Path:
    """Where step ``step``'s checkpoint goes: zero-padded, so names sort by step."""
    return out / f"{STEP_PREFIX}{step:08d}"


def prune(out: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints of ``out``."""
    for old in list_checkpoints(out, STEP_PREFIX)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp(out: Path) -> None:
    """Delete this run directory's leftovers of interrupted checkpoint saves."""
    for p in out.iterdir():
        if p.is_dir() and TMP_MARK in p.name and p.name.startswith((STEP_PREFIX, "best")):
            shutil.rmtree(p, ignore_errors=True)
