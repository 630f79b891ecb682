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


def shaped_vertices(model: HeadModel, p: FlameParams, b: int, vertex_ids: Tensor | None = None) -> Tensor:
    """[B, V', 3] vertices after identity, expression and eyelid blendshapes (no pose)."""
    vt, sd, ed = model.v_template, model.shapedirs, model.exprdirs
    if vertex_ids is not None:
        vt, sd, ed = vt[vertex_ids], sd[vertex_ids], ed[vertex_ids]
    v = vt.expand(b, -1, -1)
    if p.shape is not None and model.n_shape:
        v = v + torch.einsum("vck,bk->bvc", sd, p.shape[:, : model.n_shape].expand(b, -1))
    if p.expr is not None and model.n_expr:
        v = v + torch.einsum("vck,bk->bvc", ed, p.expr[:, : model.n_expr].expand(b, -1))
    if p.eyelids is not None and model.eyelids is not None:
        el = model.eyelids if vertex_ids is None else model.eyelids[:, vertex_ids]
        v = v + torch.einsum("kvc,bk->bvc", el, p.eyelids)
    return v


def joint_transforms(model: HeadModel, pose: Tensor, joints: Tensor) -> tuple[Tensor, Tensor]:
    """World transforms of the joints [B, 5, 4, 4] and posed joint positions [B, 5, 3]."""
    rot = axis_angle_to_matrix(pose)  # [B, 5, 3, 3]
    b = pose.shape[0]
    rel = joints.clone()
    par = model.parent_list
    rel[:, 1:] = joints[:, 1:] - joints[:, par[1:]]
    local = torch.zeros(b, 5, 4, 4, dtype=pose.dtype, device=pose.device)
    local[..., :3, :3] = rot
    local[..., :3, 3] = rel
    local[..., 3, 3] = 1
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


def flame_forward(model: HeadModel, p: FlameParams, vertex_ids: Tensor | None = None) -> FlameOutput:
    """Posed vertices (all, or ``vertex_ids``) for a batch of parameters."""
    dtype, device = model.v_template.dtype, model.v_template.device
    b = p.batch_size()
    v_full = shaped_vertices(model, p, b)  if vertex_ids is None else None
    # joints always come from the full shaped mesh (the regressor spans all vertices)
    if vertex_ids is None:
        joints_rest = torch.einsum("jv,bvc->bjc", model.J_regressor, v_full)
        v_shaped = v_full
    else:
        jv = model.J_regressor.abs().sum(0).nonzero(as_tuple=True)[0]  # vertices the regressor uses
        joints_rest = torch.einsum("jv,bvc->bjc", model.J_regressor[:, jv], shaped_vertices(model, p, b, jv))
        v_shaped = shaped_vertices(model, p, b, vertex_ids)
    pose = _full_pose(p, b, dtype, device)
    rot = axis_angle_to_matrix(pose)
    eye = torch.eye(3, dtype=dtype, device=device)
    feat = (rot[:, 1:] - eye).reshape(b, 36)
    pd = model.posedirs
    if vertex_ids is not None:
        cols = (vertex_ids[:, None] * 3 + torch.arange(3, device=device)).reshape(-1)
        pd = pd[:, cols]
    v_posed = v_shaped + (feat @ pd).reshape(b, -1, 3)
    world, joints = joint_transforms(model, pose, joints_rest)
    # transforms relative to the rest pose: G_k [I, -J_k]
    rel = world.clone()
    rel[..., :3, 3] = world[..., :3, 3] - (world[..., :3, :3] @ joints_rest[..., None])[..., 0]
    w = model.weights if vertex_ids is None else model.weights[vertex_ids]
    t = torch.einsum("vk,bkij->bvij", w, rel)  # [B, V', 4, 4]
    verts = (t[..., :3, :3] @ v_posed[..., None])[..., 0] + t[..., :3, 3]
    if p.translation is not None:
        verts = verts + p.translation[:, None]
        joints = joints + p.translation[:, None]
        rel = rel.clone()
        rel[..., :3, 3] = rel[..., :3, 3] + p.translation[:, None]
    return FlameOutput(vertices=verts, joints=joints, transforms=rel)
