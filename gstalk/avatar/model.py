"""The composed avatar: canonical Gaussians bound to the head mesh + the deformation field +
the audio encoder and the audio-to-motion model.

``Avatar.gaussians_at(frame)`` gives the posed Gaussians of one frame. Everything above
(train, drive, eval, export, viewer) uses it; it uses nothing above.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from gstalk.audio.encoder import AudioModel
from gstalk.audio.visemes import VisemeMotion
from gstalk.avatar.binding import bind_to_world, triangle_frames
from gstalk.avatar.init import expression_activity
from gstalk.deform.field import REGION_FACE, Deformation, DeformationField
from gstalk.deform.frozen import FrozenField, precision_dtype
from gstalk.gaussians.set import SH_C0, GaussianSet, GaussianTensors
from gstalk.head.flame import HeadModel
from gstalk.head.lbs import FlameParams, flame_forward

# 2: relative field + mouth prior; 3: expression prior; 4: viseme lip model; 5: its mouth at rest in pauses;
# 6: avatars fitted without audio (lip_motion 'none'); 7: the viseme model on aligned phones, with the person's
# own targets per class; 8: its pause classes (pre- and post-speech) and lag and amplitude by the lips' error (older
# versions are read as made; 4-6's viseme model is not, 7's has its pause classes off, see load_avatar); 9: the
# phones' source per avatar ('phones': free phone decoding, where it fitted the person's lips better)
AVATAR_VERSION = 9


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
    phones: str = "auto"
    """Where any audio's phones come from (:func:`gstalk.audio.phones.phone_timeline`):
    'auto' (recognised English words, else free phone decoding) or 'phones' (free phone
    decoding always), chosen at the fit by which predicted this person's lips better
    (:func:`gstalk.train.motion.choose_phones`)."""

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
        self._identity = None  # (key, the head model with this identity), see identity_head()
        self._binding32 = None  # (key, int32 binding), see binding_i32()
        self._centres = {}  # the training camera's centre per (dtype, device)
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
        self._identity = None
        self._binding32 = None
        self._centres = {}
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
        view fill or the ray cut is set; :func:`gstalk.avatar.views.other_view`)."""
        return self.view_fill is not None or self.ray_cut is not None

    def set_view_fill(self, motion: dict, max_frames: int = 128) -> None:
        """What other viewpoints show of the Gaussians the clip never showed face-on
        (:func:`gstalk.avatar.views.set_view_fill`)."""
        from gstalk.avatar.views import set_view_fill

        set_view_fill(self, motion, max_frames)

    def set_ray_cut(self, motion: dict, max_frames: int = 16) -> None:
        """The Gaussians the training camera saw end-on, shortened from other viewpoints
        (:func:`gstalk.avatar.views.set_ray_cut`)."""
        from gstalk.avatar.views import set_ray_cut

        set_ray_cut(self, motion, max_frames)

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
        """Head model -> posed triangle frames (origins, rotations, scales) of every frame
        (the avatar's identity, unless ``p`` gives a shape)."""
        verts = flame_forward(self.head_model if p.shape is not None else self.identity_head(), p).vertices
        return triangle_frames(verts, self.head_model.faces)

    def identity_head(self):
        """The head model with this avatar's identity in its template (computed once; see
        :meth:`HeadModel.with_identity`)."""
        key = (id(self.head_model), self.shape.data_ptr(), self.shape._version)
        if self._identity is None or self._identity[0] != key:
            self._identity = (key, self.head_model.with_identity(self.shape))
        return self._identity[1]

    def binding_i32(self) -> Tensor:
        """The binding as int32 (what the CUDA posing kernel reads), converted once per binding."""
        b = self.binding
        key = (b.data_ptr(), b.shape[0], b._version)
        if self._binding32 is None or self._binding32[0] != key:
            self._binding32 = (key, b.to(torch.int32).contiguous())
        return self._binding32[1]

    def training_centre(self, like: Tensor) -> Tensor:
        """[1, 3] the training camera's centre, in ``like``'s dtype and device (computed once
        per dtype and device)."""
        v = self.viewmat
        key = (like.dtype, like.device, v.data_ptr(), v._version)
        if key not in self._centres:
            v = self.viewmat.to(like)
            self._centres[key] = -(v[:3, :3].T @ v[:3, 3])[None]
        return self._centres[key]

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
            None if d is None else d.d_log_scales, backend=backend,
            binding_i32=self.binding_i32() if self.means.is_cuda else None)
        opac = self.opacity_logits[None].expand(B, -1)
        sh = self.sh[None].expand(B, -1, -1, -1)  # a view: no [B, N, K, 3] copy unless colours move
        if d is not None:
            opac = opac + 2.0 * torch.tanh(d.d_opacity[..., 0] / 2.0)
            if d.d_colors is not None:
                sh = torch.cat([sh[:, :, :1] + (d.d_colors / SH_C0)[:, :, None], sh[:, :, 1:]], 2)
        return GaussianTensors(means, quats, scales, torch.sigmoid(opac), sh), d


__all__ = ["AVATAR_VERSION", "Avatar", "AvatarConfig", "AudioToMotion", "Frame"]
