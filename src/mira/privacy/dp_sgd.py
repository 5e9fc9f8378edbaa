"""Sample-level DP: DP-SGD (Abadi et al., CCS 2016) on the LoRA tensors, through Opacus.

Inside one client's local training, every step:

1. draws a Poisson batch: each example joins with probability ``q = batch_size / n`` (what the
   accountant assumes; the batch size varies, an empty batch is a noise-only step);
2. computes one gradient per example with Opacus's ``GradSampleModule`` (hooks on the LoRA
   ``nn.Linear`` layers; the frozen base needs none), on the example's own mean token loss;
3. lets Opacus's ``DPOptimizer`` (``loss_reduction="mean"``) clip each example's gradient to ``max_grad_norm``, add
   ``N(0, (z * max_grad_norm)^2)`` to their sum, divide by the expected batch size ``q n`` and
   step the wrapped AdamW.

The noise and the batches come from generators seeded by the round's seed, so a resumed run is the
same run (a simulator's choice); ``privacy.secure_noise: true`` mixes in ``os.urandom`` bits instead.
Accounting per client (``accountant.dpsgd_event``): ``q = B / n_k`` over all the steps the client
took across rounds. One ``z`` serves every client: given a target epsilon it is calibrated for the
worst case, the smallest client training in every round; ``epsilon`` in the report is the largest
per-client value actually spent.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from mira.data.prompts import TokenizedDataset, collate
from mira.errors import MiraError
from mira.privacy.accountant import calibrate, check_delta, default_delta, dpsgd_event, epsilon, finite_or_none


class DPSGD:
    """The sample-level mechanism of one run: its noise multiplier, and the steps each client took."""

    def __init__(self, cfg, *, n_train: list[int], batch_size: int, steps_per_round: list[int], rounds: int):
        self.cfg, self.n, self.batch_size = cfg, list(n_train), batch_size
        largest = max(1, max(self.n))  # delta < 1/n must hold for every client, so for the largest
        self.delta = cfg.delta if cfg.delta is not None else default_delta(largest)
        check_delta(self.delta, largest, "examples", "privacy.sample.delta")
        self.steps = [0] * len(self.n)
        self.secure = False  # privacy.secure_noise (set by build_sample_mechanism)
        if cfg.noise_multiplier is not None:
            self.z = float(cfg.noise_multiplier)
        else:  # the largest z any client needs when it trains in every round (q and steps both vary with n)
            cases = sorted({(self.rate(c), rounds * steps_per_round[c]) for c in range(len(self.n))})
            self.z = max(calibrate(lambda z, q=q, t=t: dpsgd_event(z, q, t), cfg.epsilon, self.delta,
                                   "privacy.sample.epsilon") for q, t in cases)

    def rate(self, cid: int) -> float:
        return min(1.0, self.batch_size / max(1, self.n[cid]))

    def client_epsilons(self) -> list[float]:
        if self.z <= 0:
            return [math.inf if s else 0.0 for s in self.steps]
        return [epsilon(dpsgd_event(self.z, self.rate(c), s), self.delta) if s else 0.0 for c, s in enumerate(self.steps)]

    def report(self) -> dict:
        eps = self.client_epsilons()
        return {"level": "sample", "mechanism": "DP-SGD (Opacus)", "accountant": "dp_accounting RDP",
                "epsilon": finite_or_none(max(eps)) if eps else None,
                "epsilon_per_client": [finite_or_none(e) for e in eps], "delta": self.delta,
                "noise_multiplier": self.z, "max_grad_norm": float(self.cfg.max_grad_norm),
                "sampling": "poisson", "steps_per_client": list(self.steps)}

    def state_dict(self) -> dict:
        return {"steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = [int(s) for s in state["steps"]]


def build_sample_mechanism(cfg, strategy_cls, n_train: list[int], *, rounds: int) -> DPSGD | None:
    """The DP-SGD mechanism ``privacy.sample`` asks for (``None`` when it is absent)."""
    if cfg.privacy.sample is None:
        return None
    if getattr(strategy_cls, "pooled", False):
        raise MiraError("DP-SGD on the pooled data (centralized) is not supported; use a federated algorithm",
                        where="privacy.sample")
    if not getattr(strategy_cls, "uniform_steps", True):
        raise MiraError(f"{strategy_cls.name} trains a budget other than R local steps per round, which DP-SGD's "
                        f"calibration assumes; not supported", where="privacy.sample")
    from mira.federated.engine import train_settings

    settings = train_settings(cfg)
    mech = DPSGD(cfg.privacy.sample, n_train=n_train, batch_size=cfg.federation.batch_size,
                 steps_per_round=[settings.num_steps(n) for n in n_train], rounds=rounds)
    mech.secure = bool(cfg.privacy.secure_noise)
    return mech


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean token loss on its response tokens (labels ``-100`` elsewhere)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    mask = (labels != -100).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def poisson_batches(n: int, q: float, steps: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [np.flatnonzero(rng.random(n) < q).tolist() for _ in range(steps)]


def dp_train(trainer, ds: TokenizedDataset, seed: int, *, keys: list[str], params: list[torch.Tensor],
             steps: int, noise_multiplier: float, max_grad_norm: float, batch_size: int, lr: float,
             weight_decay: float, secure: bool = False):
    """``steps`` DP-SGD steps on ``params`` (the slot's LoRA tensors); returns a ``TrainResult``. With
    ``secure``, the batches and the noise are drawn from a seed mixed with ``os.urandom`` bits."""
    if secure:
        from mira.privacy.base import secure_seed

        from mira.federated.engine import derive_seed

        seed = derive_seed(secure_seed(), seed)
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from mira.train.trainer import TrainResult

    n = len(ds)
    q = min(1.0, batch_size / n)
    model = trainer.slot.model
    try:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    except Exception as e:  # noqa: BLE001  (Opacus names the layer it cannot handle)
        raise MiraError(f"DP-SGD cannot compute per-example gradients for this model: {e}", where="privacy.sample") from None
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    opt = DPOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), noise_multiplier=noise_multiplier,
                      max_grad_norm=max_grad_norm, expected_batch_size=max(1, int(round(q * n))),
                      loss_reduction="mean", generator=gen)
    model.train()
    torch.manual_seed(seed)
    total_loss, counted, tokens = 0.0, 0, 0
    t0 = time.perf_counter()
    try:
        for idx in poisson_batches(n, q, steps, seed):
            opt.zero_grad(set_to_none=True)
            if idx:
                batch = collate(ds, idx, trainer.pad_id, trainer.device)
                labels = batch.pop("labels")
                logits = gsm(**batch).logits
                losses = per_example_loss(logits, labels)
                with warnings.catch_warnings():  # Opacus's full backward hooks on a frozen base: expected
                    warnings.simplefilter("ignore", UserWarning)
                    losses.mean().backward()  # Opacus rescales each example's gradient by the batch size
                total_loss += float(losses.detach().mean())
                counted += 1
                tokens += int(batch["attention_mask"].sum())
            else:  # an empty Poisson batch: the step still releases noise
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            opt.step()
    finally:
        gsm._close()
        model.eval()
    return TrainResult(steps=steps, tokens=tokens, loss=total_loss / max(1, counted),
                       step_time_s=time.perf_counter() - t0)
