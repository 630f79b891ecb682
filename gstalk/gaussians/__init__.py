"""The canonical Gaussian set and its PLY format."""

from gstalk.gaussians.ply import load_ply, save_ply, standard_property_names
from gstalk.gaussians.set import (
    SH_C0,
    GaussianSet,
    GaussianTensors,
    num_sh_bases,
    rgb_to_sh,
    sh_degree_from_bases,
    sh_to_rgb,
)

__all__ = [
    "SH_C0", "GaussianSet", "GaussianTensors", "load_ply", "save_ply", "standard_property_names",
    "num_sh_bases", "rgb_to_sh", "sh_degree_from_bases", "sh_to_rgb",
]
