"""Privacy accounting with Google's maintained ``dp-accounting`` library (RDP accountant).

mira writes no accountant of its own: every epsilon comes from ``dp_accounting.rdp.RdpAccountant``
on the DP event that describes the mechanism actually run, and noise calibrated to a target
epsilon comes from ``dp_accounting.calibrate_dp_mechanism`` on the same event.

The events (``z`` the noise multiplier: noise std / L2 sensitivity):

* client-level, central (DP-FedAvg, McMahan et al. 2018): each client joins a round with
  probability ``q`` (Poisson sampling), the server adds ``N(0, (z C)^2)`` to the sum of the
  clipped updates; ``T`` rounds: ``SelfComposed(PoissonSampled(q, Gaussian(z)), T)``,
  add-or-remove-one-client adjacency.
* client-level, local: each upload carries its own ``N(0, (z C)^2)``. The server sees who uploads,
  so sampling does not amplify; one client's whole dataset can move its clipped update anywhere in
  the ball of radius C, an L2 sensitivity of 2C (replace-one), so each upload is ``Gaussian(z/2)``,
  composed over the rounds that client took part in.
* sample-level (DP-SGD, Abadi et al. 2016): each example joins a step's batch with probability
  ``q = B / n``; ``SelfComposed(PoissonSampled(q, Gaussian(z)), steps)``.
"""
from __future__ import annotations

import contextlib
import logging
import math

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from mira.errors import MiraError


def _poisson_gaussian(z: float, q: float, count: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(min(1.0, q), dp_accounting.GaussianDpEvent(z)), int(count))


def central_event(z: float, q: float, rounds: int) -> dp_accounting.DpEvent:
    return _poisson_gaussian(z, q, rounds)


def local_event(z: float, participations: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2.0), int(participations))


def dpsgd_event(z: float, q: float, steps: int) -> dp_accounting.DpEvent:
    return _poisson_gaussian(z, q, steps)


def epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    """The RDP accountant's epsilon for ``event`` at ``delta`` (``inf`` without noise)."""
    with _quiet():
        acc = RdpAccountant()
        acc.compose(event)
        return float(acc.get_epsilon(delta))


@contextlib.contextmanager
def _quiet():
    """dp-accounting logs (through absl) every fractional RDP order whose series it cannot sum and then
    leaves that order out, which only makes epsilon an upper bound over fewer orders: not for users."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def calibrate(make_event, target_epsilon: float, delta: float, where: str) -> float:
    """The smallest noise multiplier whose event has epsilon <= ``target_epsilon`` at ``delta``."""
    try:
        with _quiet():
            z = dp_accounting.calibrate_dp_mechanism(
                RdpAccountant, make_event, target_epsilon, delta,
                bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    except (ValueError, RuntimeError) as e:  # e.g. no bracket found: the target cannot be met
        raise MiraError(f"cannot calibrate noise to epsilon={target_epsilon} at delta={delta}: {e}", where=where) from None
    return float(z)


def default_delta(n: int) -> float:
    """``1 / n^1.1``: below ``1 / n``, as a meaningful delta must be."""
    return 1.0 / max(2, n) ** 1.1


def check_delta(delta: float, n: int, unit: str, where: str) -> None:
    if delta >= 1.0 / n:
        raise MiraError(f"delta={delta:g} is not below 1/n = 1/{n} {unit}: such a delta allows releasing "
                        f"one {unit.rstrip('s')}'s data outright; choose delta < {1.0 / n:.3g}", where=where)


def finite_or_none(x: float) -> float | None:
    """JSON has no infinity: report epsilon = inf as null."""
    return float(x) if math.isfinite(x) else None
