"""Model-level mixture: a "hidden" gate that sends each input to one expert (Model-GLUE).

Each expert (a cluster's merged model or adapter) gets a centroid: the mean hidden state
of the base model over the prompts of its members' own tasks. An input is routed to the
expert whose centroid is nearest in cosine similarity; ``weights`` gives the softmax over
``cos / temperature`` for soft mixtures. ``fit`` optionally trains the centroids a few
steps, with cross-entropy towards the expert that has the lowest loss on each example.
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
    """``[num_experts, hidden]``."""
    temperature: float = 0.05

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

    def logits(self, features: Tensor) -> Tensor:
        """``cos(feature, centroid) / temperature``, ``[n, num_experts]``."""
        return F.normalize(features.float(), dim=-1) @ F.normalize(self.centroids, dim=-1).T / self.temperature

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
        x = F.normalize(features.float(), dim=-1)
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
        return {"centroids": self.centroids.clone(), "temperature": self.temperature}


def routed_losses(nll: np.ndarray, tokens: np.ndarray, choice: Sequence[int]) -> np.ndarray:
    """Per-sequence NLL when sequence ``i`` is answered by expert ``choice[i]`` (``nll`` is ``[n, experts]``)."""
    return nll[np.arange(nll.shape[0]), np.asarray(choice)]


def best_expert(nll: np.ndarray, tokens: np.ndarray) -> list[int]:
    """The expert with the lowest per-token loss on each sequence (the router's training target)."""
    return np.argmin(nll / np.maximum(tokens, 1)[:, None], axis=1).tolist()
