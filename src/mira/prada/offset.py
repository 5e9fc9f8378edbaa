"""The logit offset: the remote model's scores corrected by the device's proxy.

    z = z_target + alpha * (z_proxy_with_lora - z_proxy_base)

``combine`` applies it to full-vocabulary logits; ``combine_on_support`` to the server's
top-k log-probabilities (the offset is read at the k token ids only, and the choice is made
on that support). Log-probabilities differ from logits by a constant per row, so both give
the same distribution when k is the whole vocabulary.

``ProxyPair`` is the device's proxy: one frozen base model with a LoRA adapter, run with the
adapter on and off (peft's ``disable_adapter()``), each with its own KV cache. It feeds the
prompt in one forward and every later token on its own, whatever the decoder, so that the
per-token and speculative decoders compute bit-identical offsets.
"""
from __future__ import annotations

import torch

from mira.errors import MiraError
from mira.prada.errors import ContextLimitError


def combine(target_logits: torch.Tensor, tuned_logits: torch.Tensor, base_logits: torch.Tensor,
            alpha: float = 1.0) -> torch.Tensor:
    """``target + alpha * (tuned - base)`` in float32 (any leading shape, vocabulary last)."""
    return add_offset(target_logits, tuned_logits.float() - base_logits.float(), alpha)


def add_offset(target_logits: torch.Tensor, offset: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``target + alpha * offset`` in float32, with ``offset = tuned - base`` already taken."""
    return target_logits.float() + alpha * offset.float()


def combine_on_support(target_logprobs: torch.Tensor, ids: torch.Tensor, offset: torch.Tensor,
                       alpha: float = 1.0) -> torch.Tensor:
    """Top-k mode: ``target_logprobs[j] + alpha * offset[ids[j]]`` for the ``k`` ids of one row."""
    return add_offset(target_logprobs, offset.float()[ids], alpha)


class ProxyPair:
    """The proxy with and without its adapter; ``offset(ids)`` is ``z_tuned - z_base`` after ``ids``.

    Keeps one KV cache per side and the sequence they hold. A call whose ``ids`` extend
    that sequence feeds only the new tokens (one at a time); any other call starts over.
    """

    def __init__(self, peft_model, context_length: int | None = None):
        self.model = peft_model
        self.model.eval()
        self.vocab_size = int(peft_model.config.vocab_size)
        self.context_length = int(context_length or peft_model.config.max_position_embeddings)
        self.device = next(peft_model.parameters()).device
        self._seen: list[int] = []
        self._caches: dict[bool, object] = {}
        self._last: dict[bool, torch.Tensor] = {}

    @classmethod
    def load(cls, proxy_dir: str, adapter_dir: str, dtype: str = "float32", device: str = "cpu"):
        """``(ProxyPair, tokenizer)`` from a proxy model folder and a PEFT adapter folder."""
        from peft import PeftModel

        from mira.models.adapters import read_adapter_config
        from mira.models.loader import load_base

        base, tokenizer = load_base(proxy_dir, dtype=dtype, device=device, where="--proxy")
        read_adapter_config(adapter_dir)
        try:
            model = PeftModel.from_pretrained(base, adapter_dir)
        except (RuntimeError, ValueError, KeyError) as e:
            raise MiraError(f"cannot load adapter {adapter_dir} on {proxy_dir}: {str(e).splitlines()[0]}",
                            where="--adapter") from e
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model), tokenizer

    @torch.no_grad()
    def _forward(self, tuned: bool, ids: list[int], fresh: bool) -> torch.Tensor:
        cache = None if fresh else self._caches[tuned]
        x = torch.tensor([ids], device=self.device)
        if tuned:
            out = self.model(input_ids=x, past_key_values=cache, use_cache=True)
        else:
            with self.model.disable_adapter():
                out = self.model(input_ids=x, past_key_values=cache, use_cache=True)
        self._caches[tuned] = out.past_key_values
        return out.logits[0, -1].float().cpu()

    def offset(self, ids: list[int]) -> torch.Tensor:
        """``[vocab]`` offset for the token after ``ids``."""
        if len(ids) > self.context_length:
            raise ContextLimitError(f"the sequence has {len(ids)} tokens, more than the proxy's context of "
                                    f"{self.context_length}", status=0, code="context_exceeded", where="proxy")
        extends = bool(self._seen) and len(ids) > len(self._seen) and ids[: len(self._seen)] == self._seen
        if not extends and ids != self._seen:
            for tuned in (True, False):
                self._last[tuned] = self._forward(tuned, ids, fresh=True)  # the prompt: one forward
        elif extends:
            for token in ids[len(self._seen):]:
                for tuned in (True, False):
                    self._last[tuned] = self._forward(tuned, [token], fresh=False)
        self._seen = list(ids)
        return self._last[True] - self._last[False]

    @torch.no_grad()
    def teacher_forced_offsets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, vocab]`` offsets at every position (for losses; no caches)."""
        tuned = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        with self.model.disable_adapter():
            base = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return tuned - base
