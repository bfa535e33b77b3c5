"""Checking a checkpoint that may come from a stranger before one real tensor is allocated.

Why a shadow model: a checkpoint may come from a stranger. The config is checked
(keys, per-field limits: ``ModelConfig.from_dict``), then the model is built on the ``meta``
device (shapes, no memory) so that its total parameter size can be compared with this machine's
memory and every stored tensor's name and shape with the safetensors header, all before one
real tensor is allocated. A config of a few hundred bytes can otherwise ask for terabytes.

``checkpoint.load_checkpoint`` runs these checks in that order: the config, the shadow model's
memory, the weights file's header, and only then the copy (``load_weights``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file."""


_INIT_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
               "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
               "orthogonal_", "sparse_")  # fmt: skip


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Build modules on the meta device (shapes, no memory), with ``torch.nn.init``'s fills
    skipped: on meta tensors they run Python decompositions whose first call imports
    ``torch._dynamo``, which took 20 s here on a loaded machine, for values no one reads."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FILLS}
    try:
        for name in _INIT_FILLS:
            setattr(torch.nn.init, name, _keep)
        with torch.device("meta"):
            yield
    finally:
        for name, fill in saved.items():
            setattr(torch.nn.init, name, fill)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def memory_bytes() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(shadow: torch.nn.Module, origin: Path) -> None:
    """Refuse a model (built on the meta device) whose parameters and buffers alone would
    need more than this machine's memory."""
    need = sum(t.numel() * t.element_size() for t in shadow.state_dict().values())
    have = memory_bytes()
    if need > have:
        raise CheckpointError(
            f"{origin}: the configured model needs {need / 2**30:.1f} GiB for its weights, "
            f"more than this machine's {have / 2**30:.1f} GiB; not allocating it"
        )


def stored_tensors(
    model: torch.nn.Module, skip_prefix: str | None, skip: Collection[str]
) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of ``model`` that its weights file must hold."""
    return [
        (k, v)
        for k, v in model.state_dict().items()
        if (skip_prefix is None or not k.startswith(skip_prefix)) and k not in skip
    ]


def check_weights(file: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Check that safetensors ``file`` holds exactly the tensors ``shapes`` names, with those
    shapes, from its header alone (no tensor is read)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            missing = sorted(set(shapes) - names)
            extra = sorted(names - set(shapes))
            if missing or extra:
                raise CheckpointError(
                    f"{file}: tensors do not match the model config "
                    f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                    f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
                )
            for name, want in shapes.items():
                shape = tuple(f.get_slice(name).get_shape())
                if shape != want:
                    raise CheckpointError(
                        f"{file}: tensor {name} has shape {shape}, the model needs {want}"
                    )
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError on corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None


def load_weights(
    model: torch.nn.Module,
    file: Path,
    skip_prefix: str | None = None,
    skip: Collection[str] = (),
) -> None:
    """Copy ``file``'s tensors into ``model`` after checking every name and shape.

    ``skip_prefix``: parameters under it, and ``skip``: parameters of these names, are expected
    to be absent (loaded from elsewhere)."""
    expected = dict(stored_tensors(model, skip_prefix, skip))
    check_weights(file, {k: tuple(v.shape) for k, v in expected.items()})
    try:
        with safe_open(str(file), framework="pt") as f, torch.no_grad():
            for name, ref in expected.items():
                ref.copy_(f.get_tensor(name).to(ref.dtype))
    except Exception as exc:  # safetensors raises its own SafetensorError on corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None
