"""Shared pieces of the SHED benchmarks (``shed_planted_noise.py``, ``shed_experiment.py``).

Data splits, planted corruption, the AUC of values against known bad records, fixed-step
fine-tunes scored on a test set, t-intervals over seeds, and the machine description.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mira.federated.compare import ci95  # noqa: E402


def setup_torch():
    os.environ.setdefault("MIRA_THREADS", "1")
    import torch
    import transformers

    torch.set_num_threads(int(os.environ["MIRA_THREADS"]))
    transformers.logging.set_verbosity_error()
    return torch


def load_dolly(assets: str | Path, path: str | None = None):
    from mira.config import DataConfig
    from mira.data.records import DollySource

    dolly = Path(path) if path else Path(assets) / "data/dolly-15k/databricks-dolly-15k.jsonl"
    if not dolly.exists():
        sys.exit(f"Dolly-15k not found at {dolly}; pass --assets (or set MIRA_ASSETS)")
    return DollySource().load(DataConfig(source="dolly", path=str(dolly), max_per_task=None))


def disjoint_parts(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes (and the rest last)."""
    perm = np.random.default_rng([seed, 2024]).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s])
        start += s
    out.append(perm[start:])
    return out


def corrupt(records: list, fraction: float, mode: str, seed: int, reservoir: Sequence[str]) -> tuple[list, np.ndarray]:
    """A copy of ``records`` with a random ``fraction`` of responses corrupted, and the mask of those.

    ``salad``: the response is replaced by as many words drawn at random from ``reservoir`` (the
    responses of records used nowhere else): unrelated text in the data's own vocabulary, without syntax.
    ``shuffle``: the corrupted records exchange their responses (a random derangement).
    ``chars``: the response is replaced by as many random letters, digits and spaces (garbage).
    ``boiler``: the response is replaced by one of a few canned non-answers (refusals, placeholders)."""
    rng = np.random.default_rng([seed, 77])
    n = len(records)
    bad = np.zeros(n, dtype=bool)
    idx = rng.choice(n, size=int(round(fraction * n)), replace=False)
    bad[idx] = True
    out = list(records)
    if mode == "salad":
        words = " ".join(reservoir).split()
        for i in idx:
            k = max(3, len(records[i].output.split()))
            out[i] = dataclasses.replace(records[i], output=" ".join(rng.choice(words, size=k)))
    elif mode == "chars":
        alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789      .,")
        for i in idx:
            text = "".join(rng.choice(alphabet, size=max(8, len(records[i].output))))
            out[i] = dataclasses.replace(records[i], output=text)
    elif mode == "boiler":
        canned = ["I'm sorry, but I cannot help with that request.", "N/A", "As an AI language model, I do not "
                  "have an opinion on this.", "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
                  "This answer is not available.", "TODO"]
        for i in idx:
            out[i] = dataclasses.replace(records[i], output=canned[int(rng.integers(len(canned)))])
    elif mode == "shuffle":
        order = rng.permutation(len(idx))
        while len(idx) > 1 and np.any(order == np.arange(len(idx))):  # no record keeps its own response
            order = rng.permutation(len(idx))
        for i, j in zip(idx, idx[order]):
            out[i] = dataclasses.replace(records[i], output=records[j].output)
    else:
        raise ValueError(f"unknown corruption {mode!r}")
    return out, bad


def auc(scores: Sequence[float], bad: Sequence[bool]) -> float:
    """P(a clean record scores above a corrupted one), ties counted half: scikit-learn's ROC AUC with the
    clean records as positives (NaN unless both kinds are present)."""
    from sklearn.metrics import roc_auc_score

    b = np.asarray(bad, dtype=bool)
    if b.all() or not b.any():
        return float("nan")
    return float(roc_auc_score(~b, np.asarray(scores, dtype=np.float64)))


def mean_ci(xs: Sequence[float]) -> dict:
    """Mean, sample sd and the half-width of the 95% t-interval."""
    x = np.asarray(list(xs), dtype=np.float64)
    n = len(x)
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    half = ci95(x) if n > 1 else float("nan")
    return {"mean": float(x.mean()), "sd": sd, "ci95": half, "n": n, "values": x.tolist()}


def fmt_ci(e: dict, digits: int = 4) -> str:
    return f"{e['mean']:.{digits}f} ± {e['ci95']:.{digits}f}"


class FineTuner:
    """Fresh LoRA on a base model, a fixed number of steps on a subset, scored by test loss."""

    def __init__(self, model_path: str, test_records: list, *, steps: int, lr: float, batch_size: int,
                 max_length: int, template: str, lora_r: int = 8, lora_alpha: float = 16.0, seed: int = 0):
        from mira.data.prompts import tokenize_records
        from mira.shed import ShedSettings
        from mira.shed.value import ProxyModel
        from mira.train.trainer import LocalTrainer, TrainSettings

        self.tokenize = tokenize_records
        self.max_length, self.template = max_length, template
        self.proxy = ProxyModel.load(ShedSettings(model=model_path, lora_r=lora_r, lora_alpha=lora_alpha, seed=seed))
        self.pad = self.proxy.pad_id
        self.test = tokenize_records(test_records, self.proxy.tokenizer, max_length, template, "truncate_input")
        self.trainer = LocalTrainer(self.proxy.slot, self.pad, TrainSettings(lr=lr, batch_size=batch_size, steps=steps))

    def test_loss(self) -> float:
        from mira.eval.metrics import eval_loss

        return float(eval_loss(self.proxy.model, self.test, self.pad, 16)[0])

    def base(self) -> float:
        self.proxy.slot.set(self.proxy.slot.initial_state)
        return self.test_loss()

    def run(self, subset: list, seed: int) -> dict:
        self.proxy.slot.set(self.proxy.slot.initial_state)
        ds = self.tokenize(subset, self.proxy.tokenizer, self.max_length, self.template, "truncate_input")
        t = time.perf_counter()
        res = self.trainer.train(ds, seed=seed)
        return {"n": len(subset), "test_loss": self.test_loss(), "train_loss": res.loss,
                "train_s": time.perf_counter() - t}


def machine(torch) -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": list(os.getloadavg())}


def shed_row(res) -> dict:
    """The run figures of one ``RefineResult``."""
    rel, sh = res.reliability, res.shapley
    return {"clusters": res.clustering.k, "group_size": res.group_size, "v_empty": sh.v_empty, "v_full": sh.v_full,
            "evaluations": rel.evaluations, "cache_hits": sh.cache_hits, "truncated_groups": sh.truncated_groups,
            "total_groups": sh.total_groups, "tolerance": sh.tolerance, "split_half": rel.split_half,
            "split_half_full": rel.full, "reliable": rel.reliable, "mean_stderr": rel.mean_stderr,
            "value_spread": rel.value_spread, "noise_sd": rel.noise_sd, "noise_values": rel.noise_values,
            "marginal_noise_sd": rel.marginal_noise_sd, "bottom_overlap": rel.bottom_overlap,
            "bottom_size": rel.bottom_size, "bottom_p": rel.bottom_p,
            "seconds_per_evaluation": rel.seconds_per_evaluation, "wall_s": res.timings["total_s"],
            "verdict": rel.verdict}
