"""The deformation field's per-frame inference at fixed points, factored and optionally in half
precision.

When the avatar is rendered (no gradients), its Gaussians' canonical positions do not change,
so everything in :class:`~gstalk.deform.field.DeformationField` that depends on the point
alone is computed once: the spatial features, the stream gates (with the spatial prior), the
per-point part of each branch's first layer and the output at the neutral conditions. What is
left per frame is small:

- the face branch's first layer is ``relu(P[n] + sum_s gate[n, s] * (W_s c_s[b]))``: the
  conditions of each stream (audio code, blink embedding, expression) go through their block
  of the first layer's weights once per frame (``[B, H]``), and each point mixes the S results
  by its gates. The reference multiplies every point's gated conditions ``[B, N, C]`` by the
  whole weight matrix, C/S (about 16) times the work, with the same result up to rounding;
- each branch runs on its own Gaussians only (face, mouth interior, torso), where the
  reference runs all three on every Gaussian and selects.

``dtype`` (float16 on a GPU, bfloat16 on a CPU) holds the cached per-point tensors and the
branch layers in half precision and computes in it; the offsets come out in float32 and
relative to the neutral output computed the same way, so the rounding cannot move a
Gaussian at the neutral conditions. ``scripts/bench.py`` measures what it changes in the
image.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from gstalk.deform.field import REGION_MOUTH, REGION_TORSO, Deformation, DeformationField, to_deformation
from gstalk.errors import InputError

PRECISIONS = ("float32", "half", "float16", "bfloat16")


def precision_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype of a precision name on a device: 'half' is float16 on a GPU and bfloat16 on a
    CPU (whose float16 matrix products are slow)."""
    if name not in PRECISIONS:
        raise InputError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "half":
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    return getattr(torch, name)


class FrozenField(nn.Module):
    """:class:`DeformationField` at fixed canonical points, for no-grad inference (see the
    module docstring). Built from the field's current weights; rebuild it after they change."""

    def __init__(self, field: DeformationField, x: Tensor, region: Tensor | None = None,
                 prior_gates: Tensor | None = None, relative: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.audio_dim, self.expr_dim, self.colour, self.relative = (field.audio_dim, field.expr_dim, field.colour,
                                                                       relative)
        self.n, self.dtype = x.shape[0], dtype
        self.out_dim = field.face_out[-1].out_features
        dev = x.device
        with torch.no_grad():
            h = field.spatial(x)
            gates = torch.sigmoid(field.gates(h))
            if prior_gates is not None:
                gates = gates * prior_gates
            region = torch.zeros(self.n, dtype=torch.long, device=dev) if region is None else region
            mouth, torso = region == REGION_MOUTH, region == REGION_TORSO
            parts = {"face": ~(mouth | torso), "mouth": mouth, "torso": torso}
            idx = {k: m.nonzero()[:, 0] for k, m in parts.items()}
            self.counts = {k: int(i.numel()) for k, i in idx.items()}
            self.whole_face = self.counts["face"] == self.n  # no gathering or scattering needed
            A, hf = field.audio_dim, field.face_in.cond.weight
            half = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
            for k, i in idx.items():
                self.register_buffer(f"{k}_idx", i)
            self.register_buffer("face_point", half(field.face_in.point(h[idx["face"]])))  # [Nf, H]
            self.register_buffer("face_gates", half(gates[idx["face"]]))  # [Nf, S]
            # the face branch's first-layer weights, one block per condition stream
            self.register_buffer("w_audio", half(hf[:, :A].T))  # [A, H]
            self.register_buffer("w_blink", half(hf[:, A:A + 8].T))  # [8, H]
            self.register_buffer("w_expr", half(hf[:, A + 8:].T))  # [E, H]
            self.blink_embed = copy.deepcopy(field.blink_embed).to(dtype)
            self.face_out = copy.deepcopy(field.face_out).to(dtype)
            self.register_buffer("mouth_point", half(field.mouth_in.point(h[idx["mouth"]])))
            self.register_buffer("w_mouth", half(field.mouth_in.cond.weight.T))  # [A, H/2]
            self.mouth_out = copy.deepcopy(field.mouth_out).to(dtype)
            self.register_buffer("torso_point", half(field.torso_in.point(h[idx["torso"]])))
            self.register_buffer("w_torso", half(field.torso_in.cond.weight.T))  # [3, H/2]
            self.torso_out = copy.deepcopy(field.torso_out).to(dtype)
            self.register_buffer("neutral", torch.zeros(1, self.n, self.out_dim, device=dev))
            if relative:
                z = lambda k: torch.zeros(1, k, device=dev)  # noqa: E731
                self.neutral = self._raw(z(A), z(1), z(self.expr_dim) if self.expr_dim else None, z(3))

    def _raw(self, audio: Tensor, blink: Tensor, expr: Tensor | None, neck: Tensor) -> Tensor:
        """The raw outputs [B, N, 11|14] in float32 (the reference's ``_raw``)."""
        dt, B = self.dtype, audio.shape[0]
        a = audio.to(dt)
        face = None
        if self.counts["face"]:
            streams = [a @ self.w_audio, torch.relu(self.blink_embed(blink.to(dt))) @ self.w_blink]
            if self.expr_dim:
                streams.append(expr.to(dt) @ self.w_expr)
            u = torch.stack(streams, 1)  # [B, S, H]
            pre = torch.relu(self.face_point + torch.einsum("ns,bsh->bnh", self.face_gates, u))
            face = self.face_out(pre).float()
            if self.whole_face:  # nothing to gather or scatter
                return face
        out = torch.zeros(B, self.n, self.out_dim, device=audio.device)
        if face is not None:
            out[:, self.face_idx] = face
        if self.counts["mouth"]:
            pre = torch.relu(self.mouth_point + (a @ self.w_mouth)[:, None])
            out[:, self.mouth_idx] = self.mouth_out(pre).float()
        if self.counts["torso"]:
            pre = torch.relu(self.torso_point + (neck.to(dt) @ self.w_torso)[:, None])
            out[:, self.torso_idx, :3] = self.torso_out(pre).float()
        return out

    def forward(self, audio: Tensor, blink: Tensor | None = None, expr: Tensor | None = None,
                neck: Tensor | None = None) -> Deformation:
        """Offsets of the N points under B frames' conditions: audio [B, A] (as the field takes
        it), blink [B] or [B, 1], expr [B, E], neck [B, 3]; None: the neutral value."""
        if audio.dim() != 2 or audio.shape[1] != self.audio_dim:
            raise InputError(f"audio codes must be [B, {self.audio_dim}], got {tuple(audio.shape)}")
        B, dev = audio.shape[0], audio.device
        blink = torch.zeros(B, 1, device=dev) if blink is None else blink.reshape(B, 1)
        if self.expr_dim and expr is None:
            expr = torch.zeros(B, self.expr_dim, device=dev)
        neck = torch.zeros(B, 3, device=dev) if neck is None else neck
        out = self._raw(audio, blink, expr, neck)
        if self.relative:
            out = out - self.neutral
        return to_deformation(out, self.colour)


__all__ = ["PRECISIONS", "FrozenField", "precision_dtype"]
