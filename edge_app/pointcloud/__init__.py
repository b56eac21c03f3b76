"""Organised point clouds: reading, preprocessing, grouping (FPS + IPG) and training-free 3D patch features."""
from .descriptors import DEFAULT_SCALES, descriptor_layers, estimate_normals, pair_descriptors
from .fpfh import FPFH_DIM, fpfh
from .io import CloudError, read_cloud, to_organised, valid_mask
from .ipg import Grouping, farthest_point_sampling, group_points, grow_groups, knn_groups, relative_groups
from .ipg import surface_variation
from .preprocess import PreparedCloud, PreprocessParams, fit_plane_ransac, foreground_mask, largest_cluster
from .patches import bilinear_weights, box_degrees, cell_centres, covered_pixels, pool_to_grid
from .pose import canonical_affine, frame_to_canonical, to_frame, warp_cloud, warp_image
from .preprocess import normalise_points, prepare_cloud, resize_nearest, zero_background

__all__ = [
    "CloudError", "DEFAULT_SCALES", "FPFH_DIM", "bilinear_weights", "box_degrees", "canonical_affine", "cell_centres",
    "covered_pixels", "fpfh", "pool_to_grid", "Grouping", "PreparedCloud", "PreprocessParams", "descriptor_layers",
    "estimate_normals", "farthest_point_sampling", "fit_plane_ransac", "foreground_mask", "group_points",
    "grow_groups", "knn_groups", "largest_cluster", "normalise_points", "pair_descriptors", "prepare_cloud",
    "read_cloud", "relative_groups", "resize_nearest", "surface_variation", "to_organised", "valid_mask",
    "frame_to_canonical", "to_frame", "warp_cloud", "warp_image", "zero_background",
]
