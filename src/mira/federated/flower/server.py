"""The server side of a Flower run: the in-process ``Engine`` with its two data-touching
steps (training and evaluation) replaced by messages to SuperNodes.

``FlowerEngine`` subclasses ``mira.federated.engine.Engine`` and keeps everything else:
client sampling, seeds ``derive_seed(seed, round, client)``, the strategy calls
(``configure_fit`` -> ``aggregate_fit``), NaN rejection, checkpoints, resume and the
run directory (``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``rounds.json``,
``adapters/client_<id>/``, ``graph.npy``, plots). The server holds the base model (to
know the shared LoRA initialisation and to write PEFT adapters) but no data: its
``Workspace`` has only each client's id, task and sizes, reported by the nodes.

``Fleet`` is the transport: it maps Flower node ids to mira client ids (a ``hello``
query to every new node), sends one message per client (MIRA is personalised: each
client gets its own adapter), and waits for replies under ``RunSettings``' deadlines.
A client that does not answer (node gone, ClientApp error, deadline) is left out of the
round; the strategy keeps its last adapter. If fewer than the round's quorum
(``RunSettings.quorum``: a strict majority of the sampled clients by default, at least
``federation.min_clients``) answer, the run stops with an error; the last checkpoint
stays and ``resume`` continues from it. A round that aggregated fewer clients than it
sampled is flagged ``partial`` in ``rounds.json`` (``eval_partial`` for an evaluation
that missed clients) and listed in ``summary.json`` (``partial_rounds``,
``partial_evaluations``).

Client identity. A node says which client it is (``partition-id`` in its node config),
and the first node to claim a partition is bound to it, by its Flower node id (with
node authentication, the id the SuperLink fixed for its public key at ``register``).
Another node claiming a bound partition while its owner is online is refused (and
logged); once the owner is offline, the partition is re-bound to the new node, and the
re-binding is logged with its reason and listed in ``summary.json``
(``flower.rebindings``).

Evaluation. Each node receives only its own adapter (its own and the shared global one
when the strategy has a single adapter). A personalised strategy's ``global_loss`` (an
adapter's loss on the union of all test sets) then cannot be formed: it is reported as
not computed (``null``) unless ``RunSettings.cross_eval`` sends every adapter to every
node, which shows each client's personalised adapter to all the others.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from flwr.app import Message, RecordDict

from mira.errors import MiraError
from mira.federated.flower.forkserver import debug_event
from mira.federated.flower.protocol import (
    MSG_EVAL,
    MSG_FIT,
    MSG_HELLO,
    FitTask,
    NodeInfo,
    eval_content,
    fit_content,
    parse_eval_reply,
    parse_fit_reply,
    parse_hello,
    payload_bytes,
)
from mira.federated.flower.settings import RunSettings


def say(msg: str) -> None:
    print(f"[mira {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# The ServerApp's peak memory above its fixed part, in float32 adapter copies: FIXED plus
# PER_CLIENT for each client (a round's fit messages, replies and decoded updates, and the
# evaluation's one message per client, are whole in memory at once; Flower 1.42 materialises whole
# messages). Measured with benchmarks/flower_memory.py (docs/flower.md, "Memory"; FedIT, every
# client sampled, no cross-evaluation): 2 clients 12.4 copies (100 MB adapter) and 12.9 (10 MB),
# 4 clients 20.7 (50 MB); the line lies on or above all three. Counted from the code, not measured:
# a personalised strategy holds one adapter per client and encodes each for evaluation (+2 a
# client); cross-evaluation sends every distinct adapter to every client (+K a client).
SERVER_COPIES_FIXED = 4.6
SERVER_COPIES_PER_CLIENT = 4.15
PERSONALIZED_COPIES_PER_CLIENT = 2.0
MEMORY_HEADROOM = 0.9  # refuse when the estimate exceeds this share of the memory available


def mem_available() -> int | None:
    """``MemAvailable`` of this machine in bytes (Linux ``/proc/meminfo``); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def server_memory_copies(clients: int, personalized: bool = False, cross_eval: bool = False) -> float:
    """Adapter copies the ServerApp holds at its peak (above its fixed part) with ``clients`` clients
    (evaluation reaches every client, whatever the fraction sampled for training)."""
    k = max(1, clients)
    copies = SERVER_COPIES_FIXED + SERVER_COPIES_PER_CLIENT * k
    if personalized:
        copies += PERSONALIZED_COPIES_PER_CLIENT * k
    if cross_eval:
        copies += float(k) * (k if personalized else 1)
    return copies


def check_server_memory(adapter_bytes: int, clients: int, available: int | None, personalized: bool = False,
                        cross_eval: bool = False) -> float:
    """Refuse, before the first round, a run whose rounds would not fit in this machine's memory
    (instead of being killed for memory in the middle of one); returns the estimate in bytes."""
    copies = server_memory_copies(clients, personalized, cross_eval)
    need = float(adapter_bytes) * copies
    if available is not None and need > MEMORY_HEADROOM * available:
        raise MiraError(
            f"a round would need about {need / 1e9:.1f} GB on the server ({adapter_bytes / 1e6:.0f} MB float32 "
            f"adapter x {copies:.1f} copies for {clients} clients"
            f"{', personalised' if personalized else ''}{', cross-evaluation' if cross_eval else ''}), more than "
            f"{MEMORY_HEADROOM:.0%} of the {available / 1e9:.1f} GB available; lower lora.r or the number of "
            f"clients{', or drop --cross-eval' if cross_eval else ''}, or run the SuperLink on a larger machine",
            where="lora")
    return need


@dataclass
class Reply:
    cid: int
    content: RecordDict | None
    error: str | None
    bytes_down: int  # Flower payload of the message to the node
    bytes_up: int  # ... and of its reply


def _error_text(msg: Message) -> str:
    err = msg.error
    return f"Flower error {err.code}: {err.reason}"


class Fleet:
    """Flower node ids <-> mira client ids, and one request/reply exchange per round."""

    def __init__(self, grid, settings: RunSettings, log: Callable[[str], None] = say):
        self.grid, self.s, self.log = grid, settings, log
        self.nodes: dict[int, NodeInfo] = {}  # node id -> what it said in hello
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.bad: dict[int, str] = {}  # node id -> why it is not used
        self.k: int | None = None
        self.refused: dict[int, int] = {}  # node id -> the bound partition it claimed (takeover refused)
        self.rebindings: list[dict] = []  # partitions moved to another node, with the reason
        self.round = 0  # the round being run (for the log of re-bindings)
        self.hello_bytes = 0
        self._asked: dict[str, tuple] = {}  # hello message id -> (node id, message, time sent)
        self.hello_wait = min(120.0, settings.node_wait)

    def online(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def _ttl(self, fallback: float) -> float:
        return float(self.s.round_timeout or fallback)

    def _add(self, info: NodeInfo) -> None:
        if self.k is None:
            self.k = info.num_partitions
        if info.num_partitions != self.k:
            self.bad[info.node_id] = f"num-partitions={info.num_partitions}, others say {self.k}"
            self.log(f"node {info.node_id} ignored: {self.bad[info.node_id]}")
            return
        n, pid = info.node_id, info.partition_id
        if not 0 <= pid < self.k:
            self.bad[n] = f"partition-id={pid} is not in [0, {self.k})"
            self.log(f"node {n} ignored: {self.bad[n]}")
            return
        old = self.node_of.get(pid)
        if old is not None and old != n:
            if old in self.online():
                self.bad[n] = f"claims partition-id={pid}, which is bound to node {old}, still online"
                self.refused[n] = pid
                self.log(f"node {n} refused: {self.bad[n]} (takeover refused; client {pid} stays node {old})")
                return
            reason = f"node {old} went offline"
            self.rebindings.append({"client": pid, "from_node": old, "to_node": n, "round": self.round,
                                    "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.log(f"client {pid} re-bound from node {old} to node {n}: {reason}")
        self.nodes[n] = info
        self.node_of[pid] = n

    def complete(self) -> bool:
        return self.k is not None and all(c in self.node_of for c in range(self.k))

    def _greet(self) -> None:
        """Send ``hello`` to nodes not asked yet (again after ``hello_wait``); take in the answers."""
        now = time.monotonic()
        online = self.online()
        for n, pid in list(self.refused.items()):  # its partition's owner has gone: it may claim it now
            if n in online and self.node_of.get(pid) not in online:
                del self.refused[n]
                self.bad.pop(n, None)
        for mid, (n, msg, sent) in list(self._asked.items()):
            if now - sent > self.hello_wait:
                self.log(f"node {n} did not answer hello in {self.hello_wait:.0f}s; asking again")
                del self._asked[mid]
        asked = {n for n, _, _ in self._asked.values()}
        new = sorted(online - set(self.nodes) - set(self.bad) - asked)
        if new:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=MSG_HELLO, group_id="hello",
                            ttl=max(self.hello_wait, 60.0)) for n in new]
            for msg, mid in zip(msgs, self.grid.push_messages(msgs)):
                if mid:
                    self._asked[mid] = (msg.metadata.dst_node_id, msg, now)
        if not self._asked:
            return
        for rep in self.grid.pull_messages(list(self._asked)):
            entry = self._asked.pop(rep.metadata.reply_to_message_id, None)
            if entry is None:
                continue
            n, msg, _ = entry
            self.hello_bytes += payload_bytes(msg) + payload_bytes(rep)
            if rep.has_error():
                self.bad[n] = _error_text(rep)
                self.log(f"node {n} refused: {self.bad[n]}")
                continue
            try:
                self._add(parse_hello(n, rep.content))
            except (KeyError, TypeError, ValueError) as e:
                self.bad[n] = f"malformed hello: {e}"

    def discover(self) -> list[NodeInfo]:
        """Wait (``node_wait``) until every client id 0..K-1 has a node; K comes from the nodes."""
        t0 = time.monotonic()
        while True:
            self._greet()
            if self.complete():
                break
            waited = time.monotonic() - t0
            if waited > self.s.node_wait:
                missing = [c for c in range(self.k)] if self.k else []
                missing = [c for c in missing if c not in self.node_of]
                bad = "; ".join(f"node {n}: {r}" for n, r in self.bad.items())
                what = f"clients {missing} have no SuperNode" if self.k else "no SuperNode answered"
                raise MiraError(f"after {waited:.0f}s {what}" + (f" ({bad})" if bad else ""), where="node-wait")
            time.sleep(self.s.poll)
        self.log(f"{self.k} clients: " + ", ".join(f"{c}->node {self.node_of[c]} ({self.nodes[self.node_of[c]].task})"
                                                   for c in range(self.k)))
        return [self.nodes[self.node_of[c]] for c in range(self.k)]

    def refresh(self, wait: float = 30.0) -> None:
        """Greet nodes that joined since the last round (e.g. a restarted SuperNode); give
        their answers up to ``wait`` seconds so they can take part in this round."""
        t0 = time.monotonic()
        self._greet()
        while self._asked and time.monotonic() - t0 < wait:
            time.sleep(self.s.poll)
            self._greet()

    def _push_pull(self, msgs: dict, timeout: float, min_ok: int, straggler: float,
                   watch: bool) -> dict:
        """Push ``msgs`` (key -> Message), pull replies until all are in or a deadline passes.

        Returns key -> reply ``Message`` or a string saying why there is none."""
        keys = list(msgs)
        out: dict = {}
        pending: dict[str, object] = {}
        if keys:
            debug_event("serverapp", "pushing", str(len(keys)))
            ids = list(self.grid.push_messages([msgs[k] for k in keys]))
            for mid in ids:  # with MIRA_FORKSERVER_DEBUG: when each message left (the per-round breakdown)
                debug_event("serverapp", "pushed", str(mid))
            for k, mid in zip(keys, ids):
                if mid:
                    pending[mid] = k
                else:
                    out[k] = "the SuperLink did not accept the message"
        t0 = last_check = time.monotonic()
        quorum_at = None
        reason = ""
        while pending:
            for rep in self.grid.pull_messages(list(pending)):
                debug_event("serverapp", "reply", str(rep.metadata.reply_to_message_id))
                k = pending.pop(rep.metadata.reply_to_message_id, None)
                if k is not None:
                    out[k] = rep
            if not pending:
                break
            now = time.monotonic()
            ok = sum(1 for v in out.values() if isinstance(v, Message) and not v.has_error())
            if straggler >= 0 and ok >= min_ok:
                quorum_at = quorum_at if quorum_at is not None else now
                if now - quorum_at >= straggler:
                    reason = f"no reply {straggler:g}s after {ok} clients had replied (straggler-timeout)"
                    break
            if timeout and now - t0 >= timeout:
                reason = f"no reply within {timeout:g}s (round-timeout)"
                break
            if watch and now - last_check >= 5.0:
                last_check = now
                online = self.online()
                for mid, k in list(pending.items()):
                    if msgs[k].metadata.dst_node_id not in online:
                        out[k] = "its SuperNode went offline"
                        del pending[mid]
            time.sleep(self.s.poll)
        for k in pending.values():
            out[k] = reason
        return out

    def exchange(self, msg_type: str, contents: dict[int, RecordDict], group: str, min_ok: int) -> dict[int, Reply]:
        """Send ``contents[cid]`` to client ``cid``'s node; collect the replies."""
        online = self.online()
        msgs, out = {}, {}
        for cid, content in contents.items():
            node = self.node_of.get(cid)
            if node is None or node not in online:
                out[cid] = Reply(cid, None, "its SuperNode is not connected", 0, 0)
                continue
            msgs[cid] = Message(content, dst_node_id=node, message_type=msg_type, group_id=group,
                                ttl=self._ttl(12 * 3600.0))
        sent = {cid: payload_bytes(m) for cid, m in msgs.items()}
        replies = self._push_pull(msgs, timeout=self.s.round_timeout, min_ok=min_ok,
                                  straggler=self.s.straggler_timeout, watch=True)
        for cid, rep in replies.items():
            if isinstance(rep, str):
                out[cid] = Reply(cid, None, rep, sent[cid], 0)
            elif rep.has_error():
                out[cid] = Reply(cid, None, _error_text(rep), sent[cid], payload_bytes(rep))
            else:
                out[cid] = Reply(cid, rep.content, None, sent[cid], payload_bytes(rep))
        return out


class _Count:
    """Stands in for a client's dataset on the server: only its size is known."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def remote_workspace(cfg, tokenizer, slot, infos: list[NodeInfo]):
    """A ``Workspace`` without data: client ids, tasks and sizes as the nodes reported them."""
    from mira.data.partition import ClientData
    from mira.federated.engine import Workspace

    clients = [ClientData(i.partition_id, i.task, [], []) for i in infos]
    return Workspace(cfg, slot.model, tokenizer, slot, clients, [_Count(i.n_train) for i in infos],
                     [_Count(i.n_test) for i in infos], None)


def flower_engine_class():
    """``FlowerEngine`` (built on first use: importing the engine pulls in torch)."""
    from mira.federated.engine import Engine, derive_seed
    from mira.federated.strategies import FitRes
    from mira.federated.wire import WireError
    from mira.models.adapters import all_finite

    class FlowerEngine(Engine):
        """``Engine`` whose clients are SuperNodes (see the module docstring)."""

        secure_aggregation = True  # privacy.secure_aggregation: SecAgg+ rounds (``secagg``)

        def __init__(self, ws, cfg, out_dir, fleet: Fleet, settings: RunSettings):
            super().__init__(ws, cfg, out_dir, quiet=True)
            self.fleet, self.settings = fleet, settings
            self.secagg = None
            if cfg.privacy.secure_aggregation is not None:
                from mira.federated.flower.secagg import SecAggPlan

                self.secagg = SecAggPlan.build(cfg.privacy.secure_aggregation, [len(d) for d in ws.train],
                                               self.per_round)
            # adapters travel as named tensors (protocol.TensorCodec: WireCodec's casts and byte counts)
            from mira.federated.flower.protocol import TensorCodec

            self.codec = TensorCodec(ws.slot.initial_state, cfg.federation.wire_dtype)
            self.lossless = TensorCodec(ws.slot.initial_state, "float32")
            self.failed: list[dict] = []
            self.flower = {"fit_bytes_down": 0, "fit_bytes_up": 0, "fit_messages": 0,
                           "eval_bytes_down": 0, "eval_bytes_up": 0, "eval_messages": 0}
            self._entry: dict = {}

        # -- checkpoint: the engine's state plus the Flower counters --------------------
        def state(self) -> dict:
            return {**super().state(), "flower": dict(self.flower), "failed": list(self.failed),
                    "rebindings": list(getattr(self.fleet, "rebindings", []))}

        def load_state(self, s: dict) -> None:
            super().load_state(s)
            self.flower.update(s.get("flower", {}))
            self.failed = list(s.get("failed", []))
            # the re-bindings of the interrupted part of the run come first (a resume keeps them)
            if hasattr(self.fleet, "rebindings"):
                self.fleet.rebindings[:0] = [r for r in s.get("rebindings", []) if r not in self.fleet.rebindings]

        def _count(self, kind: str, replies: dict[int, Reply]) -> None:
            for r in replies.values():
                self.flower[f"{kind}_bytes_down"] += r.bytes_down
                self.flower[f"{kind}_bytes_up"] += r.bytes_up
                self.flower[f"{kind}_messages"] += 1 if r.bytes_down else 0

        def quorum(self, sampled: int) -> int:
            """Replies a round of ``sampled`` clients needs (``RunSettings.quorum``)."""
            return self.settings.quorum(sampled, self.cfg.federation.min_clients)

        # -- one round: configure_fit -> SuperNodes -> aggregate_fit ----------------------
        def run_round(self, rnd: int, progress) -> dict:
            self.fleet.round = rnd
            if self.secagg is not None:
                from mira.federated.flower.secagg import secagg_round

                entry = secagg_round(self, rnd, progress)
            else:
                entry = self._plain_round(rnd, progress)
            # fewer clients aggregated than sampled (left out, or rejected): flagged, never silent
            short = sorted(set(entry.get("failed", [])) | set(entry.get("rejected", [])))
            entry["partial"] = bool(short)
            entry["aggregated"] = len(entry["sampled"]) - len(short)
            if short:
                say(f"round {rnd}: partial, {entry['aggregated']} of {len(entry['sampled'])} sampled clients "
                    f"aggregated (quorum {self.quorum(len(entry['sampled']))})")
            return entry

        def _plain_round(self, rnd: int, progress) -> dict:
            t0 = time.perf_counter()
            self.fleet.refresh()
            sampled = self.sample(rnd)
            keys = self.strategy.wire_keys()
            all_keys = self.ws.slot.keys()
            exchanges = self.strategy.exchanges
            codec = self.codec if exchanges else self.lossless
            contents = {}
            proximal = False  # FedProx: the proximal term is logged apart (prox_term), as in the engine
            for cid in sampled:
                ins = self.strategy.configure_fit(cid)
                proximal = proximal or ins.prox_mu > 0
                buf = codec.encode(ins.adapter, keys)
                if exchanges:
                    self.bytes_down += buf.nbytes
                contents[cid] = fit_content(FitTask(buf, rnd, derive_seed(self.cfg.seed, rnd, cid), ins.prox_mu,
                                                    sorted(ins.frozen), [] if keys == all_keys else keys,
                                                    lossless=not exchanges,
                                                    step_scale=int(getattr(ins, "step_scale", 1))))
            need = self.quorum(len(sampled))
            if self.privacy is not None:  # Poisson sampling may sample fewer (even none): the round still counts
                need = min(need, len(sampled))
            replies = self.fleet.exchange(MSG_FIT, contents, group=f"fit-{rnd}", min_ok=need)
            self._count("fit", replies)
            results, rejected, failed = {}, [], []
            step_time, tokens, n_steps, up = 0.0, 0, 0, {}
            for cid in sampled:
                r = replies[cid]
                try:
                    if r.error:
                        raise ValueError(r.error)
                    buf, m = parse_fit_reply(r.content)
                    adapter = codec.decode(buf, keys)
                except (KeyError, TypeError, ValueError, WireError) as e:
                    failed.append(cid)
                    self.failed.append({"round": rnd, "client": cid, "reason": str(e)})
                    say(f"round {rnd}: client {cid} left out: {e}")
                    continue
                if exchanges:
                    self.bytes_up += buf.nbytes
                up[cid] = r.bytes_up
                step_time += float(m.get("step_time_s", 0.0))
                tokens += int(m.get("tokens", 0))
                n_steps += int(m.get("steps", 0))
                if not all_finite(adapter):
                    say(f"round {rnd}: client {cid} sent NaN/Inf values; update rejected")
                    rejected.append(cid)
                    self.rejected.append({"round": rnd, "client": cid})
                else:
                    results[cid] = FitRes(adapter, int(m["n_train"]), {"train_loss": float(m["train_loss"]),
                                                                        "prox_term": float(m.get("prox_term", 0.0))})
                progress.client_done()
            replied = len(sampled) - len(failed)
            if replied < need:
                raise MiraError(f"round {rnd}: {replied} of {len(sampled)} sampled clients replied, fewer than the "
                                f"quorum of {need} (min-clients: a strict majority by default; federation.min_clients="
                                f"{self.cfg.federation.min_clients}); the run stops at round {rnd - 1} (resume "
                                f"continues from its checkpoint)", where="federation.min_clients")
            aggregate, dp_info = self.private_results(rnd, results, keys)  # central DP, as in the engine
            info = {**self.strategy.aggregate_fit(rnd, aggregate), **dp_info}
            entry = {"round": rnd, "sampled": sampled, "rejected": rejected, "round_time_s": time.perf_counter() - t0,
                     "train_step_time_s": step_time, "train_tokens": tokens, "train_steps": n_steps,
                     "train_loss": {str(c): r.metrics["train_loss"] for c, r in results.items()},
                     **({"prox_term": {str(c): r.metrics["prox_term"] for c, r in results.items()}}
                        if proximal and results else {}),
                     **info, "failed": failed,
                     "flower_bytes_down": {str(c): replies[c].bytes_down for c in sampled},
                     "flower_bytes_up": {str(c): b for c, b in up.items()}}
            graphs = getattr(self.strategy, "graphs", None)
            if graphs:
                from mira.io import atomic_save_npy

                atomic_save_npy(self.out / "graphs" / f"round_{rnd:04d}.npy", graphs[-1])
            say(f"round {rnd}: {len(results)}/{len(sampled)} updates aggregated in {entry['round_time_s']:.1f}s"
                + (f", left out {failed}" if failed else ""))
            self._entry = entry
            return entry

        # -- evaluation on the nodes --------------------------------------------------------
        def evaluate(self, rnd: int) -> list[dict]:
            """Each node evaluates the adapters it may see on its own test split: its own only
            (by default), or every distinct adapter with ``cross_eval``. An adapter's ``global_loss``
            (its loss on the union of the test sets, from the per-node sums) is formed when every
            evaluated node evaluated it, i.e. always for a single shared adapter; otherwise it is
            NaN here and ``null`` in the files ("not computed")."""
            adapters, index, own = [], {}, {}
            for c in self.ws.clients:
                a = self.strategy.adapter_for(c.id)
                if id(a) not in index:
                    index[id(a)] = len(adapters)
                    adapters.append(a)
                own[c.id] = index[id(a)]
            keys = self.ws.slot.keys()
            bufs = [self.lossless.encode(a, keys) for a in adapters]
            cross = self.settings.cross_eval
            visible = {c.id: list(range(len(adapters))) if cross else [own[c.id]] for c in self.ws.clients}
            contents = {c.id: eval_content([bufs[i] for i in visible[c.id]], visible[c.id].index(own[c.id]), rnd)
                        for c in self.ws.clients}
            need = min(len(contents), self.quorum(len(contents)))
            replies = self.fleet.exchange(MSG_EVAL, contents, group=f"eval-{rnd}", min_ok=need)
            self._count("eval", replies)
            per_node, failed = {}, []  # client -> (its metrics, adapter index -> loss)
            for c in self.ws.clients:
                r = replies[c.id]
                try:
                    if r.error:
                        raise ValueError(r.error)
                    m = parse_eval_reply(r.content)
                    if len(m["losses"]) != len(visible[c.id]):
                        raise ValueError(f"{len(m['losses'])} losses for {len(visible[c.id])} adapters")
                    per_node[c.id] = (m, {i: float(x) for i, x in zip(visible[c.id], m["losses"])})
                except (KeyError, TypeError, ValueError) as e:
                    failed.append(c.id)
                    say(f"round {rnd}: client {c.id} not evaluated: {e}")
            if not per_node:
                raise MiraError(f"round {rnd}: no SuperNode answered the evaluation")
            weight = {j: int(m["tokens"]) for j, (m, _) in per_node.items() if int(m["tokens"]) > 0}
            total = sum(weight.values())
            rows = []
            for c in self.ws.clients:
                if c.id not in per_node:
                    continue
                (m, losses), i = per_node[c.id], own[c.id]
                if total and all(i in per_node[j][1] for j in weight):
                    glob = sum(per_node[j][1][i] * w for j, w in weight.items()) / total
                else:
                    glob = float("nan")  # not computed: other nodes did not see this adapter
                row = {"round": rnd, "client": c.id, "task": c.task, "local_loss": losses[i],
                       "global_loss": float(glob), "n_train": len(self.ws.train[c.id]),
                       "n_test": len(self.ws.test[c.id])}
                for key in ("rouge_l", "exact_match"):
                    if key in m:
                        row[key] = float(m[key])
                rows.append(row)
            if self._entry.get("round") == rnd:
                self._entry["eval_failed"] = failed
                self._entry["eval_partial"] = bool(failed)
            if failed:
                say(f"round {rnd}: partial evaluation, {len(per_node)} of {len(contents)} clients evaluated")
            return rows

        def finish(self) -> dict:
            from mira.io import atomic_write_json

            import json
            import math

            from mira.io import atomic_write_text

            summary = super().finish()
            summary["runtime"] = "flower"
            summary["flower"] = {**self.flower, "hello_bytes": self.fleet.hello_bytes,
                                 "failed_updates": self.failed,
                                 "nodes": {str(c): n for c, n in sorted(self.fleet.node_of.items())},
                                 "rebindings": list(getattr(self.fleet, "rebindings", [])),
                                 "cross_eval": bool(self.settings.cross_eval),
                                 "quorum": self.settings.min_clients or "majority"}
            summary["partial_rounds"] = [e["round"] for e in self.rounds_log if e.get("partial")]
            summary["partial_evaluations"] = [e["round"] for e in self.rounds_log if e.get("eval_partial")]

            def nan(x) -> bool:
                return isinstance(x, float) and math.isnan(x)

            if any(nan(r["global_loss"]) for r in self.rows):  # personalised adapters, no cross-evaluation
                summary["global_loss"] = ("not computed: each node evaluated only its own adapter (cross-eval "
                                          "sends every adapter to every node, exposing them, to compute it)")
                if nan(summary["mean_global_test_loss"]):
                    summary["mean_global_test_loss"] = None
                for c in summary["clients"]:
                    if nan(c.get("global_test_loss")):
                        c["global_test_loss"] = None
                atomic_write_text(self.out / "metrics.jsonl", "".join(
                    json.dumps({k: (None if nan(v) else v) for k, v in r.items()}) + "\n" for r in self.rows))
            if self.secagg is not None:
                summary["secure_aggregation"] = self.secagg.report(self.rounds_log)
            atomic_write_json(self.out / "summary.json", summary)
            return summary

    return FlowerEngine


def check_supported(cfg) -> None:
    """What the Flower runtime cannot run (checked when submitting and again on the server)."""
    from mira.federated.strategies import get_strategy

    if get_strategy(cfg.algorithm.name).pooled:
        raise MiraError(f"{cfg.algorithm.name!r} trains on the pooled data of all clients, which a federation "
                        "never gathers; run it with `mira run`", where="algorithm.name")
    if cfg.refine is not None:
        raise MiraError("refine hooks are not supported on the Flower runtime yet", where="refine")
    if cfg.lora.ranks is not None:
        raise MiraError("per-client LoRA ranks are not supported on the Flower runtime yet (the nodes hold one "
                        "rank); run flora, hetlora or mira (space: delta) with mira run or mira compare",
                        where="lora.ranks")
    from mira.federated.flower.secagg import check_secure_aggregation

    check_secure_aggregation(cfg)
    if cfg.privacy.sample is not None:
        raise MiraError("DP-SGD is not supported on the Flower runtime yet (see docs/privacy.md); run it with "
                        "`mira run`", where="privacy.sample")
    if cfg.privacy.client is not None and cfg.privacy.client.mode != "central":
        raise MiraError("local DP is not supported on the Flower runtime yet (central DP is; see docs/privacy.md); "
                        "run it with `mira run`", where="privacy.client.mode")


def run_server(grid, run_config) -> dict:
    """The ServerApp's body: discover the nodes, then run the engine over them."""
    import threading
    from pathlib import Path

    from mira.federated.flower.node import run_config_of
    from mira.federated.flower.worker import _preload

    settings = RunSettings.from_run_config(run_config)
    cfg = run_config_of(run_config)
    out = Path(settings.out_dir)
    say(f"{cfg.algorithm.name}: {cfg.federation.rounds} rounds, run directory {out}")
    preload = threading.Thread(target=_preload, daemon=True)  # import torch & co. while the nodes answer
    preload.start()
    fleet = Fleet(grid, settings)
    infos = fleet.discover()
    preload.join()
    check_supported(cfg)
    from mira.federated.flower.node import load_slot

    tokenizer, slot = load_slot(cfg)
    ws = remote_workspace(cfg, tokenizer, slot, infos)
    engine = flower_engine_class()(ws, cfg, out, fleet, settings)
    adapter_bytes = 4 * sum(t.numel() for t in slot.initial_state.values())
    need = check_server_memory(adapter_bytes, engine.k, mem_available(), personalized=engine.strategy.personalized,
                               cross_eval=settings.cross_eval)
    if adapter_bytes >= 10**8:
        say(f"{adapter_bytes / 1e6:.0f} MB adapter, {engine.k} clients: about {need / 1e9:.1f} GB of server memory "
            f"a round")
    summary = engine.run(resume=settings.resume)
    say(f"done: mean local test loss {summary['mean_local_test_loss']:.4f}, "
        f"bytes up {summary['bytes_up']:,}, down {summary['bytes_down']:,}; written to {out}")
    return summary
