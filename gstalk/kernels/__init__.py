"""Building and loading gstalk's compiled kernels (``csrc/``), in one place below everything
that uses them.

- :mod:`gstalk.kernels.cpu`: one C++ module (the compositor of :mod:`gstalk.render.cpu_ext`
  and the hash encoding of :mod:`gstalk.deform.hashgrid`), built with torch's extension
  loader on first use (a C++ compiler and Python's headers; about 30 s once).
- :mod:`gstalk.kernels.cuda`: the CUDA modules (hash encoding, posing), built only where
  ``torch.cuda.is_available()``; also gsplat's CUDA code, which gsplat compiles itself.

**One rule for every kernel.** A backend chosen automatically ('auto') uses a kernel when it
builds and loads here (asked once per process; a failure is logged once) and its PyTorch twin
otherwise, with the same results. A backend asked for by name ('cpu', 'cuda', 'gsplat') that
cannot be built raises a :class:`gstalk.errors.GstalkError` that says why. Each kernel's
PyTorch twin lives beside the code that uses it, and the tests compare the two.
"""

from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
