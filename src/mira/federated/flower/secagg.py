"""Secure aggregation on the Flower runtime: Flower's SecAgg+ (``SecAggPlusWorkflow`` on the
server, ``secaggplus_mod`` on the nodes) for the strategies whose server step needs only the
mean of the uploads (``privacy.secure_aggregation``; see docs/privacy.md).

In a round of a SecAgg run the ServerApp does not send ``train.mira_fit``. It runs Flower's
workflow over the sampled clients' SuperNodes, with

* ``_Bridge``, a legacy ``flwr.server.strategy.Strategy`` that only carries messages:
  ``configure_fit`` hands each node the global adapter (NDArrays in the strategy's
  ``wire_keys()`` order, after the ``federation.wire_dtype`` round trip the plain runtime
  does) and its fit task (round, seed, FedProx ``mu``, ... as JSON in the ``FitIns`` config);
  ``aggregate_fit`` receives what the workflow unmasked: the weighted average
  ``sum_k w_k x_k / sum_k w_k`` with ``w_k`` = the client's ``num_examples`` (its training-set
  size, the weight fedit uses), quantised;
* ``_StageGrid``, the ``Grid`` the workflow talks to: the ``Fleet``'s push/pull (its poll
  interval, ``round-timeout`` and offline-node checks instead of ``Grid.send_and_receive``'s
  3 s polling) that also records each stage (nodes, replies, seconds, bytes) for ``rounds.json``.

The mean is then handed to mira's strategy object as one virtual upload (as
``mira.privacy.dp_fedavg`` hands it one private mean): FedIT/FedProx/FFA-LoRA take it as the
new global adapter, the FedOpt family as ``x + Delta``. On the node, the ClientApp's plain
``train`` handler (``client_app.secagg_fit``, with ``secaggplus_mod`` applied) trains with
``NodeRuntime.fit_arrays`` (``client_fit``, as always); the mod quantises, masks and uploads.

Quantisation (Flower's): client k uploads ``Q(w_k x_k)`` with ``w_k = round(n_k / max_weight * T) / T``,
``Q`` clipping to ``[-c, c]`` and rounding stochastically to a grid of step ``2c / T``
(``c = clipping_range``, ``T = quantization_range``). So each value of the mean is off by less
than ``error_bound = K * (2c / T) / sum_k w_k`` (``K`` clients aggregated); with the default
``max_weight`` (the largest ``n_train``) and equal client sizes that is ``2c / T`` (3.8e-6 for
Flower's defaults). Each round's bound is in ``rounds.json`` (``secure_aggregation.error_bound``).

Not protected: the training metrics (``train_loss``, steps, tokens, ``num_examples``) still
travel per client in the clear, and the evaluation messages are unchanged (the nodes get the
global adapter, the server gets each node's test loss).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

from mira.errors import MiraError

SUM_ONLY = ("fedit", "fedprox", "ffa_lora", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
FIELD = "privacy.secure_aggregation"
FIT_KEY = "mira.fit"  # the FitIns config entry holding the fit task (JSON)


# -- what can run under SecAgg+ ------------------------------------------------------------
def sum_only(strategy_cls, params) -> bool:
    """Whether the strategy's server step uses the uploads only through their weighted mean:
    the classes marked ``dp_central`` (fedit, fedprox, ffa_lora, the FedOpt family), with
    ``aggregation: fedavg`` (``exact`` averages each client's products ``B_k A_k``)."""
    return bool(getattr(strategy_cls, "dp_central", False)) and getattr(params, "aggregation", "fedavg") == "fedavg"


def check_secure_aggregation(cfg) -> None:
    """Refuse, in one line naming the field, a config that cannot run under SecAgg+ (nothing to do
    without ``privacy.secure_aggregation``)."""
    if cfg.privacy.secure_aggregation is None:
        return
    from mira.federated.strategies import get_strategy

    name = cfg.algorithm.name
    cls = get_strategy(name)
    params = cls.parse_params(cfg.algorithm.params())
    if getattr(params, "aggregation", "fedavg") != "fedavg" and getattr(cls, "dp_central", False):
        raise MiraError(f"{name} with aggregation: {params.aggregation} combines each client's own B_k A_k, which "
                        f"secure aggregation hides (the server learns only the sum of the uploads); use "
                        f"aggregation: fedavg, or remove {FIELD}", where="algorithm.aggregation")
    if not sum_only(cls, params):
        raise MiraError(f"secure aggregation hides each client's update, but {name} needs the individual updates "
                        f"on the server; it works with {', '.join(SUM_ONLY)}", where=FIELD)
    if cfg.privacy.client is not None or cfg.privacy.sample is not None:
        raise MiraError("secure aggregation together with differential privacy (privacy.client / privacy.sample) "
                        "is not supported yet", where=FIELD)


def refuse_in_process() -> None:
    raise MiraError("secure aggregation needs the Flower runtime (SecAgg+ between SuperNodes); the in-process engine "
                    "has no network to hide updates on: run it with `mira flower local` / `mira flower run`, or "
                    "remove the section", where=FIELD)


def resolved_shares(sa, n: int) -> tuple[int, int]:
    """``(num_shares, threshold)`` as ``SecAggPlusWorkflow`` resolves them for ``n`` sampled clients."""
    ns, t = sa.num_shares, sa.reconstruction_threshold
    ns = 1.0 if isinstance(ns, int) and ns == 1 else ns
    t = 1.0 if isinstance(t, int) and t == 1 else t
    if isinstance(ns, float):
        shares = round(ns * n)
        if shares < n and shares & 1 == 0:
            shares += 1
        if shares <= 2:
            shares = n
    else:
        shares = ns
    threshold = max(round(t * shares), 2) if isinstance(t, float) else t
    return int(shares), int(threshold)


def error_bound(sa, max_weight: float, sizes: list[int]) -> float:
    """Largest error of one value of the securely aggregated mean of clients with ``sizes``."""
    T = sa.quantization_range
    total = sum(round(n / max_weight * T) / T for n in sizes)
    return len(sizes) * (2 * sa.clipping_range / T) / total if total else math.inf


@dataclass
class SecAggPlan:
    """The run's SecAgg+ settings, resolved on the server once the clients' sizes are known."""

    cfg: object  # mira.privacy.config.SecureAggregation
    max_weight: float
    per_round: int
    shares: int
    threshold: int

    @classmethod
    def build(cls, sa, n_train: list[int], per_round: int) -> "SecAggPlan":
        if per_round < 2:
            raise MiraError(f"secure aggregation needs at least 2 clients per round; federation.fraction samples "
                            f"{per_round}", where="federation.fraction")
        max_weight = float(sa.max_weight) if sa.max_weight is not None else float(max(max(n_train), 1))
        shares, threshold = resolved_shares(sa, per_round)
        neighbours = min(per_round, 2 * (shares >> 1) + 1)
        if threshold > neighbours:
            raise MiraError(f"reconstruction_threshold resolves to {threshold} but with {per_round} clients per round "
                            f"each client has {neighbours} neighbours (num_shares={shares})",
                            where=f"{FIELD}.reconstruction_threshold")
        return cls(sa, max_weight, per_round, shares, threshold)

    def workflow(self, timeout: float | None):
        from flwr.server.workflow import SecAggPlusWorkflow

        sa = self.cfg
        return SecAggPlusWorkflow(sa.num_shares, sa.reconstruction_threshold, max_weight=self.max_weight,
                                  clipping_range=float(sa.clipping_range),
                                  quantization_range=int(sa.quantization_range), timeout=timeout)

    def report(self, rounds_log: list[dict]) -> dict:
        """``summary.json``'s ``secure_aggregation`` (from ``rounds.json``, so a resumed run counts all rounds)."""
        sa = self.cfg
        done = [e["secure_aggregation"] for e in rounds_log if "secure_aggregation" in e]
        return {"protocol": "SecAgg+ (Flower SecAggPlusWorkflow / secaggplus_mod)", "num_shares": self.shares,
                "reconstruction_threshold": self.threshold, "clipping_range": float(sa.clipping_range),
                "quantization_range": int(sa.quantization_range), "max_weight": self.max_weight,
                "rounds": len(done), "clipped_values": int(sum(e["clipped_values"] for e in done)),
                "max_error_bound": max((e["error_bound"] for e in done), default=None)}


# -- the fit task in a legacy FitIns / FitRes ----------------------------------------------
def task_config(task, max_weight: float, clipping_range: float) -> dict:
    """The ``FitIns.config`` of a SecAgg round: Flower's legacy config holds scalars only, so the
    task travels as JSON (everything but the adapter, which is the ``FitIns.parameters``)."""
    d = asdict(task)
    d.pop("adapter")
    return {FIT_KEY: json.dumps(d), "mira.max_weight": float(max_weight), "mira.clipping_range": float(clipping_range)}


def parse_legacy_fit(content):
    """``(FitTask, arrays, config)`` from a ``train`` message of SecAggPlusWorkflow's collect stage."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    from mira.federated.flower.protocol import FitTask

    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    cfg = dict(fitins.config)
    task = FitTask(adapter=None, **json.loads(str(cfg[FIT_KEY])))
    return task, parameters_to_ndarrays(fitins.parameters), cfg


def legacy_fit_reply(arrays, metrics: dict, cfg: dict):
    """The ``FitRes`` record ``secaggplus_mod`` masks. A non-finite update is not uploaded (the
    server could not reject it after aggregation): the ClientApp fails and SecAgg+ goes on
    without this client. Also counts the values the quantiser will clip (``secagg_clipped``)."""
    import flwr.compat.common.recorddict_compat as compat
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]  # float64: the mod's quantiser works at 2^22 levels
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("the trained update has NaN/Inf values; not uploaded")
    n = int(metrics["n_train"])
    scale = n / float(cfg.get("mira.max_weight", 1000.0))
    clip = float(cfg.get("mira.clipping_range", 8.0))
    clipped = int(sum(int((np.abs(a) * scale > clip).sum()) for a in arrays))
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), n,
                 {**{k: v for k, v in metrics.items()}, "secagg_clipped": clipped})
    return compat.fitres_to_recorddict(res, keep_input=False)


# -- the server side --------------------------------------------------------------------------
class _Proxy:
    """What the workflow needs of a ``ClientProxy``: the node id (and, for mira, the client id)."""

    def __init__(self, node_id: int, cid: int):
        self.node_id, self.cid = node_id, cid


def _bridge_class():
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import Strategy as LegacyStrategy

    class _Bridge(LegacyStrategy):
        """A legacy strategy that hands out the prepared ``FitIns`` and keeps the unmasked mean."""

        def __init__(self, fitins: dict[int, tuple[int, object]]):
            self.fitins = fitins  # node id -> (client id, FitIns)
            self.mean = None
            self.results: dict[int, object] = {}  # client id -> FitRes (parameters: the mean)
            self.failures: list = []

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(_Proxy(node, cid), ins) for node, (cid, ins) in self.fitins.items()]

        def aggregate_fit(self, server_round, results, failures):
            self.results = {proxy.cid: res for proxy, res in results}
            self.failures = list(failures)
            if results:
                self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return _Bridge


def _available(n: int):
    """A client manager that only answers ``num_available`` (the workflow logs it; nodes are the Fleet's)."""
    from flwr.server.client_manager import SimpleClientManager

    class _Available(SimpleClientManager):
        def num_available(self) -> int:
            return n

    return _Available()


def _stage_of(msgs) -> str:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    try:
        return str(msgs[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
    except (IndexError, KeyError):
        return "?"


@dataclass
class _StageGrid:
    """The ``Grid`` given to ``SecAggPlusWorkflow``: sends through the ``Fleet`` and logs each stage."""

    fleet: object
    cid_of: dict[int, int]  # node id -> client id
    stages: list[dict] = field(default_factory=list)
    down: dict[int, int] = field(default_factory=dict)  # client id -> Flower bytes sent to it this round
    up: dict[int, int] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)  # client id -> why it left the protocol (first stage)
    messages: int = 0

    def send_and_receive(self, messages, *, timeout: float | None = None):
        from flwr.app import Message

        from mira.federated.flower.protocol import payload_bytes

        msgs = list(messages)
        stage = _stage_of(msgs)
        t0 = time.perf_counter()
        down = 0
        for m in msgs:
            cid, b = self.cid_of[m.metadata.dst_node_id], payload_bytes(m)
            self.down[cid] = self.down.get(cid, 0) + b
            down += b
        self.messages += len(msgs)
        fl = self.fleet
        replies = fl._push_pull(dict(enumerate(msgs)), timeout=timeout or fl.s.round_timeout, min_ok=len(msgs),
                                straggler=-1.0, watch=True)
        out, ok, up = [], 0, 0
        for i, rep in replies.items():
            cid = self.cid_of[msgs[i].metadata.dst_node_id]
            if isinstance(rep, Message):
                b = payload_bytes(rep)
                up += b
                self.up[cid] = self.up.get(cid, 0) + b
                out.append(rep)
                if rep.has_error():
                    self.dropped.setdefault(cid, f"{stage}: Flower error {rep.error.code}: {rep.error.reason}")
                else:
                    ok += 1
            else:
                self.dropped.setdefault(cid, f"{stage}: {rep}")
        self.stages.append({"stage": stage, "nodes": len(msgs), "replies": ok, "time_s": time.perf_counter() - t0,
                            "bytes_down": down, "bytes_up": up})
        return out

    def __getattr__(self, name):  # anything else (get_node_ids, run, ...) from the real Grid
        return getattr(self.fleet.grid, name)


def secagg_round(engine, rnd: int, progress) -> dict:
    """One training round of ``FlowerEngine`` under SecAgg+ (the same entry keys as a plain round,
    plus ``secure_aggregation``)."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

    from mira.federated.engine import derive_seed
    from mira.federated.flower.protocol import FitTask
    from mira.federated.flower.server import say
    from mira.federated.strategies import FitRes
    from mira.models.adapters import all_finite

    plan: SecAggPlan = engine.secagg
    t0 = time.perf_counter()
    fleet, strategy, cfg = engine.fleet, engine.strategy, engine.cfg
    fleet.refresh()
    sampled = engine.sample(rnd)
    keys = strategy.wire_keys()
    all_keys = engine.ws.slot.keys()
    codec = engine.codec if strategy.exchanges else engine.lossless
    online = fleet.online()
    fitins, cid_of, failed_why = {}, {}, {}
    proximal, nbytes, start = False, 0, None
    for cid in sampled:
        ins = strategy.configure_fit(cid)
        proximal = proximal or ins.prox_mu > 0
        node = fleet.node_of.get(cid)
        if node is None or node not in online:
            failed_why[cid] = "its SuperNode is not connected"
            continue
        wire = codec.encode(ins.adapter, keys)
        nbytes = wire.nbytes
        engine.bytes_down += nbytes
        down = codec.decode(wire, keys)  # what the client starts from: the adapter at federation.wire_dtype
        start = start or {k: ins.adapter[k] for k in keys}
        task = FitTask(None, rnd, derive_seed(cfg.seed, rnd, cid), ins.prox_mu, sorted(ins.frozen),
                       [] if keys == all_keys else keys, lossless=not strategy.exchanges,
                       step_scale=int(getattr(ins, "step_scale", 1)))
        arrays = [down[k].detach().cpu().float().numpy() for k in keys]
        fitins[node] = (cid, FitIns(ndarrays_to_parameters(arrays),
                                    task_config(task, plan.max_weight, plan.cfg.clipping_range)))
        cid_of[node] = cid
    bridge = _bridge_class()(fitins)
    grid = _StageGrid(fleet, cid_of)
    need = engine.quorum(len(sampled))  # a strict majority of the sampled by default, >= federation.min_clients
    if len(fitins) >= max(2, need):
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=bridge, client_manager=_available(len(online)))
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": rnd})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        try:
            plan.workflow(None)(grid, context)
        except (KeyError, TypeError, ValueError) as e:
            raise MiraError(f"round {rnd}: secure aggregation failed ({type(e).__name__}: {e}); the run stops at "
                            f"round {rnd - 1} (resume continues from its checkpoint)") from None
    engine.flower["fit_bytes_down"] += sum(grid.down.values())
    engine.flower["fit_bytes_up"] += sum(grid.up.values())
    engine.flower["fit_messages"] += grid.messages
    results = bridge.results
    failed, rejected = [], []
    for cid in sampled:
        if cid in results:
            continue
        why = failed_why.get(cid) or grid.dropped.get(cid) or "left the SecAgg+ protocol"
        failed.append(cid)
        engine.failed.append({"round": rnd, "client": cid, "reason": why})
        if "NaN/Inf" in why:
            rejected.append(cid)
            engine.rejected.append({"round": rnd, "client": cid})
        say(f"round {rnd}: client {cid} left out: {why}")
    if bridge.mean is None or len(results) < need:
        stage = grid.stages[-1]["stage"] if grid.stages else "before setup"
        raise MiraError(f"round {rnd}: secure aggregation did not complete ({len(results)} of {len(sampled)} sampled "
                        f"clients aggregated, stopped after stage {stage}; quorum {need}, SecAgg+ "
                        f"needs at least 2 and threshold {plan.threshold}); the run stops at round {rnd - 1} (resume "
                        f"continues from its checkpoint)", where="federation.min_clients")
    if len(bridge.mean) != len(keys):
        raise MiraError(f"round {rnd}: secure aggregation returned {len(bridge.mean)} tensors for {len(keys)} keys")
    mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(start[k].shape).to(start[k].dtype)
            for k, a in zip(keys, bridge.mean)}
    if not all_finite(mean):
        raise MiraError(f"round {rnd}: the securely aggregated mean has NaN/Inf values")
    step_time = tokens = n_steps = clipped = 0
    train_loss, prox_term = {}, {}
    sizes = []
    for cid in sorted(results):
        m = results[cid].metrics
        sizes.append(int(results[cid].num_examples))
        step_time += float(m.get("step_time_s", 0.0))
        tokens += int(m.get("tokens", 0))
        n_steps += int(m.get("steps", 0))
        clipped += int(m.get("secagg_clipped", 0))
        train_loss[str(cid)] = float(m["train_loss"])
        prox_term[str(cid)] = float(m.get("prox_term", 0.0))
        engine.bytes_up += nbytes  # mira's accounting: the adapter at wire_dtype (SecAgg+ sends int64 masks)
        progress.client_done()
    info = strategy.aggregate_fit(rnd, {0: FitRes(mean, 1, {})})
    info = {k: v for k, v in info.items() if not k.startswith("fedavg_error")}  # needs the individual uploads
    if clipped:
        say(f"round {rnd}: {clipped} uploaded values exceeded privacy.secure_aggregation.clipping_range "
            f"(times their weight) and were clipped")
    bound = error_bound(plan.cfg, plan.max_weight, sizes)
    entry = {"round": rnd, "sampled": sampled, "rejected": rejected, "round_time_s": time.perf_counter() - t0,
             "train_step_time_s": step_time, "train_tokens": tokens, "train_steps": n_steps, "train_loss": train_loss,
             **({"prox_term": prox_term} if proximal and results else {}), **info, "failed": failed,
             "flower_bytes_down": {str(c): grid.down.get(c, 0) for c in sampled},
             "flower_bytes_up": {str(c): b for c, b in grid.up.items()},
             "secure_aggregation": {"aggregated": sorted(results), "num_shares": plan.shares,
                                    "threshold": plan.threshold, "max_weight": plan.max_weight,
                                    "error_bound": bound, "clipped_values": clipped, "stages": grid.stages}}
    say(f"round {rnd}: SecAgg+ mean of {len(results)}/{len(sampled)} clients in {entry['round_time_s']:.1f}s ("
        + ", ".join(f"{s['stage']} {s['time_s']:.1f}s" for s in grid.stages) + ")"
        + (f", left out {failed}" if failed else ""))
    engine._entry = entry
    return entry
