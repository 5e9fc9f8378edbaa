"""What travels between server and client: LoRA tensors only, in a compact flat format.

Both sides hold the same model and LoRA config, so key order and shapes are known in
advance (the ``template``); a message is a 16-byte header followed by the raw tensor
bytes, concatenated. ``float16``/``bfloat16`` halve the bytes of ``float32``.
"""
from __future__ import annotations

import struct
import zlib

import torch

from mira.models.adapters import AdapterState

MAGIC = b"MIRA"
WIRE_DTYPES = {"float32": (0, torch.float32), "float16": (1, torch.float16), "bfloat16": (2, torch.bfloat16)}
_CODE_TO_DTYPE = {code: dt for code, dt in WIRE_DTYPES.values()}
HEADER = struct.Struct("<4sBxxxII")  # magic, dtype code, pad, key-set checksum, element count


class WireError(ValueError):
    pass


class WireCodec:
    def __init__(self, template: AdapterState, dtype: str = "float32"):
        self.shapes = {k: tuple(t.shape) for k, t in template.items()}
        self.code, self.dtype = WIRE_DTYPES[dtype]

    @staticmethod
    def _checksum(keys: list[str]) -> int:
        return zlib.crc32("\n".join(keys).encode())

    def encode(self, state: AdapterState, keys: list[str]) -> bytes:
        flat = torch.cat([state[k].detach().reshape(-1).to("cpu", self.dtype) for k in keys])
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return HEADER.pack(MAGIC, self.code, self._checksum(keys), flat.numel()) + raw

    def decode(self, buf: bytes, keys: list[str], device=None, out_dtype=torch.float32) -> AdapterState:
        if len(buf) < HEADER.size:
            raise WireError("message too short")
        magic, code, checksum, count = HEADER.unpack_from(buf)
        if magic != MAGIC or code not in _CODE_TO_DTYPE:
            raise WireError("not a mira adapter message")
        if checksum != self._checksum(keys):
            raise WireError("message carries a different set of adapter tensors")
        dtype = _CODE_TO_DTYPE[code]
        flat = torch.frombuffer(bytearray(buf[HEADER.size:]), dtype=torch.uint8).view(dtype)
        if flat.numel() != count:
            raise WireError(f"message has {flat.numel()} values, header says {count}")
        out, pos = {}, 0
        for k in keys:
            n = 1
            for d in self.shapes[k]:
                n *= d
            out[k] = flat[pos:pos + n].reshape(self.shapes[k]).to(device or "cpu", out_dtype)
            pos += n
        return out

    def raw_bytes(self, keys: list[str], dtype=torch.float32) -> int:
        """Bytes of the tensors themselves in ``dtype`` (the reference for wire overhead)."""
        size = torch.tensor([], dtype=dtype).element_size()
        total = 0
        for k in keys:
            n = 1
            for d in self.shapes[k]:
                n *= d
            total += n * size
        return total
