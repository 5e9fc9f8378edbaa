"""What travels in a Flower ``Message`` between mira's ServerApp and ClientApp.

Three message types, each a ``RecordDict``:

* ``query.mira_hello`` (server -> node, empty): the node answers with its partition
  id, the number of partitions, its task name and its train/test sizes (counts only,
  never records). The server uses it to map Flower node ids to mira client ids.
* ``train.mira_fit``: ``"adapter"`` (an ``ArrayRecord`` with one ``Array`` holding a
  ``WireCodec`` buffer: the adapter in ``federation.wire_dtype``) and ``"fit"`` (a
  ``ConfigRecord``: round, seed, prox_mu, frozen keys, the keys on the wire when
  not all of them, whether the exchange is lossless, the step scale of one-shot). The reply carries the trained
  adapter the same way plus a ``MetricRecord`` (n_train, train_loss, steps, tokens,
  step time).
* ``evaluate.mira_eval``: ``"adapters"`` (``a0``, ``a1``, ... in float32) and ``"eval"``
  (which one is the node's own). By default a node gets only its own adapter; with the
  run setting ``cross-eval`` it gets every distinct adapter the server holds (which shows
  every client's personalised adapter to every node), so that the server can form every
  adapter's loss on the union of the test sets. The reply has the node's test loss under
  each adapter it got and its number of test tokens.

Adapters use mira's own ``WireCodec`` (a 16-byte header and the raw tensor bytes in a
fixed key order): both ends hold the same model and LoRA config, so no names or shapes
need to travel, and the codec checks that both sides agree on the key set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

MSG_HELLO = "query.mira_hello"
MSG_FIT = "train.mira_fit"
MSG_EVAL = "evaluate.mira_eval"

STYPE = "mira.wire"  # Array.stype of a WireCodec buffer


def wire_array(buf: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(buf),), stype=STYPE, data=bytes(buf))


def array_bytes(arr: Array) -> bytes:
    if arr.stype != STYPE:
        raise ValueError(f"expected a {STYPE} array, got stype {arr.stype!r}")
    return arr.data


def payload_bytes(msg: Message) -> int:
    """Bytes of the message as Flower serialises it: every object it pushes or pulls
    (message header, records, arrays), before HTTP/TLS framing."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


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
    buf: bytes
    rnd: int
    seed: int
    prox_mu: float = 0.0
    frozen: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the wire keys; empty: all adapter keys
    lossless: bool = False  # float32 both ways (strategies that exchange nothing in mira's accounting)
    step_scale: int = 1  # local steps = step_scale x R (one-shot trains the whole budget at once)


def fit_content(t: FitTask) -> RecordDict:
    return RecordDict({
        "adapter": ArrayRecord({"adapter": wire_array(t.buf)}),
        "fit": ConfigRecord({"round": t.rnd, "seed": t.seed, "prox_mu": float(t.prox_mu),
                             "frozen": list(t.frozen), "keys": list(t.keys),
                             "lossless": bool(t.lossless), "step_scale": int(t.step_scale)}),
    })


def parse_fit(content: RecordDict) -> FitTask:
    c = content["fit"]
    return FitTask(array_bytes(content["adapter"]["adapter"]), int(c["round"]), int(c["seed"]), float(c["prox_mu"]),
                   [str(k) for k in c.get("frozen", [])], [str(k) for k in c.get("keys", [])], bool(c["lossless"]),
                   int(c.get("step_scale", 1)))


def fit_reply(buf: bytes, metrics: dict) -> RecordDict:
    return RecordDict({"adapter": ArrayRecord({"adapter": wire_array(buf)}),
                       "metrics": MetricRecord({k: v for k, v in metrics.items()})})


def parse_fit_reply(content: RecordDict) -> tuple[bytes, dict]:
    return array_bytes(content["adapter"]["adapter"]), dict(content["metrics"])


# -- evaluate -----------------------------------------------------------------------------
def eval_content(bufs: list[bytes], own: int, rnd: int) -> RecordDict:
    return RecordDict({
        "adapters": ArrayRecord({f"a{i}": wire_array(b) for i, b in enumerate(bufs)}),
        "eval": ConfigRecord({"own": own, "round": rnd, "count": len(bufs)}),
    })


def parse_eval(content: RecordDict) -> tuple[list[bytes], int, int]:
    c = content["eval"]
    n = int(c["count"])
    return [array_bytes(content["adapters"][f"a{i}"]) for i in range(n)], int(c["own"]), int(c["round"])


def eval_reply(losses: list[float], tokens: int, extra: dict) -> RecordDict:
    return RecordDict({"eval": MetricRecord({"losses": [float(x) for x in losses], "tokens": int(tokens), **extra})})


def parse_eval_reply(content: RecordDict) -> dict:
    return dict(content["eval"])
