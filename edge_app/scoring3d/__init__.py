"""MuSc-V2 3D and multimodal scoring: SNAMD-3D, CAE, 3D maps and the 2d / 3d / 2d+3d pipeline."""
from .cae import Projection, cae, histogram_match, projection
from .map3d import Propagation, centre_map, propagation
from .multimodal import (MODES, FusionParams, MultimodalBatch, MultimodalResult, Params3D, Sample3D,
                         fpfh_sample, patch_degrees,
                         batch_euclidean_distances, euclidean_sample_distances, prepare_3d, sample_from_cloud,
                         sample_from_tokens,
                         score_batch, score_one, stack_layers)
from .snamd3d import adaptive_pool_matrix, nearest_centres, snamd3d

__all__ = [
    "FusionParams", "MODES", "MultimodalBatch", "MultimodalResult", "Params3D", "Projection", "Propagation",
    "Sample3D", "adaptive_pool_matrix", "batch_euclidean_distances", "cae", "centre_map",
    "euclidean_sample_distances", "fpfh_sample", "patch_degrees", "histogram_match", "nearest_centres", "prepare_3d", "projection", "propagation",
    "sample_from_cloud", "sample_from_tokens", "score_batch", "score_one", "snamd3d", "stack_layers",
]
