"""The deformation field: hash-grid / tri-plane encodings (PyTorch, own CUDA kernels,
tiny-cuda-nn when importable) and the audio/expression-conditioned heads."""
