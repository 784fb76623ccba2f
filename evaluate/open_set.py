"""`python -m evaluate identify`: the open-set identification report over a folder of people.

Protocol (one photo per person enrolled unless `per_person` says more):
- enrolled: N people drawn at random among those with two or more photos; their other photos are mated probes;
- strangers: every photo of every person not enrolled is a non-mated probe;
- several draws for each gallery size smaller than the pool (outcomes pooled), one at the largest;
- FAR(t) from every different-person pair of photos, and from it the predicted FPIR(N, t) = 1 - (1 - FAR(t))^N,
  checked against the FPIR measured on the draws;
- the service's own decision policy (service/decision.py) replayed: its threshold for each gallery size and the
  target FPIR, with the FPIR and FNIR it gets;
- candidate improvements measured on one common split (templates from several photos, cohort score
  normalisation, a best-vs-second margin), so that each is kept only where it shows a gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from evaluate.identification import (
    SearchScores,
    build_far_table,
    det_curve,
    fnir_at,
    fnir_at_fpir,
    fpir_at,
    impostor_histogram,
    open_set_split,
    rank1,
    run_search,
)
from evaluate.people import People
from service.decision import FarTable, IdentifyPolicy, fpir

FPIR_TARGETS = (0.1, 0.01, 0.001)
README_SIZES = (100, 1_000, 10_000, 100_000, 1_000_000)


def pooled(outcomes: list[SearchScores]) -> SearchScores:
    return SearchScores(
        mated_score=np.concatenate([o.mated_score for o in outcomes]),
        mated_rank1=np.concatenate([o.mated_rank1 for o in outcomes]),
        mated_margin=np.concatenate([o.mated_margin for o in outcomes]),
        nonmated_top=np.concatenate([o.nonmated_top for o in outcomes]),
        nonmated_margin=np.concatenate([o.nonmated_margin for o in outcomes]),
        identities=outcomes[0].identities,
    )


@dataclass
class OpenSetReport:
    people: int
    photos: int
    candidates: int  # people with two or more photos: the largest possible gallery
    table: FarTable
    sizes: list[dict] = field(default_factory=list)
    outcomes: dict[int, SearchScores] = field(default_factory=dict)  # per gallery size, pooled
    variants: dict = field(default_factory=dict)
    serves: list[dict] = field(default_factory=list)  # the README table: FNIR at the target FPIR by size


def _rates(outcome: SearchScores) -> dict:
    rates = {"identities": outcome.identities, "mated_searches": len(outcome.mated_score),
             "nonmated_searches": len(outcome.nonmated_top), "rank1": rank1(outcome), "fnir_at_fpir": {}}
    for target in FPIR_TARGETS:
        supported = target * len(outcome.nonmated_top) >= 1  # the data can show at least one named stranger
        fnir, t = fnir_at_fpir(outcome, target)
        rates["fnir_at_fpir"][f"{target:g}"] = {
            "fnir": fnir, "threshold": None if not math.isfinite(t) else t, "supported": supported,
        }
    return rates


def evaluate_open_set(people: People, *, sizes: list[int], repeats: int, seed: int, policy: IdentifyPolicy,
                      table_rule: str, target_fpir: float, per_person: int = 1, template: str = "mean",
                      cohort_people: int = 300) -> OpenSetReport:
    x, labels = people.embeddings, people.labels
    similarity = x @ x.T
    counts = np.bincount(labels, minlength=len(people.names))
    candidates = int((counts >= 2).sum())
    edges, hist, pairs = impostor_histogram(x, labels)
    table = build_far_table(edges, hist, pairs, rule=table_rule)
    policy = IdentifyPolicy(table, target_fpir, policy.verify_threshold)
    report = OpenSetReport(people=len(people.names), photos=people.photos, candidates=candidates, table=table)

    rng = np.random.default_rng(seed)
    for n in sorted({min(s, candidates) for s in sizes}):
        draws = 1 if n == candidates else repeats
        outcome = pooled([
            run_search(similarity, x, labels, open_set_split(labels, n, rng, per_person=per_person), template)
            for _ in range(draws)
        ])
        report.outcomes[n] = outcome
        row = {"draws": draws, **_rates(outcome)}
        decided = policy.decide(n)
        row["policy"] = {
            "threshold": decided.threshold, "target_fpir": target_fpir, "expected_fpir": decided.expected_fpir,
            "measured_fpir": fpir_at(outcome, decided.threshold), "fnir": fnir_at(outcome, decided.threshold),
            "extrapolated": decided.extrapolated,
        }
        # The prediction checked where it can be: at the thresholds that give the measured FPIR targets.
        row["prediction"] = [
            {"threshold": t, "measured_fpir": fpir_at(outcome, t), "predicted_fpir": fpir(table.far_at(t), n)}
            for t in sorted({round(float(v), 4) for v in np.linspace(0.3, 0.75, 10)})
        ]
        report.sizes.append(row)

    largest = report.outcomes[max(report.outcomes)]
    for n in README_SIZES:
        decided = policy.decide(n)
        measured = report.outcomes.get(n)
        report.serves.append({
            "identities": n,
            "threshold": decided.threshold,
            "expected_fpir": decided.expected_fpir,
            "fnir": fnir_at(measured if measured is not None else largest, decided.threshold),
            "measured": measured is not None,
            "far_extrapolated": decided.extrapolated,
        })

    report.variants = _variants(people, similarity, counts, rng, cohort_people, target_fpir)
    return report


def _variants(people: People, similarity: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
              cohort_people: int, target_fpir: float) -> dict:
    """Each candidate decision rule on one common split, against the plain one (best face, raw score)."""
    x, labels = people.embeddings, people.labels
    singletons = np.flatnonzero(counts == 1)
    cohort_labels = rng.choice(singletons, size=min(cohort_people, len(singletons) // 2), replace=False)
    cohort = np.flatnonzero(np.isin(labels, cohort_labels))
    eligible = int((np.bincount(np.delete(labels, cohort), minlength=len(counts)) >= 2).sum())
    split1 = open_set_split(labels, eligible, rng, per_person=1, exclude=cohort)
    split3 = open_set_split(labels, eligible, np.random.default_rng(rng.integers(1 << 31)), per_person=3,
                            exclude=cohort)

    def summary(outcome: SearchScores, margin: float = 0.0) -> dict:
        return {
            "rank1": rank1(outcome),
            **{f"fnir_at_fpir_{t:g}": fnir_at_fpir(outcome, t, margin)[0] for t in FPIR_TARGETS},
            "mated_searches": len(outcome.mated_score), "nonmated_searches": len(outcome.nonmated_top),
        }

    base = run_search(similarity, x, labels, split1)
    result = {"identities": eligible, "cohort_photos": len(cohort), "baseline": summary(base)}
    result["cohort_tnorm"] = summary(run_search(similarity, x, labels, split1, cohort=cohort))
    result["margin"] = {f"{m:g}": summary(base, m) for m in (0.02, 0.05, 0.1)}
    result["templates_3_photos"] = {
        t: summary(run_search(similarity, x, labels, split3, template=t)) for t in ("best", "mean", "both")
    }
    result["enrolled_photos"] = {"1": summary(base), "up to 3 (best face)": result["templates_3_photos"]["best"]}
    return result


def report_lines(report: OpenSetReport, target_fpir: float) -> list[str]:
    t = report.table
    lines = [
        (f"{report.people} people, {report.photos} photos with a face; {report.candidates} people with 2+ photos "
         "(largest gallery)"),
        (f"FAR(t) from {t.impostor_pairs:,} different-person pairs: measured down to FAR "
         f"{t.smallest_measured_far:.2g} at t = {t.measured_to:.3f}; beyond that a fitted tail"),
    ]
    for row in report.sizes:
        fnirs = ", ".join(
            f"FNIR@FPIR {k} = {v['fnir']:.3f}" + ("" if v["supported"] else " (too few strangers)")
            for k, v in row["fnir_at_fpir"].items()
        )
        p = row["policy"]
        lines.append(f"N = {row['identities']} ({row['draws']} draws, {row['mated_searches']} mated, "
                     f"{row['nonmated_searches']} non-mated searches): rank-1 {row['rank1']:.3f}; {fnirs}")
        lines.append(f"    policy at target FPIR {target_fpir:g}: threshold {p['threshold']:.4f}, expected FPIR "
                     f"{p['expected_fpir']:.4f}, measured FPIR {p['measured_fpir']:.4f}, FNIR {p['fnir']:.3f}")
    lines.append(f"how large a gallery this model serves (target FPIR {target_fpir:g}):")
    for row in report.serves:
        kind = "measured" if row["measured"] else "predicted"
        tail = ", FAR beyond the measured range" if row["far_extrapolated"] else ""
        lines.append(f"    N = {row['identities']:>9,}: threshold {row['threshold']:.4f}, FNIR {row['fnir']:.3f} "
                     f"({kind}{tail})")
    v = report.variants
    lines.append(f"variants on one split ({v['identities']} identities, cohort of {v['cohort_photos']} photos "
                 "left out of every search):")

    def fmt(s):
        return (f"rank-1 {s['rank1']:.3f}, FNIR@FPIR 0.1/0.01/0.001 = {s['fnir_at_fpir_0.1']:.3f}/"
                f"{s['fnir_at_fpir_0.01']:.3f}/{s['fnir_at_fpir_0.001']:.3f}")

    lines.append(f"    baseline (best face, raw cosine): {fmt(v['baseline'])}")
    lines.append(f"    cohort T-norm:                    {fmt(v['cohort_tnorm'])}")
    for m, s in v["margin"].items():
        lines.append(f"    margin >= {m:<5}:                  {fmt(s)}")
    for name, s in v["templates_3_photos"].items():
        lines.append(f"    up to 3 photos, template {name:<5}:   {fmt(s)}")
    return lines


def plot_det(report: OpenSetReport, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=110)
    for n, outcome in sorted(report.outcomes.items()):
        f, m, _ = det_curve(outcome)
        floor = 0.5 / max(1, len(outcome.nonmated_top))
        ax.step(np.maximum(f, floor), m, where="post", label=f"N = {n}")
    ax.set_xscale("log")
    ax.set_xlim(5e-4, 1)
    ax.set_ylim(0, 0.5)
    ax.set_xlabel("FPIR (strangers named as someone)")
    ax.set_ylabel("FNIR (enrolled people missed or misnamed)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_prediction(report: OpenSetReport, path, title: str) -> None:
    """Measured FPIR against threshold for each gallery size, with the FAR-table prediction as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=110)
    grid = np.linspace(0.25, 0.8, 111)
    for k, (n, outcome) in enumerate(sorted(report.outcomes.items())):
        measured = [fpir_at(outcome, t) for t in grid]
        predicted = [fpir(report.table.far_at(t), n) for t in grid]
        ax.plot(grid, measured, color=f"C{k}", label=f"N = {n} measured")
        ax.plot(grid, predicted, color=f"C{k}", linestyle="--", label=f"N = {n} predicted")
    ax.axvline(report.table.measured_to, color="grey", linestyle=":", label="FAR measured up to here")
    ax.set_yscale("log")
    ax.set_ylim(5e-4, 1.05)
    ax.set_xlabel("threshold (cosine)")
    ax.set_ylabel("FPIR")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
