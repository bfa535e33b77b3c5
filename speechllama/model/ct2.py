"""Reader for CTranslate2 ``model.bin`` files, without importing ctranslate2.

Layout (little-endian, as CTranslate2's Python converter writes it and its C++ loader reads it):

    u32 binary_version                      (we read 1..6)
    str spec_name, u32 spec_revision        (binary_version >= 2)
    u32 n_variables, then per variable:
        str name, u8 rank, u32 dims[rank],
        u8 dtype_id, u32 n_bytes            (binary_version >= 4)
        u8 item_size, u32 n_items           (older: dtype inferred from the item size)
        n_bytes of row-major data
    u32 n_aliases, then per alias: str alias, str target     (binary_version >= 3)

where ``str`` is a u16 length (counting a trailing NUL) followed by that many bytes.
dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Quantised weights: an int8 ``.../weight`` comes with ``.../weight_scale`` (one float per output
row, ``int8 = round(fp32 * scale)``); int16 weights carry one scalar scale. :func:`float_tensors`
divides them back out, so callers see float32 only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

SUPPORTED_BINARY_VERSION = 6
_MAX_RANK = 8
_DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
_LEGACY_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}  # by item size, version < 4


class WeightsError(ValueError):
    """A weight file or source is missing, malformed or does not fit the model (one line)."""


@dataclass(frozen=True)
class Ct2Model:
    """The raw contents of a ``model.bin``: tensors keep their stored dtype."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]


class _Reader:
    """Bounds-checked little-endian reads that name the file in every error."""

    def __init__(self, stream: BinaryIO, path: Path, size: int) -> None:
        self.stream, self.path, self.size = stream, path, size

    def fail(self, problem: str) -> WeightsError:
        return WeightsError(f"{self.path}: {problem}")

    def take(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise self.fail(f"truncated CTranslate2 model (wanted {n} bytes at {self.tell()})")
        return data

    def tell(self) -> int:
        return self.stream.tell()

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def string(self) -> str:
        n = self.u16()
        if n == 0:
            raise self.fail(f"invalid string length 0 at byte {self.tell() - 2}")
        raw = self.take(n)
        if raw[-1] != 0:
            raise self.fail(f"string at byte {self.tell() - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"string at byte {self.tell() - n} is not UTF-8") from err

    def skip(self, n: int) -> None:
        if self.tell() + n > self.size:
            raise self.fail(f"truncated CTranslate2 model (wanted {n} bytes at {self.tell()})")
        self.stream.seek(n, 1)


def read_ct2_model(path: str | Path, include: Callable[[str], bool] | None = None) -> Ct2Model:
    """Parse ``model.bin``; only variables for which ``include(name)`` holds are materialised
    (the others are skipped by seeking, so reading the encoder of a Whisper model does not load
    its decoder). Raises :class:`WeightsError` on any malformed or truncated file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        stream = path.open("rb")
    except OSError as err:
        raise WeightsError(f"{path}: cannot open CTranslate2 model ({err.strerror})") from err
    with stream:
        r = _Reader(stream, path, size)
        version = r.u32()
        if not 1 <= version <= SUPPORTED_BINARY_VERSION:
            raise r.fail(
                f"CTranslate2 binary version {version} is not supported "
                f"(this reader knows 1..{SUPPORTED_BINARY_VERSION})"
            )
        spec, revision = (r.string(), r.u32()) if version >= 2 else ("", 1)
        variables: dict[str, torch.Tensor] = {}
        for _ in range(r.u32()):
            name = r.string()
            rank = r.u8()
            if rank > _MAX_RANK:
                raise r.fail(f"variable {name!r} has rank {rank} > {_MAX_RANK}")
            shape = [r.u32() for _ in range(rank)]
            if version >= 4:
                type_id = r.u8()
                if type_id not in _DTYPES:
                    raise r.fail(f"variable {name!r} has unknown dtype id {type_id}")
                dtype = _DTYPES[type_id]
                n_bytes = r.u32()
            else:
                item_size = r.u8()
                if item_size not in _LEGACY_DTYPES:
                    raise r.fail(f"variable {name!r} has unknown item size {item_size}")
                dtype = _LEGACY_DTYPES[item_size]
                n_bytes = r.u32() * item_size
            n_items = 1
            for dim in shape:
                n_items *= dim
            if n_bytes != n_items * dtype.itemsize:
                raise r.fail(f"variable {name!r} has {n_bytes} bytes for shape {shape} {dtype}")
            if include is not None and not include(name):
                r.skip(n_bytes)
                continue
            data = bytearray(r.take(n_bytes))
            flat = torch.frombuffer(data, dtype=dtype) if n_items else torch.empty(0, dtype=dtype)
            variables[name] = flat.reshape(shape)
        aliases: dict[str, str] = {}
        if version >= 3:
            for _ in range(r.u32()):
                alias = r.string()
                aliases[alias] = r.string()
    return Ct2Model(path, version, spec, revision, variables, aliases)


def float_tensors(model: Ct2Model) -> dict[str, torch.Tensor]:
    """All variables as float32, aliases resolved and quantised weights dequantised.

    Scale tensors are consumed (not returned); integer tensors without a scale (e.g. the int16
    ``num_heads`` scalar) are returned as they are.
    """
    raw = dict(model.variables)
    for alias, target in model.aliases.items():
        for suffix in ("", "_scale"):
            if target + suffix in raw:
                raw.setdefault(alias + suffix, raw[target + suffix])
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith("_scale") and name[: -len("_scale")] in raw:
            continue
        if name + "_zero" in raw:
            raise WeightsError(f"{model.path}: {name} uses AWQ quantisation, which is unsupported")
        scale = raw.get(name + "_scale")
        if scale is not None:
            out[name] = _dequantize(tensor, scale.float(), name, model.path)
        elif tensor.is_floating_point():
            out[name] = tensor.float()
        else:
            out[name] = tensor
    return out


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """int8 rows (or int16 with one scalar) -> float32: ``weight / scale``."""
    if weight.is_floating_point():
        return weight.float()  # a scale left over from an unquantised export: nothing to undo
    if scale.dim() == 0 or scale.numel() == 1:
        return weight.float() / scale.reshape(())
    if weight.dim() == 0 or scale.shape != (weight.shape[0],):
        raise WeightsError(
            f"{path}: {name}_scale has shape {tuple(scale.shape)}, "
            f"expected ({weight.shape[0] if weight.dim() else 1},)"
        )
    return weight.float() / scale.reshape(-1, *([1] * (weight.dim() - 1)))
