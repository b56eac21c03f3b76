"""Label-free threshold calibration measured on a real line's ledger.

Calibrates a threshold from the ledger's scores alone (no labels), then uses the labels the file paths
carry (``source_ref`` in a folder named ``good`` = good part, any other folder = defective) to measure
what it would have done: the false-reject rate on good parts and the share of defective parts rejected.

    python bench/bench_calibration.py --ledger /tmp/bottle_line/ledger.sqlite --method all

Acceptance for a 1 % target (bottle stream: all train/good + test images): false-reject rate on good
parts within 0.5 %..3 % and >= 90 % of the defective parts rejected. Also printed: the same threshold
fitted on the first half of the stream and measured on the second (out of sample), and the fit time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from musc_edge.calibration.shadow import SCORED
from musc_edge.calibration.thresholds import METHODS, ThresholdError, fit_threshold, reject_rate
from musc_edge.edge.ledger import Ledger, LedgerError

FRR_WINDOW = (0.005, 0.03)
MIN_DEFECT_REJECTION = 0.90


def labelled_scores(ledger: Path, recipe: str, last: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores in stream order, defective mask, rows skipped for lacking a path) of the scored parts."""
    reader = Ledger.open_readonly(ledger)
    try:
        rows = [r for r in reader.iter_rows() if r.recipe == recipe and r.reason in SCORED and r.score is not None
                and not r.test_part]
    finally:
        reader.close()
    rows = rows[-last:] if last else rows
    known = [r for r in rows if r.source_ref]
    scores = np.array([r.score for r in known], np.float64)
    defective = np.array([Path(r.source_ref).parent.name != "good" for r in known], bool)
    return scores, defective, len(rows) - len(known)


def _timed(func, *args) -> float:
    t0 = time.perf_counter()
    func(*args)
    return time.perf_counter() - t0


def measure(fit_on: np.ndarray, scores: np.ndarray, defective: np.ndarray, target: float,
            method: str) -> tuple[float, float, float, float]:
    """(threshold, false-reject rate on good, defect rejection, best-of-20 fit seconds) of a threshold fitted
    on ``fit_on`` and applied to ``scores``."""
    threshold = fit_threshold(fit_on, target, method).threshold
    seconds = min(_timed(fit_threshold, fit_on, target, method) for _ in range(20))
    return threshold, reject_rate(scores[~defective], threshold), reject_rate(scores[defective], threshold), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", type=Path, default=Path("/tmp/bottle_line/ledger.sqlite"))
    parser.add_argument("--method", choices=(*METHODS, "all"), default="gumbel")
    parser.add_argument("--target-frr", type=float, default=0.01)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--last", type=int, help="only the last N scored parts (default: all)")
    args = parser.parse_args(argv)
    try:
        scores, defective, skipped = labelled_scores(args.ledger, args.recipe, args.last)
    except LedgerError as exc:
        print(f"bench_calibration: {exc}", file=sys.stderr)
        return 2
    n_good, n_bad = int((~defective).sum()), int(defective.sum())
    if not n_good or not n_bad:
        print(f"bench_calibration: {args.ledger} needs both good and defective scored parts "
              f"(found {n_good} good, {n_bad} defective)", file=sys.stderr)
        return 2
    print(f"ledger {args.ledger}: {len(scores)} scored parts of recipe {args.recipe!r} "
          f"({n_good} good, {n_bad} defective = {100 * n_bad / len(scores):.1f} % contamination)"
          + (f", {skipped} without a source path skipped" if skipped else ""))
    print(f"target false-reject rate {100 * args.target_frr:g} %; acceptance: good parts rejected "
          f"{100 * FRR_WINDOW[0]:g}..{100 * FRR_WINDOW[1]:g} %, defective parts rejected >= "
          f"{100 * MIN_DEFECT_REJECTION:g} %\n")
    half = len(scores) // 2
    print(f"{'':<10} {'':>10} {'all parts (in sample)':^32}   {'fit on 1st half, 2nd half':^26}")
    print(f"{'method':<10} {'threshold':>10} {'good rej.':>10} {'defects rej.':>13}  {'':<7}  {'good rej.':>10} "
          f"{'defects rej.':>13}  {'fit ms':>7}")
    methods = METHODS if args.method == "all" else (args.method,)
    failed = False
    for method in methods:
        try:
            threshold, frr, caught, seconds = measure(scores, scores, defective, args.target_frr, method)
            _, frr2, caught2, _ = measure(scores[:half], scores[half:], defective[half:], args.target_frr, method)
        except ThresholdError as exc:
            print(f"{method:<10} cannot calibrate: {exc}")
            failed = True
            continue
        ok = FRR_WINDOW[0] <= frr <= FRR_WINDOW[1] and caught >= MIN_DEFECT_REJECTION
        failed |= method == args.method and not ok
        verdict = "PASS" if ok else "fail"
        print(f"{method:<10} {threshold:>10.4f} {100 * frr:>8.2f} % {100 * caught:>11.1f} %  {verdict:<7}"
              f"  {100 * frr2:>8.2f} % {100 * caught2:>11.1f} %  {1e3 * seconds:>7.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
