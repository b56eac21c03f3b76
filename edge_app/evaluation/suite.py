"""``musc-edge eval --suite DIR``: every category under a folder, every modality it has, one table and one JSON.

This is how defaults are chosen: a setting is judged by the mean *and* the worst category of the suite, not
by one category. Categories are found by their ``test/`` folder (MVTec AD and MVTec 3D-AD layouts, at any
depth up to :data:`MAX_DEPTH`); all of them are scored in 2D, and those whose every test image has an ``xyz``
point cloud also in 3D and 2D+3D (through :mod:`.runner3d`). A category that fails is reported with its error
and the suite goes on.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import ScanSettings
from .datasets import MVTEC_3D_AD, DatasetError, detect_layout, load_dataset
from .metrics import METRIC_KEYS, MetricsError
from .runner import STREAMED_MODES, EvalSettings, run_eval

MAX_DEPTH = 3
MODALITIES = ("2d", "3d", "2d+3d")
TABLE_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pro")
_HEADINGS = ("img AUROC", "img AP", "px AUROC", "px AP", "PRO")


@dataclass
class SuiteSettings:
    root: Path
    template: EvalSettings                       # every run's settings; ``dataset`` is replaced per category
    scan: ScanSettings = field(default_factory=ScanSettings)
    modalities: tuple[str, ...] = MODALITIES     # those a category has are run


def find_categories(root: str | Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Category folders (holding a ``test/`` folder) under ``root``, sorted; ``root`` itself may be one."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"suite folder {root} does not exist or is not a folder")
    found, frontier = [], [root]
    for _ in range(max_depth + 1):
        nxt = []
        for folder in frontier:
            if (folder / "test").is_dir():
                found.append(folder)
            else:
                nxt += [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        frontier = nxt
    if not found:
        raise DatasetError(f"no category under {root}: expected folders with a test/ subfolder "
                           "(MVTec AD or MVTec 3D-AD layout), e.g. {root}/mvtec_ad/bottle/test")
    return sorted(found)


def category_modalities(folder: Path) -> tuple[str, ...]:
    """``2d`` for every category; ``3d`` and ``2d+3d`` too when every test image has its point cloud."""
    if detect_layout(folder) == MVTEC_3D_AD and all(s.xyz_path is not None for s in load_dataset(folder)):
        return MODALITIES
    return ("2d",)


def _run_one(settings: SuiteSettings, folder: Path, modality: str) -> dict:
    run = replace(settings.template, dataset=folder)
    if modality == "2d":
        return run_eval(run)
    from .runner3d import Eval3DSettings, run_eval3d

    fields = {k: getattr(run, k) for k in EvalSettings.__dataclass_fields__}
    return run_eval3d(Eval3DSettings(**fields, modality=modality, scan=settings.scan))


def summarise(runs: list[dict]) -> dict:
    """Per modality: the mean and the worst (lowest) of every metric over the categories that ran."""
    summary = {}
    for modality in MODALITIES:
        done = [r for r in runs if r["modality"] == modality and "report" in r]
        if not done:
            continue
        mean, worst, worst_category = {}, {}, {}
        for key in METRIC_KEYS:
            values = [(r["report"][key], r["category"]) for r in done if r["report"][key] is not None]
            if values:
                mean[key] = float(np.mean([v for v, _ in values]))
                worst[key], worst_category[key] = min(values)
        summary[modality] = {"categories": len(done), "mean": mean, "worst": worst, "worst_category": worst_category}
    return summary


def run_suite(settings: SuiteSettings) -> dict:
    """Score every (category, modality) of the suite; the report holds each run's report and the summary."""
    t_start = time.monotonic()
    root = Path(settings.root)
    plan = [(folder, m) for folder in find_categories(root) for m in category_modalities(folder)
            if m in settings.modalities]
    runs = []
    for i, (folder, modality) in enumerate(plan, 1):
        name = folder.relative_to(root).as_posix() if folder != root else folder.name
        if settings.template.progress:
            print(f"suite [{i}/{len(plan)}] {name} {modality}", file=sys.stderr, flush=True)
        entry: dict = {"category": name, "modality": modality}
        try:
            entry["report"] = _run_one(settings, folder, modality)
        except (DatasetError, MetricsError, ValueError) as exc:
            entry["error"] = str(exc)
            print(f"suite: {name} {modality} failed: {exc}", file=sys.stderr, flush=True)
        runs.append(entry)
    t = settings.template
    return {"suite": str(root),
            "settings": {"mode": t.mode, "size": t.size, "fit": t.fit, "blocks": list(t.blocks),
                         "aggregation": t.params.aggregation, "image_top": t.params.image_top,
                         "pool": t.pool if t.mode in STREAMED_MODES else None},
            "runs": runs, "summary": summarise(runs), "seconds": round(time.monotonic() - t_start, 3)}


def format_suite(report: dict) -> str:
    """The suite as one table: a row per (category, modality), then the mean and the worst per modality."""
    def cell(v) -> str:
        return f"{v:9.1f}" if v is not None else "      n/a"

    width = max([len(r["category"]) for r in report["runs"]] + [24])
    s = report["settings"]
    lines = [f"suite {report['suite']}  mode {s['mode']}  size {s['size']}  fit {s['fit']}  blocks "
             f"{','.join(map(str, s['blocks']))}  aggregation {s['aggregation']}", "",
             f"{'category':<{width}}  {'modality':<8}" + "".join(f"{h:>10}" for h in _HEADINGS) + "   seconds"]
    for r in report["runs"]:
        head = f"{r['category']:<{width}}  {r['modality']:<8}"
        if "error" in r:
            lines.append(f"{head}  error: {r['error']}")
            continue
        rep = r["report"]
        lines.append(head + "".join(f" {cell(rep[k])}" for k in TABLE_KEYS) + f"  {rep['seconds']['total']:8.1f}")
    for modality, summ in report["summary"].items():
        lines.append("")
        for label in ("mean", "worst"):
            row = f"{label + ' (' + str(summ['categories']) + ')':<{width}}  {modality:<8}"
            lines.append(row + "".join(f" {cell(summ[label].get(k))}" for k in TABLE_KEYS))
        lines.append(f"{'  worst is':<{width}}  {'':<8}" + "".join(
            f" {summ['worst_category'].get(k, '-').split('/')[-1][:9]:>9}" for k in TABLE_KEYS))
    lines += ["", f"total {report['seconds']:.1f} s"]
    return "\n".join(lines)
