"""Selective-merging strategies, one per file, registered by name (see ``base``)."""
from mira.glue.strategies import (  # noqa: F401
                                       evolutionary,
                                       heuristic_average,
                                       heuristic_coefficient,
                                       heuristic_similarity,
)
from mira.glue.strategies.base import (
                                       STRATEGIES,
                                       ScoreFn,
                                       Selection,
                                       Strategy,
                                       StrategyOptions,
                                       get_strategy,
                                       memoised,
                                       register_strategy,
                                       strategy_names,
)

__all__ = ["STRATEGIES", "ScoreFn", "Selection", "Strategy", "StrategyOptions", "get_strategy", "memoised",
           "register_strategy", "strategy_names"]
