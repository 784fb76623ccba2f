"""The 1:N decision: how high the similarity threshold must be for a gallery of N identities.

A search compares the probe with every enrolled identity, so a threshold that wrongly accepts a fraction FAR(t)
of single comparisons names a stranger as *someone* with probability about

    FPIR(N, t) = 1 - (1 - FAR(t))^N          (false-positive identification rate)

which is 88 % at N = 774 for the 1:1 threshold of the default model (FAR 0.27 %). The policy here inverts that:
for a target FPIR (FACE_IDENTIFY_FPIR) and the gallery's current number of searchable identities N, it picks the
lowest threshold whose predicted FPIR is at most the target, from a FAR(t) table measured on labelled impostor
pairs and carried in the embedder's metadata (`face.embedder.far_table`, docs/model-contract.md).

Two rules on top of the arithmetic:
- the threshold never goes below the 1:1 threshold (`/verify`'s), so a face /identify names is always one
  /verify would accept; small galleries therefore run at a lower FPIR than the target;
- the independence assumption behind the formula is conservative when probes differ in how "stranger-like"
  they are (Jensen: E[1 - (1 - p)^N] <= 1 - (1 - E[p])^N), and `python -m evaluate identify` checks the
  prediction against measured FPIR; beyond the smallest FAR the table measured, the table's own tail fit is used
  and answers say so (`extrapolated`).

Pure numpy and the standard library; no model, no I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


class FarTableError(ValueError):
    """The table in the metadata is not usable (shape, order or range)."""


MAX_POINTS = 10_000  # a table is a few hundred points; more is a mistake (and would bloat /models)


@dataclass(frozen=True)
class FarTable:
    """Per-comparison false-accept rate FAR(t) at increasing thresholds t (non-increasing rates).

    Points at or below `measured_to` were counted on impostor pairs; points above it come from a fit of the
    measured tail (see `extrapolation`). Between points, log FAR is interpolated linearly in t (the tail of
    impostor cosine scores is close to exponential there).
    """

    thresholds: np.ndarray  # (K,) float64, strictly increasing
    far: np.ndarray  # (K,) float64 in (0, 1], non-increasing
    measured_to: float  # the highest threshold whose FAR was counted, not fitted
    impostor_pairs: int  # how many different-person comparisons the counts come from
    rule: str  # how the table was made: data, pipeline, counting rule
    extrapolation: str  # how the points beyond measured_to were made ("" when there are none)

    @classmethod
    def from_json(cls, value: str | dict[str, Any]) -> FarTable:
        try:
            data = json.loads(value) if isinstance(value, str) else value
        except (ValueError, RecursionError) as exc:  # bad JSON, absurd nesting, a 5,000-digit number
            raise FarTableError(f"the FAR table is not readable JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise FarTableError("the FAR table must be a JSON object")
        missing = {"thresholds", "far", "measured_to", "impostor_pairs"} - set(data)
        if missing:
            raise FarTableError(f"the FAR table needs thresholds, far, measured_to, impostor_pairs (missing "
                                f"{sorted(missing)})")
        t, far = data["thresholds"], data["far"]
        if not (isinstance(t, list) and isinstance(far, list) and 2 <= len(t) == len(far) <= MAX_POINTS):
            raise FarTableError(f"thresholds and far must be lists of the same length, 2 to {MAX_POINTS}")
        numbers = [*t, *far, data["measured_to"]]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
            raise FarTableError("thresholds, far and measured_to must be numbers")
        pairs = data["impostor_pairs"]
        if isinstance(pairs, bool) or not isinstance(pairs, int) or not 1 <= pairs <= 10**15:
            raise FarTableError("impostor_pairs must be a positive integer")
        try:
            t = np.asarray(t, dtype=np.float64)
            far = np.asarray(far, dtype=np.float64)
            measured_to = float(data["measured_to"])
        except (OverflowError, ValueError) as exc:
            raise FarTableError(f"the FAR table holds numbers out of range ({exc})") from None
        if not (np.isfinite(t).all() and np.isfinite(far).all() and math.isfinite(measured_to)):
            raise FarTableError("the FAR table holds non-finite numbers")
        # A minimum spacing, not just strictly increasing: two thresholds 1e-16 apart would make interpolation
        # between them meaningless.
        if not (np.diff(t) >= 1e-6).all() or t[0] < -1 or t[-1] > 1:
            raise FarTableError("thresholds must increase (by 1e-6 or more) within [-1, 1]")
        if not ((far > 0) & (far <= 1)).all() or (np.diff(far) > 0).any():
            raise FarTableError("far must be rates in (0, 1] that never increase with the threshold")
        if not t[0] <= measured_to <= t[-1] or pairs < 1:
            raise FarTableError("measured_to must lie within the thresholds, impostor_pairs must be positive")
        return cls(t, far, measured_to, pairs, str(data.get("rule", "")), str(data.get("extrapolation", "")))

    def to_json(self) -> dict[str, Any]:
        return {
            "thresholds": [round(float(x), 6) for x in self.thresholds],
            "far": [float(f"{x:.6g}") for x in self.far],
            "measured_to": round(float(self.measured_to), 6),
            "impostor_pairs": int(self.impostor_pairs),
            "rule": self.rule,
            "extrapolation": self.extrapolation,
        }

    @property
    def smallest_measured_far(self) -> float:
        return float(self.far_at(self.measured_to))

    def far_at(self, threshold: float) -> float:
        """FAR at a threshold: log-linear between points; 1 below the table (it says nothing there, so assume the
        worst), the last one's slope continued above it (never 0: a rate the data cannot show is not zero)."""
        t, log_far = self.thresholds, np.log(self.far)
        if threshold < t[0]:
            return 1.0
        if threshold == t[0]:
            return float(self.far[0])
        if threshold >= t[-1]:
            slope = (log_far[-1] - log_far[-2]) / (t[-1] - t[-2])
            return float(math.exp(log_far[-1] + slope * (threshold - t[-1])))
        return float(math.exp(np.interp(threshold, t, log_far)))

    def threshold_for(self, far: float) -> float:
        """The lowest threshold whose FAR is at most `far` (the inverse of far_at, same interpolation)."""
        if not 0 < far <= 1:
            raise ValueError("far must be in (0, 1]")
        t, log_far = self.thresholds, np.log(self.far)
        target = math.log(far)
        if target >= log_far[0]:
            return float(t[0])
        if target < log_far[-1]:
            slope = (log_far[-1] - log_far[-2]) / (t[-1] - t[-2])
            return float(min(1.0, t[-1] + (target - log_far[-1]) / slope)) if slope < 0 else 1.0
        # log_far is non-increasing: the first point at or below the target, interpolated from the one before.
        k = int(np.flatnonzero(log_far <= target)[0])
        if log_far[k] == log_far[k - 1]:
            return float(t[k])
        return float(t[k - 1] + (target - log_far[k - 1]) * (t[k] - t[k - 1]) / (log_far[k] - log_far[k - 1]))


def fpir(far: float, identities: int) -> float:
    """1 - (1 - far)^N, computed without cancellation for tiny rates."""
    if identities <= 0 or far <= 0:
        return 0.0
    if far >= 1:
        return 1.0
    return float(-math.expm1(identities * math.log1p(-far)))


def far_for_fpir(target_fpir: float, identities: int) -> float:
    """The per-comparison FAR at which N independent comparisons name a stranger with probability target_fpir."""
    if not 0 < target_fpir < 1:
        raise ValueError("target_fpir must be in (0, 1)")
    return float(-math.expm1(math.log1p(-target_fpir) / max(1, identities)))


@dataclass(frozen=True)
class Decision:
    """What one /identify answer decided with."""

    threshold: float
    policy: str  # "fpir": set for the gallery size; "model": the 1:1 threshold (no table); "settings"/"request"
    gallery_identities: int  # identities the search compared with
    target_fpir: float | None  # the FPIR the policy aims at (None unless policy is "fpir")
    expected_fpir: float | None  # predicted chance that a stranger is named, at this threshold and size
    extrapolated: bool  # the prediction rests on the table's fitted tail, beyond the FAR it measured


class IdentifyPolicy:
    """Chooses /identify's threshold for a gallery size; cheap enough to run on every request."""

    def __init__(self, table: FarTable | None, target_fpir: float, verify_threshold: float,
                 fixed_threshold: float | None = None, fixed_source: str = "settings"):
        if not 0 < target_fpir < 1:
            raise ValueError("target_fpir must be in (0, 1)")
        self.table = table
        self.target_fpir = float(target_fpir)
        self.verify_threshold = float(verify_threshold)
        self.fixed_threshold = None if fixed_threshold is None else float(fixed_threshold)
        self.fixed_source = fixed_source

    @property
    def name(self) -> str:
        if self.fixed_threshold is not None:
            return self.fixed_source
        return "fpir" if self.table is not None else "model"

    def expected_fpir(self, threshold: float, identities: int) -> tuple[float | None, bool]:
        if self.table is None:
            return None, False
        return fpir(self.table.far_at(threshold), identities), threshold > self.table.measured_to

    def decide(self, identities: int, threshold: float | None = None, source: str = "request") -> Decision:
        """The threshold for a search over `identities` identities; an explicit `threshold` wins."""
        identities = max(0, int(identities))
        if threshold is not None or self.fixed_threshold is not None:
            chosen = float(threshold if threshold is not None else self.fixed_threshold)
            expected, extrapolated = self.expected_fpir(chosen, identities)
            return Decision(chosen, source if threshold is not None else self.fixed_source, identities, None,
                            _rounded(expected), extrapolated)
        if self.table is None:
            return Decision(self.verify_threshold, "model", identities, None, None, False)
        wanted = self.table.threshold_for(far_for_fpir(self.target_fpir, identities))
        chosen = max(self.verify_threshold, wanted)
        expected, extrapolated = self.expected_fpir(chosen, identities)
        return Decision(chosen, "fpir", identities, self.target_fpir, _rounded(expected), extrapolated)


def _rounded(x: float | None) -> float | None:
    """Six significant digits: a prediction, not a measurement to the last bit (0.01, not 0.009999999999999997)."""
    return None if x is None else float(f"{x:.6g}")
