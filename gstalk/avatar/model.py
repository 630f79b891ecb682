"""The composed avatar: canonical Gaussians bound to the head mesh + the deformation field +
the audio encoder and the audio-to-motion model.

``Avatar.gaussians_at(frame)`` gives the posed Gaussians of one frame. Everything above
(train, drive, eval, export, viewer) uses it; it uses nothing above.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from gstalk.audio.encoder import AudioModel
from gstalk.audio.visemes import VisemeMotion
from gstalk.avatar.binding import bind_to_world, rotmat_to_quat, triangle_frames, world_to_local
from gstalk.deform.field import REGION_FACE, REGION_MOUTH, REGION_TORSO, Deformation, DeformationField
from gstalk.deform.frozen import FrozenField, precision_dtype
from gstalk.gaussians.set import SH_C0, GaussianSet, GaussianTensors
from gstalk.head.flame import HeadModel
from gstalk.head.lbs import FlameParams, flame_forward
from gstalk.render import Cameras, RenderOutput, rasterize, rasterize_frames
from gstalk.render.project import quat_to_rotmat, sh_colors

# 2: relative field + mouth prior; 3: expression prior; 4: viseme lip model; 5: its mouth at rest in pauses;
# 6: avatars fitted without audio (lip_motion 'none'); 7: the viseme model on aligned phones, with the person's
# own targets per class (older versions are read as made; their viseme model is not, see load_avatar)
AVATAR_VERSION = 7


@dataclass
class AvatarConfig:
    """What an avatar folder records about how it was made (config.json)."""

    version: int = AVATAR_VERSION
    fps: float = 25.0
    resolution: int = 512
    feature_kind: str = "phoneme"
    window: int = 32
    code_dim: int = 32
    expr_cond: int = 8
    sh_degree: int = 1
    encoding: str = "triplane"
    background: str = "plate"  # 'plate' (composite over background.png) or 'alpha' or 'white'/'black'
    head_model: dict = field(default_factory=dict)
    n_shape: int = 0
    n_expr: int = 0
    feature_dim: int = 15
    seed: int = 0
    field_relative: bool = True
    """The field's offsets are relative to the neutral conditions (it is the identity there),
    so switching it off gives the canonical avatar it was trained with."""
    mouth_centre: list | None = None
    """Centre of the lips on the identity's rest mesh (head space, metres): where the audio
    acts. None: no spatial prior on the audio stream."""
    mouth_radius: float = 0.0
    """Fall-off (metres, one standard deviation) of the audio stream's spatial prior."""
    expr_prior: bool = False
    """The field's blink and expression streams act only where the head model's expressions
    move the mesh (see :func:`expression_activity`): not on hair, scalp, neck or eyeballs."""
    lip_motion: str = "learned"
    """What moves jaw and expression for new audio: 'visemes' (the viseme model on the audio's
    aligned phones, with the person's own mouth per class, :mod:`gstalk.audio.visemes`) or 'learned' (the
    audio-to-motion network trained on the clip). Blink always comes from the network.
    'none': fitted without audio (its clip was silent, or ``--train.audio off``): no audio can
    drive it, only tracked expressions; its field saw zero audio codes."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Frame:
    """Conditions of B frames: head-model parameters, audio codes, blink."""

    params: FlameParams
    audio: Tensor | None = None  # [B, code_dim]
    blink: Tensor | None = None  # [B]
    deform: bool = True


class AudioToMotion(nn.Module):
    """Audio windows -> jaw [3], expression [E], blink [1] per frame (trained on the track)."""

    def __init__(self, feature_dim: int, window: int, n_expr: int, code_dim: int = 32):
        super().__init__()
        self.audio = AudioModel(feature_dim, window, code_dim)
        self.head = nn.Linear(code_dim, 3 + n_expr + 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.n_expr = n_expr
        self.register_buffer("out_mean", torch.zeros(3 + n_expr + 1))
        self.register_buffer("out_std", torch.ones(3 + n_expr + 1))

    def forward(self, windows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = self.head(self.audio(windows)) * self.out_std + self.out_mean
        return y[:, :3], y[:, 3:3 + self.n_expr], y[:, -1].clamp(0, 1)


class Avatar(nn.Module):
    """Canonical Gaussians (bound to the head mesh, or free for the torso) + networks."""

    def __init__(self, cfg: AvatarConfig, head: HeadModel, shape: Tensor, gaussians: GaussianSet, region: Tensor,
                 K: Tensor, viewmat: Tensor):
        super().__init__()
        self.cfg = cfg
        self.head_model = head
        self.register_buffer("shape", shape.float())
        self.register_buffer("K", K.float())
        self.register_buffer("viewmat", viewmat.float())
        self._rest = None
        self._prior = None
        object.__setattr__(self, "_static", None)  # the inference field (frozen_field()), not a submodule
        object.__setattr__(self, "_compiled", None)  # see compile_field(); not a submodule
        object.__setattr__(self, "_compile_opts", None)
        object.__setattr__(self, "precision", "float32")  # see set_precision()
        self.notes: list[str] = []  # what loading it had to say to the user (an older format's limits)
        self.register_buffer("view_centre", torch.zeros(3), persistent=False)  # see set_view_fill()
        self.set_gaussians(gaussians, region)
        self.field = DeformationField(audio_dim=cfg.code_dim, expr_dim=cfg.expr_cond, encoding=cfg.encoding,
                                      colour=False)
        self.audio = AudioModel(cfg.feature_dim, cfg.window, cfg.code_dim)
        self.a2m = AudioToMotion(cfg.feature_dim, cfg.window, cfg.expr_cond, cfg.code_dim)
        self.visemes = VisemeMotion(cfg.n_expr)

    def to(self, *args, **kwargs):  # the head model is plain tensors, not a module: move it too
        out = super().to(*args, **kwargs)
        dev = self.means.device
        self.head_model = self.head_model.to(dev)
        self._canon = None
        self._rest = None
        self._prior = None
        object.__setattr__(self, "_static", None)
        return out

    # ------------------------------------------------------------------ Gaussians
    def set_gaussians(self, g: GaussianSet, region: Tensor) -> None:
        self.means = nn.Parameter(g.means.detach().clone())
        self.quats = nn.Parameter(g.quats.detach().clone())
        self.log_scales = nn.Parameter(g.log_scales.detach().clone())
        self.opacity_logits = nn.Parameter(g.opacity_logits.detach().clone())
        self.sh = nn.Parameter(g.sh.detach().clone())
        self.register_buffer("binding", g.binding.detach().clone().long())
        self.register_buffer("region", region.detach().clone().long())
        self.register_buffer("view_fill", None, persistent=False)  # see set_view_fill()
        self.register_buffer("view_fill_rgb", None, persistent=False)
        self.register_buffer("view_fill_scale", None, persistent=False)
        self.register_buffer("ray_cut", None, persistent=False)  # see set_ray_cut()
        self.register_buffer("ray_cut_scale", None, persistent=False)
        self.invalidate()

    def gaussian_set(self) -> GaussianSet:
        return GaussianSet(self.means.detach(), self.quats.detach(), self.log_scales.detach(),
                           self.opacity_logits.detach(), self.sh.detach(), binding=self.binding.clone(),
                           extra={"region": self.region.to(torch.int32)})

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    def gaussian_params(self) -> dict[str, nn.Parameter]:
        return {"means": self.means, "quats": self.quats, "log_scales": self.log_scales,
                "opacity_logits": self.opacity_logits, "sh": self.sh}

    # ------------------------------------------------------------------ geometry
    def rest_frames(self):
        """Triangle frames of the identity's rest mesh (cached: they depend only on the shape)."""
        if self._rest is None:
            with torch.no_grad():
                v = flame_forward(self.head_model, FlameParams(shape=self.shape[None])).vertices
                self._rest = triangle_frames(v, self.head_model.faces)
        return self._rest

    def canonical_positions(self) -> Tensor:
        """[N, 3] rest-pose positions in head space (the deformation field's input)."""
        if self._canon is None or self._canon.shape[0] != self.num_gaussians:
            with torch.no_grad():
                o, r, s = self.rest_frames()
                bound = self.binding >= 0
                pos = self.means.detach().clone()
                if bool(bound.any()):
                    m, _, _ = bind_to_world(self.means[bound].detach(), self.quats[bound].detach(),
                                            self.log_scales[bound].detach(), self.binding[bound], o, r, s)
                    pos[bound] = m[0]
                self._canon = pos
        return self._canon

    def _sampled_motion(self, motion: dict, max_frames: int) -> dict[str, Tensor]:
        """Up to ``max_frames`` frames spread evenly over ``motion`` (arrays of FlameParams
        fields, a row a frame, as in motion.npz), as FlameParams keyword tensors on the
        avatar's device."""
        n = len(motion["translation"])
        idx = np.unique(np.linspace(0, n - 1, min(max_frames, n)).round().astype(int))
        keys = ("expr", "global_rot", "neck", "jaw", "eyes", "eyelids", "translation")
        return {k: torch.as_tensor(np.asarray(motion[k])[idx], dtype=torch.float32, device=self.means.device)
                for k in keys if k in motion}

    @property
    def changes_other_views(self) -> bool:
        """Whether views other than the training camera's draw some Gaussians differently (the
        view fill or the ray cut is set; :func:`other_view`)."""
        return self.view_fill is not None or self.ray_cut is not None

    @torch.no_grad()
    def set_view_fill(self, motion: dict, max_frames: int = 128) -> None:
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
        longest axes (in the rest pose, after the ray cut: call :meth:`set_ray_cut` first).
        Nor their opacity: many learnt to be faint, blending the head's outline into the
        background, and from the side what lay behind them showed through (on aoc_8s, dark
        blotches on her cheek at 45 degrees); they are drawn at least ``FILL_OPACITY`` opaque.

        Sets ``view_fill`` ([T] indices of the filled Gaussians, or None), ``view_fill_rgb``
        ([T, 3] their colours) and ``view_fill_scale`` ([T, 3] factors, at most 1, on their
        scales); changing the Gaussians (:meth:`set_gaussians`) drops them."""
        self.view_fill = self.view_fill_rgb = self.view_fill_scale = None
        t = np.asarray(motion["translation"], dtype=np.float64)
        self.view_centre = torch.as_tensor(np.median(t, 0), dtype=torch.float32, device=self.means.device)
        bound = self.binding >= 0
        if not bool(bound.any()):
            return
        arrays = self._sampled_motion(motion, max_frames)
        o, r, _ = self.skin(FlameParams(**arrays))
        tri = self.binding.clamp_min(0)
        to_cam = _training_centre(self, o)[:, None] - o[:, tri]
        cos = ((r[:, tri, :, 2] * to_cam).sum(-1) / to_cam.norm(dim=-1).clamp_min(1e-12)).amax(0)
        seen = bound & (cos >= SEEN_COS)
        unseen = bound & ~seen
        source = seen & (torch.sigmoid(self.opacity_logits) > SOURCE_OPACITY)
        if not bool(unseen.any()) or not bool(source.any()):
            return
        few = self.posed_batch(Frame(FlameParams(**self._sampled_motion(motion, VISIBLE_FRAMES)), deform=False))[0]
        B = few.means.shape[0]
        K = self.K.float().clone()
        K[:2] *= VISIBLE_SIZE / self.cfg.resolution
        cams = Cameras(self.viewmat.float()[None].expand(B, 4, 4), K[None].expand(B, 3, 3), VISIBLE_SIZE, VISIBLE_SIZE)
        source &= drawn_pixels(few, cams) / B >= SOURCE_PIXELS
        if not bool(source.any()):
            return
        x = self.canonical_positions()
        part = self.head_parts()
        targets = torch.nonzero(unseen)[:, 0]
        near = torch.empty(len(targets), FILL_K, dtype=torch.long, device=targets.device)
        for k in [None] if part is None else torch.unique(part[unseen]).tolist():
            to = unseen if k is None else unseen & (part == k)
            src = source if k is None else source & (part == k)
            near[to[targets]] = nearest_of(x, src if bool(src.any()) else source, to, FILL_K)
        # the sources' colours as the training camera saw them in the first of those frames
        g = self.posed_batch(Frame(FlameParams(**{k: a[:1] for k, a in arrays.items()}), deform=False))[0]
        rgb = sh_colors(g.colors[0], g.means[0], _training_centre(self, g.means[0]), self.cfg.sh_degree)[0]
        self.view_fill = targets
        self.view_fill_rgb = middle_mean(rgb[near])
        _, _, s_rest = self.rest_frames()
        size = torch.exp(self.log_scales) * s_rest[0, tri][:, None]  # [N, 3] rest-pose scales of the bound ones
        if self.ray_cut is not None:
            size = size.index_copy(0, self.ray_cut, size[self.ray_cut] * self.ray_cut_scale)
        cap = torch.quantile(size[seen].amax(-1), FILL_SIZE_QUANTILE)
        self.view_fill_scale = (cap / size[targets]).clamp_max(1.0)

    @torch.no_grad()
    def set_ray_cut(self, motion: dict, max_frames: int = 16) -> None:
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
        scales, 1 but on the cut axis); changing the Gaussians (:meth:`set_gaussians`) drops
        both."""
        self.ray_cut = self.ray_cut_scale = None
        g = self.posed_batch(Frame(FlameParams(**self._sampled_motion(motion, max_frames)), deform=False))[0]
        order = self.log_scales.argsort(-1, descending=True)  # [N, 3]; posing scales the three alike
        axis = quat_to_rotmat(g.quats).gather(-1, order[None, :, None, :1].expand(g.quats.shape[0], -1, 3, 1))[..., 0]
        ray = g.means - _training_centre(self, g.means)
        cos = ((axis * ray).sum(-1).abs() / ray.norm(dim=-1).clamp_min(1e-12)).mean(0)  # [N], over the frames
        top, mid = self.log_scales.gather(-1, order[:, :2]).unbind(-1)
        cut = (cos > math.cos(math.radians(RAY_DEGREES))) & (top - mid > math.log(RAY_RATIO))
        if bool(cut.any()):
            i = torch.nonzero(cut)[:, 0]
            scale = torch.ones(len(i), 3, device=self.means.device)
            scale[torch.arange(len(i), device=i.device), order[i, 0]] = torch.exp(mid[i] - top[i]) * RAY_RATIO
            self.ray_cut, self.ray_cut_scale = i, scale

    def head_parts(self) -> Tensor | None:
        """[N] the part of the head (the head model's ``vertex_region``: skull, face, neck, ...)
        each Gaussian's triangle belongs to (its first corner's), -1 for free Gaussians; None
        when the head model names no parts."""
        vr = self.head_model.meta.get("vertex_region")
        if vr is None:
            return None
        vr = torch.as_tensor(np.asarray(vr), dtype=torch.long, device=self.binding.device)
        faces = self.head_model.faces.to(self.binding.device)
        part = torch.full_like(self.binding, -1)
        bound = self.binding >= 0
        part[bound] = vr[faces[self.binding[bound], 0]]
        return part

    def invalidate(self) -> None:
        """Forget what was computed from the Gaussians and the field (call after changing them)."""
        self._canon = None
        self._prior = None
        object.__setattr__(self, "_static", None)

    def prior_gates(self) -> Tensor | None:
        """[N, streams] spatial prior of the field's condition streams (audio, blink[,
        expression]), multiplying the learned gates. The audio stream falls off with distance
        from the mouth (a Gaussian of ``mouth_radius``), so speech moves the lips, jaw and
        cheeks but cannot explain changes on the eyes, hair or background. With
        ``expr_prior`` the blink and expression streams act only on Gaussians bound to
        triangles that the head model's expressions move: on a real clip, hair moves with
        the head in ways no expression predicts, and a field allowed to explain training
        frames' hair that way gets new frames' hair wrong. None without a prior."""
        c = self.cfg
        mouth = c.mouth_centre is not None and c.mouth_radius > 0
        if not (mouth or c.expr_prior):
            return None
        x = self.canonical_positions()
        if self._prior is None or self._prior.shape[0] != x.shape[0]:
            n = 3 if c.expr_cond else 2
            prior = torch.ones(x.shape[0], n, device=x.device)
            face = self.region == REGION_FACE
            if mouth:
                d2 = (x - x.new_tensor(c.mouth_centre)).square().sum(-1)
                prior[:, 0] = torch.where(face, torch.exp(-0.5 * d2 / c.mouth_radius ** 2), prior[:, 0])
            if c.expr_prior:
                act = expression_activity(self.head_model).to(x.device)
                bound = face & (self.binding >= 0)
                prior[bound, 1:] = act[self.binding[bound]][:, None]
            self._prior = prior
        return self._prior

    def gaussians_at(self, frame: Frame) -> list[GaussianTensors]:
        """Posed Gaussians of each of the B frames (activated, ready to rasterize)."""
        return self.posed(frame)[0]

    def skin(self, p: FlameParams) -> tuple[Tensor, Tensor, Tensor]:
        """Head model -> posed triangle frames (origins, rotations, scales) of every frame."""
        B = p.batch_size()
        if p.shape is None:
            p = FlameParams(**{**p.__dict__, "shape": self.shape[None].expand(B, -1)})
        verts = flame_forward(self.head_model, p).vertices
        return triangle_frames(verts, self.head_model.faces)

    def deformation(self, frame: Frame) -> Deformation:
        """The deformation field's outputs for every Gaussian of every frame."""
        p = frame.params
        B = p.batch_size()
        dev = self.means.device
        audio = frame.audio if frame.audio is not None else torch.zeros(B, self.cfg.code_dim, device=dev)
        expr = None
        if self.cfg.expr_cond:
            e = p.expr if p.expr is not None else torch.zeros(B, self.cfg.expr_cond, device=dev)
            expr = torch.nn.functional.pad(e[:, : self.cfg.expr_cond], (0, max(0, self.cfg.expr_cond - e.shape[1])))
        if not torch.is_grad_enabled():
            # inference: the points do not move, so the field is evaluated in its factored form
            # at them (gstalk/deform/frozen.py), built once (invalidate() drops it)
            field = self.frozen_field()
            if self._compile_opts is not None:
                if self._compiled is None:
                    object.__setattr__(self, "_compiled", torch.compile(field, dynamic=False, **self._compile_opts))
                field = self._compiled
            # bounded codes: new voices must not push the field far outside what it was trained on
            return field(torch.tanh(audio), frame.blink, expr, p.neck)
        return self.field(self.canonical_positions(), torch.tanh(audio), blink=frame.blink, expr=expr, neck=p.neck,
                          region=self.region, prior_gates=self.prior_gates(), relative=self.cfg.field_relative)

    def frozen_field(self) -> FrozenField:
        """The deformation field at the canonical positions, for no-grad inference, in the
        avatar's precision (see :meth:`set_precision`); cached until :meth:`invalidate`."""
        x = self.canonical_positions()
        if self._static is None or self._static.n != x.shape[0]:
            with torch.no_grad():
                # a cache, not a submodule: kept out of the avatar's state_dict and parameters
                object.__setattr__(self, "_static", FrozenField(
                    self.field, x, self.region, self.prior_gates(), self.cfg.field_relative,
                    precision_dtype(self.precision, x.device)))
            object.__setattr__(self, "_compiled", None)
        return self._static

    def set_precision(self, precision: str = "float32") -> "Avatar":
        """The precision of the deformation field at inference: 'float32' (the default), 'half'
        (float16 on a GPU, bfloat16 on a CPU), 'float16' or 'bfloat16'. Posing and
        rasterisation stay in float32; training always uses float32."""
        precision_dtype(precision, self.means.device)  # refuse an unknown name now
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "_static", None)
        return self

    def compile_field(self, mode: str | None = None, backend: str = "inductor", fullgraph: bool = True,
                      enable: bool = True) -> "Avatar":
        """Use a ``torch.compile``d deformation field for inference (no-grad calls; training keeps
        the eager module). ``mode`` 'reduce-overhead' adds CUDA graphs on a GPU. The first call
        compiles (tens of seconds on a CPU). ``enable=False`` goes back to the eager field."""
        object.__setattr__(self, "_compile_opts", {"mode": mode, "backend": backend, "fullgraph": fullgraph}
                           if enable else None)
        object.__setattr__(self, "_compiled", None)
        return self

    def posed(self, frame: Frame, backend: str = "auto") -> tuple[list[GaussianTensors], Deformation | None]:
        """Posed Gaussians of each frame, and the deformation that was applied (None if off).
        ``backend``: the posing step's (see gstalk/avatar/posing.py)."""
        g, d = self.posed_batch(frame, backend)
        return [GaussianTensors(*(t[b] for t in g)) for b in range(g.means.shape[0])], d

    def posed_batch(self, frame: Frame, backend: str = "auto") -> tuple[GaussianTensors, Deformation | None]:
        """:meth:`posed` as one set of tensors with the frames first (means [B, N, 3], ...),
        as :func:`gstalk.render.rasterize.rasterize_frames` takes them."""
        from gstalk.avatar.posing import pose_gaussians

        o, r, s = self.skin(frame.params)
        B = o.shape[0]
        d = self.deformation(frame) if frame.deform else None
        _, r0, _ = self.rest_frames()
        means, quats, scales = pose_gaussians(
            o, r, s, r0[0], self.means, self.quats, self.log_scales, self.binding,
            None if d is None else d.d_means, None if d is None else d.d_quats,
            None if d is None else d.d_log_scales, backend=backend)
        opac = self.opacity_logits[None].expand(B, -1)
        sh = self.sh[None].expand(B, -1, -1, -1)
        if d is not None:
            opac = opac + 2.0 * torch.tanh(d.d_opacity[..., 0] / 2.0)
            sh = torch.cat([sh[:, :, :1] + (d.d_colors / SH_C0)[:, :, None], sh[:, :, 1:]], 2)
        return GaussianTensors(means, quats, scales, torch.sigmoid(opac), sh), d


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
    rgb = sh_colors(g.colors.reshape(-1, k, 3), g.means.reshape(-1, 3), _training_centre(av, g.means),
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
    b = _training_centre(av, centres) - c
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    deg = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    t = ((deg - FILL_ANGLES[0]) / (FILL_ANGLES[1] - FILL_ANGLES[0])).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


def _training_centre(av: Avatar, like: Tensor) -> Tensor:
    """[1, 3] the training camera's centre, in ``like``'s dtype and device."""
    return Cameras(av.viewmat[None].to(like), av.K[None].to(like), 1, 1).centers


def _for_cameras(av: Avatar, g: GaussianTensors, cams: Cameras) -> tuple[GaussianTensors, int | None]:
    """What to rasterize from ``cams`` and the SH degree to evaluate: the Gaussians as they are
    from the training camera's centre (training, the tracked and still cameras, mouth
    close-ups), else with :func:`other_view`."""
    train = _training_centre(av, cams.viewmats)
    if torch.allclose(cams.centers, train.expand_as(cams.centers), rtol=0.0, atol=1e-6):
        return g, av.cfg.sh_degree
    if av.cfg.sh_degree == 0 and not av.changes_other_views:
        return g, 0
    return other_view(av, g, cams.centers), None


def render_frame(av: Avatar, g: GaussianTensors, cam: Cameras, bg: Tensor) -> tuple[Tensor, Tensor, RenderOutput]:
    """Rasterize one frame's posed Gaussians over the background image ``bg`` [S, S, 3]:
    (rgb [S, S, 3], alpha [S, S, 1], the render output). From a camera elsewhere than the
    training camera, view-dependent colour is the training camera's (:func:`other_view`)."""
    g, degree = _for_cameras(av, g, cam)
    out = rasterize(g, cam, sh_degree=degree, background=0.0)
    return out.colors[0] + (1 - out.alphas[0]) * bg, out.alphas[0], out


def render_frames(av: Avatar, g: GaussianTensors, cams: Cameras, bg: Tensor) -> Tensor:
    """Rasterize B frames' posed Gaussians (:meth:`Avatar.posed_batch`), frame b by camera b,
    in one call, over the background image ``bg`` [S, S, 3]: rgb [B, S, S, 3] (view-dependent
    colour as in :func:`render_frame`)."""
    g, degree = _for_cameras(av, g, cams)
    out = rasterize_frames(g, cams, sh_degree=degree, background=0.0)
    return out.colors + (1 - out.alphas) * bg


# ---------------------------------------------------------------------- initialisation
def _lip_landmarks(head: HeadModel):
    """(landmark embedding, the indices of its lip landmarks); None where it has fewer than 4."""
    from gstalk.face.regions import LIPS
    from gstalk.head.embedding import load_embedding

    emb = load_embedding(head)
    ids = emb.landmark_indices.tolist()
    lips = [ids.index(i) for i in LIPS if i in ids]
    return (emb, lips) if len(lips) >= 4 else None


def mouth_prior(head: HeadModel, shape: Tensor) -> tuple[list[float], float] | None:
    """(centre, radius) of the audio stream's spatial prior for this identity: the centre of
    the lip landmarks on the rest mesh and the mouth's width (corner to corner). None where
    the landmark embedding has no lips."""
    found = _lip_landmarks(head)
    if found is None:
        return None
    emb, lips = found
    with torch.no_grad():
        v = flame_forward(head, FlameParams(shape=shape[None].float())).vertices
        return _centre_width(emb.points(v, head.faces)[0, lips])


def _centre_width(lip_pts: Tensor) -> tuple[list[float], float]:
    """The lip landmarks' centre and the mouth's width (x extent, corner to corner)."""
    width = float((lip_pts.max(0).values - lip_pts.min(0).values)[0])
    return [float(a) for a in lip_pts.mean(0)], max(width, 1e-3)


def mouth_expressions(head: HeadModel, shape: Tensor, ratio: float = 2.0) -> Tensor:
    """[E] bool: the expression coefficients that move the lips (their lip landmarks move on
    average more than ``ratio`` times as far as the other face-mesh landmarks more than a
    mouth's width from the lips: eyes, brows, forehead), the ones a lip model may drive.
    All True where the landmark embedding has no lips."""
    head, shape = head.to("cpu"), shape.float().cpu()  # the landmark embedding is on the CPU
    E = head.n_expr
    found = _lip_landmarks(head)
    if found is None or E == 0:
        return torch.ones(E, dtype=torch.bool)
    emb, lips = found
    with torch.no_grad():
        # the rest mesh, then each expression coefficient at 1 alone: one batch of E + 1 meshes
        expr = torch.cat([torch.zeros(1, E), torch.eye(E)])
        v = flame_forward(head, FlameParams(shape=shape[None].expand(E + 1, -1), expr=expr)).vertices
        pts = emb.points(v, head.faces)  # [E + 1, L, 3]
        centre, width = _centre_width(pts[0, lips])  # mouth_prior's, from the rest mesh already here
        d = (pts[1:] - pts[:1]).norm(dim=-1)  # [E, L]
        far = (pts[0] - pts.new_tensor(centre)).norm(dim=-1) > width
        far[lips] = False
        if not far.any():
            return torch.ones(E, dtype=torch.bool)
        return d[:, lips].mean(1) > ratio * d[:, far].mean(1)


def expression_activity(head: HeadModel) -> Tensor:
    """[F] how much the head model's expressions (and eyelids) move each triangle, in
    [0, 1]: the norm of its vertices' expression directions, 1 from a quarter of the
    90th percentile over the mesh up, falling linearly to 0 where nothing moves (scalp,
    neck, eyeballs)."""
    a = head.exprdirs.norm(dim=(1, 2))  # [V]
    if head.eyelids is not None:
        a = a + head.eyelids.norm(dim=-1).sum(0)
    tri = a[head.faces].mean(-1)
    ref = 0.25 * torch.quantile(tri, 0.9)
    if float(ref) <= 0:
        return torch.ones_like(tri)
    return (tri / ref).clamp(0, 1)


def init_gaussians(head: HeadModel, shape: Tensor, per_triangle: int = 2, sh_degree: int = 1,
                   seed: int = 0) -> tuple[GaussianSet, Tensor]:
    """Gaussians on every triangle of the rest-pose head mesh (bound), grey, flat along the surface."""
    g = torch.Generator().manual_seed(seed)
    faces = head.faces
    F = faces.shape[0]
    v = flame_forward(head, FlameParams(shape=shape[None])).vertices
    o, r, s = triangle_frames(v, faces)
    tri = v[0, faces]  # [F, 3, 3]
    bary = torch.rand(F, per_triangle, 3, generator=g)
    bary = -torch.log(bary.clamp_min(1e-6))
    bary = bary / bary.sum(-1, keepdim=True)
    pts = (bary[..., None] * tri[:, None]).sum(2).reshape(-1, 3)
    binding = torch.arange(F).repeat_interleave(per_triangle)
    local = world_to_local(pts, binding, o, r, s)
    n = pts.shape[0]
    k = (sh_degree + 1) ** 2
    sh = torch.zeros(n, k, 3)
    sh[:, 0] = (0.6 - 0.5) / SH_C0
    side = 0.6 / math.sqrt(per_triangle)
    log_scales = torch.log(torch.tensor([side, side, side * 0.3])).expand(n, 3).clone()
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1
    region = torch.full((n,), REGION_FACE, dtype=torch.long)
    vr = head.meta.get("vertex_region")
    if vr is not None:  # the stand-in marks its mouth pocket
        mouth = torch.as_tensor((np.asarray(vr)[faces.numpy()] == 2).all(1))
        region[mouth[binding]] = REGION_MOUTH
    gs = GaussianSet(local, quats, log_scales, torch.full((n,), 2.0), sh, binding=binding)
    return gs, region


def torso_gaussians(points: Tensor, colors: Tensor, scale: float, sh_degree: int) -> tuple[GaussianSet, Tensor]:
    """Free (unbound) Gaussians for the shoulders and torso at world ``points`` with rgb ``colors``."""
    g = GaussianSet.from_points(points, colors, scale=scale, opacity=0.9, sh_degree=sh_degree,
                                binding=torch.full((points.shape[0],), -1, dtype=torch.long))
    return g, torch.full((points.shape[0],), REGION_TORSO, dtype=torch.long)


def concat_sets(a: GaussianSet, b: GaussianSet) -> GaussianSet:
    return GaussianSet(torch.cat([a.means, b.means]), torch.cat([a.quats, b.quats]),
                       torch.cat([a.log_scales, b.log_scales]), torch.cat([a.opacity_logits, b.opacity_logits]),
                       torch.cat([a.sh, b.sh]), binding=torch.cat([a.binding, b.binding]))


__all__ = ["AVATAR_VERSION", "Avatar", "AvatarConfig", "AudioToMotion", "Frame", "concat_sets", "expression_activity",
           "init_gaussians", "mouth_prior", "nearest_of", "rotmat_to_quat", "torso_gaussians"]
