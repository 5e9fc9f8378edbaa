"""The value function of SHED: v(S) = score of a small model LoRA-tuned on the proxies in S.

One base model is loaded once (``ProxyModel``); every ``v(S)`` resets its LoRA adapter
to the same starting state, trains a fixed ``steps`` steps of SGD (``optimizer: adamw`` for
AdamW) on batches drawn from the proxy records of ``S`` and scores the adapter on a fixed
validation set. ``v(empty)`` is
the score of the starting state.

**A budget that does not reward size.** Every coalition gets the same number of steps,
whatever its size, so a marginal ``v(S + G) - v(S)`` measures what the records of ``G`` teach,
not how many steps they add (with ``ceil(epochs*|S|/batch)`` steps, as before, it measured
mostly the latter).

**Paired seeds across coalitions (common random numbers).** Batches are drawn by fixed
random priorities: for training seed ``seed``, step ``t`` and player ``p`` a key ``u[t, p]``
is drawn once; the batch of step ``t`` is the ``batch_size`` players of ``S`` with the
smallest keys (all of ``S`` when it is smaller). Adding a group to ``S`` then changes only
the batches its members enter; everything else about the two runs is the same, so their
difference carries far less training noise than two independently seeded runs would. Plain
SGD keeps it so: an update is proportional to the batch's gradient, so one record more moves
the adapter a little, where AdamW's normalised first steps (about ``lr`` per weight whatever the
gradient) turn a small change of batch into a large one (measured on Dolly with stories260K:
the difference between adding a clean and a bad record was ~0.3 standard deviations of its
noise with AdamW at 3e-3, ~1.3 with SGD at 0.1). v is
a deterministic function of ``S`` (safe to cache); ``evaluate(S, seed)`` re-trains with
other keys, to measure the noise of one v(S).

Scores (``SCORES``, higher is better): ``neg_loss`` (minus the mean NLL per response
token) and ``token_accuracy`` (teacher-forced next-token accuracy on response tokens).

Background (``background > 0``): every v(S), v(empty) included, also trains on a fixed seeded
sample of that many *non-proxy* candidate records, drawn into the batches like members of S.
A proxy's marginal is then what it adds to a training set that is never tiny, instead of the
chaotic first steps on a handful of records (where whichever records come first dominate).

Players of several records (``proxy_size > 1``): a player (a cluster) may bring several records, its
proxy and the next nearest members. The batches are then drawn over records (*units*) by the same
fixed priorities, and a coalition trains on every record of its players, so a cluster's value averages
over its members instead of resting on one record. With one record per player, unit ids are player ids
and nothing changes.

Loss weighting (``loss_weighting``): ``token`` (default) trains on the model's own loss, the mean over
every response token of a batch, so a record weighs as many tokens as it has (a two-token non-answer
barely moves the adapter); ``record`` averages each record's own mean token loss, every record of a
batch weighing the same (``record_mean_loss``).

Warm start (``warm_start_steps > 0``): the starting state is not the fresh LoRA
initialisation but an adapter first trained that many steps on the *non-proxy*
candidate records (the same for every S; AdamW, at ``lr`` only when v(S) uses AdamW too, else at
3e-3). The short runs for v(S) then measure what a
proxy adds beyond learning the prompt format; this is the ``initial_checkpoint`` of the
paper's reference scripts. The game stays well defined: v(empty) is the warm adapter's score.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mira.data.prompts import IGNORE, TokenizedDataset, collate, tokenize_records
from mira.data.records import Record
from mira.errors import MiraError
from mira.eval.metrics import eval_loss
from mira.models.adapters import AdapterSlot, AdapterState, lora_settings_to_peft
from mira.shed.settings import ShedSettings
from mira.train.trainer import LocalTrainer, TrainSettings

Score = Callable[[torch.nn.Module, TokenizedDataset, int, int], float]
SCORES: dict[str, Score] = {}


def register_score(name: str):
    def deco(fn: Score) -> Score:
        SCORES[name] = fn
        return fn

    return deco


@register_score("neg_loss")
def neg_loss(model, ds: TokenizedDataset, pad_id: int, batch_size: int) -> float:
    """Minus the mean NLL per response token."""
    return -eval_loss(model, ds, pad_id, batch_size)[0]


@register_score("token_accuracy")
@torch.no_grad()
def token_accuracy(model, ds: TokenizedDataset, pad_id: int, batch_size: int) -> float:
    """Fraction of response tokens predicted exactly by greedy next-token prediction (teacher forcing)."""
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    correct = count = 0
    for start in range(0, len(order), batch_size):
        batch = collate(ds, order[start:start + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        correct += int(((logits[:, :-1].argmax(-1) == labels) & mask).sum())
        count += int(mask.sum())
    return correct / count if count else float("nan")


def record_mean_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The mean over the batch's records of each record's mean next-token NLL on its response tokens.

    Every record weighs the same, however long its response (the model's own loss weighs each record by
    its token count, so a two-token non-answer barely moves the adapter). Records without a response token
    are left out."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                            labels.clamp(min=0).reshape(-1), reduction="none").view(labels.shape)
    counts = mask.sum(dim=1)
    per_record = (nll * mask).sum(dim=1) / counts.clamp(min=1)
    keep = counts > 0
    return per_record[keep].mean() if bool(keep.any()) else (logits.sum() * 0.0)


@dataclass
class ProxyModel:
    """The small model behind v(S): frozen base, tokenizer and one LoRA slot, loaded once."""

    model: torch.nn.Module
    tokenizer: object
    slot: AdapterSlot
    path: str

    @classmethod
    def load(cls, s: ShedSettings) -> "ProxyModel":
        from mira.models.loader import load_base

        base, tokenizer = load_base(s.model, "float32", s.device, where="model")
        lora = lora_settings_to_peft(base, s.lora_r, s.lora_alpha, s.lora_dropout, s.target_modules)
        slot = AdapterSlot.attach(base, lora, seed=s.seed)
        return cls(slot.model, tokenizer, slot, s.model)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


class LoraValue:
    """``v(S)`` for coalitions ``S`` of proxy ids ``0..len(proxy_records)-1`` (see the module docstring)."""

    def __init__(self, proxy: ProxyModel, proxy_records: Sequence[Record | Sequence[Record]],
                 val_records: Sequence[Record], s: ShedSettings, warm_records: Sequence[Record] = (),
                 log: Callable[[str], None] = lambda m: None, background_records: Sequence[Record] = ()):
        self.proxy = proxy
        self.s = s
        self.score_fn = SCORES[s.metric]
        # each player is one record (its cluster's proxy) or several (its ``proxy_size`` representatives);
        # the training *units* are the records: player p's units are contiguous, background units come last,
        # so with one record per player unit ids are player ids (the batches are the same either way)
        groups = [[r] if isinstance(r, Record) else list(r) for r in proxy_records]
        if any(not g for g in groups):
            raise MiraError("every player of v(S) needs at least one record", where="proxy_records")
        self.n_players = len(groups)
        ends = np.cumsum([len(g) for g in groups])
        self.n_units = int(ends[-1]) if len(ends) else 0
        self.units_of = [np.arange(end - len(g), end) for g, end in zip(groups, ends)]
        # background records are units n_units.. that every coalition contains
        self.background = frozenset(range(self.n_units, self.n_units + len(background_records)))
        # units keep their ids: a long input is cut from its middle, a long response from its end; a
        # record whose instruction alone does not fit trains nothing (a player of such records has marginal zero)
        self.train_ds = tokenize_records([r for g in groups for r in g] + list(background_records), proxy.tokenizer,
                                         s.max_length, s.template, "truncate_input")
        self.row_of = {src: i for i, src in enumerate(self.train_ds.source_index)}
        self.val_ds = tokenize_records(list(val_records), proxy.tokenizer, s.max_length, s.template, "truncate_input")
        if not len(self.val_ds):
            raise MiraError(f"no validation record fits max_length {s.max_length}", where="max_length")
        self.start: AdapterState = proxy.slot.initial_state
        self.train_seconds = 0.0
        self._keys: dict[int, np.ndarray] = {}
        if s.warm_start_steps and warm_records:
            warm_ds = tokenize_records(list(warm_records), proxy.tokenizer, s.max_length, s.template, "truncate_input")
            warm = LocalTrainer(proxy.slot, proxy.pad_id, TrainSettings(lr=s.warm_lr, batch_size=s.batch_size,
                                                                        weight_decay=0.0, grad_clip=1.0))
            proxy.slot.set(proxy.slot.initial_state)
            warm.train(warm_ds, seed=s.seed + 1, steps=s.warm_start_steps)
            self.start = proxy.slot.get()
            log(f"warm start: {s.warm_start_steps} steps on {len(warm_ds)} non-proxy records")
        elif s.warm_start_steps:
            log("warm start skipped: every candidate record is a proxy")

    def score(self) -> float:
        return float(self.score_fn(self.proxy.model, self.val_ds, self.proxy.pad_id, self.s.eval_batch_size))

    def keys(self, seed: int) -> np.ndarray:
        """The batch priorities ``(steps, n_units)`` of training seed ``seed`` (drawn once)."""
        if seed not in self._keys:
            n = self.n_units + len(self.background)
            self._keys[seed] = np.random.default_rng([int(seed), 11]).random((self.s.steps, max(1, n)))
        return self._keys[seed]

    def units(self, coalition: frozenset) -> list[int]:
        """The training units (records) of the players in ``coalition`` and the background that fit, sorted."""
        out = {int(u) for p in coalition for u in self.units_of[p]} | self.background
        return sorted(u for u in out if u in self.row_of)

    def batches(self, coalition: frozenset, seed: int) -> list[list[int]]:
        """Dataset rows of each step's batch: the ``batch_size`` units of ``coalition`` (and the background)
        with the smallest keys."""
        units = np.array(self.units(coalition), dtype=np.int64)
        if not len(units):
            return []
        keys = self.keys(seed)[:, units]
        b = min(self.s.batch_size, len(units))
        if b < len(units):
            chosen = np.argpartition(keys, b - 1, axis=1)[:, :b]
        else:
            chosen = np.tile(np.arange(b), (len(keys), 1))
        return [sorted(self.row_of[int(u)] for u in units[row]) for row in chosen]

    def train(self, batches: list[list[int]], seed: int) -> None:
        """SGD (or AdamW) on the slot's LoRA tensors over ``batches`` (grad clip 1, no weight decay)."""
        slot, model = self.proxy.slot, self.proxy.model
        params = slot.trainable(slot.keys())
        for p in params:
            p.requires_grad_(True)
        lr = self.s.value_lr
        if self.s.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        device = next(model.parameters()).device
        model.train()
        torch.manual_seed(seed)  # dropout masks
        t0 = time.perf_counter()
        for rows in batches:
            batch = collate(self.train_ds, rows, self.proxy.pad_id, device)
            if self.s.loss_weighting == "record":
                loss = record_mean_loss(model, batch)
            else:
                loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        self.train_seconds += time.perf_counter() - t0
        model.eval()

    def evaluate(self, coalition: frozenset, seed: int) -> float:
        """v(coalition) trained with the batch priorities (and dropout) of ``seed``."""
        self.proxy.slot.set(self.start)
        batches = self.batches(coalition, seed)
        if batches:
            self.train(batches, seed)
        return self.score()

    def __call__(self, coalition: frozenset) -> float:
        return self.evaluate(coalition, self.s.seed)

    def restore(self, state: Optional[AdapterState] = None) -> None:
        """Put the fresh LoRA initialisation (or ``state``) back into the slot."""
        self.proxy.slot.set(state if state is not None else self.proxy.slot.initial_state)
