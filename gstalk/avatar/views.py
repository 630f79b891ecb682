"""What other viewpoints show. One still camera saw the head from one side: the Gaussians it
never showed face-on (the sides and back of the head) learnt only to blend the outline into
the background, and the ones it saw end-on could grow along its rays unseen. From any other
camera, :func:`other_view` draws the first with colours, sizes and opacities taken from what
the clip did show (the view fill, :func:`set_view_fill`) and the second shortened (the ray
cut, :func:`set_ray_cut`), faded in between 5 and 25 degrees from the training camera
(:func:`fill_weight`); the training camera's own view is as trained.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gstalk.avatar.model import Avatar, Frame
from gstalk.gaussians.set import GaussianTensors
from gstalk.head.lbs import FlameParams
from gstalk.render import Cameras, rasterize_frames
from gstalk.render.project import quat_to_rotmat, sh_colors


def nearest_of(points: Tensor, sources: Tensor, targets: Tensor, k: int = 0) -> Tensor:
    """For each of the ``targets`` (a mask over ``points`` [N, 3]), the index into ``points``
    of the nearest of the ``sources`` (a mask; at least one): [T]; with ``k``, of the ``k``
    nearest, nearest first: [T, k] (where there are fewer sources, the farthest repeats)."""
    from scipy.spatial import cKDTree

    pts = points.detach().double().cpu().numpy()
    src = torch.nonzero(sources)[:, 0]
    q = pts[targets.cpu().numpy()]
    tree = cKDTree(pts[src.cpu().numpy()])
    if k <= 0:
        return src[torch.as_tensor(tree.query(q)[1], device=src.device)]
    m = min(k, len(src))
    j = np.asarray(tree.query(q, k=m)[1]).reshape(len(q), m)
    j = np.concatenate([j, np.repeat(j[:, -1:], k - m, 1)], 1)
    return src[torch.as_tensor(j, device=src.device)]


def middle_mean(colours: Tensor, trim: float = 0.25) -> Tensor:
    """[..., 3] the mean of the middle of each set of ``colours`` [..., K, 3]: ordered by
    brightness (the mean of the channels), the darkest and the lightest ``trim`` of them are
    left out. One odd colour (a dark parting, a grey that blended into the wall) is left out
    or counts for 1/(K/2); and where the set mixes two colours (brown hair with blonde
    highlights) the result moves from one to the other as the mix does, always on the line
    between them. A median taken channel by channel instead flips between them where their
    counts cross, in patches, and can take red and green from one and blue from the other (on
    a 128-px fit of hill_8s: olive blotches on brown-and-blonde hair)."""
    k = colours.shape[-2]
    cut = int(k * trim)
    order = colours.mean(-1).argsort(-1)[..., cut:k - cut]
    return colours.gather(-2, order[..., None].expand(*order.shape, colours.shape[-1])).mean(-2)


def drawn_pixels(g: GaussianTensors, cams: Cameras) -> Tensor:
    """[N] how much each of the Gaussians ``g`` (frames first: means [B, N, 3], ...) shows in the
    frames ``cams`` ([B] cameras) draw, summed over them, in pixels: the sum over the pixels of
    its alpha times transmittance (the gradient of the images' sum with respect to a colour of
    one for every Gaussian). A Gaussian behind others or outside the frame draws 0."""
    # three channels of ones, as every other render (gsplat's kernels are built for those counts)
    ones = torch.ones(*g.means.shape[:2], 3, device=g.means.device, requires_grad=True)
    with torch.enable_grad():
        out = rasterize_frames(GaussianTensors(g.means.detach(), g.quats.detach(), g.scales.detach(),
                                               g.opacities.detach(), ones), cams, sh_degree=None, background=0.0)
        return torch.autograd.grad(out.colors[..., 0].sum(), ones)[0][..., 0].sum(0)


def other_view(av: Avatar, g: GaussianTensors, centres: Tensor | None = None) -> GaussianTensors:
    """``g`` (posed Gaussians, [N, ...] or frames first [B, N, ...]) as a viewpoint other than
    the training camera draws them: with plain RGB colours [..., N, 3], their SH evaluated
    from the training camera's centre, whatever camera will draw them; and, seen from the
    camera centres ``centres`` ([1, 3], or [B, 3] one per frame; world), for the Gaussians the
    training camera never saw face-on the colour of a nearby one it did, no axis longer than
    the seen ones' and at least ``FILL_OPACITY`` (:meth:`Avatar.set_view_fill`), and the
    Gaussians it saw end-on shortened (:meth:`Avatar.set_ray_cut`), both faded in over the
    first 25 degrees away from the training camera (:func:`fill_weight`). Without
    ``centres`` (splats that any viewpoint may draw) nothing is filled or cut: from the
    front, the fill would change the outline the training camera saw.

    The clip is filmed by one still camera (the tracker moves the head, not the camera), so
    each Gaussian was seen from nearly one direction: the SH bands above 0 fitted how its
    colour changed over a few degrees and say nothing about other views. Evaluated from an
    orbit or a side view they extrapolate (on a fitted avatar: blue hair and a red and
    green nose at 45 degrees; docs/avatar.md). From another viewpoint each Gaussian keeps the
    colour the training camera saw."""
    k = g.colors.shape[-2]
    rgb = sh_colors(g.colors.reshape(-1, k, 3), g.means.reshape(-1, 3), av.training_centre(g.means),
                    av.cfg.sh_degree).reshape(g.means.shape)
    scales, opacities = g.scales, g.opacities
    fill, cut = av.view_fill, av.ray_cut
    if av.changes_other_views and centres is not None and av.num_gaussians == rgb.shape[-2]:
        w = fill_weight(av, centres).to(rgb)
        if bool(w.gt(0).any()):
            w = w.reshape(-1, 1, 1) if rgb.dim() == 3 else w.reshape(())  # one weight a frame
            if cut is not None:
                f = av.ray_cut_scale.to(scales) ** w
                scales = scales.index_copy(-2, cut, scales.index_select(-2, cut) * f)
            if fill is not None:
                own = rgb.index_select(-2, fill)
                rgb = rgb.index_copy(-2, fill, own + w * (av.view_fill_rgb.to(rgb) - own))
                f = av.view_fill_scale.to(scales) ** w
                scales = scales.index_copy(-2, fill, scales.index_select(-2, fill) * f)
                op = opacities.index_select(-1, fill)
                wo = w[..., 0] if w.dim() == 3 else w
                opacities = opacities.index_copy(-1, fill, op + wo * (op.clamp_min(FILL_OPACITY) - op))
    return GaussianTensors(g.means, g.quats, scales, opacities, rgb)


#: The view fill fades in between these angles (degrees) from the training camera, as seen from
#: the head's centre.
FILL_ANGLES = (5.0, 25.0)
#: A head Gaussian counts as seen when some tracked frame showed its triangle at less than
#: 60 degrees from face-on (the cosine between its normal and the direction to the camera).
SEEN_COS = 0.5
#: ... and lends its colour to unseen ones when it is also this opaque
SOURCE_OPACITY = 0.6
#: ... and the training camera drew this much of it (pixels at VISIBLE_SIZE, about 2 at 512),
#: on average over VISIBLE_FRAMES tracked frames spread over the clip.
SOURCE_PIXELS = 0.125
VISIBLE_SIZE = 128
VISIBLE_FRAMES = 8
#: Each Gaussian the clip never showed face-on takes the mean of the middle half (by brightness)
#: of the colours of this many seen ones (the nearest of its part of the head).
FILL_K = 64
#: ... and is drawn with no axis longer than this quantile of the seen ones' longest axes
FILL_SIZE_QUANTILE = 0.99
#: ... and at least this opaque (as opaque as a source must be).
FILL_OPACITY = SOURCE_OPACITY


#: Gaussians whose longest axis lies within this many degrees of the training camera's ray
#: (on average over the clip) and is over RAY_RATIO times their middle one are cut to that
#: from other viewpoints (:meth:`Avatar.set_ray_cut`).
RAY_DEGREES = 25.0
RAY_RATIO = 4.0


def fill_weight(av: Avatar, centres: Tensor) -> Tensor:
    """[C] how much of the view fill cameras at ``centres`` [C, 3] (world) show: 0 up to 5
    degrees from the training camera (round the head's centre), 1 from 25 degrees, smooth
    between."""
    c = av.view_centre.to(centres)
    a = centres - c
    b = av.training_centre(centres) - c
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    deg = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    t = ((deg - FILL_ANGLES[0]) / (FILL_ANGLES[1] - FILL_ANGLES[0])).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


def at_training_centre(av: Avatar, cams: Cameras) -> bool:
    """Whether every camera of ``cams`` sits at the training camera's centre (one wait for a
    GPU: a render path asks once, not per batch)."""
    train = av.training_centre(cams.viewmats)
    return bool(torch.allclose(cams.centers, train.expand_as(cams.centers), rtol=0.0, atol=1e-6))


def _for_cameras(av: Avatar, g: GaussianTensors, cams: Cameras,
                 at_train: bool | None = None) -> tuple[GaussianTensors, int | None]:
    """What to rasterize from ``cams`` and the SH degree to evaluate: the Gaussians as they are
    from the training camera's centre (training, the tracked and still cameras, mouth
    close-ups), else with :func:`other_view`; ``at_train``: :func:`at_training_centre` of
    ``cams`` where the caller knows it."""
    if at_train is None:
        at_train = at_training_centre(av, cams)
    if at_train:
        return g, av.cfg.sh_degree
    if av.cfg.sh_degree == 0 and not av.changes_other_views:
        return g, 0
    return other_view(av, g, cams.centers), None


@torch.no_grad()
def set_view_fill(av: Avatar, motion: dict, max_frames: int = 128) -> None:
    """Choose the colours the Gaussians the clip never showed face-on take from other
    viewpoints (:func:`other_view`), from the tracked motion (``motion``: arrays
    of FlameParams fields, a row a frame, as in motion.npz).

    A head Gaussian is seen when some frame (of up to ``max_frames`` spread over the clip)
    showed its triangle at less than 60 degrees from face-on. The others, at the sides and
    back of the head, under the chin and on top of the hair, were drawn edge-on at the
    silhouette or not at all: what they learnt is how to blend the head's outline into
    the background, and from the side they showed the background's and the shirt's
    colours in blobs (on every fitted avatar: blue, orange and red patches from 90
    degrees, the face's colours on the back of the head). Each takes the mean of the middle
    half, by brightness (:func:`middle_mean`), of the colours (as the training camera sees
    them in the first of those frames) of the ``FILL_K`` nearest (in the rest pose) seen,
    opaque, visible head Gaussians of the same part of the head (skull, face, neck, ...
    where the head model names its parts, as the stand-in does; of any part where it does
    not or that part has none seen). So the back
    of the skull takes the hair (or scalp) of its top and front, not the skin of the ears,
    cheeks and neck beside it, and no single Gaussian at the edge of what the camera saw
    (a grey one that blended the hair into a light wall, a dark one in a parting) paints a
    patch of its own. Visible: the training camera drew at least ``SOURCE_PIXELS`` of it
    (:func:`drawn_pixels`, over ``VISIBLE_FRAMES`` of those frames at ``VISIBLE_SIZE``
    pixels). A Gaussian facing the camera behind another (the neck behind hair falling
    over it) was never taught a colour: on hill_8s such neck Gaussians kept her top's
    orange, and the back of her neck took it. Free Gaussians keep their own colours.
    Without a source, nothing is filled.

    Nothing in training bounded their size either: on hill_8s, discs up to 13 cm long on
    the back of the neck and under the skull, seen edge-on from 135 degrees as light
    streaks fanning over the hair. From other viewpoints each axis of a filled Gaussian is
    drawn no longer than the ``FILL_SIZE_QUANTILE`` quantile of the seen head Gaussians'
    longest axes (in the rest pose, after the ray cut: call :func:`set_ray_cut` first).
    Nor their opacity: many learnt to be faint, blending the head's outline into the
    background, and from the side what lay behind them showed through (on aoc_8s, dark
    blotches on her cheek at 45 degrees); they are drawn at least ``FILL_OPACITY`` opaque.

    Sets ``view_fill`` ([T] indices of the filled Gaussians, or None), ``view_fill_rgb``
    ([T, 3] their colours) and ``view_fill_scale`` ([T, 3] factors, at most 1, on their
    scales); changing the Gaussians (:meth:`Avatar.set_gaussians`) drops them."""
    av.view_fill = av.view_fill_rgb = av.view_fill_scale = None
    t = np.asarray(motion["translation"], dtype=np.float64)
    av.view_centre = torch.as_tensor(np.median(t, 0), dtype=torch.float32, device=av.means.device)
    bound = av.binding >= 0
    if not bool(bound.any()):
        return
    arrays = av._sampled_motion(motion, max_frames)
    o, r, _ = av.skin(FlameParams(**arrays))
    tri = av.binding.clamp_min(0)
    to_cam = av.training_centre(o)[:, None] - o[:, tri]
    cos = ((r[:, tri, :, 2] * to_cam).sum(-1) / to_cam.norm(dim=-1).clamp_min(1e-12)).amax(0)
    seen = bound & (cos >= SEEN_COS)
    unseen = bound & ~seen
    source = seen & (torch.sigmoid(av.opacity_logits) > SOURCE_OPACITY)
    if not bool(unseen.any()) or not bool(source.any()):
        return
    few = av.posed_batch(Frame(FlameParams(**av._sampled_motion(motion, VISIBLE_FRAMES)), deform=False))[0]
    B = few.means.shape[0]
    K = av.K.float().clone()
    K[:2] *= VISIBLE_SIZE / av.cfg.resolution
    cams = Cameras(av.viewmat.float()[None].expand(B, 4, 4), K[None].expand(B, 3, 3), VISIBLE_SIZE, VISIBLE_SIZE)
    source &= drawn_pixels(few, cams) / B >= SOURCE_PIXELS
    if not bool(source.any()):
        return
    x = av.canonical_positions()
    part = av.head_parts()
    targets = torch.nonzero(unseen)[:, 0]
    near = torch.empty(len(targets), FILL_K, dtype=torch.long, device=targets.device)
    for k in [None] if part is None else torch.unique(part[unseen]).tolist():
        to = unseen if k is None else unseen & (part == k)
        src = source if k is None else source & (part == k)
        near[to[targets]] = nearest_of(x, src if bool(src.any()) else source, to, FILL_K)
    # the sources' colours as the training camera saw them in the first of those frames
    g = av.posed_batch(Frame(FlameParams(**{k: a[:1] for k, a in arrays.items()}), deform=False))[0]
    rgb = sh_colors(g.colors[0], g.means[0], av.training_centre(g.means[0]), av.cfg.sh_degree)[0]
    av.view_fill = targets
    av.view_fill_rgb = middle_mean(rgb[near])
    _, _, s_rest = av.rest_frames()
    size = torch.exp(av.log_scales) * s_rest[0, tri][:, None]  # [N, 3] rest-pose scales of the bound ones
    if av.ray_cut is not None:
        size = size.index_copy(0, av.ray_cut, size[av.ray_cut] * av.ray_cut_scale)
    cap = torch.quantile(size[seen].amax(-1), FILL_SIZE_QUANTILE)
    av.view_fill_scale = (cap / size[targets]).clamp_max(1.0)


@torch.no_grad()
def set_ray_cut(av: Avatar, motion: dict, max_frames: int = 16) -> None:
    """Choose the Gaussians the training camera saw end-on, which views from elsewhere
    draw shortened (:func:`other_view`).

    One still camera cannot tell how far a Gaussian reaches along its own line of sight: a
    Gaussian stretched along the ray draws the same small footprint whatever its length,
    so nothing in training stops it growing (on hill_8s, over a hundred head Gaussians, up
    to 12.7 cm long). From the side each is a streak across the head. A Gaussian whose
    longest axis lies within ``RAY_DEGREES`` of the training camera's ray (the cosine
    averaged over up to ``max_frames`` tracked frames; ``motion``: arrays of FlameParams
    fields, a row a frame, as in motion.npz) and is over ``RAY_RATIO`` times its middle
    axis has that axis cut to ``RAY_RATIO`` times the middle one. Cut for good, this cost
    the training camera's view 0.016 dB on hill_8s: so the training camera draws them as
    trained, and the cut fades in with the view fill (:func:`fill_weight`).

    Sets ``ray_cut`` ([C] indices, or None) and ``ray_cut_scale`` ([C, 3] factors on their
    scales, 1 but on the cut axis); changing the Gaussians (:meth:`Avatar.set_gaussians`) drops
    both."""
    av.ray_cut = av.ray_cut_scale = None
    g = av.posed_batch(Frame(FlameParams(**av._sampled_motion(motion, max_frames)), deform=False))[0]
    order = av.log_scales.argsort(-1, descending=True)  # [N, 3]; posing scales the three alike
    axis = quat_to_rotmat(g.quats).gather(-1, order[None, :, None, :1].expand(g.quats.shape[0], -1, 3, 1))[..., 0]
    ray = g.means - av.training_centre(g.means)
    cos = ((axis * ray).sum(-1).abs() / ray.norm(dim=-1).clamp_min(1e-12)).mean(0)  # [N], over the frames
    top, mid = av.log_scales.gather(-1, order[:, :2]).unbind(-1)
    cut = (cos > math.cos(math.radians(RAY_DEGREES))) & (top - mid > math.log(RAY_RATIO))
    if bool(cut.any()):
        i = torch.nonzero(cut)[:, 0]
        scale = torch.ones(len(i), 3, device=av.means.device)
        scale[torch.arange(len(i), device=i.device), order[i, 0]] = torch.exp(mid[i] - top[i]) * RAY_RATIO
        av.ray_cut, av.ray_cut_scale = i, scale


# ---------------------------------------------------------------------- stored with the avatar
#: The file in an avatar folder that holds the view fill and the ray cut, computed when the
#: fit saved the avatar; a folder without it (fitted before it existed, or with it deleted)
#: has them computed as it is loaded.
VIEWS_FILE = "views.safetensors"
_PAIRS = (("view_fill", ("view_fill_rgb", "view_fill_scale")), ("ray_cut", ("ray_cut_scale",)))


def save_views(av: Avatar, folder) -> None:
    """Write ``av``'s view fill and ray cut (set first: :func:`set_ray_cut`,
    :func:`set_view_fill`) into ``folder``, atomically."""
    from pathlib import Path

    from safetensors.torch import save_file

    from gstalk.io.atomic import atomic_path

    keys = ["view_centre"] + [k for idx, rest in _PAIRS if getattr(av, idx) is not None for k in (idx, *rest)]
    tensors = {k: getattr(av, k).detach().cpu().contiguous() for k in keys}
    with atomic_path(Path(folder) / VIEWS_FILE) as tmp:
        save_file(tensors, str(tmp))


def load_views(av: Avatar, folder) -> bool:
    """Set ``av``'s view fill and ray cut from ``folder``'s :data:`VIEWS_FILE`, checked
    against its Gaussians; False where the folder has none (compute them instead)."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gstalk.errors import FileFormatError

    path = Path(folder) / VIEWS_FILE
    if not path.is_file():
        return False
    fix = "delete it (it is computed again as the avatar loads) or re-fit the avatar"
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FileFormatError(f"{path}: not a readable safetensors file ({e}); {fix}") from None
    n, dev = av.means.shape[0], av.means.device
    centre = t.get("view_centre")
    if centre is None or centre.shape != (3,) or not bool(torch.isfinite(centre).all()):
        raise FileFormatError(f"{path}: view_centre must be 3 finite numbers; {fix}")
    got = {"view_centre": centre}
    for idx, rest in _PAIRS:
        if idx not in t:
            if any(k in t for k in rest):
                raise FileFormatError(f"{path}: {', '.join(rest)} without {idx}; {fix}")
            continue
        i = t[idx]
        if i.dim() != 1 or i.dtype != torch.int64 or (len(i) and (int(i.min()) < 0 or int(i.max()) >= n)):
            raise FileFormatError(f"{path}: {idx} must be indices of this avatar's {n} Gaussians; {fix}")
        for k in rest:
            v = t.get(k)
            if v is None or v.shape != (len(i), 3) or not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise FileFormatError(f"{path}: {k} must be [{len(i)}, 3] finite values of 0 or more; {fix}")
            got[k] = v
        got[idx] = i
    av.view_fill = av.view_fill_rgb = av.view_fill_scale = av.ray_cut = av.ray_cut_scale = None
    for k, v in got.items():
        setattr(av, k, v.to(dev))
    return True
