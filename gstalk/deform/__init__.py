"""The deformation field: hash-grid / tri-plane encodings (PyTorch, own CUDA kernels,
tiny-cuda-nn when importable), the audio/expression-conditioned heads (``field``) and their
factored inference form at fixed points, in float32 or half precision (``frozen``)."""
