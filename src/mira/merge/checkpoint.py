"""Reading checkpoints one tensor at a time, and writing sharded safetensors as we go.

``Checkpoint`` describes a Hugging Face model folder (``config.json`` + ``model.safetensors``
or a sharded ``model.safetensors.index.json``) or a PEFT LoRA adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) from the safetensors headers
alone; ``read(name)`` opens the file with ``safetensors.safe_open`` for that one tensor and
closes it again, so no memory map of a whole model stays resident.

``ShardedWriter`` is given the list of output tensors (name, shape, dtype) up front, so it
can lay out the shards and write each file's header before any data; every tensor is then
written to disk as soon as it is merged and nothing of the output stays in memory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from mira.errors import MiraError

MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"

_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth",
                    ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = {ADAPTER_CONFIG, "README.md"}

_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES_BY_CODE = {code: dtype for dtype, code in _DTYPE_CODES.items()}

Kind = Literal["model", "adapter"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint:
    """A model or adapter folder whose tensors are read one at a time.

    Build it with ``Checkpoint.open(path, where)``; ``where`` names the recipe field the
    folder came from and prefixes every error about it.
    """

    def __init__(self, path: Path, kind: Kind, config: dict, files: dict[str, Path],
                 specs: dict[str, TensorSpec], where: str):
        self.path = path
        self.kind = kind
        self.config = config
        self.where = where
        self._files = files
        self.specs = specs

    @classmethod
    def open(cls, path: str | os.PathLike, where: str) -> Checkpoint:
        """Inspect ``path`` (headers only) or raise ``MiraError`` naming ``where``."""
        folder = Path(path)
        if not folder.exists():
            raise MiraError(f"folder not found: {folder}", where=where)
        if not folder.is_dir():
            raise MiraError(f"{folder} is a file; expected a model or adapter folder", where=where)
        if (folder / ADAPTER_CONFIG).is_file():
            kind: Kind = "adapter"
            config = _read_json(folder / ADAPTER_CONFIG, where)
            weight_files = _adapter_weight_files(folder, where)
        elif (folder / MODEL_CONFIG).is_file():
            kind = "model"
            config = _read_json(folder / MODEL_CONFIG, where)
            weight_files = _model_weight_files(folder, where)
        else:
            raise MiraError(f"{folder} has neither {MODEL_CONFIG} (Hugging Face model) nor {ADAPTER_CONFIG} "
                            "(PEFT adapter)", where=where)
        files: dict[str, Path] = {}
        specs: dict[str, TensorSpec] = {}
        for file in weight_files:
            for spec in _read_header(file, where):
                files[spec.name] = file
                specs[spec.name] = spec
        if not specs:
            raise MiraError(f"{folder} holds no tensors", where=where)
        return cls(folder, kind, config, files, specs, where)

    @property
    def names(self) -> list[str]:
        """Tensor names, shard by shard in file order."""
        return list(self.specs)

    def read(self, name: str) -> Tensor:
        """Load tensor ``name`` from disk (only that tensor)."""
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, tensors={len(self.specs)})"


def _read_json(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MiraError(f"cannot read {path}: {e}", where=where) from e
    if not isinstance(data, dict):
        raise MiraError(f"{path} is not a JSON object", where=where)
    return data


def _adapter_weight_files(folder: Path, where: str) -> list[Path]:
    if (folder / ADAPTER_WEIGHTS).is_file():
        return [folder / ADAPTER_WEIGHTS]
    raise MiraError(f"{folder} has no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)", where=where)


def _model_weight_files(folder: Path, where: str) -> list[Path]:
    if (folder / MODEL_INDEX).is_file():
        weight_map = _read_json(folder / MODEL_INDEX, where).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MiraError(f"{folder / MODEL_INDEX} has no weight_map", where=where)
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MiraError(f"{folder} lacks shard(s) {missing} listed in {MODEL_INDEX}", where=where)
        return files
    if (folder / MODEL_WEIGHTS).is_file():
        return [folder / MODEL_WEIGHTS]
    raise MiraError(f"{folder} has no {MODEL_WEIGHTS} or {MODEL_INDEX} (only safetensors models are supported)",
                    where=where)


def _read_header(file: Path, where: str) -> list[TensorSpec]:
    try:
        with safe_open(file, framework="pt") as f:
            specs = []
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = _DTYPES_BY_CODE.get(piece.get_dtype())
                if dtype is None:
                    raise MiraError(f"{file}: tensor {name!r} has unsupported dtype {piece.get_dtype()}", where=where)
                specs.append(TensorSpec(name, tuple(piece.get_shape()), dtype))
            return specs
    except MiraError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MiraError(f"cannot read {file}: {e}", where=where) from e


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files (not sub-folders) from ``src`` to ``dst``."""
    copied = []
    for item in sorted(src.iterdir()):
        if not item.is_file() or item.name.startswith(".") or item.name in _NOT_COPIED:
            continue
        if item.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(item, dst / item.name)
        copied.append(item.name)
    return copied


class ShardedWriter:
    """Write a planned list of tensors into safetensors shards, one tensor at a time.

    Shards hold at most ``max_shard_bytes`` of data (a single larger tensor gets a shard of
    its own). One shard is named ``<stem>.safetensors``; several are named
    ``<stem>-00001-of-00003.safetensors`` with an index ``<stem>.safetensors.index.json``
    in Hugging Face's format. Tensors must be written in plan order.
    """

    def __init__(self, out_dir: Path, plan: Sequence[TensorSpec], stem: str = "model",
                 max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None):
        self.out_dir = out_dir
        self.stem = stem
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shards = _split_into_shards(plan, max_shard_bytes)
        self._names = [_shard_name(stem, i, len(self._shards)) for i in range(len(self._shards))]
        self._queue = [(shard_index, spec) for shard_index, shard in enumerate(self._shards) for spec in shard]
        self._position = 0
        self._file: IO[bytes] | None = None
        self._file_index = -1

    @property
    def files(self) -> list[str]:
        """Names of the shard files (all of them, once ``close`` has run)."""
        return list(self._names)

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next planned tensor; its name, shape and dtype must match the plan."""
        if self._position >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} was not planned")
        shard_index, spec = self._queue[self._position]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"expected {spec} next, got {name!r} {tuple(tensor.shape)} {tensor.dtype}")
        if shard_index != self._file_index:
            self._open_shard(shard_index)
        assert self._file is not None
        data = tensor.detach().contiguous().cpu().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._position += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        if self._position != len(self._queue):
            missing = self._queue[self._position][1].name
            raise RuntimeError(f"closing with {len(self._queue) - self._position} tensors unwritten (next {missing!r})")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self._shards) > 1:
            weight_map = {spec.name: self._names[i] for i, shard in enumerate(self._shards) for spec in shard}
            total = sum(spec.nbytes for shard in self._shards for spec in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def _open_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.out_dir / self._names[index], "wb")
        self._file_index = index
        self._file.write(_encode_header(self._shards[index], self.metadata))


def _split_into_shards(plan: Sequence[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in plan:
        if max_shard_bytes is not None and shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _shard_name(stem: str, index: int, count: int) -> str:
    if count == 1:
        return f"{stem}.safetensors"
    return f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


def _encode_header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded
