"""The audio- and expression-conditioned deformation field.

For canonical Gaussian positions ``x`` [N, 3] and per-frame conditions (audio code [B, A],
blink [B, 1], optionally head-model expression coefficients [B, E] and neck pose [B, 3])
it gives per-Gaussian, per-frame offsets: position [B, N, 3], rotation as a quaternion
delta [B, N, 4] (w, x, y, z; identity = (1, 0, 0, 0)), log-scale [B, N, 3], opacity-logit
[B, N, 1] and colour [B, N, 3]. The output layers start at zero, so the field is the
identity at initialisation.

Structure (after TalkingGaussian / ER-NeRF, in our own form):
- a spatial feature h(x) from a hash grid or tri-plane (computed once per point, shared
  by all frames);
- region attention: from h(x), per-point gates in (0, 1) for each condition stream
  (audio, eyes, expression), so audio acts mostly around the mouth and blink around the
  eyes (learned; an optional prior mask can bias them);
- the face branch: an MLP on [h, gated conditions]; its first layer is split so that the
  per-point part and the per-frame part are added (``[N, H] + [B, 1, H]``) instead of
  concatenating ``B x N`` inputs;
- a mouth-interior branch (teeth, tongue) driven by audio only, for Gaussians flagged
  ``mouth``; a torso branch driven by the neck pose, for Gaussians flagged ``torso``;
- ``relative=True`` (what avatars use): the offsets are taken relative to the field's output
  at the neutral conditions, so it is exactly the identity there and any change it makes
  comes from the conditions; switching it off then gives the canonical avatar it was
  trained with, not a degraded one that leant on an audio-independent offset.

Inference at fixed points (rendering an avatar) uses :class:`gstalk.deform.frozen.FrozenField`,
the same computation factored so that what depends on the point alone is done once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gstalk.deform.hashgrid import HashGrid, TriPlane
from gstalk.errors import InputError

REGION_FACE, REGION_MOUTH, REGION_TORSO = 0, 1, 2


@dataclass
class Deformation:
    """Per-frame offsets for N Gaussians (B frames)."""

    d_means: Tensor  # [B, N, 3]
    d_quats: Tensor  # [B, N, 4]
    d_log_scales: Tensor  # [B, N, 3]
    d_opacity: Tensor  # [B, N, 1]
    d_colors: Tensor | None  # [B, N, 3]; None for a field that moves no colours

    def regulariser(self) -> Tensor:
        """Mean squared offsets (keeps motion small where data does not ask for it)."""
        dq = self.d_quats - self.d_quats.new_tensor([1.0, 0, 0, 0])
        return (self.d_means.square().sum(-1).mean() + 0.1 * dq.square().sum(-1).mean()
                + 0.1 * self.d_log_scales.square().sum(-1).mean())


def to_deformation(out: Tensor, colour: bool) -> Deformation:
    """The field's raw outputs [B, N, 11|14] as offsets. Raw outputs are in natural units:
    1 = 1 cm, 0.1 rad, 10 % of scale, 0.1 of colour."""
    d_q = 0.05 * out[..., 3:7] + out.new_tensor([1.0, 0, 0, 0])
    col = 0.1 * out[..., 11:14] if colour else None
    return Deformation(d_means=0.01 * out[..., 0:3], d_quats=d_q, d_log_scales=0.1 * out[..., 7:10],
                       d_opacity=out[..., 10:11], d_colors=col)


def _mlp(inp: int, hidden: int, out: int, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = inp
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    last = nn.Linear(d, out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    mods.append(last)
    return nn.Sequential(*mods)


class _SplitFirstLayer(nn.Module):
    """A first layer over [per-point features, per-frame conditions], computed as a sum."""

    def __init__(self, point_dim: int, cond_dim: int, hidden: int):
        super().__init__()
        self.point = nn.Linear(point_dim, hidden)
        self.cond = nn.Linear(cond_dim, hidden, bias=False) if cond_dim else None

    def forward(self, h: Tensor, c: Tensor | None) -> Tensor:
        out = self.point(h)[None]  # [1, N, H]
        if self.cond is not None and c is not None:
            out = out + self.cond(c)  # [B, N, H] (c is [B, N, C] or [B, 1, C])
        return torch.relu(out)


class DeformationField(nn.Module):
    """See the module docstring. ``encoding``: 'hash' (3D hash grid) or 'triplane'."""

    def __init__(self, audio_dim: int = 32, expr_dim: int = 0, encoding: str = "triplane", hidden: int = 64,
                 levels: int = 12, features: int = 2, log2_table: int = 15, finest: int = 512,
                 bbox: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
                 colour: bool = True, backend: str = "auto"):
        super().__init__()
        self.audio_dim, self.expr_dim, self.colour = audio_dim, expr_dim, colour
        if encoding == "hash":
            self.encoder = HashGrid(3, levels, features, log2_table, 16, finest, backend)
        elif encoding == "triplane":
            self.encoder = TriPlane(levels, features, log2_table, 16, finest, backend)
        else:
            raise InputError(f"unknown spatial encoding {encoding!r}: choose 'hash' or 'triplane'")
        lo, hi = bbox if bbox is not None else ((-0.15, -0.25, -0.15), (0.15, 0.15, 0.2))
        self.register_buffer("bbox_lo", torch.tensor(lo, dtype=torch.float32))
        self.register_buffer("bbox_hi", torch.tensor(hi, dtype=torch.float32))
        hd = self.encoder.out_dim
        n_streams = 3 if expr_dim else 2
        self.gates = nn.Sequential(nn.Linear(hd, 32), nn.ReLU(), nn.Linear(32, n_streams))
        self.blink_embed = nn.Linear(1, 8)
        cond = audio_dim + 8 + expr_dim
        out = 3 + 4 + 3 + 1 + (3 if colour else 0)
        self.face_in = _SplitFirstLayer(hd, cond, hidden)
        self.face_out = _mlp(hidden, hidden, out, layers=1)
        self.mouth_in = _SplitFirstLayer(hd, audio_dim, hidden // 2)
        self.mouth_out = _mlp(hidden // 2, hidden // 2, 3 + 4 + 3 + 1 + (3 if colour else 0), layers=1)
        self.torso_in = _SplitFirstLayer(hd, 3, hidden // 2)
        self.torso_out = _mlp(hidden // 2, hidden // 2, 3, layers=1)

    def normalise(self, x: Tensor) -> Tensor:
        return ((x - self.bbox_lo) / (self.bbox_hi - self.bbox_lo)).clamp(0, 1)

    def spatial(self, x: Tensor) -> Tensor:
        """h(x) [N, F]: compute once per set of canonical positions."""
        return self.encoder(self.normalise(x))

    def forward(self, x: Tensor, audio: Tensor, blink: Tensor | None = None, expr: Tensor | None = None,
                neck: Tensor | None = None, region: Tensor | None = None, h: Tensor | None = None,
                prior_gates: Tensor | None = None, relative: bool = False,
                neutral: Tensor | None = None) -> Deformation:
        """Offsets for canonical positions ``x`` [N, 3] under B frames' conditions.

        audio [B, A]; blink [B] or [B, 1]; expr [B, E] (if the field has expr_dim); neck
        [B, 3]; region [N] (0 face, 1 mouth interior, 2 torso); h: precomputed
        :meth:`spatial` features; prior_gates [N, streams] multiplies the learned gates.
        ``relative``: give the offsets relative to the neutral conditions (all-zero audio
        code, expression and neck, open eyes), so the field is exactly the identity there and
        cannot hold an audio-independent change of the canonical avatar. ``neutral``: the raw
        output at the neutral conditions from :meth:`neutral_raw` (for repeated inference on
        the same points; computed here when not given).
        """
        if audio.dim() != 2 or audio.shape[1] != self.audio_dim:
            raise InputError(f"audio codes must be [B, {self.audio_dim}], got {tuple(audio.shape)}")
        B = audio.shape[0]
        h = self.spatial(x) if h is None else h
        gates = torch.sigmoid(self.gates(h))  # [N, S]
        if prior_gates is not None:
            gates = gates * prior_gates
        dev = x.device
        blink = torch.zeros(B, 1, device=dev) if blink is None else blink.reshape(B, 1)
        if self.expr_dim and expr is None:
            expr = torch.zeros(B, self.expr_dim, device=dev)
        neck = torch.zeros(B, 3, device=dev) if neck is None else neck
        out = self._raw(h, gates, audio, blink, expr, neck, region)
        if relative:
            out = out - (self.neutral_raw(h, region, gates=gates) if neutral is None else neutral)
        return to_deformation(out, self.colour)

    def neutral_raw(self, h: Tensor, region: Tensor | None = None, prior_gates: Tensor | None = None,
                    gates: Tensor | None = None) -> Tensor:
        """The raw output [1, N, 11|14] at the neutral conditions (zero audio code, expression
        and neck pose, blink 0) for spatial features ``h`` (``gates``: the stream gates, prior
        included, when the caller has them)."""
        if gates is None:
            gates = torch.sigmoid(self.gates(h))
            if prior_gates is not None:
                gates = gates * prior_gates
        z = h.new_zeros
        return self._raw(h, gates, z(1, self.audio_dim), z(1, 1), z(1, self.expr_dim) if self.expr_dim else None,
                         z(1, 3), region)

    def _raw(self, h: Tensor, gates: Tensor, audio: Tensor, blink: Tensor, expr: Tensor | None, neck: Tensor,
             region: Tensor | None) -> Tensor:
        """The branches' raw outputs [B, N, 11|14] for B frames' conditions."""
        B, N = audio.shape[0], h.shape[0]
        streams = [audio[:, None, :] * gates[None, :, 0:1],
                   torch.relu(self.blink_embed(blink))[:, None] * gates[None, :, 1:2]]
        if self.expr_dim:
            streams.append(expr[:, None, :] * gates[None, :, 2:3])
        cond = torch.cat(streams, -1)  # [B, N, C]
        out = self.face_out(self.face_in(h, cond))  # [B, N, 11|14]
        if region is not None:
            # the branches are skipped when no Gaussian needs them (eager); a compiled graph has
            # no data-dependent branches and always evaluates them
            whole = torch.compiler.is_compiling()
            mouth = (region == REGION_MOUTH)[None, :, None]
            if whole or bool(mouth.any()):
                m_out = self.mouth_out(self.mouth_in(h, audio[:, None, :]))
                out = torch.where(mouth, m_out, out)
            torso = (region == REGION_TORSO)[None, :, None]
            if whole or bool(torso.any()):
                t_out = self.torso_out(self.torso_in(h, neck[:, None, :]))
                t_full = torch.cat([t_out, torch.zeros(B, N, out.shape[-1] - 3, device=h.device)], -1)
                out = torch.where(torso, t_full, out)
        return out
