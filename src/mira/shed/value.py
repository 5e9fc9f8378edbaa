"""The value function of SHED: v(S) = score of a small model LoRA-tuned on the proxies in S.

One base model is loaded once (``ProxyModel``); every ``v(S)`` resets its LoRA adapter
to the same starting state, trains ``steps`` AdamW steps (or ``epochs`` passes, i.e.
``ceil(epochs*|S|/batch_size)`` steps, as in the paper) on the proxy records of ``S``
(fixed seed, so ``v`` is a deterministic function of ``S`` and safe to cache) and scores
the adapter on a fixed validation set. ``v(empty)`` is the score of the starting state.

Scores (``SCORES``, higher is better): ``neg_loss`` (minus the mean NLL per response
token) and ``token_accuracy`` (teacher-forced next-token accuracy on response tokens).

Warm start (``warm_start_steps > 0``): the starting state is not the fresh LoRA
initialisation but an adapter first trained that many steps on the *non-proxy*
candidate records (the same for every S). The short runs for v(S) then measure what a
proxy adds beyond learning the prompt format, and fewer ``steps`` suffice; this is the
``initial_checkpoint`` of the paper's reference scripts. The game stays well defined:
v(empty) is the warm adapter's score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

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
    """``v(S)`` for coalitions ``S`` of proxy ids ``0..len(proxy_records)-1``."""

    def __init__(self, proxy: ProxyModel, proxy_records: Sequence[Record], val_records: Sequence[Record],
                 s: ShedSettings, warm_records: Sequence[Record] = (), log: Callable[[str], None] = lambda m: None):
        self.proxy = proxy
        self.s = s
        self.score_fn = SCORES[s.metric]
        # proxies keep their ids: a long input is cut from its middle, a long response from its end; a
        # proxy whose instruction alone does not fit trains nothing (its marginal is measured as zero)
        self.train_ds = tokenize_records(list(proxy_records), proxy.tokenizer, s.max_length, s.template, "truncate_input")
        self.val_ds = tokenize_records(list(val_records), proxy.tokenizer, s.max_length, s.template, "truncate_input")
        if not len(self.val_ds):
            raise MiraError(f"no validation record fits max_length {s.max_length}", where="max_length")
        self.trainer = LocalTrainer(proxy.slot, proxy.pad_id, TrainSettings(
            lr=s.lr, batch_size=s.batch_size, weight_decay=0.0, grad_clip=1.0, steps=s.steps, epochs=s.epochs))
        self.start: AdapterState = proxy.slot.initial_state
        self.train_seconds = 0.0
        if s.warm_start_steps and warm_records:
            warm_ds = tokenize_records(list(warm_records), proxy.tokenizer, s.max_length, s.template, "truncate_input")
            proxy.slot.set(proxy.slot.initial_state)
            self.trainer.train(warm_ds, seed=s.seed + 1, steps=s.warm_start_steps)
            self.start = proxy.slot.get()
            log(f"warm start: {s.warm_start_steps} steps on {len(warm_ds)} non-proxy records")
        elif s.warm_start_steps:
            log("warm start skipped: every candidate record is a proxy")

    def score(self) -> float:
        return float(self.score_fn(self.proxy.model, self.val_ds, self.proxy.pad_id, self.s.eval_batch_size))

    def __call__(self, coalition: frozenset) -> float:
        self.proxy.slot.set(self.start)
        idx = self.train_ds.positions(sorted(coalition))
        if idx:
            res = self.trainer.train(self.train_ds.subset(idx), seed=self.s.seed)
            self.train_seconds += res.step_time_s
        return self.score()

    def restore(self, state: Optional[AdapterState] = None) -> None:
        """Put the fresh LoRA initialisation (or ``state``) back into the slot."""
        self.proxy.slot.set(state if state is not None else self.proxy.slot.initial_state)
