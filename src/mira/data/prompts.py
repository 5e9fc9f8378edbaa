"""Alpaca-style prompts, tokenisation with the loss on response tokens only, and batching.

Prompt tokens get label -100 (ignored by the loss); the response is followed by EOS.
When an example is longer than ``max_length``, the prompt's body is cut (its
``### Response:`` marker is kept) so that at least half of ``max_length`` or the whole
response remains for the loss; the response is cut last.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mira.data.records import Record

IGNORE = -100
HEADER = "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"
MARKER = "### Response:\n"


def format_prompt(r: Record) -> str:
    """The Alpaca template, without the response marker (see ``MARKER``)."""
    if r.input:
        return (HEADER.format(ctx=", paired with an input that provides further context")
                + f"### Instruction:\n{r.instruction}\n\n### Input:\n{r.input}\n\n")
    return HEADER.format(ctx="") + f"### Instruction:\n{r.instruction}\n\n"


@dataclass
class TokenizedDataset:
    """Tokenised examples of one client (or one split), ready for ``collate``."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    records: list[Record] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def num_target_tokens(self, idx=None) -> int:
        idx = range(len(self)) if idx is None else idx
        return sum(sum(1 for t in self.labels[i] if t != IGNORE) for i in idx)

    def subset(self, idx) -> "TokenizedDataset":
        return TokenizedDataset([self.input_ids[i] for i in idx], [self.labels[i] for i in idx],
                                [self.records[i] for i in idx] if self.records else [],
                                [self.prompt_lens[i] for i in idx] if self.prompt_lens else [])

    @staticmethod
    def concat(parts: list["TokenizedDataset"]) -> "TokenizedDataset":
        out = TokenizedDataset([], [], [], [])
        for p in parts:
            out.input_ids += p.input_ids
            out.labels += p.labels
            out.records += p.records
            out.prompt_lens += p.prompt_lens
        return out


def tokenize_records(records: list[Record], tokenizer, max_length: int) -> TokenizedDataset:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker = tokenizer(MARKER, add_special_tokens=False)["input_ids"]
    bodies = tokenizer([format_prompt(r) for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
    ds = TokenizedDataset([], [], list(records), [])
    for body, resp in zip(bodies, responses):
        resp = resp + eos
        room_for_prompt = max_length - min(len(resp), max_length // 2)
        body = body[: max(0, room_for_prompt - len(bos) - len(marker))]
        prompt = bos + body + marker
        ids = (prompt + resp)[:max_length]
        labels = ([IGNORE] * len(prompt) + resp)[:max_length]
        ds.input_ids.append(ids)
        ds.labels.append(labels)
        ds.prompt_lens.append(len(prompt))
    return ds


def collate(ds: TokenizedDataset, idx, pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Pad the examples ``idx`` to the longest among them (right padding)."""
    length = max(len(ds.input_ids[i]) for i in idx)
    n = len(idx)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    attn = torch.zeros((n, length), dtype=torch.long)
    for row, i in enumerate(idx):
        ids = ds.input_ids[i]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ds.labels[i])
        attn[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
