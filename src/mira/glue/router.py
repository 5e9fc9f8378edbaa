"""Model-level mixture: a "hidden" gate that sends each input to one expert (Model-GLUE).

Features are the base model's mean last-layer hidden state over a prompt, **standardised**
with the validation set's mean and standard deviation (raw hidden states share one large
common direction, so raw cosines are all alike and the softmax is almost uniform).

* ``centroid`` gate: each expert (a cluster's merged model or adapter) gets a centroid, the
  mean standardised feature over the prompts of its members' own tasks; logits are
  ``cos(feature, centroid) / temperature``. ``calibrate`` picks the temperature that
  minimises the cross-entropy of own-task routing on the validation set.
* ``linear`` gate: a softmax regression ``W x + b`` on the frozen standardised features,
  trained on the validation prompts towards their own task's expert (L2-regularised, LBFGS).

``route`` takes the arg-max, ``weights`` the softmax (soft mixtures). ``fit`` optionally
trains the centroids a few steps towards the expert with the lowest loss on each example.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class HiddenRouter:
    """Cosine gate over expert centroids in the base model's hidden space."""

    centroids: Tensor
    """``[num_experts, hidden]`` (in standardised feature space when ``mean`` is set)."""
    temperature: float = 0.05
    mean: Tensor | None = None
    std: Tensor | None = None
    linear: tuple[Tensor, Tensor] | None = None
    """``(W [experts, hidden], b [experts])`` of a trained linear gate; replaces the centroids."""

    @classmethod
    def from_features(cls, features: Tensor, owners: Sequence[int], num_experts: int,
                      temperature: float = 0.05) -> HiddenRouter:
        """Centroid of expert ``e`` = mean of the features whose owner is ``e``.

        An expert that owns no example gets the mean of all features (it is then rarely chosen).
        """
        owners_t = torch.as_tensor(list(owners))
        rows = []
        for e in range(num_experts):
            mask = owners_t == e
            rows.append(features[mask].mean(0) if bool(mask.any()) else features.mean(0))
        return cls(torch.stack(rows).float(), temperature)

    @classmethod
    def standardised(cls, features: Tensor, owners: Sequence[int], num_experts: int,
                     temperature: float = 0.05) -> HiddenRouter:
        """Centroids in the feature space standardised with ``features``' mean and std."""
        mean, std = features.float().mean(0), features.float().std(0).clamp_min(1e-6)
        router = cls.from_features((features.float() - mean) / std, owners, num_experts, temperature)
        router.mean, router.std = mean, std
        return router

    def prepare(self, features: Tensor) -> Tensor:
        x = features.float()
        return (x - self.mean) / self.std if self.mean is not None else x

    def logits(self, features: Tensor) -> Tensor:
        """Gate logits ``[n, num_experts]``: ``cos(feature, centroid) / temperature`` or the linear gate's."""
        x = self.prepare(features)
        if self.linear is not None:
            w, b = self.linear
            return x @ w.T + b
        return F.normalize(x, dim=-1) @ F.normalize(self.centroids, dim=-1).T / self.temperature

    def calibrate(self, features: Tensor, owners: Sequence[int]) -> float:
        """Set the temperature that minimises own-task routing cross-entropy on ``features``; return it."""
        keep = [i for i, o in enumerate(owners) if o >= 0]
        if not keep:
            return self.temperature
        x = F.normalize(self.prepare(features[keep]), dim=-1)
        cos = x @ F.normalize(self.centroids, dim=-1).T
        y = torch.as_tensor([owners[i] for i in keep])
        grid = torch.logspace(-3, 1, 81).tolist()
        self.temperature = float(min(grid, key=lambda t: float(F.cross_entropy(cos / t, y))))
        return self.temperature

    def fit_linear(self, features: Tensor, owners: Sequence[int], l2: float = 1e-2, steps: int = 100) -> float:
        """Train the linear gate on ``features`` towards ``owners`` (LBFGS); return the final loss."""
        keep = [i for i, o in enumerate(owners) if o >= 0]
        x = self.prepare(features[keep])
        y = torch.as_tensor([owners[i] for i in keep])
        n_exp = self.centroids.shape[0]
        w = torch.zeros(n_exp, x.shape[1], requires_grad=True)
        b = torch.zeros(n_exp, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        loss = float(opt.step(closure).detach())
        self.linear = (w.detach(), b.detach())
        return loss

    def route(self, features: Tensor) -> list[int]:
        """Index of the nearest centroid for each feature row."""
        return self.logits(features).argmax(-1).tolist()

    def weights(self, features: Tensor) -> Tensor:
        """Softmax over the cosine logits, ``[n, num_experts]``."""
        return torch.softmax(self.logits(features), dim=-1)

    def fit(self, features: Tensor, targets: Sequence[int], steps: int, lr: float = 0.05, seed: int = 0) -> list[float]:
        """Train the centroids ``steps`` Adam steps on cross-entropy towards ``targets``; return the losses."""
        if steps <= 0:
            return []
        torch.manual_seed(seed)
        centroids = self.centroids.clone().requires_grad_(True)
        opt = torch.optim.Adam([centroids], lr=lr)
        y = torch.as_tensor(list(targets))
        x = F.normalize(self.prepare(features), dim=-1)
        history = []
        for _ in range(steps):
            loss = F.cross_entropy(x @ F.normalize(centroids, dim=-1).T / self.temperature, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
        self.centroids = centroids.detach()
        return history

    def state_dict(self) -> dict:
        out = {"centroids": self.centroids.clone(), "temperature": self.temperature}
        if self.mean is not None:
            out.update(mean=self.mean.clone(), std=self.std.clone())
        if self.linear is not None:
            out.update(linear_weight=self.linear[0].clone(), linear_bias=self.linear[1].clone())
        return out


def normalised_entropy(weights: Tensor) -> float:
    """Mean entropy of the rows of ``weights`` divided by ``log(num_experts)`` (1 = uniform)."""
    w = weights.float().clamp_min(1e-12)
    return float((-(w * w.log()).sum(-1)).mean() / np.log(w.shape[1])) if w.shape[1] > 1 else 0.0


def routed_losses(nll: np.ndarray, tokens: np.ndarray, choice: Sequence[int]) -> np.ndarray:
    """Per-sequence NLL when sequence ``i`` is answered by expert ``choice[i]`` (``nll`` is ``[n, experts]``)."""
    return nll[np.arange(nll.shape[0]), np.asarray(choice)]


def best_expert(nll: np.ndarray, tokens: np.ndarray) -> list[int]:
    """The expert with the lowest per-token loss on each sequence (the router's training target)."""
    return np.argmin(nll / np.maximum(tokens, 1)[:, None], axis=1).tolist()
