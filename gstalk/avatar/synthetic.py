"""An avatar built in memory on the open stand-in head, without a clip or training: Gaussians on
its triangles and randomised networks. For benchmarks (numbers that do not depend on a fit)
and for tests of what reads avatars (export, viewer)."""

from __future__ import annotations

import torch

from gstalk.audio.features import feature_dim
from gstalk.avatar.init import concat_sets, init_gaussians, torso_gaussians
from gstalk.avatar.model import Avatar, AvatarConfig
from gstalk.head.flame import STANDIN_PATH, load_head_model
from gstalk.head.tracker import VIEWMAT


def standin_avatar(n_gaussians: int = 0, per_triangle: int = 1, resolution: int = 64, sh_degree: int = 1,
                   n_shape: int | None = None, n_expr: int | None = None, expr_cond: int = 8,
                   shape_std: float = 0.0, torso: int = 0, field_noise: float = 0.02, seed: int = 0) -> Avatar:
    """A stand-in avatar with random colours and view dependence, ``per_triangle`` Gaussians a
    triangle (or exactly ``n_gaussians``, spread over the triangles), ``torso`` free Gaussians
    below the head at the tracked distance, and its field and audio-to-motion head perturbed
    by ``field_noise`` so that they move things."""
    g = torch.Generator().manual_seed(seed)
    head = load_head_model(STANDIN_PATH, n_shape=n_shape, n_expr=n_expr)
    shape = torch.randn(head.n_shape, generator=g) * shape_std
    if n_gaussians > 0:
        per_triangle = max(1, -(-n_gaussians // head.faces.shape[0]))  # enough per triangle, then cut
    gs, region = init_gaussians(head, shape, per_triangle=per_triangle, sh_degree=sh_degree, seed=seed)
    if n_gaussians > 0:
        keep = torch.arange(min(n_gaussians, len(gs)))
        gs, region = gs.subset(keep), region[keep]
    gs.sh[:, 0] = torch.rand(len(gs), 3, generator=g) * 2 - 1
    gs.sh[:, 1:] = torch.randn(gs.sh[:, 1:].shape, generator=g) * 0.2
    if torso > 0:
        pts = torch.stack([torch.rand(torso, generator=g) * 0.3 - 0.15, -0.18 - torch.rand(torso, generator=g) * 0.1,
                           torch.rand(torso, generator=g) * 0.1 - 0.05], 1) + torch.tensor([0.0, 0.0, -0.6])
        tg, treg = torso_gaussians(pts, torch.rand(torso, 3, generator=g), 0.02, sh_degree)
        gs, region = concat_sets(gs, tg), torch.cat([region, treg])
    cfg = AvatarConfig(resolution=resolution, feature_kind="mel", window=16, feature_dim=feature_dim("mel"),
                       sh_degree=sh_degree, expr_cond=expr_cond, head_model=head.reference(),
                       n_shape=head.n_shape, n_expr=head.n_expr, seed=seed)
    f = 1.6 * resolution
    K = torch.tensor([[f, 0, resolution / 2], [0, f, resolution / 2], [0, 0, 1.0]])
    with torch.random.fork_rng(devices=[]):  # the networks' initial weights: from the seed, not the caller's state
        torch.manual_seed(seed)
        av = Avatar(cfg, head, shape, gs, region, K, torch.as_tensor(VIEWMAT, dtype=torch.float32))
    with torch.no_grad():
        for mod in (av.field, av.a2m.head):
            for p in mod.parameters():
                p.add_(torch.randn(p.shape, generator=g) * field_noise)
    return av


__all__ = ["standin_avatar"]
