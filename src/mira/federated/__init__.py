"""MIRA and its baselines: the federated engine, strategies, task graphs and wire format."""
