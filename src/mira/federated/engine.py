"""The in-process federated engine.

``Workspace`` loads what every algorithm shares: the records, the client partition,
the one frozen base model with its LoRA slot, and the tokenised splits.
``Engine`` runs one strategy on a workspace, round by round:

1. sample ``max(1, round(fraction*K))`` clients uniformly without replacement;
2. for each, serialise what the strategy sends (``WireCodec``), train locally
   (``client_fit``), serialise the upload; updates with NaN/Inf are rejected and logged (when
   every update of a round is, the training has diverged: the run stops, ``RunStopped``, its last
   checkpoint kept);
3. ``strategy.aggregate_fit``;
4. evaluate every ``eval.every`` rounds and at the end: each client's adapter on its own
   test split (``local_loss``), on the union of all test splits (``global_loss``) and, with
   ``partition.val_fraction > 0``, on its own validation split (``val_loss``, carved from its
   training data: what model selection such as ``mira tune`` may look at; test losses never);
5. checkpoint the server state atomically, with the run's fingerprint (``mira.federated.fingerprint``:
   what its result depends on), which ``--resume`` checks before it continues (``check_resume``).
   A full disk stops the run in one line (``RunStopped``), the last checkpoint intact.

Each round's entry in ``rounds.json`` also holds every client's mean training (task) loss
(``train_loss``; FedProx's proximal term apart, ``prox_term``) and, for strategies with a task
graph, when the clients have several tasks and some share one, ``graph_auc``: the ROC AUC with
which the graph's weights ``a_kl`` separate same-task pairs from different-task pairs.

Randomness is derived from ``(seed, round, client)``, so a resumed run retraces the
uninterrupted one exactly. The checkpoint holds only tensors and plain data (numpy arrays
are stored as tensors, numpy scalars as numbers), so it is read back with
``torch.load(weights_only=True)``: a ``checkpoint.pt`` that would run code when unpickled
is refused, not executed.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mira.config import RunConfig
from mira.data.partition import ClientData, partition
from mira.data.prompts import TokenizedDataset
from mira.data.report import data_summary, log_lines, tokenize_clients
from mira.data.records import load_records
from mira.errors import MiraError
from mira.eval.metrics import eval_loss, generate, generation_metrics
from mira.federated.client import client_fit
from mira.federated.strategies import FitRes, Strategy, StrategyContext, get_strategy
from mira.federated.strategies.ranks import client_ranks
from mira.federated.wire import WireCodec
from mira.io import atomic_save_npy, atomic_torch_save, atomic_write_json, atomic_write_text, clean_temp
from mira.models.adapters import AdapterSlot, all_finite, lora_settings_to_peft
from mira.models.loader import load_base
from mira.report.progress import NullProgress
from mira.train.trainer import LocalTrainer, TrainSettings

log = logging.getLogger("mira")
CHECKPOINT = "checkpoint.pt"


class RunStopped(MiraError):
    """The run cannot go on (every update of a round rejected, a full disk); the message says what
    happened, what was kept and how to continue."""


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def disk_full(e: BaseException) -> bool:
    """``e`` (or what caused it) is a full disk or quota: ``ENOSPC``/``EDQUOT``, also as the text that
    writers such as safetensors make of it."""
    import errno

    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(x)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
    return False


_NDARRAY = "__ndarray__"


def to_checkpoint(obj):
    """``obj`` with numpy arrays as ``{"__ndarray__": tensor}`` and numpy scalars as Python
    numbers, so that ``torch.load(weights_only=True)`` reads it back (see ``from_checkpoint``)."""
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_checkpoint(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_checkpoint(v) for v in obj)
    return obj


def from_checkpoint(obj):
    if isinstance(obj, dict):
        if len(obj) == 1 and _NDARRAY in obj:
            return obj[_NDARRAY].numpy()
        return {k: from_checkpoint(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_checkpoint(v) for v in obj)
    return obj


def load_checkpoint(path: Path) -> dict:
    """The engine state in ``path``, read with ``weights_only=True``; anything else (a corrupt,
    truncated or empty file, or one holding arbitrary objects) is a one-line ``MiraError``."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # UnpicklingError (objects outside the allow-list), RuntimeError (bad zip), EOFError
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise MiraError(f"{path} is not a readable mira checkpoint (corrupt, truncated, or holding objects "
                        f"other than tensors and plain data; refused: {type(e).__name__}: {first})",
                        where="--resume") from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int):
        raise MiraError(f"{path} is not a mira checkpoint (no round counter)", where="--resume")
    return from_checkpoint(state)


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def train_settings(cfg: RunConfig) -> TrainSettings:
    f = cfg.federation
    return TrainSettings(lr=f.lr, batch_size=f.batch_size, weight_decay=f.weight_decay, grad_clip=f.grad_clip,
                         steps=f.local_steps, epochs=f.local_epochs, gradient_checkpointing=cfg.train.gradient_checkpointing)


@dataclass
class Workspace:
    """Model, tokenizer, LoRA slot and client data, loaded once and shared by all algorithms."""

    cfg: RunConfig
    model: object
    tokenizer: object
    slot: AdapterSlot
    clients: list[ClientData]
    train: list[TokenizedDataset]
    test: list[TokenizedDataset]
    global_test: TokenizedDataset
    data_report: list[dict] = field(default_factory=list)  # empty on a Flower server: the nodes hold the data
    val: list[TokenizedDataset] = field(default_factory=list)  # per client; empty without partition.val_fraction

    @classmethod
    def load(cls, cfg: RunConfig, log_fn: Callable[[str], None] = lambda s: None) -> "Workspace":
        records = load_records(cfg.data, seed=cfg.data.seed)
        clients = partition(records, cfg.partition, seed=cfg.seed, min_train=1)
        if cfg.refine is not None:
            from mira.shed.federated import refine_clients

            clients = refine_clients(clients, cfg, log_fn)
        base, tokenizer = load_base(cfg.model.path, cfg.model.dtype, cfg.model.device, quantization=cfg.model.quantization)
        lora = lora_settings_to_peft(base, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        slot = AdapterSlot.attach(base, lora, seed=cfg.seed)
        train, test, val, report = tokenize_clients(clients, tokenizer, cfg.data)
        for line in log_lines(report):
            log_fn(line)
        log_fn(f"{len(records)} records, {len(clients)} clients, "
               f"{sum(len(t) for t in train)} train / {sum(len(t) for t in test)} test examples"
               + (f" / {sum(len(v) for v in val)} validation examples (from the training data)" if val else ""))
        return cls(cfg, slot.model, tokenizer, slot, clients, train, test, TokenizedDataset.concat(test), report, val)


def strategy_context(cfg: RunConfig, n_train: list[int], keys: list[str] | None = None) -> StrategyContext:
    """What the strategy may know, from the clients' training-set sizes (the engine's and the
    up-front checks' one definition, see ``mira.federated.compare.preflight``)."""
    settings = train_settings(cfg)
    steps = [settings.num_steps(n) for n in n_train]
    return StrategyContext(num_clients=len(n_train), n_train=list(n_train), lr=cfg.federation.lr,
                           local_steps=int(round(float(np.mean(steps)))) if steps else 1, seed=cfg.seed,
                           keys=list(keys or []), rounds=cfg.federation.rounds,
                           ranks=client_ranks(cfg.lora.ranks, cfg.lora.rank_by, n_train), lora_alpha=cfg.lora.alpha)


class Engine:
    secure_aggregation = False  # privacy.secure_aggregation needs the Flower runtime (FlowerEngine sets this)

    def __init__(self, ws: Workspace, cfg: RunConfig, out_dir: str | Path, quiet: bool = False):
        if cfg.privacy.secure_aggregation is not None and not self.secure_aggregation:
            from mira.federated.flower.secagg import refuse_in_process

            refuse_in_process()
        self.ws, self.cfg, self.out = ws, cfg, Path(out_dir)
        self.quiet = quiet
        self.k = len(ws.clients)
        cls = get_strategy(cfg.algorithm.name)
        self.params = cls.parse_params(cfg.algorithm.params())
        self.trainer = LocalTrainer(ws.slot, ws.tokenizer.pad_token_id, train_settings(cfg))
        ctx = strategy_context(cfg, [len(d) for d in ws.train], ws.slot.keys())
        self.ranks = ctx.ranks  # per-client LoRA ranks (lora.ranks); None: every client has the slot's rank
        self._by_rank: dict[int, tuple] = {}
        if self.ranks:
            ctx.inits = {r: ws.slot.for_rank(r).initial_state for r in sorted(set(self.ranks))}
        self.strategy: Strategy = cls(self.params, ctx, ws.slot.initial_state)
        self.codec = WireCodec(ws.slot.initial_state, cfg.federation.wire_dtype)
        self.privacy = self.dpsgd = None  # differential privacy (mira.privacy; imported only when asked for)
        if cfg.privacy.enabled:
            from mira.privacy.base import build_client_mechanism
            from mira.privacy.dp_sgd import build_sample_mechanism

            rounds = self.strategy.num_rounds(cfg.federation.rounds)
            self.privacy = build_client_mechanism(cfg, cls, num_clients=self.k, fraction=cfg.federation.fraction,
                                                  rounds=rounds, seed=cfg.seed)
            self.dpsgd = build_sample_mechanism(cfg, cls, [len(d) for d in ws.train], rounds=rounds)
        if self.dpsgd is not None:
            self.trainer.settings.dp_noise_multiplier = self.dpsgd.z
            self.trainer.settings.dp_max_grad_norm = cfg.privacy.sample.max_grad_norm
            self.trainer.settings.dp_secure_noise = cfg.privacy.secure_noise
        self.per_round = max(1, int(round(cfg.federation.fraction * self.k)))
        if self.per_round < cfg.federation.min_clients:
            raise MiraError(f"fraction {cfg.federation.fraction} samples {self.per_round} clients per round, "
                            f"fewer than federation.min_clients={cfg.federation.min_clients}", where="federation.fraction")
        self.pooled = TokenizedDataset.concat(ws.train) if cls.pooled else None
        # counters (checkpointed)
        self.round = 0
        self.rows: list[dict] = []
        self.rounds_log: list[dict] = []
        self.bytes_up = self.bytes_down = 0
        self.wall = 0.0
        self.rejected: list[dict] = []
        self.fingerprint: dict = {}
        self.changes: list[dict] = []  # fingerprint fields changed on a resume (federation.rounds, --allow-changed)
        self.saved_round = 0  # the round of the checkpoint on disk

    # -- setup / resume --------------------------------------------------------------
    def resolved_dict(self) -> dict:
        raw = self.cfg.model_dump(mode="json")
        raw["algorithm"] = {"name": self.cfg.algorithm.name, **self.params.model_dump(mode="json", by_alias=True)}
        return raw

    def resolved_config(self) -> str:
        import yaml

        return yaml.safe_dump(self.resolved_dict(), sort_keys=False)

    def make_fingerprint(self) -> dict:
        """What this run's result depends on (``mira.federated.fingerprint``)."""
        from mira.federated.fingerprint import fingerprint

        shapes = {k: list(v.shape) for k, v in self.ws.slot.initial_state.items()}
        if getattr(self, "ranks", None):  # lora.ranks: each client's adapter has its own rank
            shapes["(client ranks)"] = list(self.ranks)
        return fingerprint(self.resolved_dict(), self.ws.clients, shapes)

    def rounds_may_change(self) -> bool:
        """Whether ``federation.rounds`` may change on resume: not when the strategy's schedule or a
        privacy accountant depends on it."""
        private = getattr(self, "privacy", None) is not None or getattr(self, "dpsgd", None) is not None
        return self.strategy.rounds_extendable and not private

    def write_identity(self) -> None:
        """``config.yaml`` (first: it marks a run directory) and ``fingerprint.json``."""
        atomic_write_text(self.out / "config.yaml", self.resolved_config())
        atomic_write_json(self.out / "fingerprint.json", {"fingerprint": self.fingerprint, "changes": self.changes})

    def check_resume(self, state: dict, allow_changed: Sequence[str] = ()) -> list[str]:
        """Refuse to continue ``state`` with a config or data it was not made with (one line naming the
        field), except ``federation.rounds`` (see ``rounds_may_change``) and the fields in ``allow_changed``;
        the changed fields that were accepted."""
        from mira.federated import fingerprint as fp

        fp.check_allowed(allow_changed, self.fingerprint)
        stored, done = state.get("fingerprint"), state["round"]
        self.changes = list(state.get("fingerprint_changes") or [])
        if not isinstance(stored, dict):
            log.warning("%s has no fingerprint (written by an older mira): its config and data are not checked "
                        "against the run's", self.out / CHECKPOINT)
            return []
        safe = ("federation.rounds",) if self.rounds_may_change() else ()
        refused, accepted = fp.compare(stored, self.fingerprint, [*allow_changed, *safe])
        if refused:
            raise MiraError(fp.mismatch_message(self.out, stored, self.fingerprint, refused), where="--resume")
        rounds = self.strategy.num_rounds(self.cfg.federation.rounds)
        if done > rounds:
            raise MiraError(f"{self.out} has run {done} rounds; federation.rounds={self.cfg.federation.rounds} "
                            f"would undo some (set it to {done} or more)", where="--resume")
        for name in accepted:
            was, now = stored.get(name), self.fingerprint.get(name)
            if name == "federation.rounds":
                log.info("federation.rounds was %s, now %s: continuing from round %d to round %d", was, now, done, rounds)
            else:
                log.warning("--resume: %s was %s, now %s: accepted (--allow-changed)", name, was, now)
            self.changes.append({"round": done, "field": name, "was": was, "now": now})
        if accepted:
            self.write_identity()
        return accepted

    def state(self) -> dict:
        return {"round": self.round, "strategy": self.strategy.state_dict(), "rows": self.rows,
                "rounds_log": self.rounds_log, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "wall": self.wall, "rejected": self.rejected,
                "rng": {"scheme": "numpy SeedSequence([seed, round, client])", "seed": self.cfg.seed},
                **({"privacy": self.privacy.state_dict()} if self.privacy is not None else {}),
                **({"dp_sgd": self.dpsgd.state_dict()} if self.dpsgd is not None else {})}

    def load_state(self, s: dict) -> None:
        try:
            self.round = s["round"]
            self.strategy.load_state_dict(s["strategy"])
            self.rows, self.rounds_log = s["rows"], s["rounds_log"]
            self.bytes_up, self.bytes_down, self.wall = s["bytes_up"], s["bytes_down"], s["wall"]
            self.rejected = s["rejected"]
            if self.privacy is not None:
                self.privacy.load_state_dict(s["privacy"])
            if self.dpsgd is not None:
                self.dpsgd.load_state_dict(s["dp_sgd"])
        except (KeyError, TypeError, AttributeError) as e:
            raise MiraError(f"{self.out / CHECKPOINT} does not hold a {self.cfg.algorithm.name} run's state "
                            f"({type(e).__name__}: {e})", where="--resume") from None

    def checkpoint(self) -> None:
        identity = {"fingerprint": self.fingerprint, "fingerprint_changes": self.changes}
        atomic_torch_save(self.out / CHECKPOINT, to_checkpoint({**self.state(), **identity}))
        self.saved_round = self.round
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    # -- one round --------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, 1_000_003))
        sampled = sorted(rng.choice(self.k, size=self.per_round, replace=False).tolist())
        own = self.privacy.sample(rnd, self.k) if self.privacy is not None else None
        if own is not None:  # central DP: Poisson sampling, as its accountant assumes
            sampled = own
        return sorted(self.strategy.select_clients(rnd, sampled))  # e.g. fedit_ft's last round: every client

    def _transfer(self, state, keys, codec: WireCodec | None = None) -> tuple[dict, int]:
        codec = codec or self.codec
        buf = codec.encode(state, keys)
        return codec.decode(buf, keys), len(buf)

    def _client(self, cid: int) -> tuple[AdapterSlot, LocalTrainer, WireCodec]:
        """The slot (made active), trainer and wire codec of client ``cid``'s LoRA rank: the workspace's
        own without ``lora.ranks``, else those of a PEFT adapter of its rank on the same model."""
        if not self.ranks:
            return self.ws.slot.activate(), self.trainer, self.codec
        r = self.ranks[cid]
        if r not in self._by_rank:
            slot = self.ws.slot.for_rank(r)
            self._by_rank[r] = (slot, LocalTrainer(slot, self.ws.tokenizer.pad_token_id, self.trainer.settings),
                                WireCodec(slot.initial_state, self.cfg.federation.wire_dtype))
        slot, trainer, codec = self._by_rank[r]
        return slot.activate(), trainer, codec

    def private_results(self, rnd: int, results: dict[int, FitRes], keys: list[str]) -> tuple[dict, dict]:
        """What the strategy aggregates, and what to log about it: ``results`` as they are, or, under a
        client-level DP mechanism, what it releases (central DP: one private mean of the updates from the
        global adapter). The engine's and the Flower ServerApp's one place for this."""
        if self.privacy is None:
            return results, {}
        start = {k: v for k, v in self.strategy.configure_fit(0).adapter.items() if k in keys}
        return self.privacy.server_aggregate(rnd, results, start, keys)

    def run_round(self, rnd: int, progress: NullProgress) -> dict:
        t0 = time.perf_counter()
        sampled = self.sample(rnd)
        keys = self.strategy.wire_keys()
        results: dict[int, FitRes] = {}
        step_time, tokens, n_steps, rejected = 0.0, 0, 0, []
        train_loss: dict[str, float] = {}
        prox_term: dict[str, float] = {}
        client_bytes: dict[str, list[int]] = {}  # with lora.ranks: per client [bytes up, bytes down]
        if self.strategy.pooled:
            steps = sum(self.trainer.settings.num_steps(len(self.ws.train[c])) for c in sampled)
            ins = self.strategy.configure_fit(0)
            adapter, res = client_fit(self.ws.slot.activate(), self.trainer, self.pooled, ins,
                                      derive_seed(self.cfg.seed, rnd, 0), steps)
            step_time, tokens, n_steps = res.step_time_s, res.tokens, res.steps
            if not all_finite(adapter):  # as for a client's update: rejected, the previous adapter is kept
                log.warning("round %d: the pooled update has NaN/Inf values; update rejected", rnd)
                rejected.append("pooled")
                self.rejected.append({"round": rnd, "client": "pooled"})
            else:
                results[0] = FitRes(adapter, len(self.pooled), {"train_loss": res.loss})
                train_loss["pooled"] = res.loss
            progress.client_done()
        else:
            for cid in sampled:
                ins = self.strategy.configure_fit(cid)
                slot, trainer, codec = self._client(cid)
                if self.strategy.exchanges:
                    down, nbytes = self._transfer(ins.adapter, keys, codec)
                    self.bytes_down += nbytes
                    if self.ranks:
                        client_bytes.setdefault(str(cid), [0, 0])[1] += nbytes
                    ins.adapter = down
                adapter, res = client_fit(slot, trainer, self.ws.train[cid], ins,
                                          derive_seed(self.cfg.seed, rnd, cid))
                if self.dpsgd is not None:
                    self.dpsgd.steps[cid] += res.steps
                if self.privacy is not None:  # on the client, before the upload leaves it (local DP)
                    adapter = self.privacy.client_upload(rnd, cid, ins.adapter, adapter, keys)
                step_time += res.step_time_s
                tokens += res.tokens
                n_steps += res.steps
                if self.strategy.exchanges:
                    adapter, nbytes = self._transfer(adapter, keys, codec)
                    self.bytes_up += nbytes
                    if self.ranks:
                        client_bytes.setdefault(str(cid), [0, 0])[0] += nbytes
                if not all_finite(adapter):
                    log.warning("round %d: client %d sent NaN/Inf values; update rejected", rnd, cid)
                    rejected.append(cid)
                    self.rejected.append({"round": rnd, "client": cid})
                else:
                    metrics = {"train_loss": res.loss}
                    if ins.prox_mu > 0:
                        metrics["prox_term"] = res.prox_term
                        prox_term[str(cid)] = res.prox_term
                    results[cid] = FitRes(adapter, len(self.ws.train[cid]), metrics)
                    train_loss[str(cid)] = res.loss
                progress.client_done()
        if rejected and not results:  # every update diverged: nothing to aggregate, and the next round would too
            who = "the pooled update" if self.strategy.pooled else f"client(s) {', '.join(map(str, rejected))}"
            raise RunStopped(f"round {rnd}: every update had NaN/Inf values ({who}), the training diverged and the "
                             "run stopped; " + self.kept(
                                 f"continue with a smaller learning rate: mira run --resume {self.out} "
                                 "--set federation.lr=... --allow-changed federation.lr"))
        results, dp_info = self.private_results(rnd, results, keys)
        # a pooled update that was rejected leaves the strategy as it was (nothing to aggregate)
        info = self.strategy.aggregate_fit(rnd, results) if results or not self.strategy.pooled else {}
        info = {**info, **dp_info}
        round_time = time.perf_counter() - t0
        entry = {"round": rnd, "sampled": sampled, "rejected": rejected, "round_time_s": round_time,
                 "train_step_time_s": step_time, "train_tokens": tokens, "train_steps": n_steps,
                 "train_loss": train_loss, **({"prox_term": prox_term} if prox_term else {}),
                 **({"client_bytes": client_bytes} if client_bytes else {}), **info}
        graphs = getattr(self.strategy, "graphs", None)
        if graphs:
            atomic_save_npy(self.out / "graphs" / f"round_{rnd:04d}.npy", graphs[-1])
        return entry

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, rnd: int) -> list[dict]:
        ws, ev = self.ws, self.cfg.eval
        pad = ws.tokenizer.pad_token_id
        rows, global_cache = [], {}
        final = rnd == getattr(self, "final_round", rnd)
        want_global = ev.global_loss == "every" or (ev.global_loss == "final" and final)
        want_generation = ev.generation is True or (ev.generation == "final" and final)
        for c in ws.clients:
            adapter = self.strategy.adapter_for(c.id)
            self._client(c.id)[0].set(adapter)
            local, _ = self.test_loss(ws.test[c.id])
            if id(adapter) not in global_cache:
                global_cache[id(adapter)] = self.test_loss(ws.global_test)[0] if want_global else None
            row = {"round": rnd, "client": c.id, "task": c.task, "local_loss": local,
                   "global_loss": global_cache[id(adapter)], "n_train": len(ws.train[c.id]), "n_test": len(ws.test[c.id])}
            if ws.val:  # the client's own adapter on its own validation split (selection looks only at this)
                row["val_loss"] = eval_loss(ws.model, ws.val[c.id], pad, ev.batch_size)[0]
                row["n_val"] = len(ws.val[c.id])
            if want_generation:
                preds = generate(ws.model, ws.tokenizer, ws.test[c.id], ev.max_new_tokens, ev.max_examples)
                refs = [r.output for r in ws.test[c.id].records[: len(preds)]]
                row.update(generation_metrics(preds, refs))
            rows.append(row)
        ws.slot.activate()
        return rows

    def test_loss(self, ds: TokenizedDataset) -> tuple[float, int]:
        """Loss of the adapter in the slot on a *test* split (one place, so that a test can check
        that nothing selected on validation depends on it)."""
        return eval_loss(self.ws.model, ds, self.ws.tokenizer.pad_token_id, self.cfg.eval.batch_size)

    def graph_auc(self) -> float | None:
        """ROC AUC of the last graph's ``a_kl`` for same-task vs different-task client pairs (None
        without a graph, or when no two clients share a task or all share one)."""
        graphs = getattr(self.strategy, "graphs", None)
        if not graphs:
            return None
        from mira.federated.graph import task_auc

        return task_auc(graphs[-1], [c.task for c in self.ws.clients])

    # -- the run ------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: NullProgress | None = None, allow_changed: Sequence[str] = ()) -> dict:
        """Run (or, with ``resume``, continue: ``check_resume``) to the last round, then ``finish``. A full
        disk stops it with one line (``RunStopped``); the last checkpoint is intact."""
        try:
            return self._run(resume, progress or NullProgress(), allow_changed)
        except Exception as e:
            if not disk_full(e):
                raise
            name = next((x.filename for x in _chain(e) if getattr(x, "filename", None)), None) or self.out
            raise RunStopped(f"no space left on device (writing {name}); " + self.kept(
                f"free some space, then mira run --resume {self.out} continues it")) from None

    def kept(self, then: str) -> str:
        """What a stopped run leaves: its last checkpoint, and what to do next."""
        if self.saved_round > 0:
            return f"the checkpoint of round {self.saved_round} is intact: {then}"
        return "no round had finished, so there is nothing to resume"

    def _run(self, resume: bool, progress: NullProgress, allow_changed: Sequence[str]) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        clean_temp(self.out)  # temp files of atomic writes that a kill interrupted
        ck = self.out / CHECKPOINT
        self.fingerprint = self.make_fingerprint()
        if resume and ck.exists():
            state = load_checkpoint(ck)
            changed = self.check_resume(state, allow_changed)  # before load_state: another algorithm's would not fit
            self.load_state(state)
            self.saved_round = self.round
            if changed:
                self.checkpoint()  # the run is now the changed one, even if no round is left to run
        else:
            if resume and (self.out / "config.yaml").exists():
                log.info("no checkpoint in %s (killed before round 1 ended): starting from round 0", self.out)
            self.write_identity()
        rounds = self.final_round = self.strategy.num_rounds(self.cfg.federation.rounds)
        every = self.cfg.eval.every
        progress.start_rounds(self.cfg.algorithm.name, rounds, self.round)
        for rnd in range(self.round + 1, rounds + 1):
            t0 = time.perf_counter()
            progress.start_clients(1 if self.strategy.pooled else self.per_round)
            entry = self.run_round(rnd, progress)
            auc = self.graph_auc()
            if auc is not None:
                entry["graph_auc"] = auc
                shadows = getattr(self.strategy, "shadow_graphs", None)
                if shadows:  # mira's estimator_diagnostics: every estimator on the same updates
                    from mira.federated.graph import task_auc

                    entry["graph_auc_estimators"] = {n: task_auc(a, [c.task for c in self.ws.clients])
                                                     for n, a in shadows.items()}
            if rnd % every == 0 or rnd == rounds:  # noqa: SIM102
                te = time.perf_counter()
                self.rows += self.evaluate(rnd)
                entry["eval_time_s"] = time.perf_counter() - te
            self.rounds_log.append(entry)
            self.round = rnd
            self.wall += time.perf_counter() - t0
            self.checkpoint()
            progress.round_done()
        return self.finish()

    def _rank_summary(self, summary: dict, keys: list[str]) -> None:
        """With ``lora.ranks``: each client's rank, adapter size and serialised bytes up and down."""
        sent: dict[int, list[int]] = {c.id: [0, 0] for c in self.ws.clients}
        for e in self.rounds_log:
            for cid, (up, down) in e.get("client_bytes", {}).items():
                sent[int(cid)][0] += up
                sent[int(cid)][1] += down
        summary["lora_ranks"] = list(self.ranks)
        for row in summary["clients"]:
            cid = row["id"]
            row.update(rank=self.ranks[cid], adapter_bytes=self._client(cid)[2].raw_bytes(keys),
                       bytes_up=sent[cid][0], bytes_down=sent[cid][1])
        self.ws.slot.activate()

    def finish(self) -> dict:
        ws = self.ws
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        last = [r for r in self.rows if r["round"] == self.round]
        for c in ws.clients:
            self._client(c.id)[0].save(self.strategy.adapter_for(c.id), self.out / "adapters" / f"client_{c.id}")
        ws.slot.activate()
        graphs = getattr(self.strategy, "graphs", None)
        if graphs:
            atomic_save_npy(self.out / "graph.npy", graphs[-1])
        keys = self.strategy.wire_keys()
        summary = {
            "algorithm": self.cfg.algorithm.name,
            "rounds": self.round,
            "seed": self.cfg.seed,
            "clients": [{"id": r["client"], "task": r["task"], "n_train": r["n_train"], "n_test": r["n_test"],
                         "local_test_loss": r["local_loss"], "global_test_loss": r["global_loss"],
                         **{k: r[k] for k in ("n_val", "val_loss", "rouge_l", "exact_match") if k in r}} for r in last],
            "mean_local_test_loss": float(np.mean([r["local_loss"] for r in last])),
            "mean_global_test_loss": (float(np.mean([r["global_loss"] for r in last]))
                                      if last and all(r["global_loss"] is not None for r in last) else None),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "adapter_bytes": self.codec.raw_bytes(keys),
            "wire_dtype": self.cfg.federation.wire_dtype,
            "rejected_updates": self.rejected,
            "wall_time_s": self.wall,
            "train_step_time_s": float(sum(e["train_step_time_s"] for e in self.rounds_log)),
            "round_time_s": float(sum(e["round_time_s"] for e in self.rounds_log)),
            "train_tokens": int(sum(e["train_tokens"] for e in self.rounds_log)),
            "train_steps": int(sum(e["train_steps"] for e in self.rounds_log)),
            "data": data_summary(ws.data_report, self.cfg.data, ws.tokenizer),
        }
        if self.privacy is not None or self.dpsgd is not None:
            summary["privacy"] = {**({"client": self.privacy.report()} if self.privacy is not None else {}),
                                  **({"sample": self.dpsgd.report()} if self.dpsgd is not None else {})}
        if self.ranks:
            self._rank_summary(summary, keys)
        for key in ("val_loss", "rouge_l", "exact_match"):
            if last and key in last[0]:
                summary[f"mean_{key}"] = float(np.mean([r[key] for r in last]))
        aucs = [e["graph_auc"] for e in self.rounds_log if "graph_auc" in e]
        if aucs:
            summary["graph_auc_last"] = float(aucs[-1])
        est = [e["graph_auc_estimators"] for e in self.rounds_log if "graph_auc_estimators" in e]
        if est:
            summary["graph_auc_estimators_last"] = est[-1]
        scaled = [e["round"] for e in self.rounds_log if e.get("step_scaled")]
        if scaled:
            summary["step_scaled_rounds"] = scaled
        atomic_write_json(self.out / "rounds.json", self.rounds_log)
        if self.cfg.plots:
            from mira.report.plots import plot_graph_auc, plot_run

            plot_run(self.out, self.rows, self.cfg.algorithm.name)
            plot_graph_auc(self.out, self.rounds_log, self.cfg.algorithm.name)
        atomic_write_json(self.out / "summary.json", summary)  # last: a run is finished when this exists
        return summary
