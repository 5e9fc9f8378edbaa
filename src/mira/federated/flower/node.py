"""The SuperNode side: one client's data and the model it trains, built in the ClientApp.

A SuperNode says which client it is through Flower's node configuration::

    flower-supernode ... --node-config "partition-id=0 num-partitions=3"
    flower-supernode ... --node-config "partition-id=0 num-partitions=3 data-path='/data/client0.jsonl'"

* ``partition-id`` / ``num-partitions``: the node is mira client ``partition-id`` of
  ``num-partitions``. Without ``data-path`` it derives its partition from the run's
  data section exactly as ``mira run`` does (same records, partitioner and seed) and
  keeps only its own share: the usual way to emulate a federation on one dataset.
* ``data-path``: the node's own records (a file in the format of ``data.source``; the
  run's field map and max length apply). They are split into train/test with the
  run's ``partition.test_size``/``test_fraction``; no other client's data is needed.
* ``worker``: the socket of a warm node worker (``mira flower supernode --warm`` sets
  it; see ``mira.federated.flower.worker``).

Only counts (``n_train``/``n_test``), adapter tensors and losses leave the node.

Flower (1.41, 1.42) starts a new ClientApp process for every message, so by default each
``fit``/``evaluate`` loads the model afresh (``NodeRuntime``); a warm worker keeps one
``NodeRuntime`` per run instead. Both run the same code below.
"""
from __future__ import annotations

import logging

from dataclasses import dataclass
from typing import Any, Mapping

from mira.config import PartitionConfig, RunConfig
from mira.errors import MiraError

# mira.data (records, partition) is imported inside the functions below: importing the
# package pulls in torch, and the ServerApp parses the config before it needs that.

@dataclass
class NodeSpec:
    partition_id: int
    num_partitions: int
    data_path: str | None = None
    worker: str | None = None  # socket of a warm node worker (``mira.federated.flower.worker``)


def node_spec(node_config: Mapping[str, Any]) -> NodeSpec:
    """Read and check ``partition-id``, ``num-partitions``, ``data-path`` and ``worker``."""
    known = {"partition-id", "num-partitions", "data-path", "worker"}
    extra = sorted(set(node_config) - known)
    if extra:
        raise MiraError(f"unknown node-config keys {extra}; expected {sorted(known)}", where="--node-config")
    try:
        pid, k = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as e:
        raise MiraError(f"missing {e.args[0]} (e.g. --node-config \"partition-id=0 num-partitions=3\")",
                        where="--node-config") from None
    except (TypeError, ValueError):
        raise MiraError("partition-id and num-partitions must be integers", where="--node-config") from None
    if k < 1 or not 0 <= pid < k:
        raise MiraError(f"partition-id={pid} must be in [0, num-partitions={k})", where="--node-config")
    path = node_config.get("data-path")
    return NodeSpec(pid, k, str(path) if path else None, str(node_config.get("worker") or "") or None)


def config_from_text(text: str) -> RunConfig:
    """Parse the run's YAML. The submitter and the ServerApp validated it in full
    (``load_config``); a node only needs the pydantic model (with ``${VARS}`` expanded
    here), which spares a ``hello`` the import of every strategy and of PEFT."""
    import yaml
    from pydantic import ValidationError

    import mira.config as mc

    try:
        raw = yaml.safe_load(text) or {}
        expand = getattr(mc, "_expand", None)
        if expand is None:  # pragma: no cover - older/newer mira.config: validate in full
            return mc.validate(raw, "mira-config")
        return RunConfig.model_validate(expand(raw, ""))
    except (yaml.YAMLError, ValidationError) as e:
        raise MiraError(f"the run's mira-config is invalid: {str(e).splitlines()[0]}") from None


def run_config_of(run_config: Mapping[str, Any]) -> RunConfig:
    """The run's mira config, shipped in the Flower run config (``mira-config``, YAML text)."""
    return config_from_text(config_text_of(run_config))


def config_text_of(run_config: Mapping[str, Any]) -> str:
    text = run_config.get("mira-config")
    if not isinstance(text, str) or not text.strip():
        raise MiraError("the Flower run config has no 'mira-config' (start runs with `mira flower run`)")
    return text


def load_client_data(cfg: RunConfig, spec: NodeSpec):
    """This node's records (a ``ClientData``): its partition of the run's data, or its own ``data-path``."""
    from mira.data.partition import ClientData, partition
    from mira.data.records import load_records

    if cfg.refine is not None:
        raise MiraError("refine hooks are not supported on the Flower runtime yet", where="refine")
    if spec.data_path:
        data = cfg.data.model_copy(update={"path": spec.data_path})
        records = load_records(data, seed=cfg.data.seed)
        p = cfg.partition
        split = PartitionConfig(name="iid", num_clients=1, test_fraction=p.test_fraction, test_size=p.test_size)
        (own,) = partition(records, split, seed=cfg.seed, min_train=1)
        return ClientData(spec.partition_id, own.task, own.train, own.test)
    records = load_records(cfg.data, seed=cfg.data.seed)
    clients = partition(records, cfg.partition, seed=cfg.seed, min_train=1)
    if len(clients) != spec.num_partitions:
        raise MiraError(f"the run's data and partition give {len(clients)} clients but this node was started with "
                        f"num-partitions={spec.num_partitions}", where="--node-config")
    return clients[spec.partition_id]


def hello_info(cfg: RunConfig, spec: NodeSpec) -> dict:
    c = load_client_data(cfg, spec)
    return {"partition_id": spec.partition_id, "num_partitions": spec.num_partitions, "task": c.task,
            "n_train": len(c.train), "n_test": len(c.test)}


def load_slot(cfg: RunConfig):
    """The base model with its LoRA slot, initialised exactly as ``Workspace.load`` does
    (same seed, so every party holds the same initial adapter). Returns ``(tokenizer, slot)``."""
    from mira.models.adapters import AdapterSlot, lora_settings_to_peft
    from mira.models.loader import load_base

    base, tokenizer = load_base(cfg.model.path, cfg.model.dtype, cfg.model.device, quantization=cfg.model.quantization)
    lora = lora_settings_to_peft(base, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    return tokenizer, AdapterSlot.attach(base, lora, seed=cfg.seed)


class NodeRuntime:
    """Model, LoRA slot, trainer and this client's tokenised splits (one ClientApp call)."""

    def __init__(self, cfg: RunConfig, spec: NodeSpec):
        from mira.data.report import tokenize_clients
        from mira.federated.engine import train_settings
        from mira.federated.flower.protocol import TensorCodec
        from mira.train.trainer import LocalTrainer

        self.cfg, self.spec = cfg, spec
        self.client = load_client_data(cfg, spec)
        self.tokenizer, self.slot = load_slot(cfg)
        (self.train,), (self.test,), _val, self.data_report = tokenize_clients([self.client], self.tokenizer, cfg.data)
        from mira.data.report import log_lines

        for line in log_lines(self.data_report):  # stays on this node, with its data
            logging.getLogger("mira").info(line)
        self.trainer = LocalTrainer(self.slot, self.tokenizer.pad_token_id, train_settings(cfg))
        self.codec = TensorCodec(self.slot.initial_state, cfg.federation.wire_dtype)
        self.lossless = TensorCodec(self.slot.initial_state, "float32")
        self.keys = self.slot.keys()

    def wire_keys(self, keys: list[str]) -> list[str]:
        """The keys the server sent (an empty list means all of them, in the model's order)."""
        return list(keys) if keys else list(self.keys)

    def _train(self, adapter, task) -> tuple[dict, dict]:
        from mira.federated.client import client_fit
        from mira.federated.strategies.base import FitIns

        ins = FitIns(adapter=adapter, frozen=frozenset(task.frozen), prox_mu=task.prox_mu,
                     **({"step_scale": task.step_scale} if task.step_scale != 1 else {}))
        new, res = client_fit(self.slot, self.trainer, self.train, ins, task.seed)
        return new, {"n_train": len(self.train), "train_loss": float(res.loss), "prox_term": float(res.prox_term),
                     "steps": int(res.steps), "tokens": int(res.tokens), "step_time_s": float(res.step_time_s)}

    def fit(self, task) -> tuple[object, dict]:
        """Train from ``task.adapter`` (``protocol.Tensors``, checked against this node's model);
        returns the trained tensors at the wire dtype and the metrics."""
        keys = self.wire_keys(task.keys)
        codec = self.lossless if task.lossless else self.codec
        adapter = codec.decode(task.adapter, keys)
        new, metrics = self._train(adapter, task)
        return codec.encode(new, keys), metrics

    def fit_arrays(self, task, arrays: list) -> tuple[list, dict]:
        """``fit`` for a SecAgg+ round (``mira.federated.flower.secagg``): the adapter arrives as NDArrays
        in the wire-key order and leaves the same way, after the ``federation.wire_dtype`` round trip
        a plain upload makes (the SecAgg+ mod then quantises and masks it)."""
        import numpy as np
        import torch

        keys = self.wire_keys(task.keys)
        if len(arrays) != len(keys):
            raise ValueError(f"{len(arrays)} arrays for {len(keys)} adapter keys")
        init = self.slot.initial_state
        adapter = {}
        for k, a in zip(keys, arrays):
            if tuple(a.shape) != tuple(init[k].shape):
                raise ValueError(f"{k}: shape {tuple(a.shape)}, this node's model has {tuple(init[k].shape)}")
            adapter[k] = torch.from_numpy(np.array(a, copy=True)).to(init[k].dtype)
        new, metrics = self._train(adapter, task)
        codec = self.lossless if task.lossless else self.codec
        up = codec.decode(codec.encode(new, keys), keys)
        return [up[k].detach().cpu().double().numpy() for k in keys], metrics

    def evaluate(self, adapters: list, own: int) -> tuple[list[float], int, dict]:
        from mira.eval.metrics import eval_loss, generate, generation_metrics

        ev = self.cfg.eval
        pad = self.tokenizer.pad_token_id
        losses, tokens, extra = [], 0, {}
        for i, tensors in enumerate(adapters):
            adapter = self.lossless.decode(tensors, self.keys)
            self.slot.set(adapter)
            loss, tokens = eval_loss(self.slot.model, self.test, pad, ev.batch_size)
            losses.append(loss)
            if i == own and ev.generation:
                preds = generate(self.slot.model, self.tokenizer, self.test, ev.max_new_tokens, ev.max_examples)
                refs = [r.output for r in self.test.records[: len(preds)]]
                extra.update(generation_metrics(preds, refs))
        return losses, tokens, extra


# -- before a SuperNode starts: does the SuperLink speak what the node will? -----------------------
def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise MiraError(f"expected HOST:PORT, got {address!r}", where="--superlink")
    return host.strip("[]") or "127.0.0.1", int(port)


def probe_tls(address: str, timeout: float = 3.0, ca: str | None = None) -> str:
    """One TLS handshake attempt with the SuperLink's Fleet API at ``address`` (``HOST:PORT``).

    Returns ``"tls"`` (it completed a TLS handshake), ``"plain"`` (it answered, but not with
    TLS: a plain-text gRPC server), ``"untrusted: <why>"`` (TLS, but its certificate does not
    verify against ``ca`` for that host, as gRPC would check it) or ``"unreachable: <why>"``."""
    import socket
    import ssl

    host, port = _split_address(address)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return f"unreachable: {e.strerror or e}"
    with raw:
        raw.settimeout(timeout)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca:
            ctx.load_verify_locations(cafile=ca)
        else:  # only "does it speak TLS at all?"
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                return "tls"
        except ssl.SSLCertVerificationError as e:
            return f"untrusted: {e.verify_message or e.reason}"
        except (ssl.SSLError, ConnectionError, EOFError, socket.timeout) as e:
            # a plain-text HTTP/2 server reads the ClientHello as a bad preface and answers in
            # clear (or hangs up): no TLS record ever comes back
            return f"plain ({type(e).__name__})"
        except OSError as e:
            return f"unreachable: {e.strerror or e}"


def transport_mismatch(seen: str, address: str, insecure: bool, ca: str | None) -> MiraError | None:
    """The error for a probe answer (``probe_tls``) that the node's transport does not speak; None
    when it matches or the SuperLink did not answer."""
    if insecure and seen == "tls":
        return MiraError(f"the SuperLink at {address} speaks TLS; start the node with --root-cert CA.crt (or --certs "
                         f"DIR with ca.crt), not --insecure", where="--insecure")
    if not insecure and seen.startswith("plain"):
        return MiraError(f"the SuperLink at {address} does not speak TLS (it was started with --insecure); start the "
                         f"node with --insecure, or the SuperLink with --certs", where="--root-cert")
    if not insecure and seen.startswith("untrusted"):
        return MiraError(f"the SuperLink at {address} speaks TLS but its certificate does not verify against {ca} "
                         f"({seen.split(': ', 1)[1]}); give the CA that signed the SuperLink's certificate",
                         where="--root-cert")
    return None


def check_superlink_transport(address: str, insecure: bool, ca: str | None, tries: int = 10,
                              interval: float = 1.0, timeout: float = 3.0, log=None) -> str:
    """Refuse to start a SuperNode whose transport the SuperLink at ``address`` does not speak:
    Flower's SuperNode would otherwise retry the connection without end and without a word.

    Probes up to ``tries`` times, ``interval`` seconds apart, while the SuperLink is not
    reachable (it may still be starting); a SuperLink that stays unreachable is not an error
    here: the node starts, and ``TransportWatch`` goes on probing it while it runs. Returns the
    last probe's answer."""
    import time

    for i in range(max(1, tries)):
        seen = probe_tls(address, timeout=timeout, ca=None if insecure else ca)
        if not seen.startswith("unreachable"):
            break
        if i + 1 < tries:
            time.sleep(interval)
    err = transport_mismatch(seen, address, insecure, ca)
    if err is not None:
        raise err
    if seen.startswith("unreachable") and log is not None:
        log(f"the SuperLink at {address} is not reachable yet ({seen.split(': ', 1)[1]}); starting the SuperNode, "
            f"which keeps trying (the transport is checked again once the SuperLink answers)")
    return seen


class TransportWatch:
    """For a node whose SuperLink was not reachable at start: each call probes it once, and says
    ``"ok"`` once it answers in the node's transport, ``"waiting"`` while it does not answer, or
    the one-line error once it answers in the other transport (``mira.federated.flower.worker.
    supervise`` then stops the SuperNode, which Flower would leave retrying silently forever)."""

    def __init__(self, address: str, insecure: bool, ca: str | None, timeout: float = 3.0, confirm: int = 2):
        self.address, self.insecure, self.ca, self.timeout = address, insecure, ca, timeout
        self.confirm = confirm  # mismatches in a row before it is one: a SuperLink that is still
        self.mismatches = 0  # starting may reset or stall one handshake, which reads as "plain"

    def __call__(self) -> str:
        seen = probe_tls(self.address, timeout=self.timeout, ca=None if self.insecure else self.ca)
        if seen.startswith("unreachable"):
            self.mismatches = 0
            return "waiting"
        err = transport_mismatch(seen, self.address, self.insecure, self.ca)
        if err is None:
            self.mismatches = 0
            return "ok"
        self.mismatches += 1
        return f"error: {err}" if self.mismatches >= self.confirm else "waiting"
