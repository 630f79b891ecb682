"""``rasterize``: the one entry point, with a gsplat (CUDA) backend, a compiled CPU backend
(``csrc/raster_cpu.cpp``) and the pure-PyTorch reference backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence, Union

import torch
from torch import Tensor

from gstalk.errors import InputError
from gstalk.gaussians.set import GaussianSet, GaussianTensors, sh_degree_from_bases
from gstalk.render import cpu_ext, reference
from gstalk.render.camera import Cameras
from gstalk.render.project import covariance_3d, project, sh_colors

Backend = Literal["auto", "gsplat", "cpu", "torch"]
GaussiansLike = Union[GaussianSet, GaussianTensors, Mapping[str, Tensor]]
CamerasLike = Union[Cameras, Sequence[Cameras]]


@dataclass
class RenderOutput:
    """What :func:`rasterize` returns for C cameras and N Gaussians.

    colors [C, H, W, D] composited over the background; alphas [C, H, W, 1];
    depths [C, H, W, 1] expected camera z (0 where nothing was drawn);
    means2d [C, N, 2] screen positions in pixels, kept in the autograd graph (its
    ``.grad`` after backward is the screen-space gradient that densification uses);
    radii [C, N, 2] int32 screen half-extents (0 = not drawn); gaussian_depths [C, N];
    backend: which backend drew it.
    """

    colors: Tensor
    alphas: Tensor
    depths: Tensor
    means2d: Tensor
    radii: Tensor
    gaussian_depths: Tensor
    backend: str

    @property
    def visible(self) -> Tensor:
        """[C, N] bool: drawn in that camera."""
        return (self.radii > 0).all(dim=-1)


def select_backend(backend: Backend, device: torch.device) -> str:
    """The backend for tensors on ``device``: gsplat on CUDA where its CUDA code compiles; on
    the CPU the compiled compositor where it builds (:mod:`gstalk.render.cpu_ext`); else the
    PyTorch reference (the rule of :mod:`gstalk.kernels`: asked for by name, a backend that
    cannot run here is a GstalkError saying why)."""
    from gstalk.kernels import cuda

    if backend == "torch":
        return "torch"
    if backend == "gsplat":
        if torch.cuda.is_available() and device.type != "cuda":
            raise InputError("the gsplat backend needs the Gaussians on a CUDA device (call .to('cuda'))")
        if not cuda.gsplat_available():
            cuda.gsplat_check()  # raises, saying why
        return "gsplat"
    if backend == "cpu":
        if device.type != "cpu":
            raise InputError("the cpu backend needs the Gaussians on the CPU (call .to('cpu'))")
        if not cpu_ext.available():
            raise InputError("the cpu backend's compositor could not be built (see the logged reason, or "
                             "GSTALK_CPU_KERNEL); use backend='torch'")
        return "cpu"
    if backend != "auto":
        raise InputError(f"unknown render backend {backend!r}: choose 'auto', 'gsplat', 'cpu' or 'torch'")
    if device.type == "cuda" and torch.cuda.is_available():
        return "gsplat" if cuda.gsplat_available() else "torch"
    return "cpu" if device.type == "cpu" and cpu_ext.available() else "torch"


def _backend_for(backend: Backend, means: Tensor) -> str:
    """:func:`select_backend`, and the compiled CPU compositor only for float32 and float64
    (other dtypes go to the reference under 'auto')."""
    which = select_backend(backend, means.device)
    if which == "cpu" and means.dtype not in cpu_ext.DTYPES:
        if backend == "cpu":
            raise InputError(f"the cpu backend draws float32 or float64 Gaussians, got {means.dtype}; "
                             "use backend='torch'")
        which = "torch"
    return which


def _as_tensors(gaussians: GaussiansLike, sh_degree: int | None) -> tuple[GaussianTensors, int | None]:
    if isinstance(gaussians, GaussianSet):
        deg = gaussians.sh_degree if sh_degree is None else sh_degree
        if deg > gaussians.sh_degree:
            raise InputError(f"sh_degree {deg} asked for, but the Gaussians only have degree {gaussians.sh_degree}")
        return gaussians.activated(deg), deg
    if isinstance(gaussians, Mapping):
        try:
            gaussians = GaussianTensors(**{k: gaussians[k] for k in GaussianTensors._fields})
        except KeyError as e:
            raise InputError(f"Gaussian tensors are missing {e}; need {list(GaussianTensors._fields)}") from None
    if not isinstance(gaussians, GaussianTensors):
        raise InputError(f"rasterize takes a GaussianSet, GaussianTensors or a dict of tensors, "
                         f"got {type(gaussians).__name__}")
    if sh_degree is None and gaussians.colors.dim() == 3:
        sh_degree = sh_degree_from_bases(gaussians.colors.shape[1])
    return gaussians, sh_degree


def _validate(g: GaussianTensors, sh_degree: int | None) -> None:
    for name, t in g._asdict().items():
        if not isinstance(t, Tensor):
            raise InputError(f"Gaussian {name} must be a torch.Tensor, got {type(t).__name__}")
    n = g.means.shape[0] if g.means.dim() == 2 else -1
    if g.means.dim() != 2 or g.means.shape[1] != 3:
        raise InputError(f"means must be [N, 3], got {tuple(g.means.shape)}")
    for name, t, shape in (("quats", g.quats, (n, 4)), ("scales", g.scales, (n, 3)), ("opacities", g.opacities, (n,))):
        if tuple(t.shape) != shape:
            raise InputError(f"{name} must be {list(shape)} for N={n} Gaussians, got {tuple(t.shape)}")
    c = g.colors
    if sh_degree is not None:
        need = (sh_degree + 1) ** 2
        if c.dim() != 3 or c.shape[0] != n or c.shape[2] != 3 or c.shape[1] < need:
            raise InputError(f"with sh_degree={sh_degree} colors must be SH coefficients [N={n}, K>={need}, 3], "
                             f"got {tuple(c.shape)}")
    elif c.dim() != 2 or c.shape[0] != n:
        raise InputError(f"colors must be [N={n}, D] features (or [N, K, 3] SH with sh_degree), got {tuple(c.shape)}")
    dtypes = {t.dtype for t in g}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise InputError(f"Gaussian tensors must share one floating dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in g}
    if len(devices) != 1:
        raise InputError(f"Gaussian tensors are on several devices: {sorted(map(str, devices))}")
    if n and not bool(torch.isfinite(g.means).all() & torch.isfinite(g.scales).all()):
        raise InputError("Gaussian means or scales contain NaN or infinite values")


def _as_cameras(cameras: CamerasLike) -> Cameras:
    if isinstance(cameras, Cameras):
        return cameras
    if isinstance(cameras, Sequence) and cameras and all(isinstance(c, Cameras) for c in cameras):
        return Cameras.cat(list(cameras))
    raise InputError(f"cameras must be a Cameras object or a list of them, got {type(cameras).__name__}")


def rasterize(
    gaussians: GaussiansLike,
    cameras: CamerasLike,
    *,
    background: Tensor | float | Sequence[float] | None = None,
    sh_degree: int | None = None,
    backend: Backend = "auto",
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> RenderOutput:
    """Render Gaussians into one or more cameras.

    Args:
        gaussians: a :class:`GaussianSet` (raw parameters, activated here), or activated
            tensors (:class:`GaussianTensors` or a dict with means, quats, scales,
            opacities, colors).
        cameras: :class:`Cameras` (C views of one size) or a list of them.
        background: colour behind the Gaussians: a number, [D] or [C, D]; default black.
        sh_degree: SH degree to evaluate (colors [N, K, 3]); ``None`` for a GaussianSet
            means its full degree; for tensors, plain [N, D] features are composited as is.
        backend: 'auto' (gsplat when the tensors are on CUDA; on the CPU the compiled
            compositor, or the PyTorch reference where it cannot be built), 'gsplat', 'cpu'
            or 'torch' (the pure-PyTorch reference).
        near, far: depth clipping planes; eps2d: screen-space low-pass added to each
            2D covariance (pixels^2); tile_size: tile edge in pixels.

    Returns:
        :class:`RenderOutput` with colour, alpha and depth images and per-Gaussian screen data.
    """
    g, sh_degree = _as_tensors(gaussians, sh_degree)
    _validate(g, sh_degree)
    cams, bg = _cameras_and_background(cameras, g, sh_degree, background)
    which = _backend_for(backend, g.means)
    if which == "gsplat":
        return _rasterize_gsplat(g, cams.viewmats, cams.Ks, cams.width, cams.height, bg, sh_degree, near, far, eps2d,
                                 tile_size)
    return _rasterize_torch(g, cams, bg, sh_degree, near, far, eps2d, tile_size, which)


def rasterize_frames(
    gaussians: GaussianTensors,
    cameras: Cameras,
    *,
    background: Tensor | float | Sequence[float] | None = None,
    sh_degree: int | None = None,
    backend: Backend = "auto",
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> RenderOutput:
    """Render B frames, each its own Gaussians (activated tensors with a leading frame
    dimension: means [B, N, 3], ..., colors [B, N, K, 3] or [B, N, D]) seen by its own camera
    (``cameras``: B views, frame b by view b), in one call: an offline renderer's batch.
    gsplat draws them in one launch (its batch dimension); the reference draws them one by
    one. Arguments as :func:`rasterize`; the output has one image per frame (colors [B, H, W,
    D], means2d [B, N, 2], ...)."""
    if not isinstance(gaussians, GaussianTensors):
        raise InputError(f"rasterize_frames takes GaussianTensors with a frame dimension, "
                         f"got {type(gaussians).__name__}")
    if gaussians.means.dim() != 3:
        raise InputError(f"means must be [B, N, 3] (one set of Gaussians per frame), "
                         f"got {tuple(gaussians.means.shape)}")
    nb = gaussians.means.shape[0]
    if any(t.shape[:1] != (nb,) for t in gaussians):
        raise InputError(f"every Gaussian tensor must have the same {nb} frames first, got "
                         f"{[tuple(t.shape) for t in gaussians]}")
    if nb == 0:
        raise InputError("no frames to render")
    if sh_degree is None and gaussians.colors.dim() == 4:
        sh_degree = sh_degree_from_bases(gaussians.colors.shape[2])
    g = gaussians
    _validate(GaussianTensors(*(t[0] for t in g)), sh_degree)
    if not bool(torch.isfinite(g.means).all() & torch.isfinite(g.scales).all()):
        raise InputError("Gaussian means or scales contain NaN or infinite values")
    cams, bg = _cameras_and_background(cameras, g, sh_degree, background, frames=nb)
    which = _backend_for(backend, g.means)
    if which == "gsplat":
        # gsplat's batch dimension: frame b's Gaussians [b] seen by its one camera [b, 0]
        out = _rasterize_gsplat(g, cams.viewmats[:, None], cams.Ks[:, None], cams.width, cams.height, bg[:, None],
                                sh_degree, near, far, eps2d, tile_size)
        return RenderOutput(*(getattr(out, f)[:, 0] for f in _PER_VIEW), backend="gsplat")
    outs = [_rasterize_torch(GaussianTensors(*(t[b] for t in g)), cams[b:b + 1], bg[b:b + 1], sh_degree, near, far,
                             eps2d, tile_size, which) for b in range(nb)]
    return RenderOutput(*(torch.cat([getattr(o, f) for o in outs]) for f in _PER_VIEW), backend=which)


_PER_VIEW = ("colors", "alphas", "depths", "means2d", "radii", "gaussian_depths")  # RenderOutput's tensors, view first


def _cameras_and_background(cameras: CamerasLike, g: GaussianTensors, sh_degree: int | None, background,
                            frames: int | None = None) -> tuple[Cameras, Tensor]:
    """The cameras on the Gaussians' device and dtype, and the background [C, D] per view;
    ``frames``: the number of views :func:`rasterize_frames` needs (one per frame)."""
    cams = _as_cameras(cameras)
    if frames is not None and len(cams) != frames:
        raise InputError(f"{frames} frames need {frames} cameras (one each), got {len(cams)}")
    dev, dt = g.means.device, g.means.dtype
    d = 3 if sh_degree is not None else g.colors.shape[-1]
    return cams.to(device=dev, dtype=dt), _background(background, len(cams), d, dev, dt)


def _background(background, ncam: int, d: int, dev, dt) -> Tensor:
    if background is None:
        return torch.zeros(ncam, d, device=dev, dtype=dt)
    bg = torch.as_tensor(background, device=dev, dtype=dt)
    if bg.dim() == 0:
        bg = bg.expand(d)
    if bg.dim() == 1:
        bg = bg[None].expand(ncam, -1)
    if tuple(bg.shape) != (ncam, d):
        raise InputError(f"background must be a number, [D={d}] or [C={ncam}, D={d}], got {tuple(bg.shape)}")
    if not bool(torch.isfinite(bg).all()):
        raise InputError("background contains NaN or infinite values")
    return bg


def _rasterize_torch(g: GaussianTensors, cams: Cameras, bg: Tensor, sh_degree, near, far, eps2d, tile_size,
                     which: str = "torch"):
    """Projection and SH in PyTorch, then per view the compositor of ``which``: 'cpu' (the
    compiled one) or 'torch' (the reference)."""
    covars = covariance_3d(g.quats, g.scales)
    proj = project(g.means, covars, cams.viewmats, cams.Ks, cams.width, cams.height, eps2d=eps2d,
                   near=near, far=far, opacities=g.opacities)
    if proj.means2d.requires_grad:
        proj.means2d.retain_grad()
    if sh_degree is not None:
        colors = sh_colors(g.colors, g.means, cams.centers, sh_degree)  # [C, N, 3]
    else:
        colors = g.colors[None].expand(len(cams), -1, -1)
    composite = cpu_ext.composite if which == "cpu" else reference.composite
    outs_c, outs_a, outs_d = [], [], []
    for c in range(len(cams)):
        col, alpha, dep = composite(proj, c, g.opacities, colors[c], cams.width, cams.height, tile_size=tile_size)
        outs_c.append(col + (1 - alpha) * bg[c])
        outs_a.append(alpha)
        outs_d.append(dep / alpha.clamp_min(1e-10))
    return RenderOutput(colors=torch.stack(outs_c), alphas=torch.stack(outs_a), depths=torch.stack(outs_d),
                        means2d=proj.means2d, radii=proj.radii, gaussian_depths=proj.depths, backend=which)


def _rasterize_gsplat(g: GaussianTensors, viewmats: Tensor, Ks: Tensor, width: int, height: int, bg: Tensor,
                      sh_degree, near, far, eps2d, tile_size):
    from gsplat import rasterization  # imported only on CUDA machines

    render, alphas, meta = rasterization(
        g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks, width, height,
        near_plane=near, far_plane=far, eps2d=eps2d, sh_degree=sh_degree, packed=False, tile_size=tile_size,
        backgrounds=bg, render_mode="RGB+ED", rasterize_mode="classic",
    )
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"]
    if radii.dim() == means2d.dim() - 1:  # older gsplat: one radius per Gaussian
        radii = radii[..., None].expand(*radii.shape, 2)
    return RenderOutput(colors=render[..., :-1], alphas=alphas, depths=render[..., -1:], means2d=means2d,
                        radii=radii.to(torch.int32), gaussian_depths=meta["depths"], backend="gsplat")
