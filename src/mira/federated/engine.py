"""The in-process federated engine.

``Workspace`` loads what every algorithm shares: the records, the client partition,
the one frozen base model with its LoRA slot, and the tokenised splits.
``Engine`` runs one strategy on a workspace, round by round:

1. sample ``max(1, round(fraction*K))`` clients uniformly without replacement;
2. for each, serialise what the strategy sends (``WireCodec``), train locally
   (``client_fit``), serialise the upload; updates with NaN/Inf are rejected and logged;
3. ``strategy.aggregate_fit``;
4. evaluate every ``eval.every`` rounds and at the end: each client's adapter on its own
   test split (``local_loss``), on the union of all test splits (``global_loss``) and, with
   ``partition.val_fraction > 0``, on its own validation split (``val_loss``, carved from its
   training data: what model selection such as ``mira tune`` may look at; test losses never);
5. checkpoint the server state atomically.

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
from typing import Callable

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
from mira.federated.wire import WireCodec
from mira.io import atomic_save_npy, atomic_torch_save, atomic_write_json, atomic_write_text, clean_temp
from mira.models.adapters import AdapterSlot, all_finite, lora_settings_to_peft
from mira.models.loader import load_base
from mira.report.progress import NullProgress
from mira.train.trainer import LocalTrainer, TrainSettings

log = logging.getLogger("mira")
CHECKPOINT = "checkpoint.pt"


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
                           keys=list(keys or []), rounds=cfg.federation.rounds)


class Engine:
    def __init__(self, ws: Workspace, cfg: RunConfig, out_dir: str | Path, quiet: bool = False):
        self.ws, self.cfg, self.out = ws, cfg, Path(out_dir)
        self.quiet = quiet
        self.k = len(ws.clients)
        cls = get_strategy(cfg.algorithm.name)
        self.params = cls.parse_params(cfg.algorithm.params())
        self.trainer = LocalTrainer(ws.slot, ws.tokenizer.pad_token_id, train_settings(cfg))
        ctx = strategy_context(cfg, [len(d) for d in ws.train], ws.slot.keys())
        self.strategy: Strategy = cls(self.params, ctx, ws.slot.initial_state)
        self.codec = WireCodec(ws.slot.initial_state, cfg.federation.wire_dtype)
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

    # -- setup / resume --------------------------------------------------------------
    def resolved_config(self) -> str:
        raw = self.cfg.model_dump(mode="json")
        raw["algorithm"] = {"name": self.cfg.algorithm.name, **self.params.model_dump(mode="json", by_alias=True)}
        import yaml

        return yaml.safe_dump(raw, sort_keys=False)

    def state(self) -> dict:
        return {"round": self.round, "strategy": self.strategy.state_dict(), "rows": self.rows,
                "rounds_log": self.rounds_log, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "wall": self.wall, "rejected": self.rejected,
                "rng": {"scheme": "numpy SeedSequence([seed, round, client])", "seed": self.cfg.seed}}

    def load_state(self, s: dict) -> None:
        try:
            self.round = s["round"]
            self.strategy.load_state_dict(s["strategy"])
            self.rows, self.rounds_log = s["rows"], s["rounds_log"]
            self.bytes_up, self.bytes_down, self.wall = s["bytes_up"], s["bytes_down"], s["wall"]
            self.rejected = s["rejected"]
        except (KeyError, TypeError, AttributeError) as e:
            raise MiraError(f"{self.out / CHECKPOINT} does not hold a {self.cfg.algorithm.name} run's state "
                            f"({type(e).__name__}: {e})", where="--resume") from None

    def checkpoint(self) -> None:
        atomic_torch_save(self.out / CHECKPOINT, to_checkpoint(self.state()))
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    # -- one round --------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, 1_000_003))
        sampled = sorted(rng.choice(self.k, size=self.per_round, replace=False).tolist())
        return sorted(self.strategy.select_clients(rnd, sampled))  # e.g. fedit_ft's last round: every client

    def _transfer(self, state, keys) -> tuple[dict, int]:
        buf = self.codec.encode(state, keys)
        return self.codec.decode(buf, keys), len(buf)

    def run_round(self, rnd: int, progress: NullProgress) -> dict:
        t0 = time.perf_counter()
        sampled = self.sample(rnd)
        keys = self.strategy.wire_keys()
        results: dict[int, FitRes] = {}
        step_time, tokens, n_steps, rejected = 0.0, 0, 0, []
        train_loss: dict[str, float] = {}
        prox_term: dict[str, float] = {}
        if self.strategy.pooled:
            steps = sum(self.trainer.settings.num_steps(len(self.ws.train[c])) for c in sampled)
            ins = self.strategy.configure_fit(0)
            adapter, res = client_fit(self.ws.slot, self.trainer, self.pooled, ins, derive_seed(self.cfg.seed, rnd, 0), steps)
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
                if self.strategy.exchanges:
                    down, nbytes = self._transfer(ins.adapter, keys)
                    self.bytes_down += nbytes
                    ins.adapter = down
                adapter, res = client_fit(self.ws.slot, self.trainer, self.ws.train[cid], ins,
                                          derive_seed(self.cfg.seed, rnd, cid))
                step_time += res.step_time_s
                tokens += res.tokens
                n_steps += res.steps
                if self.strategy.exchanges:
                    adapter, nbytes = self._transfer(adapter, keys)
                    self.bytes_up += nbytes
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
        # a pooled update that was rejected leaves the strategy as it was (nothing to aggregate)
        info = self.strategy.aggregate_fit(rnd, results) if results or not self.strategy.pooled else {}
        round_time = time.perf_counter() - t0
        entry = {"round": rnd, "sampled": sampled, "rejected": rejected, "round_time_s": round_time,
                 "train_step_time_s": step_time, "train_tokens": tokens, "train_steps": n_steps,
                 "train_loss": train_loss, **({"prox_term": prox_term} if prox_term else {}), **info}
        graphs = getattr(self.strategy, "graphs", None)
        if graphs:
            atomic_save_npy(self.out / "graphs" / f"round_{rnd:04d}.npy", graphs[-1])
        return entry

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, rnd: int) -> list[dict]:
        ws, ev = self.ws, self.cfg.eval
        pad = ws.tokenizer.pad_token_id
        rows, global_cache = [], {}
        for c in ws.clients:
            adapter = self.strategy.adapter_for(c.id)
            ws.slot.set(adapter)
            local, _ = self.test_loss(ws.test[c.id])
            if id(adapter) not in global_cache:
                global_cache[id(adapter)] = self.test_loss(ws.global_test)[0]
            row = {"round": rnd, "client": c.id, "task": c.task, "local_loss": local,
                   "global_loss": global_cache[id(adapter)], "n_train": len(ws.train[c.id]), "n_test": len(ws.test[c.id])}
            if ws.val:  # the client's own adapter on its own validation split (selection looks only at this)
                row["val_loss"] = eval_loss(ws.model, ws.val[c.id], pad, ev.batch_size)[0]
                row["n_val"] = len(ws.val[c.id])
            if ev.generation:
                preds = generate(ws.model, ws.tokenizer, ws.test[c.id], ev.max_new_tokens, ev.max_examples)
                refs = [r.output for r in ws.test[c.id].records[: len(preds)]]
                row.update(generation_metrics(preds, refs))
            rows.append(row)
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
    def run(self, resume: bool = False, progress: NullProgress | None = None) -> dict:
        progress = progress or NullProgress()
        self.out.mkdir(parents=True, exist_ok=True)
        clean_temp(self.out)  # temp files of atomic writes that a kill interrupted
        ck = self.out / CHECKPOINT
        if resume and ck.exists():
            self.load_state(load_checkpoint(ck))
        elif resume and (self.out / "config.yaml").exists():
            log.info("no checkpoint in %s (killed before round 1 ended): starting from round 0", self.out)
        else:
            atomic_write_text(self.out / "config.yaml", self.resolved_config())
        rounds = self.strategy.num_rounds(self.cfg.federation.rounds)
        every = self.cfg.eval.every
        progress.start_rounds(self.cfg.algorithm.name, rounds, self.round)
        for rnd in range(self.round + 1, rounds + 1):
            t0 = time.perf_counter()
            progress.start_clients(1 if self.strategy.pooled else self.per_round)
            entry = self.run_round(rnd, progress)
            auc = self.graph_auc()
            if auc is not None:
                entry["graph_auc"] = auc
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

    def finish(self) -> dict:
        ws = self.ws
        last = [r for r in self.rows if r["round"] == self.round]
        for c in ws.clients:
            ws.slot.save(self.strategy.adapter_for(c.id), self.out / "adapters" / f"client_{c.id}")
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
            "mean_global_test_loss": float(np.mean([r["global_loss"] for r in last])),
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
        for key in ("val_loss", "rouge_l", "exact_match"):
            if last and key in last[0]:
                summary[f"mean_{key}"] = float(np.mean([r[key] for r in last]))
        aucs = [e["graph_auc"] for e in self.rounds_log if "graph_auc" in e]
        if aucs:
            summary["graph_auc_last"] = float(aucs[-1])
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
