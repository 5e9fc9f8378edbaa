"""Validation scores of members and merges, with one shared model in memory.

``Evaluator`` holds the base model once. For adapters it wraps the base with a LoRA slot
of the members' shape (``AdapterSlot``) and swaps states in by copying tensors; for full
models it loads each state dict into one model. A merge is computed in memory with
``mira.merge.merge_state_dicts`` (no files), so scoring a candidate merge costs one
pass over the validation set.

Losses are kept per sequence (summed NLL and response-token count), so a per-input
router can be scored from the same numbers; a task's loss is its total NLL over its total
response tokens (as ``mira.eval.metrics.eval_loss``). The **score** is the negative mean
of the per-task losses.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mira.data.prompts import IGNORE, TokenizedDataset, collate
from mira.errors import MiraError
from mira.glue.zoo import Member

State = Mapping[str, Tensor]


@dataclass
class SeqLosses:
    """Per-sequence summed NLL and number of response tokens."""

    nll: np.ndarray
    tokens: np.ndarray


def task_losses(nll: np.ndarray, tokens: np.ndarray, tasks: Sequence[str]) -> dict[str, float]:
    """Token-weighted mean loss of each task (in order of first appearance)."""
    out: dict[str, float] = {}
    arr = np.asarray(tasks)
    for t in dict.fromkeys(tasks):
        mask = arr == t
        out[t] = float(nll[mask].sum() / max(1, tokens[mask].sum()))
    return out


def score_of(losses: Mapping[str, float]) -> float:
    """Negative mean of the per-task losses."""
    return -float(np.mean(list(losses.values())))


@torch.no_grad()
def sequence_losses(model, ds: TokenizedDataset, pad_id: int, batch_size: int = 16) -> SeqLosses:
    """Summed response-token NLL and token count of every sequence of ``ds`` (in ``ds`` order)."""
    device = next(model.parameters()).device
    model.eval()
    n = len(ds)
    nll, tok = np.zeros(n), np.zeros(n)
    order = sorted(range(n), key=lambda i: len(ds.input_ids[i]))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = collate(ds, idx, pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        per = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
        nll[idx] = per.sum(1).cpu().numpy()
        tok[idx] = (labels != IGNORE).sum(1).cpu().numpy()
    return SeqLosses(nll, tok)


class Evaluator:
    """Scores adapter or model states on a tokenised validation set with one model in memory."""

    def __init__(self, members: Sequence[Member], base_path: Path | None, batch_size: int = 16,
                 merge_method: str | None = None):
        from mira.models.loader import load_base

        self.kind = members[0].kind
        self.batch_size = batch_size
        self.base_state: dict[str, Tensor] | None = None
        if self.kind == "adapter":
            from peft import LoraConfig, get_peft_model

            from mira.models.adapters import AdapterSlot

            assert base_path is not None
            model, self.tokenizer = load_base(str(base_path), device="cpu", where="base_model")
            # members' states are in the zoo's common form (mira.glue.zoo.normalise_adapters): scaling 1,
            # the zoo's largest rank, the union of the modules -- so one slot scores every member exactly
            state0 = members[0].state
            modules = sorted(k.split(".lora_A.")[0].removeprefix("base_model.model.") for k in state0 if ".lora_A." in k)
            rank = int(next(v for k, v in state0.items() if ".lora_A." in k).shape[0])
            lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=modules, bias="none",
                              task_type="CAUSAL_LM")
            try:
                self.slot = AdapterSlot(get_peft_model(model, lora))
            except ValueError as e:  # PEFT: a target module that the base model does not have
                raise MiraError(f"the adapters do not fit base model {base_path}: {str(e).splitlines()[0][:200]}",
                                where="base_model") from None
            shapes = {k: tuple(v.shape) for k, v in self.slot.get().items()}
            if shapes != {k: tuple(v.shape) for k, v in state0.items()}:
                raise MiraError(f"adapter {members[0].path} does not fit base model {base_path}", where="base_model")
            self.model = self.slot.model
            self.lora_config = lora
            self.merge_method = merge_method or "linear"
        else:
            self.model, self.tokenizer = load_base(str(members[0].path), device="cpu", where="members[0].path")
            if base_path is not None:
                from mira.glue.zoo import _read_tensors

                self.base_state = _read_tensors(base_path, "base_model")
            self.merge_method = merge_method or ("task_arithmetic" if self.base_state is not None else "linear")
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.evaluations = 0

    # -- states ---------------------------------------------------------------------
    @torch.no_grad()
    def load(self, state: State) -> None:
        """Put ``state`` into the model."""
        if self.kind == "adapter":
            self.slot.set(dict(state))
        else:
            _missing, unexpected = self.model.load_state_dict(dict(state), strict=False)
            if unexpected:
                raise MiraError(f"model weights do not fit: unexpected {unexpected[:3]}")

    def merge(self, states: Sequence[State], weights: Sequence[float]) -> dict[str, Tensor]:
        """In-memory merge of ``states`` with non-negative ``weights`` (zero-weight states are left out)."""
        from mira.merge import merge_state_dicts

        pairs = [(s, float(w)) for s, w in zip(states, weights) if w > 0]
        if not pairs:
            pairs = [(s, 1.0) for s in states]
        if len(pairs) == 1:
            return {k: v.clone() for k, v in pairs[0][0].items()}
        total = sum(w for _, w in pairs)
        ws = [w / total for _, w in pairs]
        return merge_state_dicts(self.merge_method, [s for s, _ in pairs], ws, base=self.base_state)

    # -- losses ---------------------------------------------------------------------
    def losses(self, state: State, ds: TokenizedDataset) -> SeqLosses:
        """Per-sequence losses of ``state`` on ``ds``."""
        self.load(state)
        self.evaluations += 1
        return sequence_losses(self.model, ds, self.pad_id, self.batch_size)

    def task_losses(self, state: State, ds: TokenizedDataset) -> dict[str, float]:
        sl = self.losses(state, ds)
        return task_losses(sl.nll, sl.tokens, [r.task for r in ds.records])

    def score(self, state: State, ds: TokenizedDataset) -> float:
        """Negative mean validation loss over the tasks of ``ds``."""
        return score_of(self.task_losses(state, ds))

    @torch.no_grad()
    def prompt_features(self, ds: TokenizedDataset) -> Tensor:
        """Mean last-layer hidden state of the base model over each example's prompt tokens."""
        ctx = self.model.disable_adapter() if self.kind == "adapter" else _nullcontext()
        feats = []
        with ctx:
            for i in range(len(ds)):
                ids = torch.tensor([ds.input_ids[i][: ds.prompt_lens[i]]])
                out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
                feats.append(out.hidden_states[-1][0].float().mean(0))
        return torch.stack(feats)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
