"""Multi-resolution hash encoding (Instant-NGP, Mueller et al. 2022) and its tri-plane variant.

Level l has resolution ``N_l = floor(base * b**l)`` with ``b = exp((ln finest - ln base) / (L-1))``.
A point ``x`` in [0, 1]^D is scaled to ``x * N_l``; the 2^D corners of its cell are looked
up in the level's table of ``2**log2_table`` feature vectors, directly when the grid fits
(``(N_l + 1)^D <= table size``), else by the spatial hash
``(c_0 * 1) XOR (c_1 * 2654435761) XOR (c_2 * 805459861) mod table size``, and blended
(multi)linearly. Output: ``[N, L * F]``.

Backends behind one module: ``torch`` (the reference: plain PyTorch, any device,
differentiable), ``cuda`` (gstalk's own kernels in ``csrc/hashgrid_kernels.cu``) and ``cpu``
(``csrc/hashgrid_cpu.cpp``: the reference's arithmetic in the reference's order, float32 and
float64), both built by :mod:`gstalk.kernels`. ``auto`` picks the kernel for the tensors'
device where it builds (on the CPU, where the positions need no gradient), torch otherwise
(the rule of :mod:`gstalk.kernels`). The compiled backends give gradients for the tables, not
for the input positions (canonical positions are constants in gstalk; they refuse positions
that require a gradient); the torch backend gives both. (tiny-cuda-nn's encoding hashes and
lays out its tables otherwise, so it cannot read these tables; it is not a backend.)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from gstalk.errors import InputError

PRIMES = (1, 2654435761, 805459861)
Backend = Literal["auto", "torch", "cuda", "cpu"]


def level_resolutions(levels: int, base: int, finest: int) -> list[int]:
    if levels == 1:
        return [base]
    b = math.exp((math.log(finest) - math.log(base)) / (levels - 1))
    return [int(math.floor(base * b**lv)) for lv in range(levels)]


def corner_offsets(dim: int, device=None) -> Tensor:
    """[2^dim, dim] 0/1 offsets of a cell's corners (bit d of corner c = offset along d)."""
    c = torch.arange(2**dim, device=device)
    return torch.stack([(c >> d) & 1 for d in range(dim)], -1)


def grid_index(coords: Tensor, res: int, table_size: int) -> Tensor:
    """Integer corner coordinates [..., D] -> table indices (dense when the grid fits, else hashed)."""
    dim = coords.shape[-1]
    if (res + 1) ** dim <= table_size:
        idx = torch.zeros(coords.shape[:-1], dtype=torch.long, device=coords.device)
        stride = 1
        for d in range(dim):
            idx = idx + coords[..., d] * stride
            stride *= res + 1
        return idx
    h = torch.zeros(coords.shape[:-1], dtype=torch.long, device=coords.device)
    for d in range(dim):
        h = torch.bitwise_xor(h, coords[..., d] * PRIMES[d])
    return h & (table_size - 1)


def hash_encode_torch(x: Tensor, tables: Tensor, resolutions: list[int]) -> Tensor:
    """Reference encoding: ``x`` [N, D] in [0, 1], ``tables`` [L, T, F] -> [N, L*F].

    Every level's corners are looked up in one gather from the flattened tables, so the
    backward pass scatters into one table-sized gradient, not one per level (per level, the
    gradient of ``tables[lv]`` alone is a zero-filled copy of all L tables)."""
    n, dim = x.shape
    L, T, F = tables.shape
    offs = corner_offsets(dim, x.device)  # [C, D]
    idx, wts = [], []
    for lv in range(L):
        pos = x * resolutions[lv]
        p0 = torch.floor(pos)
        frac = pos - p0
        corners = p0.long()[:, None, :] + offs[None]  # [N, C, D]
        idx.append(grid_index(corners, resolutions[lv], T) + lv * T)  # [N, C] into the flattened tables
        wts.append(torch.where(offs[None].bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1))  # [N, C]
    feats = tables.reshape(L * T, F)[torch.stack(idx, 1)]  # [N, L, C, F]
    return (torch.stack(wts, 1)[..., None] * feats).sum(2).reshape(n, L * F)


class _CudaHashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tables, res_tensor, ext):
        out = ext.forward(x.contiguous(), tables.contiguous(), res_tensor)
        ctx.save_for_backward(x, res_tensor)
        ctx.ext, ctx.table_shape = ext, tables.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, res_tensor = ctx.saved_tensors
        gt = ctx.ext.backward(grad.contiguous(), x.contiguous(), res_tensor, *ctx.table_shape)
        return None, gt, None, None


class _CpuHashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tables, resolutions, ext):
        ctx.save_for_backward(x)
        ctx.ext, ctx.resolutions, ctx.table_shape = ext, resolutions, tables.shape
        return ext.hash_encode_forward(x, tables.contiguous(), resolutions)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return None, ctx.ext.hash_encode_backward(grad.contiguous(), x, ctx.resolutions, *ctx.table_shape), None, None


class HashGrid(nn.Module):
    """Learnable multi-resolution hash encoding of ``dim``-D points in [0, 1]^dim."""

    def __init__(self, dim: int = 3, levels: int = 16, features: int = 2, log2_table: int = 19, base: int = 16,
                 finest: int = 2048, backend: Backend = "auto", init_scale: float = 1e-4):
        super().__init__()
        if dim not in (2, 3):
            raise InputError("hash grids encode 2D or 3D points")
        if log2_table > 24 or levels < 1 or features < 1:
            raise InputError("hash grid: 1+ levels and features, table size at most 2^24")
        self.dim, self.levels, self.features, self.backend = dim, levels, features, backend
        self.table_size = 2**log2_table
        self.resolutions = level_resolutions(levels, base, finest)
        self.register_buffer("res_tensor", torch.tensor(self.resolutions, dtype=torch.int32), persistent=False)
        self.tables = nn.Parameter((torch.rand(levels, self.table_size, features) * 2 - 1) * init_scale)

    @property
    def out_dim(self) -> int:
        return self.levels * self.features

    def which_backend(self, x: Tensor) -> str:
        if self.backend == "auto":  # the kernel where it builds here, else the twin (gstalk.kernels)
            if x.is_cuda:
                from gstalk.kernels import cuda

                return "cuda" if cuda.available("hashgrid") else "torch"
            return "cpu" if self._cpu_kernel_refusal(x) is None else "torch"
        return self.backend

    def _cpu_kernel_refusal(self, x: Tensor) -> str | None:
        """Why the compiled CPU encoding cannot take ``x`` (None when it can): 'auto' then uses
        the PyTorch form, and ``backend="cpu"`` raises it."""
        from gstalk.kernels import cpu

        if x.device.type != "cpu" or x.dtype not in cpu.DTYPES or x.dtype != self.tables.dtype:
            return "the compiled CPU hash encoding takes float32 or float64 CPU points and tables of the same dtype"
        if x.requires_grad:
            return "the compiled CPU hash encoding gives no gradient for the positions: use 'torch'"
        if not cpu.available():
            return "the compiled CPU kernels could not be built here (or GSTALK_CPU_KERNEL=0): use 'torch'"
        return None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise InputError(f"hash grid input must be [N, {self.dim}], got {tuple(x.shape)}")
        # NaN survives the clamp and would index outside the tables (checked off the GPU only:
        # there it would cost a host-device sync per call)
        if not x.is_cuda and bool(torch.isnan(x).any()):
            raise InputError("hash grid input holds NaN positions (did the fit diverge?)")
        x = x.clamp(0.0, 1.0 - 1e-6)
        b = self.which_backend(x)
        if b == "torch":
            return hash_encode_torch(x, self.tables, self.resolutions)
        if b == "cuda":
            from gstalk.kernels import cuda

            return _CudaHashEncode.apply(x.float(), self.tables, self.res_tensor.to(x.device), cuda.load("hashgrid"))
        if b == "cpu":
            from gstalk.kernels import cpu

            refusal = self._cpu_kernel_refusal(x) if self.backend == "cpu" else None  # 'auto' checked it
            if refusal is not None:
                raise InputError(refusal)
            return _CpuHashEncode.apply(x.contiguous(), self.tables, self.resolutions, cpu.load())
        raise InputError(f"unknown hash-grid backend {b!r}: auto, torch, cuda or cpu")


class TriPlane(nn.Module):
    """Three 2D hash grids on the xy, yz and xz planes; features concatenated: [N, 3*L*F]."""

    PLANES = ((0, 1), (1, 2), (0, 2))

    def __init__(self, levels: int = 16, features: int = 2, log2_table: int = 17, base: int = 16,
                 finest: int = 1024, backend: Backend = "auto"):
        super().__init__()
        self.grids = nn.ModuleList(HashGrid(2, levels, features, log2_table, base, finest, backend)
                                   for _ in self.PLANES)

    @property
    def out_dim(self) -> int:
        return sum(g.out_dim for g in self.grids)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != 3:
            raise InputError(f"tri-plane input must be [N, 3], got {tuple(x.shape)}")
        return torch.cat([g(x[:, list(p)]) for g, p in zip(self.grids, self.PLANES)], -1)
