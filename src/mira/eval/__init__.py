"""Evaluation: token-level test loss and generation metrics (ROUGE-L, exact match)."""
from mira.eval.metrics import eval_loss, generate, generation_metrics

__all__ = ["eval_loss", "generate", "generation_metrics"]
