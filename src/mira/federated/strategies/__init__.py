"""Federated algorithms, one class per file, registered by name in ``STRATEGIES``.

Importing this package registers all built-in strategies.
"""
from mira.federated.strategies.base import STRATEGIES, FitIns, FitRes, Strategy, StrategyContext, get_strategy
from mira.federated.strategies import local, fedit, fedprox, ffa_lora, centralized, mira, oneshot  # noqa: F401,E501  (registration)

__all__ = ["STRATEGIES", "FitIns", "FitRes", "Strategy", "StrategyContext", "get_strategy"]
