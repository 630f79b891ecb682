"""The composed avatar: bound Gaussians + deformation field + audio models; its folder format."""
