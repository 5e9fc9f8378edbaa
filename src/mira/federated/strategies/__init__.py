"""Federated algorithms, one class per file, registered by name in ``STRATEGIES``.

Importing this package registers all built-in strategies.
"""
from mira.federated.strategies.base import STRATEGIES, FitIns, FitRes, Strategy, StrategyContext, get_strategy
from mira.federated.strategies import local, fedit, fedprox, ffa_lora, centralized, mira, oneshot  # noqa: F401,E501  (registration)
from mira.federated.strategies import fedavgm, fedadam, fedyogi, fedadagrad  # noqa: F401  (FedOpt family)
from mira.federated.strategies import fedsa_lora, fedit_ft  # noqa: F401  (personalised baselines)
from mira.federated.strategies import flora, hetlora  # noqa: F401  (heterogeneous LoRA ranks)

__all__ = ["STRATEGIES", "FitIns", "FitRes", "Strategy", "StrategyContext", "get_strategy"]
