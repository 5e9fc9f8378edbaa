"""Prompt templates, the length policy, tokenisation with the loss on response tokens only, batching.

Read top to bottom:

1. **Templates** (``data.template``), classes registered by name in ``TEMPLATES``:
   ``alpaca``, ``compact`` (``Instruction: …\\nInput: …\\nResponse:``, for tiny models),
   ``chat`` (the tokenizer's own chat template: user turn = instruction + input, assistant
   turn = response) and any user string with ``{instruction}`` / ``{input}`` placeholders.
   ``auto`` (the default) is ``chat`` when the tokenizer defines a chat template, else ``alpaca``.
2. **The boundary.** Each example is tokenised twice, the prompt alone and prompt + response
   as one text; the prompt's ids must be a prefix of the full ids, so the response tokens are
   exactly those the model sees after the prompt at inference. A tokenizer that merges across
   the boundary is an error (trailing spaces of a prompt move into the response first, the
   usual ``"Answer:" + " Paris"`` split, so ``"Answer: "`` templates work).
3. **The length policy** (``data.overflow``), never silent and never cutting the instruction:
   ``drop`` leaves out an example whose prompt + response exceeds ``max_length``;
   ``truncate_input`` cuts the input from its middle (head and tail kept, ``[...]`` marks the
   cut) when the prompt exceeds ``max_length - min_response_tokens``, then cuts the response
   from its end (no EOS after a cut response). Whether and where a prompt is cut depends
   only on the prompt, never on the response, so the prompt's length reveals nothing about
   the answer. ``LengthStats`` counts what happened; ``check_client_stats`` refuses a client
   that would lose more than half of its examples.

Prompt tokens get label -100 (ignored by the loss); a whole response is followed by EOS.
"""
from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from mira.data.records import Record
from mira.errors import MiraError

log = logging.getLogger("mira")
IGNORE = -100
CUT_MARK = " [...] "
OVERFLOW_POLICIES = ("drop", "truncate_input")

# -- 1. templates ------------------------------------------------------------------------------

HEADER = "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"
MARKER = "### Response:\n"


def format_prompt(r: Record) -> str:
    """The Alpaca template, without the response marker (see ``MARKER``)."""
    if r.input:
        return (HEADER.format(ctx=", paired with an input that provides further context")
                + f"### Instruction:\n{r.instruction}\n\n### Input:\n{r.input}\n\n")
    return HEADER.format(ctx="") + f"### Instruction:\n{r.instruction}\n\n"


TEMPLATES: dict[str, type["Template"]] = {}


def register_template(cls):
    TEMPLATES[cls.name] = cls
    return cls


class Template:
    """``prompt(record)`` is the text before the response; ``response(record)`` the text after it.

    ``bos``: prepend BOS where the tokenizer itself would (``adds_bos``); ``eos``: append EOS after a
    whole response.
    """

    name: ClassVar[str]
    bos: ClassVar[bool] = True
    eos: ClassVar[bool] = True

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def prompt(self, r: Record) -> str:
        raise NotImplementedError

    def response(self, r: Record) -> str:
        return r.output.strip()

    def split(self, r: Record) -> tuple[str, str]:
        """``(prompt, response)`` texts; trailing spaces of the prompt go to the response."""
        p = self.prompt(r)
        stripped = p.rstrip(" ")
        return stripped, p[len(stripped):] + self.response(r)


@register_template
class Alpaca(Template):
    name = "alpaca"

    def prompt(self, r: Record) -> str:
        return format_prompt(r) + MARKER


@register_template
class Compact(Template):
    """A short format for tiny models: ``Instruction: …\\nInput: …\\nResponse: …``."""

    name = "compact"

    def prompt(self, r: Record) -> str:
        inp = f"Input: {r.input}\n" if r.input else ""
        return f"Instruction: {r.instruction}\n{inp}Response: "


class UserString(Template):
    """A user string with ``{instruction}`` and ``{input}`` placeholders, e.g. ``"Q: {instruction}\\nA: "``."""

    name = "string"

    def __init__(self, tokenizer=None, fmt: str = ""):
        super().__init__(tokenizer)
        fields = {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}
        if "instruction" not in fields or not fields <= {"instruction", "input"}:
            raise MiraError(f"a template string needs {{instruction}} (and may use {{input}}), got fields "
                            f"{sorted(fields)} in {fmt!r}; or choose one of {sorted(TEMPLATES) + ['auto']}",
                            where="data.template")
        self.fmt = fmt

    def prompt(self, r: Record) -> str:
        return self.fmt.format(instruction=r.instruction, input=r.input)


@register_template
class Chat(Template):
    """The tokenizer's own chat template (``apply_chat_template``); its end-of-turn ends the response."""

    name = "chat"
    bos = False  # the chat template writes its own special tokens
    eos = False

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer)
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise MiraError("data.template 'chat' needs a tokenizer with a chat template; this model's tokenizer "
                            "has none (use 'alpaca', 'compact' or a template string)", where="data.template")

    @staticmethod
    def user_text(r: Record) -> str:
        return f"{r.instruction}\n\n{r.input}" if r.input else r.instruction

    def prompt(self, r: Record) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": self.user_text(r)}],
                                                  tokenize=False, add_generation_prompt=True)

    def split(self, r: Record) -> tuple[str, str]:
        prompt = self.prompt(r)
        full = self.tokenizer.apply_chat_template([{"role": "user", "content": self.user_text(r)},
                                                   {"role": "assistant", "content": r.output.strip()}], tokenize=False)
        if not full.startswith(prompt):
            raise MiraError("the chat template renders the conversation so that the prompt (with the generation "
                            "prompt) is not a prefix of prompt + response; use another data.template",
                            where="data.template")
        resp = full[len(prompt):]
        eos = self.tokenizer.eos_token
        if eos and eos in resp:  # the loss ends with the end-of-turn token, not the newline after it
            resp = resp[: resp.rindex(eos) + len(eos)]
        return prompt, resp


def get_template(spec: str | None, tokenizer) -> Template:
    """``auto``/None, a registered name, or a string with ``{instruction}`` placeholders."""
    if spec in (None, "auto"):
        return Chat(tokenizer) if getattr(tokenizer, "chat_template", None) else Alpaca(tokenizer)
    if spec in TEMPLATES:
        return TEMPLATES[spec](tokenizer)
    if "{" in spec:
        return UserString(tokenizer, spec)
    raise MiraError(f"unknown template {spec!r}; choose one of {sorted(TEMPLATES) + ['auto']} "
                    "or give a string with {instruction} and {input}", where="data.template")


# -- 2./3. tokenisation with the boundary check and the length policy --------------------------

@dataclass
class LengthStats:
    """What the length policy did to one set of examples (natural lengths, before any cut)."""

    before: int = 0
    after: int = 0
    dropped: int = 0
    input_truncated: int = 0
    response_truncated: int = 0
    prompt_lens: list[int] = field(default_factory=list)
    response_lens: list[int] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return self.input_truncated + self.response_truncated

    @property
    def prompt_intact(self) -> int:
        """Examples kept with their whole prompt (instruction and input)."""
        return self.after - self.input_truncated

    def merge(self, other: "LengthStats") -> "LengthStats":
        return LengthStats(self.before + other.before, self.after + other.after, self.dropped + other.dropped,
                           self.input_truncated + other.input_truncated,
                           self.response_truncated + other.response_truncated,
                           self.prompt_lens + other.prompt_lens, self.response_lens + other.response_lens)

    def length_to_keep(self, q: float = 90.0) -> int:
        """The ``max_length`` that would keep ``q``% of these examples whole."""
        total = np.add(self.prompt_lens, self.response_lens)
        return int(np.ceil(np.percentile(total, q))) if len(total) else 0

    def to_dict(self) -> dict:
        def pct(xs):
            if not xs:
                return {}
            return {f"p{q}": int(np.percentile(xs, q)) for q in (50, 90, 95)} | {"max": int(max(xs))}

        return {"before": self.before, "after": self.after, "dropped": self.dropped,
                "input_truncated": self.input_truncated, "response_truncated": self.response_truncated,
                "prompt_intact": self.prompt_intact,
                "prompt_intact_fraction": self.prompt_intact / self.before if self.before else 1.0,
                "prompt_tokens": pct(self.prompt_lens), "response_tokens": pct(self.response_lens),
                "max_length_for_90pct": self.length_to_keep(90)}


@dataclass
class TokenizedDataset:
    """Tokenised examples of one client (or one split), ready for ``collate``."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    records: list[Record] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)
    stats: LengthStats = field(default_factory=LengthStats)
    source_index: list[int] = field(default_factory=list)  # each example's position in the records given

    def __len__(self) -> int:
        return len(self.input_ids)

    def num_target_tokens(self, idx=None) -> int:
        idx = range(len(self)) if idx is None else idx
        return sum(sum(1 for t in self.labels[i] if t != IGNORE) for i in idx)

    def subset(self, idx) -> "TokenizedDataset":
        return TokenizedDataset([self.input_ids[i] for i in idx], [self.labels[i] for i in idx],
                                [self.records[i] for i in idx] if self.records else [],
                                [self.prompt_lens[i] for i in idx] if self.prompt_lens else [],
                                source_index=[self.source_index[i] for i in idx] if self.source_index else [])

    def positions(self, source_ids) -> list[int]:
        """Positions of the examples made from records ``source_ids`` (those the length policy kept)."""
        pos = {src: i for i, src in enumerate(self.source_index)}
        return [pos[s] for s in source_ids if s in pos]

    @staticmethod
    def concat(parts: list["TokenizedDataset"]) -> "TokenizedDataset":
        out = TokenizedDataset([], [], [], [])
        for p in parts:
            out.input_ids += p.input_ids
            out.labels += p.labels
            out.records += p.records
            out.prompt_lens += p.prompt_lens
            out.stats = out.stats.merge(p.stats)
        return out


class Tokenizer:
    """Turns records into (prompt ids, response ids) under one template and one length policy."""

    def __init__(self, tokenizer, max_length: int, template: str | Template | None = "alpaca",
                 overflow: str = "drop", min_response_tokens: int = 16, warn: bool = True):
        if overflow not in OVERFLOW_POLICIES:
            raise MiraError(f"unknown overflow policy {overflow!r}; choose one of {list(OVERFLOW_POLICIES)}",
                            where="data.overflow")
        self.tok = tokenizer
        self.template = template if isinstance(template, Template) else get_template(template, tokenizer)
        self.max_length = max_length
        self.overflow = overflow
        self.warn = warn  # log what the length policy did (callers that report it themselves pass False)
        self.min_response = min(min_response_tokens, max_length // 2)
        self.bos = [tokenizer.bos_token_id] if self.template.bos and adds_bos(tokenizer) else []
        self.eos = [tokenizer.eos_token_id] if self.template.eos and tokenizer.eos_token_id is not None else []

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, r: Record) -> tuple[list[int], list[int]]:
        """Whole prompt ids (with BOS) and whole response ids (with EOS), split at the checked boundary."""
        prompt, response = self.template.split(r)
        p = self.bos + self.ids(prompt)
        full = self.bos + self.ids(prompt + response)
        if full[: len(p)] != p:
            raise MiraError(f"template {self.template.name!r}: the tokenizer merges the end of the prompt with the "
                            f"start of the response (task {r.task!r}, prompt ending {prompt[-20:]!r}, response "
                            f"starting {response[:20]!r}); end the prompt with a newline or a separator",
                            where="data.template")
        return p, full[len(p):] + self.eos

    def prompt_ids(self, r: Record) -> list[int]:
        """What a model is given at inference: the prompt exactly as in training."""
        prompt, _ = self.template.split(r)
        return self.bos + self.ids(prompt)

    def _cut_input(self, r: Record, budget: int) -> list[int] | None:
        """The prompt with the input cut from its middle to fit ``budget`` tokens, or None."""
        if not r.input:
            return None
        in_ids = self.ids(r.input)
        keep = len(in_ids)
        for _ in range(12):
            p = self.prompt_ids(Record(r.instruction, r.output, self._middle(in_ids, keep), r.task))
            over = len(p) - budget
            if over <= 0:
                return p
            if keep == 0:
                return None
            keep = max(0, keep - over)
        return None

    def _middle(self, ids: list[int], keep: int) -> str:
        if keep >= len(ids):
            return self.tok.decode(ids)
        head = (keep + 1) // 2
        tail = keep - head
        return (self.tok.decode(ids[:head]).rstrip() + CUT_MARK + self.tok.decode(ids[len(ids) - tail:]).lstrip()).strip()

    def __call__(self, records: list[Record]) -> TokenizedDataset:
        ds = TokenizedDataset([], [], [], [])
        st = ds.stats
        for n, r in enumerate(records):
            p, resp = self.encode(r)
            st.before += 1
            st.prompt_lens.append(len(p))
            st.response_lens.append(len(resp))
            if self.overflow == "drop":
                if len(p) + len(resp) > self.max_length:
                    st.dropped += 1
                else:
                    ds_add(ds, n, r, p, resp)
                continue
            budget = self.max_length - self.min_response
            if len(p) > budget:  # depends on the prompt only
                p = self._cut_input(r, budget)
                if p is None:  # the instruction alone does not fit: never cut it
                    st.dropped += 1
                    continue
                st.input_truncated += 1
            room = self.max_length - len(p)
            if len(resp) > room:
                resp = resp[:room]  # no EOS: the model must not learn to stop mid-answer
                st.response_truncated += 1
            ds_add(ds, n, r, p, resp)
        st.after = len(ds)
        if self.warn and (st.dropped or st.truncated):
            log.warning("max_length %d (%s, template %s): %d of %d examples dropped, %d inputs and %d responses cut",
                        self.max_length, self.overflow, self.template.name, st.dropped, st.before,
                        st.input_truncated, st.response_truncated)
        return ds


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts a text with BOS (Llama/SentencePiece style; GPT-2-style
    tokenizers such as SmolLM2's do not, and their ``bos_token`` is a chat control token)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def ds_add(ds: TokenizedDataset, n: int, r: Record, p: list[int], resp: list[int]) -> None:
    ds.source_index.append(n)
    ds.input_ids.append(p + resp)
    ds.labels.append([IGNORE] * len(p) + resp)
    ds.records.append(r)
    ds.prompt_lens.append(len(p))


def tokenize_records(records: list[Record], tokenizer, max_length: int, template: str | Template | None = "alpaca",
                     overflow: str = "drop", min_response_tokens: int = 16) -> TokenizedDataset:
    """Tokenise ``records`` (see the module doc); ``ds.stats`` says what the length policy did."""
    return Tokenizer(tokenizer, max_length, template, overflow, min_response_tokens)(records)


def tokenizer_from_config(data_cfg, tokenizer) -> Tokenizer:
    """The ``Tokenizer`` a run's ``data:`` section describes."""
    return Tokenizer(tokenizer, data_cfg.max_length, data_cfg.template, data_cfg.overflow, data_cfg.min_response_tokens,
                     warn=False)


def check_client_stats(client_id: int, task: str, stats: LengthStats, data_cfg) -> None:
    """A client that would lose more than half of its examples is an error naming a ``max_length`` that works."""
    if stats.before and stats.dropped > stats.before / 2:
        raise MiraError(f"client {client_id} (task {task!r}) would lose {stats.dropped} of its {stats.before} examples "
                        f"to max_length {data_cfg.max_length} (overflow: {data_cfg.overflow}); "
                        f"data.max_length={stats.length_to_keep(90)} keeps 90% of them, or set "
                        f"data.overflow=truncate_input", where="data.max_length")


# -- batching ----------------------------------------------------------------------------------

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
