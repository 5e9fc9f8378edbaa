"""What travels in a Flower ``Message`` between mira's ServerApp and ClientApp.

Three message types, each a ``RecordDict``:

* ``query.mira_hello`` (server -> node, empty): the node answers with its partition
  id, the number of partitions, its task name and its train/test sizes (counts only,
  never records). The server uses it to map Flower node ids to mira client ids.
* ``train.mira_fit``: ``"adapter"`` (an ``ArrayRecord`` with one ``Array`` per LoRA tensor,
  keyed by its name, in ``federation.wire_dtype``) and ``"fit"`` (a ``ConfigRecord``: round,
  seed, prox_mu, frozen keys, the keys on the wire when not all of them, whether the exchange
  is lossless, the step scale of one-shot, the wire dtype). The reply carries the trained
  adapter the same way plus a ``MetricRecord`` (n_train, train_loss, steps, tokens, step time).
* ``evaluate.mira_eval``: ``"adapter_0"``, ``"adapter_1"``, ... (one ``ArrayRecord`` per
  adapter, float32) and ``"eval"`` (which one is the node's own). By default a node gets only
  its own adapter; with the run setting ``cross-eval`` it gets every distinct adapter the
  server holds (which shows every client's personalised adapter to every node), so that the
  server can form every adapter's loss on the union of the test sets. The reply has the
  node's test loss under each adapter it got and its number of test tokens.

Adapters are Flower-native named tensors, built with Flower's public ``Array`` /
``ArrayRecord`` API, so Flower's own tooling (mods, strategies, logging of array records)
sees them as what they are:

* ``float32`` and ``float16``: ``Array(ndarray)`` (``stype="numpy.ndarray"``, dtype
  ``float32``/``float16``; ``Array.numpy()`` gives the tensor back);
* ``bfloat16`` (numpy has no such dtype): ``dtype="bfloat16"``, ``stype="mira.bfloat16"``
  (``BF16_STYPE``), ``data`` the raw little-endian 16-bit patterns in C order (2 bytes a
  value, no header). ``Array.numpy()`` refuses that stype, so a Flower component that
  expects numpy arrays fails loudly instead of reading bit patterns as numbers; use
  ``float16`` or ``float32`` with Flower mods that change the arrays.

The receiving side checks the tensors against its own model and LoRA config (the key set,
every shape, a float dtype) and refuses a mismatch with an error naming the keys; both ends
must run the same model and ``lora`` section. mira's byte accounting (``bytes_up`` /
``bytes_down``) counts an adapter as the in-process engine does (``Tensors.nbytes``: the raw
tensor bytes at the wire dtype plus the 16-byte header of ``mira.federated.wire``), so the two
runtimes report the same numbers; ``payload_bytes`` is what the records of a message hold in
Flower's serialisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

MSG_HELLO = "query.mira_hello"
MSG_FIT = "train.mira_fit"
MSG_EVAL = "evaluate.mira_eval"

NUMPY_STYPE = "numpy.ndarray"  # what Flower's Array(ndarray) writes (flwr.common.constant.SType.NUMPY)
BF16_STYPE = "mira.bfloat16"  # Array.stype of a bfloat16 tensor: raw little-endian 16-bit patterns
WIRE_DTYPES = ("float32", "float16", "bfloat16")
HEADER_BYTES = 16  # mira.federated.wire.HEADER.size: counted per adapter message, as the engine does


class PayloadError(ValueError):
    """The adapter tensors of a message do not fit this side's model (keys, shapes, dtype)."""


class Tensors:
    """Adapter tensors at a wire dtype, in order: name -> numpy array (``bfloat16`` as ``uint16``
    bit patterns). What ``TensorCodec`` makes of an adapter and what a message's ``ArrayRecord``
    holds; plain numpy, so it pickles (to a node's warm worker) without torch."""

    __slots__ = ("dtype", "arrays")

    def __init__(self, dtype: str, arrays: dict[str, np.ndarray]):
        if dtype not in WIRE_DTYPES:
            raise PayloadError(f"unknown wire dtype {dtype!r}; expected one of {WIRE_DTYPES}")
        self.dtype, self.arrays = dtype, dict(arrays)

    @property
    def nbytes(self) -> int:
        """mira's accounting of this adapter on the wire: raw bytes plus the 16-byte header."""
        return HEADER_BYTES + sum(int(a.nbytes) for a in self.arrays.values())

    def __eq__(self, other) -> bool:
        if not isinstance(other, Tensors):
            return NotImplemented
        return (self.dtype == other.dtype and list(self.arrays) == list(other.arrays)
                and all(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
                        for a, b in zip(self.arrays.values(), other.arrays.values())))

    def __repr__(self) -> str:
        return f"Tensors({self.dtype}, {len(self.arrays)} arrays, {self.nbytes} B)"

    def __getstate__(self):
        return self.dtype, self.arrays

    def __setstate__(self, state):
        self.dtype, self.arrays = state


def _np_dtype(dtype: str):
    return np.dtype("<u2") if dtype == "bfloat16" else np.dtype(dtype)


def to_record(t: Tensors) -> ArrayRecord:
    """One ``Array`` per tensor, keyed by its name (see the module docstring for the dtypes)."""
    rec = ArrayRecord()
    for k, a in t.arrays.items():
        if t.dtype == "bfloat16":
            data = np.ascontiguousarray(a, dtype="<u2").tobytes()
            rec[k] = Array(dtype="bfloat16", shape=tuple(int(d) for d in a.shape), stype=BF16_STYPE, data=data)
        else:
            rec[k] = Array(np.ascontiguousarray(a, dtype=_np_dtype(t.dtype)))
    return rec


def from_record(rec: ArrayRecord) -> Tensors:
    """``Tensors`` from an ``ArrayRecord`` of ``to_record``'s form; refuses other stypes and
    non-float dtypes, and arrays whose data does not match their shape."""
    arrays, dtypes = {}, set()
    for k, arr in rec.items():
        if arr.stype == BF16_STYPE:
            n = int(np.prod(arr.shape, dtype=np.int64))
            if arr.dtype != "bfloat16" or len(arr.data) != 2 * n:
                raise PayloadError(f"{k}: a {BF16_STYPE} array needs dtype bfloat16 and 2 bytes a value "
                                   f"(dtype {arr.dtype}, shape {tuple(arr.shape)}, {len(arr.data)} bytes)")
            a = np.frombuffer(arr.data, dtype="<u2").reshape(tuple(arr.shape))
            dtypes.add("bfloat16")
        elif arr.stype == NUMPY_STYPE:
            a = arr.numpy()
            if str(a.dtype) not in ("float32", "float16") or tuple(a.shape) != tuple(arr.shape):
                raise PayloadError(f"{k}: expected a float32/float16 tensor, got {a.dtype} {tuple(a.shape)}")
            dtypes.add(str(a.dtype))
        else:
            raise PayloadError(f"{k}: unsupported Array stype {arr.stype!r} (expected {NUMPY_STYPE!r} or "
                               f"{BF16_STYPE!r})")
        arrays[k] = a
    if len(dtypes) > 1:
        raise PayloadError(f"an adapter's tensors mix dtypes {sorted(dtypes)}")
    return Tensors(dtypes.pop() if dtypes else "float32", arrays)


def check_tensors(t: Tensors, keys: list[str], shapes: dict[str, tuple]) -> None:
    """Refuse tensors that are not exactly ``keys`` with this side's ``shapes``."""
    got, want = set(t.arrays), set(keys)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        parts = []
        if missing:
            parts.append(f"{len(missing)} expected here are missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} are not in this model's LoRA (e.g. {extra[0]})")
        raise PayloadError(f"the adapter tensors do not match this side's model: {len(got)} sent, {len(want)} "
                           f"expected; {'; '.join(parts)} (both ends need the same model and lora section)")
    for k in keys:
        a = t.arrays[k]
        if tuple(a.shape) != tuple(shapes[k]):
            raise PayloadError(f"{k}: shape {tuple(a.shape)} on the wire, {tuple(shapes[k])} in this side's model "
                               f"(lora.r / target modules differ?)")


class TensorCodec:
    """An adapter (``{name: torch tensor}``) <-> ``Tensors`` at ``federation.wire_dtype``: the same
    casts as ``mira.federated.wire.WireCodec`` (to the wire dtype on the way out, to float32 on the
    way in), so a Flower run moves the very numbers the in-process engine does."""

    def __init__(self, template, dtype: str = "float32"):
        if dtype not in WIRE_DTYPES:
            raise PayloadError(f"unknown wire dtype {dtype!r}; expected one of {WIRE_DTYPES}")
        self.shapes = {k: tuple(t.shape) for k, t in template.items()}
        self.dtype = dtype

    def encode(self, state, keys: list[str]) -> Tensors:
        import torch

        tdt = getattr(torch, self.dtype)
        out = {}
        for k in keys:
            t = state[k].detach().to("cpu", tdt).contiguous()
            out[k] = t.view(torch.int16).numpy().view(np.uint16) if self.dtype == "bfloat16" else t.numpy()
        return Tensors(self.dtype, out)

    def decode(self, t: Tensors, keys: list[str], device=None, out_dtype=None):
        """The tensors as torch ``out_dtype`` (float32), after ``check_tensors``; the dtype is the one
        that arrived (as ``WireCodec.decode`` reads it from its header)."""
        import torch

        check_tensors(t, keys, self.shapes)
        out_dtype = out_dtype or torch.float32
        out = {}
        for k in keys:
            a = np.array(t.arrays[k], copy=True)
            x = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if t.dtype == "bfloat16" else torch.from_numpy(a)
            out[k] = x.to(device or "cpu", out_dtype)
        return out

    def raw_bytes(self, keys: list[str], dtype=None) -> int:
        """Bytes of the tensors themselves in ``dtype`` (float32 by default), as ``WireCodec.raw_bytes``."""
        if dtype is None:
            size = 4
        else:
            import torch

            size = torch.tensor([], dtype=dtype).element_size()
        return sum(int(np.prod(self.shapes[k], dtype=np.int64)) * size for k in keys)


def payload_bytes(msg: Message) -> int:
    """Bytes the message's records hold, by Flower's public ``count_bytes()`` (array data with
    its numpy header, record keys, config and metric values); Flower's own framing (message
    metadata, object ids and headers, protobuf, HTTP/TLS) is not included. 0 for an error reply."""
    if not msg.has_content():
        return 0
    return sum(_record_bytes(rec) for rec in msg.content.values())


def _record_bytes(rec) -> int:
    if isinstance(rec, ConfigRecord):
        empty = [k for k, v in rec.items() if isinstance(v, list) and not v]
        if empty:  # flwr 1.42's ConfigRecord.count_bytes() fails on an empty list: count its key only
            rest = ConfigRecord({k: v for k, v in rec.items() if k not in empty})
            return int(rest.count_bytes()) + sum(len(k) for k in empty)
    return int(rec.count_bytes())


def task_fields(task) -> dict:
    """A dataclass's fields, shallow (``dataclasses.asdict`` would deep-copy the tensors)."""
    return {f.name: getattr(task, f.name) for f in fields(task)}


# -- hello ------------------------------------------------------------------------------
@dataclass
class NodeInfo:
    node_id: int
    partition_id: int
    num_partitions: int
    task: str
    n_train: int
    n_test: int


def hello_reply(info: dict) -> RecordDict:
    return RecordDict({"hello": ConfigRecord({k: info[k] for k in ("partition_id", "num_partitions", "task",
                                                                  "n_train", "n_test")})})


def parse_hello(node_id: int, content: RecordDict) -> NodeInfo:
    h = content["hello"]
    return NodeInfo(node_id, int(h["partition_id"]), int(h["num_partitions"]), str(h["task"]), int(h["n_train"]),
                    int(h["n_test"]))


# -- fit --------------------------------------------------------------------------------
@dataclass
class FitTask:
    adapter: Tensors | None  # the wire keys' tensors (None in a SecAgg+ round: they travel as FitIns parameters)
    rnd: int
    seed: int
    prox_mu: float = 0.0
    frozen: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the wire keys; empty: all adapter keys
    lossless: bool = False  # float32 both ways (strategies that exchange nothing in mira's accounting)
    step_scale: int = 1  # local steps = step_scale x R (one-shot trains the whole budget at once)


def fit_content(t: FitTask) -> RecordDict:
    return RecordDict({
        "adapter": to_record(t.adapter),
        "fit": ConfigRecord({"round": t.rnd, "seed": t.seed, "prox_mu": float(t.prox_mu),
                             "frozen": list(t.frozen), "keys": list(t.keys),
                             "lossless": bool(t.lossless), "step_scale": int(t.step_scale),
                             "wire_dtype": t.adapter.dtype}),
    })


def parse_fit(content: RecordDict) -> FitTask:
    c = content["fit"]
    adapter = from_record(content["adapter"])
    if "wire_dtype" in c and adapter.arrays and str(c["wire_dtype"]) != adapter.dtype:
        raise PayloadError(f"the fit config says wire_dtype {c['wire_dtype']}, the tensors are {adapter.dtype}")
    return FitTask(adapter, int(c["round"]), int(c["seed"]), float(c["prox_mu"]),
                   [str(k) for k in c.get("frozen", [])], [str(k) for k in c.get("keys", [])], bool(c["lossless"]),
                   int(c.get("step_scale", 1)))


def fit_reply(adapter: Tensors, metrics: dict) -> RecordDict:
    return RecordDict({"adapter": to_record(adapter),
                       "metrics": MetricRecord({k: v for k, v in metrics.items()})})


def parse_fit_reply(content: RecordDict) -> tuple[Tensors, dict]:
    return from_record(content["adapter"]), dict(content["metrics"])


# -- evaluate -----------------------------------------------------------------------------
def eval_content(adapters: list[Tensors], own: int, rnd: int) -> RecordDict:
    return RecordDict({
        **{f"adapter_{i}": to_record(a) for i, a in enumerate(adapters)},
        "eval": ConfigRecord({"own": own, "round": rnd, "count": len(adapters)}),
    })


def parse_eval(content: RecordDict) -> tuple[list[Tensors], int, int]:
    c = content["eval"]
    n = int(c["count"])
    return [from_record(content[f"adapter_{i}"]) for i in range(n)], int(c["own"]), int(c["round"])


def eval_reply(losses: list[float], tokens: int, extra: dict) -> RecordDict:
    return RecordDict({"eval": MetricRecord({"losses": [float(x) for x in losses], "tokens": int(tokens), **extra})})


def parse_eval_reply(content: RecordDict) -> dict:
    return dict(content["eval"])
