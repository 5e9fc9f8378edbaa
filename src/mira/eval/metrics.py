"""Test loss (mean NLL per response token) and greedy-generation metrics."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from mira.data.prompts import IGNORE, TokenizedDataset, collate


@torch.no_grad()
def eval_loss(model, ds: TokenizedDataset, pad_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Return ``(mean loss per response token, number of response tokens)``."""
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate(ds, order[start:start + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                              ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE).sum())
    return (total / count if count else float("nan")), count


@torch.no_grad()
def generate(model, tokenizer, ds: TokenizedDataset, max_new_tokens: int = 32, limit: int | None = None) -> list[str]:
    """Greedy continuations of each example's prompt (up to ``limit`` examples)."""
    device = next(model.parameters()).device
    outs = []
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(n):
        prompt = torch.tensor([ds.input_ids[i][: ds.prompt_lens[i]]], device=device)
        gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outs.append(tokenizer.decode(gen[0, prompt.size(1):], skip_special_tokens=True).strip())
    return outs


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-L F1 (as the MIRA paper reports) and exact match, averaged."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    em = [float(pred.strip().lower() == ref.strip().lower()) for pred, ref in zip(predictions, references)]
    n = max(1, len(rouge))
    return {"rouge_l": sum(rouge) / n, "exact_match": sum(em) / n}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K solution: the one after ``####`` when there is one, else the
    last number in the text; commas and a trailing ``.0`` dropped. None when there is no number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    number = (found[0] if "####" in text else found[-1]).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def gsm8k_exact_match(predictions: list[str], references: list[str]) -> list[float]:
    """Per example: 1.0 when the prediction's final number equals the reference's, else 0.0."""
    return [float(gsm8k_answer(p) is not None and gsm8k_answer(p) == gsm8k_answer(r))
            for p, r in zip(predictions, references)]
