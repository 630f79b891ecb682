"""The deformation field: hash-grid / tri-plane encodings (PyTorch, own CPU and CUDA kernels),
the audio/expression-conditioned heads (``field``) and their
factored inference form at fixed points, in float32 or half precision (``frozen``)."""
