"""Linear blend skinning with pose correctives, the FLAME formulation, batched over frames.

    v_shaped = v_template + S beta + E psi (+ eyelid blendshapes)
    J        = J_regressor v_shaped
    v_posed  = v_shaped + P (R(theta)[1:] - I)           (pose correctives)
    v        = sum_k w_k G_k(theta, J) [v_posed; 1]       (skinning)

All of it is ordinary autograd; ``vertex_ids`` restricts the work to a subset of vertices
(the tracker only needs those under the landmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle
from torch import Tensor

from gstalk.head.flame import HeadModel


# Rodrigues' formula and its inverse, smooth at zero: kornia's (tests/test_head.py checks them)
axis_angle_to_matrix = axis_angle_to_rotation_matrix  # [..., 3] -> [..., 3, 3]
matrix_to_axis_angle = rotation_matrix_to_axis_angle  # [..., 3, 3] -> [..., 3], angles below pi


@dataclass
class FlameParams:
    """Per-frame parameters, batch size B (any field may be None = zeros).

    shape [B, n_shape]; expr [B, n_expr]; global_rot, neck, jaw [B, 3] axis-angle;
    eyes [B, 6] (left, right axis-angle); eyelids [B, 2]; translation [B, 3].
    """

    shape: Tensor | None = None
    expr: Tensor | None = None
    global_rot: Tensor | None = None
    neck: Tensor | None = None
    jaw: Tensor | None = None
    eyes: Tensor | None = None
    eyelids: Tensor | None = None
    translation: Tensor | None = None

    def batch_size(self) -> int:
        for v in self.__dict__.values():
            if v is not None:
                return v.shape[0]
        return 1


def _full_pose(p: FlameParams, b: int, dtype, device) -> Tensor:
    z3 = torch.zeros(b, 3, dtype=dtype, device=device)
    eyes = p.eyes if p.eyes is not None else torch.zeros(b, 6, dtype=dtype, device=device)
    parts = [p.global_rot if p.global_rot is not None else z3, p.neck if p.neck is not None else z3,
             p.jaw if p.jaw is not None else z3, eyes[:, :3], eyes[:, 3:]]
    return torch.stack([x.expand(b, 3) for x in parts], dim=1)  # [B, 5, 3]


def _rows(x: Tensor) -> Tensor:
    """``x`` [B, K], or its first row when it is one row expanded over the batch (the tracker's
    shared identity): the blendshape is then computed once and broadcast."""
    return x[:1] if x.shape[0] > 1 and x.stride(0) == 0 else x


def _blend(template: Tensor, sd: Tensor, ed: Tensor, lids: Tensor | None, p: FlameParams, b: int) -> Tensor:
    """[B, N, 3]: ``template`` [N, 3] plus identity (``sd`` [N, 3, S]), expression (``ed``
    [N, 3, E]) and eyelid (``lids`` [2, N, 3]) blendshapes, for vertices or joints alike."""
    v = template.expand(b, -1, -1)
    if p.shape is not None and sd.shape[-1]:
        v = v + torch.einsum("vck,bk->bvc", sd, _rows(p.shape[:, : sd.shape[-1]]))
    if p.expr is not None and ed.shape[-1]:
        v = v + torch.einsum("vck,bk->bvc", ed, _rows(p.expr[:, : ed.shape[-1]]))
    if p.eyelids is not None and lids is not None:
        v = v + torch.einsum("kvc,bk->bvc", lids, _rows(p.eyelids))
    return v.expand(b, -1, -1)


@dataclass
class VertexSubset:
    """The model's per-vertex arrays restricted to ``ids`` (see :meth:`of`): made once and
    passed as ``vertex_ids`` to :func:`flame_forward`, they are not gathered on every call
    (the tracker poses the same few hundred vertices thousands of times)."""

    ids: Tensor | None  # None: every vertex
    v_template: Tensor
    shapedirs: Tensor
    exprdirs: Tensor
    eyelids: Tensor | None
    posedirs: Tensor  # [36, V'*3]
    weights: Tensor  # [V', 5]

    @classmethod
    def of(cls, model: HeadModel, ids: Tensor | None) -> "VertexSubset":
        if ids is None:
            return cls(None, model.v_template, model.shapedirs, model.exprdirs, model.eyelids, model.posedirs,
                       model.weights)
        ids = ids.to(model.v_template.device)
        cols = (ids[:, None] * 3 + torch.arange(3, device=ids.device)).reshape(-1)
        return cls(ids, model.v_template[ids], model.shapedirs[ids], model.exprdirs[ids],
                   None if model.eyelids is None else model.eyelids[:, ids], model.posedirs[:, cols],
                   model.weights[ids])


def rest_joints(model: HeadModel, p: FlameParams, b: int) -> Tensor:
    """[B, 5, 3] joints of the blendshaped head before posing: the joint regressor is linear,
    so they come from the model's regressed template and blendshapes, without the mesh."""
    return _blend(model.J_template, model.J_shapedirs, model.J_exprdirs, model.J_eyelids, p, b)


def joint_transforms(model: HeadModel, pose: Tensor, joints: Tensor,
                     rot: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """World transforms of the joints [B, 5, 4, 4] and posed joint positions [B, 5, 3]
    (``rot``: the pose's rotation matrices, when already computed)."""
    rot = axis_angle_to_matrix(pose) if rot is None else rot  # [B, 5, 3, 3]
    b = pose.shape[0]
    par = model.parent_list
    rel = torch.cat([joints[:, :1], joints[:, 1:] - joints[:, list(par[1:])]], 1)
    local = torch.cat([torch.cat([rot, rel[..., None]], -1),
                       torch.tensor([0.0, 0, 0, 1], dtype=pose.dtype, device=pose.device).expand(b, 5, 1, 4)], -2)
    chain = [local[:, 0]]
    for i in range(1, 5):
        chain.append(chain[par[i]] @ local[:, i])
    world = torch.stack(chain, dim=1)
    return world, world[..., :3, 3]


@dataclass
class FlameOutput:
    vertices: Tensor  # [B, V', 3]
    joints: Tensor  # [B, 5, 3] posed joints (translation applied)
    transforms: Tensor  # [B, 5, 4, 4] skinning transforms (rest -> posed, translation applied)


def flame_forward(model: HeadModel, p: FlameParams, vertex_ids: Tensor | VertexSubset | None = None) -> FlameOutput:
    """Posed vertices (all, or ``vertex_ids``: indices, or a :class:`VertexSubset` made once
    for many calls) for a batch of parameters."""
    dtype, device = model.v_template.dtype, model.v_template.device
    b = p.batch_size()
    sub = vertex_ids if isinstance(vertex_ids, VertexSubset) else VertexSubset.of(model, vertex_ids)
    v_shaped = _blend(sub.v_template, sub.shapedirs, sub.exprdirs, sub.eyelids, p, b)
    joints_rest = rest_joints(model, p, b)
    if p.neck is None and p.jaw is None and p.eyes is None:
        # a rigid head (the tracker's first stage): no correctives, and every joint's
        # transform is the root's, so the skinning is one rotation about the root joint
        rot = p.global_rot if p.global_rot is not None else torch.zeros(1, 3, dtype=dtype, device=device)
        R = axis_angle_to_matrix(rot).expand(b, 3, 3)
        j0 = joints_rest[:, :1]  # [B, 1, 3]
        t = j0 - j0 @ R.transpose(-1, -2)  # [B, 1, 3]
        if p.translation is not None:
            t = t + p.translation[:, None]
        verts = v_shaped @ R.transpose(-1, -2) + t
        joints = joints_rest @ R.transpose(-1, -2) + t
        bottom = torch.tensor([0.0, 0, 0, 1], dtype=dtype, device=device).expand(b, 5, 1, 4)
        rel = torch.cat([torch.cat([R[:, None].expand(b, 5, 3, 3), t[..., None].expand(b, 5, 3, 1)], -1), bottom], -2)
        return FlameOutput(vertices=verts, joints=joints, transforms=rel)
    pose = _full_pose(p, b, dtype, device)
    rot = axis_angle_to_matrix(pose)
    eye = torch.eye(3, dtype=dtype, device=device)
    feat = (rot[:, 1:] - eye).reshape(b, 36)
    v_posed = v_shaped + (feat @ sub.posedirs).reshape(b, -1, 3)
    world, joints = joint_transforms(model, pose, joints_rest, rot)
    # transforms relative to the rest pose: G_k [I, -J_k]
    R = world[..., :3, :3]  # [B, 5, 3, 3]
    t = world[..., :3, 3] - (R @ joints_rest[..., None])[..., 0]  # [B, 5, 3]
    if p.translation is not None:
        t = t + p.translation[:, None]
        joints = joints + p.translation[:, None]
    # skinning: the joints' rotations and translations blended per vertex by the weights
    # (matrix products over the batch), then applied elementwise (a 3x3 product per vertex
    # is many tiny products, several times slower; slicing a blended [R | t] costs a zeroed
    # copy per slice in the backward pass)
    Rv = torch.einsum("vk,bkij->bvij", sub.weights, R)  # [B, V', 3, 3]
    verts = (Rv * v_posed[:, :, None, :]).sum(-1) + torch.einsum("vk,bkc->bvc", sub.weights, t)
    bottom = world[..., 3:, :]
    rel = torch.cat([torch.cat([R, t[..., None]], -1), bottom], -2)
    return FlameOutput(vertices=verts, joints=joints, transforms=rel)
