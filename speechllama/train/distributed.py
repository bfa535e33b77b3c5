"""torch.distributed plumbing of the training loop: process group, rank helpers, the wrapped
model (DistributedDataParallel or FSDP), gradient accumulation and metric reduction.

Launch with ``torchrun``: it sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``, and
:func:`session` joins that group (NCCL when CUDA is available, else gloo). Without those
variables (or with ``WORLD_SIZE=1``) everything here is a no-op around a plain single process,
so the same ``speechllama train`` command runs either way.

What each rank does: the same model is built on every rank (same seed; DDP also broadcasts rank
0's weights), every rank trains on its own share of the batches (``DurationBucketSampler``'s
``rank``/``world_size``), gradients are averaged across ranks on the micro-batch that completes
an optimizer step (``no_sync`` on the others), and the logged metrics are those of all ranks
(:func:`gather_step`). Rank 0 alone writes files (tokenizer, encoder cache, metrics, checkpoints)
and evaluates the dev set; the others wait at a barrier. The process-group timeout
(``SPEECHLLAMA_DIST_TIMEOUT`` seconds, default 3600) must exceed the longest dev evaluation.

FSDP (``--fsdp``, FSDP2 ``fully_shard``: each decoder block is one unit, the rest of the model
the root unit) shards parameters, gradients and AdamW state across ranks, so training needs
about 1/world_size of the ~16 bytes per parameter that fp32 AdamW training takes. Limits, by
design: the full model is built on every rank before it is sharded, and rank 0 keeps a plain
full copy on its device into which the full weights are gathered for dev evaluation and
checkpoints, so the weights (4 bytes per parameter in fp32) must still fit on one device beside
rank 0's share of the training state; ``--freeze`` (heads-only training) and ``--mwer`` (its
beam search calls decoder blocks outside the sharded forward) are refused with it. Tested on
CPU with gloo only (not with NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from speechllama.train.metrics import MetricsLog

TIMEOUT_ENV = "SPEECHLLAMA_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` (``cuda:LOCAL_RANK``
    under torchrun with GPUs)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The world size torchrun announced (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as torchrun announced it (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0"))


def current(device: str | None = None) -> DistContext:
    """This process's context in the current process group (a lone process when none).

    ``device``: the user's choice (``cpu``, ``cuda``); None picks CUDA when available. A bare
    ``cuda`` means this rank's GPU, ``cuda:LOCAL_RANK``."""
    grouped = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.device(kind)
    if where.type == "cuda" and where.index is None and world > 1:
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext(rank=rank, world_size=world, device=where)


@contextlib.contextmanager
def session(device: str | None = None, backend: str | None = None) -> Iterator[DistContext]:
    """Join torchrun's process group for the block and leave it afterwards.

    ``backend``: default NCCL when ``device`` is CUDA, else gloo (sharded evaluation passes
    gloo: it only exchanges a few Python objects). A group that already exists (a caller's own)
    is used and left alone; outside torchrun this yields a single-process context. One session
    per process: re-creating the default group in a process that left one can hang (seen with
    gloo), so a program that runs several distributed jobs creates the group once itself."""
    created = False
    if dist.is_available() and not dist.is_initialized() and launched_world_size() > 1:
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        seconds = float(os.environ.get(TIMEOUT_ENV, "3600"))
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"), timeout=datetime.timedelta(seconds=seconds)
        )
        created = True
    try:
        yield current(device)
    finally:
        if created:
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first, then the others: for steps that write shared files (the
    tokenizer, the encoder cache) which the other ranks then find done and only read."""
    if not ctx.is_main:
        barrier(ctx)
    try:
        yield
    finally:
        if ctx.is_main:
            barrier(ctx)


def seed_rank(seed: int, ctx: DistContext) -> None:
    """Give ranks > 0 their own RNG stream (dropout and SpecAugment masks differ per rank, as
    they would across the micro-batches of one process); rank 0 keeps the single-process one."""
    if ctx.rank:
        torch.manual_seed(seed * 1_000_003 + ctx.rank)


def main_log(path: Path, ctx: DistContext) -> MetricsLog | _Silent:
    """The metrics log on rank 0; a sink elsewhere (one writer, one file)."""
    return MetricsLog(path) if ctx.is_main else _Silent()


class _Silent:
    def write(self, event: str, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def all_finite(loss: torch.Tensor, ctx: DistContext) -> bool:
    """Whether ``loss`` is finite on every rank. Ranks must agree on skipping a micro-batch, or
    one would wait forever for the others' gradients."""
    finite = bool(torch.isfinite(loss.detach()).all())
    if not ctx.distributed:
        return finite
    flag = torch.tensor([float(finite)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_step(
    entries: Sequence[tuple[float, ...]],
    per_head: tuple[float, ...],
    audio_seconds: float,
    ctx: DistContext,
) -> tuple[list[tuple[float, ...]], tuple[float, ...], float]:
    """One optimizer step's metrics over all ranks: every rank's micro-batch entries (e.g.
    (loss, ce, ctc)), the ranks' mean ``per_head`` losses, and the summed audio seconds.

    Every rank holds as many entries as the others (skips are agreed, :func:`all_finite`), so
    one fixed-size all-gather carries them all; the mean of the gathered entries is then the
    mean over the global batch's micro-batches, as one process accumulating them would log."""
    if not ctx.distributed:
        return list(entries), per_head, audio_seconds
    width = len(entries[0]) if entries else 0
    flat = [audio_seconds, *per_head, *(x for e in entries for x in e)]
    local = torch.tensor(flat, dtype=torch.float64, device=ctx.device)
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    rows = [p.cpu().tolist() for p in parts]
    k = len(per_head)
    gathered = [
        tuple(row[1 + k + i * width : 1 + k + (i + 1) * width])
        for row in rows
        for i in range(len(entries))
    ]
    heads = tuple(sum(row[1 + j] for row in rows) / len(rows) for j in range(k))
    return gathered, heads, sum(row[0] for row in rows)


def rank_rng_states(ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's CPU RNG state, in rank order (collective), so a resumed run gives each
    rank back its own dropout/SpecAugment stream."""
    mine = torch.get_rng_state()
    if not ctx.distributed:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rng(state: dict[str, Any], ctx: DistContext, where: Path) -> None:
    """Set this rank's RNG from a checkpoint's train state; refuses another world size (the
    saved sampler position counts this rank's share of batches, which depends on it)."""
    saved = int(state.get("world_size", 1))
    if saved != ctx.world_size:
        raise ValueError(
            f"{where}: was saved by {saved} process(es); resume it with the same number "
            f"(got {ctx.world_size})"
        )
    ranks = state.get("rank_rng") or [state["torch_rng"]]
    torch.set_rng_state(ranks[ctx.rank])


class _Forward(nn.Module):
    """Runs ``fn(model, *args, **kwargs)`` as its forward, so that DDP or FSDP see the whole
    teacher-forced pass (encoder, adapter, decoder, heads, CTC and the loss) as one call."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.model, *args, **kwargs)


class Trainable:
    """The model as the training loop drives it on this rank.

    ``forward(batch, **kw)``: ``fn(model, batch, **kw)`` through DDP/FSDP when distributed;
    ``accumulating(sync)``: gradient all-reduce only when ``sync`` (the step's last
    micro-batch); ``full_model()``/``optimizer_state()``: full weights and optimizer state for
    rank 0 to evaluate and save."""

    def __init__(
        self,
        model: nn.Module,
        fn: Callable[..., Any],
        ctx: DistContext,
        *,
        fsdp: bool = False,
        find_unused: bool = False,
    ) -> None:
        self.model, self.ctx = model, ctx
        self.fsdp = fsdp and ctx.distributed
        self.ddp = ctx.distributed and not self.fsdp
        self._replica: nn.Module | None = None
        root: nn.Module = _Forward(model, fn)
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            if ctx.is_main:  # a plain copy that rank 0 evaluates and saves
                self._replica = copy.deepcopy(model)
            for block in getattr(getattr(model, "decoder", None), "layers", ()):
                fully_shard(block)
            fully_shard(root)
        elif self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            cuda = ctx.device.type == "cuda"
            root = DistributedDataParallel(
                root,
                device_ids=[ctx.device.index] if cuda else None,
                find_unused_parameters=find_unused,
            )
        self.forward = root

    def parameters(self, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
        """The parameters to optimise: ``trainable`` unless FSDP replaced them by shards."""
        if not self.fsdp:
            return trainable
        return [p for p in self.forward.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def accumulating(self, sync: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch; gradients are averaged across ranks only
        when ``sync``, the others accumulate locally (no_sync), which saves all but one
        all-reduce per optimizer step."""
        if self.fsdp:
            self.forward.set_requires_gradient_sync(sync)
            yield
        elif self.ddp and not sync:
            with self.forward.no_sync():
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor, finite: bool, params: Sequence[nn.Parameter]) -> None:
        """Backpropagate ``loss``; when a rank's loss is not finite every rank skips it, and under
        DDP backpropagates zeros instead so the gradient all-reduce still takes place (a skipped
        synchronising micro-batch would leave the ranks with different gradients)."""
        if finite:
            loss.backward()
        elif self.ddp:
            (sum(p.sum() for p in params) * 0.0).backward()

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> float:
        """Clip to ``max_norm``; the norm of the full gradient (FSDP: over all shards)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    def full_model(self) -> nn.Module | None:
        """Collective. On rank 0 a plain module holding the current full weights (the trained
        module itself unless FSDP shards it); None on the other ranks."""
        if not self.fsdp:
            return self.model if self.ctx.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.forward, options=full)
        if self._replica is None:
            return None
        prefix = "model."
        self._replica.load_state_dict({k[len(prefix) :]: v for k, v in state.items()})
        self._replica.train(self.model.training)
        return self._replica

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective. The optimizer state to save (FSDP: gathered in full on rank 0)."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.forward, optimizer, options=full)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.forward, optimizer, state, options=full)
