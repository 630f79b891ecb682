"""The canonical Gaussian set: raw (pre-activation) parameters and their activations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from gstalk.errors import InputError

SH_C0 = 0.28209479177387814
"""Zeroth real spherical-harmonic basis constant: rgb = SH_C0 * f_dc + 0.5."""


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per channel for ``degree`` (0..3): (degree + 1) ** 2."""
    if degree not in (0, 1, 2, 3):
        raise InputError(f"SH degree must be 0, 1, 2 or 3, got {degree}")
    return (degree + 1) ** 2


def sh_degree_from_bases(k: int) -> int:
    d = int(round(math.sqrt(k))) - 1
    if d not in (0, 1, 2, 3) or (d + 1) ** 2 != k:
        raise InputError(f"{k} SH coefficients per channel is not (d+1)^2 for a degree d in 0..3")
    return d


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """Colour in [0, 1] to the DC SH coefficient that renders as that colour."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh_dc: Tensor) -> Tensor:
    return sh_dc * SH_C0 + 0.5


class GaussianTensors(NamedTuple):
    """Activated Gaussian parameters, the form the rasterizer takes.

    means [N, 3] world positions; quats [N, 4] (w, x, y, z), need not be normalised;
    scales [N, 3] standard deviations (positive); opacities [N] in (0, 1);
    colors [N, K, 3] SH coefficients (with ``sh_degree``) or [N, D] plain features.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor


@dataclass
class GaussianSet:
    """A set of N 3D Gaussians in raw, optimisable form.

    Attributes:
        means: [N, 3] positions (metres).
        quats: [N, 4] rotations (w, x, y, z); normalised on use.
        log_scales: [N, 3] log of the per-axis standard deviations.
        opacity_logits: [N] logit of opacity.
        sh: [N, K, 3] spherical-harmonic coefficients, K = (degree + 1) ** 2; ``sh[:, 0]``
            is the DC term (``f_dc`` in PLY files), the rest ``f_rest``.
        binding: optional [N] int64 index of each Gaussian's parent triangle (-1 = unbound).
        extra: further per-Gaussian arrays ([N] or [N, k]) kept on PLY round-trip.
    """

    means: Tensor
    quats: Tensor
    log_scales: Tensor
    opacity_logits: Tensor
    sh: Tensor
    binding: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        n = self.means.shape[0] if self.means.dim() >= 1 else -1
        expect = {
            "means": (self.means, (n, 3)),
            "quats": (self.quats, (n, 4)),
            "log_scales": (self.log_scales, (n, 3)),
            "opacity_logits": (self.opacity_logits, (n,)),
        }
        for name, (t, shape) in expect.items():
            if not isinstance(t, Tensor):
                raise InputError(f"GaussianSet.{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise InputError(f"GaussianSet.{name} has shape {tuple(t.shape)}, expected {list(shape)}")
        if self.sh.dim() != 3 or self.sh.shape[0] != n or self.sh.shape[2] != 3:
            raise InputError(f"GaussianSet.sh has shape {tuple(self.sh.shape)}, expected [N={n}, K, 3]")
        sh_degree_from_bases(self.sh.shape[1])
        if self.binding is not None and tuple(self.binding.shape) != (n,):
            raise InputError(f"GaussianSet.binding has shape {tuple(self.binding.shape)}, expected [{n}]")
        for k, v in self.extra.items():
            if v.shape[0] != n or v.dim() > 2:
                raise InputError(f"GaussianSet.extra[{k!r}] has shape {tuple(v.shape)}, expected [{n}] or [{n}, k]")

    # ------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return sh_degree_from_bases(self.sh.shape[1])

    @property
    def device(self) -> torch.device:
        return self.means.device

    def activated(self, sh_degree: int | None = None) -> GaussianTensors:
        """Activated tensors for the rasterizer (SH truncated to ``sh_degree`` if given)."""
        sh = self.sh if sh_degree is None else self.sh[:, : num_sh_bases(sh_degree)]
        return GaussianTensors(
            means=self.means,
            quats=self.quats,
            scales=torch.exp(self.log_scales),
            opacities=torch.sigmoid(self.opacity_logits),
            colors=sh,
        )

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                yield f.name, v

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GaussianSet":
        def conv(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return GaussianSet(
            means=conv(self.means), quats=conv(self.quats), log_scales=conv(self.log_scales),
            opacity_logits=conv(self.opacity_logits), sh=conv(self.sh),
            binding=None if self.binding is None else conv(self.binding),
            extra={k: conv(v) for k, v in self.extra.items()},
        )

    def nonfinite(self) -> Tensor:
        """[N] bool: the Gaussians with a NaN or infinite parameter."""
        bad = torch.zeros(len(self), dtype=torch.bool, device=self.means.device)
        for t in (self.means, self.quats, self.log_scales, self.opacity_logits[:, None], self.sh.flatten(1)):
            bad |= ~torch.isfinite(t.detach()).all(-1)
        return bad

    def check_finite(self, what: str) -> None:
        """Refuse Gaussians with NaN or infinite parameters (a diverged fit, a damaged file),
        saying how many, for ``what`` (the file being written)."""
        bad = self.nonfinite()
        if bool(bad.any()):
            raise InputError(f"{int(bad.sum())} of the {len(self)} Gaussians for {what} hold NaN or infinite values "
                             "(a diverged fit or a damaged file); nothing was written")

    def subset(self, index: Tensor) -> "GaussianSet":
        """The Gaussians picked by a boolean mask or an index tensor (bindings kept)."""
        return GaussianSet(
            means=self.means[index], quats=self.quats[index], log_scales=self.log_scales[index],
            opacity_logits=self.opacity_logits[index], sh=self.sh[index],
            binding=None if self.binding is None else self.binding[index],
            extra={k: v[index] for k, v in self.extra.items()},
        )

    def detach(self) -> "GaussianSet":
        return GaussianSet(
            means=self.means.detach(), quats=self.quats.detach(), log_scales=self.log_scales.detach(),
            opacity_logits=self.opacity_logits.detach(), sh=self.sh.detach(),
            binding=None if self.binding is None else self.binding.detach(),
            extra={k: v.detach() for k, v in self.extra.items()},
        )

    def optimizable(self) -> dict[str, Tensor]:
        """The float parameters as leaf tensors that require grad (modifies self in place)."""
        out = {}
        for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
            t = getattr(self, name).detach().clone().requires_grad_(True)
            setattr(self, name, t)
            out[name] = t
        return out

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_points(
        cls,
        points: Tensor,
        colors: Tensor | None = None,
        scale: float | Tensor = 0.01,
        opacity: float = 0.5,
        sh_degree: int = 0,
        binding: Tensor | None = None,
    ) -> "GaussianSet":
        """Isotropic Gaussians at ``points`` [N, 3] with rgb ``colors`` [N, 3] in [0, 1]."""
        if points.dim() != 2 or points.shape[1] != 3:
            raise InputError(f"points must be [N, 3], got {tuple(points.shape)}")
        n = points.shape[0]
        dtype = points.dtype if points.is_floating_point() else torch.float32
        points = points.to(dtype)
        if colors is None:
            colors = torch.full((n, 3), 0.5, dtype=dtype, device=points.device)
        sh = torch.zeros(n, num_sh_bases(sh_degree), 3, dtype=dtype, device=points.device)
        sh[:, 0] = rgb_to_sh(colors.to(dtype))
        scale_t = torch.as_tensor(scale, dtype=dtype, device=points.device)
        log_s = torch.log(scale_t)
        log_scales = (log_s.expand(n, 3) if scale_t.dim() == 0 else log_s.reshape(n, -1).expand(n, 3)).clone()
        quats = torch.zeros(n, 4, dtype=dtype, device=points.device)
        quats[:, 0] = 1.0
        p = min(max(opacity, 1e-6), 1 - 1e-6)
        return cls(
            means=points.clone(), quats=quats, log_scales=log_scales,
            opacity_logits=torch.full((n,), math.log(p / (1 - p)), dtype=dtype, device=points.device),
            sh=sh, binding=binding,
        )

    @classmethod
    def random(cls, n: int, sh_degree: int = 0, extent: float = 1.0, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> "GaussianSet":
        """Random Gaussians in a cube of half-size ``extent`` (for tests and benchmarks)."""
        g = torch.Generator().manual_seed(seed)
        means = (torch.rand(n, 3, generator=g, dtype=dtype) * 2 - 1) * extent
        quats = torch.randn(n, 4, generator=g, dtype=dtype)
        log_scales = torch.log(torch.rand(n, 3, generator=g, dtype=dtype) * 0.04 * extent + 0.01 * extent)
        opacity_logits = torch.randn(n, generator=g, dtype=dtype)
        sh = torch.randn(n, num_sh_bases(sh_degree), 3, generator=g, dtype=dtype) * 0.3
        sh[:, 0] = torch.randn(n, 3, generator=g, dtype=dtype)
        return cls(means=means, quats=quats, log_scales=log_scales, opacity_logits=opacity_logits, sh=sh)


def to_gaussian_set(g: GaussianTensors) -> GaussianSet:
    """Activated Gaussians (a posed frame) back to raw PLY parameters."""
    op = g.opacities.detach().double().clamp(1e-7, 1 - 1e-7)
    return GaussianSet(g.means.detach().cpu().float(), g.quats.detach().cpu().float(),
                       torch.log(g.scales.detach().clamp_min(1e-12)).cpu().float(),
                       torch.log(op / (1 - op)).float().cpu(), g.colors.detach().cpu().float())


def splat_rgb(g: GaussianTensors) -> torch.Tensor:
    """[N, 3] RGB in [0, 1] (on g's device) for splat viewers that take one colour a Gaussian:
    plain colours [N, 3] as they are (:func:`gstalk.avatar.views.other_view`), else the SH's DC."""
    rgb = g.colors if g.colors.dim() == 2 else g.colors[:, 0] * SH_C0 + 0.5
    return rgb.detach().clamp(0, 1)
