"""Differential privacy for mira runs: client-level (DP-FedAvg central, or local on each upload)
and sample-level DP-SGD through Opacus, accounted with ``dp-accounting``. See ``docs/privacy.md``."""
