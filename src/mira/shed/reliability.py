"""How far SHED's cluster values can be trusted: measured on every run, reported plainly.

* **split-half rank correlation**: the permutations are split into two independent halves
  (even and odd units; an antithetic pair is one unit), the values are estimated from each
  half alone, and the two rankings are compared (Spearman). Values that carry signal rank
  the clusters alike in both halves; noise does not (expected correlation 0). The
  Spearman-Brown formula ``2r / (1 + r)`` projects it to the full set of permutations.
* **standard error** of each cluster value (from the spread of its per-unit means) against
  the **spread** of the values across clusters (their standard deviation);
* **noise of one v(S)**: v(all proxies) re-trained with other training seeds (``noise_seeds``):
  the standard deviation of those values against the spread; and the **noise of one
  marginal** ``v(N) - v(N - G)`` for one group ``G`` under the same seeds (paired batches make
  it smaller than the noise of a single v(S): the marginals are what the values are made of);
* **bottom-quartile overlap**: how many of the lowest quarter of clusters in one half are also
  among the lowest quarter in the other, against chance (a hypergeometric p-value). When a few
  clusters are bad and the rest equally good, the ranking *among the good* is noise (a low
  split-half correlation) while the bad ones are singled out consistently: the report then
  says that the values work as a filter (what they exclude is not random), not as a ranking.

Below ``threshold`` (default 0.5) the values are declared noise: a selection by them is a
random sample. The suggestion projects, by Spearman-Brown, the number of iterations that
would bring the split-half correlation to the threshold, with its cost in v(S) evaluations
and time; when the correlation is near zero more iterations cannot help (the projection
explodes), and the message says what can (less noise per v(S), fewer players).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from mira.shed.shapley import ShapleyResult

MAX_USEFUL_FACTOR = 20  # more than 20x the iterations: say that more iterations alone will not do


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation; nan when either side is constant or there are fewer than 3 values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError("spearman of arrays of different lengths")
    if len(a) < 3:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def fmt_r(r: float, threshold: float) -> str:
    """Two decimals, or three where two would round across the threshold (0.498 is not "0.50 < 0.5")."""
    two = f"{r:.2f}"
    return two if (float(two) >= threshold) == (r >= threshold) else f"{r:.3f}"


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """Reliability of an estimate ``factor`` times as long as one of reliability ``r``."""
    if not math.isfinite(r) or r <= -1:
        return float("nan")
    return factor * r / (1 + (factor - 1) * r)


@dataclass
class Reliability:
    """The reliability figures of one SHED run (``to_dict`` goes into ``shed.json``)."""

    split_half: Optional[float]  # Spearman of the two halves' values; None when not measurable
    full: Optional[float]  # Spearman-Brown projection to all the permutations
    threshold: float
    reliable: bool
    units: int  # independent permutation draws (antithetic pairs count once)
    iterations: int
    mean_stderr: float
    value_spread: float  # standard deviation of the cluster values
    noise_sd: Optional[float]  # sd of one v(S) over training seeds; None when not measured
    noise_values: list[float]
    marginal_noise_sd: Optional[float]  # sd of one marginal v(N) - v(N - G) over the same seeds
    bottom_overlap: Optional[int]  # clusters in the lowest quarter of both halves
    bottom_size: Optional[int]  # size of that quarter
    bottom_p: Optional[float]  # P(overlap >= observed) if the halves were unrelated
    evaluations: int
    cache_hits: int
    seconds_per_evaluation: float
    suggested_iterations: Optional[int]
    suggested_evaluations: Optional[int]
    suggested_seconds: Optional[float]
    verdict: str
    _n: int = 0  # clusters

    def to_dict(self) -> dict:
        d = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        d.pop("_n")
        return d

    def lines(self) -> list[str]:
        """What the console prints."""
        out = []
        r = "n/a" if self.split_half is None else fmt_r(self.split_half, self.threshold)
        full = "" if self.full is None else f" (projected to all {self.iterations} iterations: {self.full:.2f})"
        out.append(f"split-half rank correlation of the cluster values: {r}{full}; threshold {self.threshold:g}")
        noise = ("not measured" if self.noise_sd is None
                 else f"{self.noise_sd:.4g} (sd over {len(self.noise_values)} training seeds)")
        marginal = "" if self.marginal_noise_sd is None else f", of one marginal {self.marginal_noise_sd:.4g}"
        out.append(f"value spread across clusters (sd) {self.value_spread:.4g}; mean standard error "
                   f"{self.mean_stderr:.4g}; noise of one v(S) {noise}{marginal}")
        if self.bottom_overlap is not None:
            out.append(f"lowest quarter: {self.bottom_overlap} of {self.bottom_size} clusters the same in both halves "
                       f"(chance {self.bottom_size ** 2 / max(1, self._n):.1f}, p = {self.bottom_p:.2g})")
        out.append(self.verdict)
        return out


def hypergeom_tail(n: int, k: int, overlap: int) -> float:
    """P(X >= overlap) for the overlap X of two random k-subsets of n items."""
    total = math.comb(n, k)
    return float(sum(math.comb(k, x) * math.comb(n - k, k - x) for x in range(overlap, k + 1)) / total)


def bottom_overlap(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """(overlap, k, p): the lowest quarter (k = n // 4) of ``a`` and of ``b``, and the chance of such an overlap."""
    n = len(a)
    k = max(1, n // 4)
    low_a = set(np.argsort(a, kind="stable")[:k].tolist())
    low_b = set(np.argsort(b, kind="stable")[:k].tolist())
    x = len(low_a & low_b)
    return x, k, hypergeom_tail(n, k, x)


def assess(shapley: ShapleyResult, *, threshold: float = 0.5, noise_values: Sequence[float] = (),
           marginal_noise: Sequence[float] = (), evaluations: Optional[int] = None, cache_hits: Optional[int] = None,
           seconds_per_evaluation: float = 0.0) -> Reliability:
    """The reliability of ``shapley``'s values (see the module docstring)."""
    values = shapley.values
    halves = shapley.split_half()
    r = spearman(*halves) if halves is not None else float("nan")
    low = bottom_overlap(*halves) if halves is not None and len(values) >= 8 else None
    split = None if not math.isfinite(r) else r
    full = None if split is None else spearman_brown(split)
    stderr = shapley.stderr
    spread = float(np.std(values)) if len(values) > 1 else 0.0
    noise = [float(x) for x in noise_values]
    noise_sd = float(np.std(noise, ddof=1)) if len(noise) >= 2 else None
    marginal_sd = float(np.std(list(marginal_noise), ddof=1)) if len(marginal_noise) >= 2 else None
    iterations = len(shapley.credits)
    groups = shapley.total_groups / max(1, iterations)
    per_iteration = max(1.0, groups - 1)  # the last group completes N, whose value is known
    reliable = split is not None and split >= threshold
    sugg_it = sugg_ev = sugg_s = None
    if len(values) < 3:
        verdict = (f"reliability not measurable with {len(values)} clusters: the ranking of so few clusters "
                   "cannot be checked; treat the selection as unverified")
    elif split is None:
        why = ("the values are constant" if spread == 0 else
               f"{shapley.n_units} independent permutation draw(s); at least 2 are needed"
               + (" (4 iterations with antithetic pairs)" if shapley.antithetic else ""))
        verdict = (f"reliability NOT MEASURED ({why}): nothing shows these values are more than noise; "
                   "treat the selection as a random sample")
    elif reliable:
        verdict = (f"the values carry signal: the two halves of the permutations rank the clusters alike "
                   f"(split-half {fmt_r(split, threshold)} >= {threshold:g})")
    else:
        target = threshold if threshold > 0 else 0.5
        factor = (target * (1 - split)) / (split * (1 - target)) if split > 0 else math.inf
        if low is not None and low[2] < 0.05:
            head = (f"the ranking is NOISE (split-half rank correlation {fmt_r(split, threshold)} < {threshold:g}): "
                    "the order of most clusters is not reproducible, so which of them the selection keeps is random; "
                    "but the lowest "
                    f"quarter is consistent ({low[0]} of {low[1]} clusters the same in both halves, p = {low[2]:.2g}): "
                    "the values single out the worst clusters, and what the selection leaves out is not random")
        else:
            head = (f"the values are NOISE (split-half rank correlation {fmt_r(split, threshold)} < {threshold:g}): "
                    "two independent halves of the permutations rank the clusters differently, so this selection "
                    "is no better than random sampling")
        if factor <= MAX_USEFUL_FACTOR:
            sugg_it = int(math.ceil(iterations * factor))
            sugg_it += sugg_it % 2 if shapley.antithetic else 0
            sugg_ev = int(math.ceil(sugg_it * per_iteration))
            sugg_s = sugg_ev * seconds_per_evaluation
            cost = ("" if not seconds_per_evaluation else
                    f", ~{sugg_s:.0f} s" if sugg_s < 90 else f", ~{sugg_s / 60:.0f} min")
            verdict = (f"{head}. About --iterations {sugg_it} (~{sugg_ev} v(S) evaluations{cost}) should bring the "
                       f"split-half correlation to {target:g}.")
        else:
            ratio = ("" if noise_sd is None or spread == 0
                     else f" (one v(S) varies by {noise_sd / spread:.1f}x the spread)")
            verdict = (f"{head}. More iterations alone would take over {MAX_USEFUL_FACTOR}x as many; reduce the noise "
                       f"of v(S){ratio}: more validation records (--val-fraction, max_val), more --steps, fewer and "
                       "larger clusters (--clusters), a larger --group-size.")
    return Reliability(split_half=split, full=full, threshold=threshold, reliable=bool(reliable),
                       units=shapley.n_units, iterations=iterations, mean_stderr=float(np.mean(stderr)),
                       value_spread=spread, noise_sd=noise_sd, noise_values=noise, marginal_noise_sd=marginal_sd,
                       bottom_overlap=None if low is None else low[0], bottom_size=None if low is None else low[1],
                       bottom_p=None if low is None else low[2],
                       evaluations=shapley.evaluations if evaluations is None else evaluations,
                       cache_hits=shapley.cache_hits if cache_hits is None else cache_hits,
                       seconds_per_evaluation=seconds_per_evaluation, suggested_iterations=sugg_it,
                       suggested_evaluations=sugg_ev, suggested_seconds=sugg_s, verdict=verdict, _n=len(values))
