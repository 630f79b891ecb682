"""Where an avatar's Gaussians start, and the priors the field is given: Gaussians on the head
mesh's triangles and on the torso, the lips' place and reach (the audio stream's spatial
prior), the expression coefficients that move the lips, and how much the expressions move
each triangle."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gstalk.avatar.binding import triangle_frames, world_to_local
from gstalk.deform.field import REGION_FACE, REGION_MOUTH, REGION_TORSO
from gstalk.gaussians.set import SH_C0, GaussianSet
from gstalk.head.flame import HeadModel
from gstalk.head.lbs import FlameParams, flame_forward


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


def lip_jacobian(head: HeadModel, shape: Tensor, jaw: np.ndarray, expr: np.ndarray,
                 eps: float = 1e-3) -> np.ndarray | None:
    """[3 + E, 3 L]: how far the head model's lip landmarks move (in millimetres) per unit of
    each jaw (axis-angle) and expression output, around the jaw ``jaw`` [3] and expression
    ``expr`` [E] (a clip's mean; the head otherwise at rest): what a lip model's errors in
    those outputs cost in lip position. None where the landmark embedding has no lips."""
    head, shape = head.to("cpu"), shape.float().cpu()
    E = head.n_expr
    found = _lip_landmarks(head)
    if found is None:
        return None
    emb, lips = found
    e0 = torch.zeros(E)
    given = torch.as_tensor(expr, dtype=torch.float32).reshape(-1)[:E]
    e0[:len(given)] = given
    y0 = torch.cat([torch.as_tensor(jaw, dtype=torch.float32).reshape(3), e0])
    ys = torch.cat([y0[None], y0[None] + eps * torch.eye(3 + E)])  # the point, then each output nudged
    with torch.no_grad():
        v = flame_forward(head, FlameParams(shape=shape[None].expand(len(ys), -1), jaw=ys[:, :3],
                                            expr=ys[:, 3:])).vertices
        pts = emb.points(v, head.faces)[:, lips] * 1000.0  # [4 + E, L, 3] in mm
    return ((pts[1:] - pts[:1]) / eps).reshape(3 + E, -1).double().numpy()


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

