"""Densification of the canonical Gaussians during the static stage, triangle bindings kept.

Every ``densify_every`` iterations (3DGS's adaptive density control, as in gsplat's
``DefaultStrategy``): Gaussians whose mean screen-space gradient is over ``densify_grad``
grow, the large ones (over twice the median size) split in two smaller ones placed by their
own shape, the small ones are cloned; faint ones (opacity under 0.005) go. gsplat's
strategies cannot be used as they are: they own the parameter dictionary and know nothing of
the binding and region each Gaussian carries, which every new one must inherit from its
source. What they do right is done here too:

- **Adam's state is kept.** The optimizer is rebuilt over the new tensors with each kept
  Gaussian's moments carried over (and the step count); new ones start from zero moments,
  as gsplat's ops give them.
- **Split noise follows the Gaussian's orientation:** a child is placed at a sample of the
  parent's own Gaussian (the noise scaled by its axes, then turned by its rotation), not an
  axis-aligned one.
- **The cap holds:** at most ``max_gaussians`` after the step; where more would grow, the
  ones with the largest gradients do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gstalk.gaussians.set import GaussianSet
from gstalk.render.project import quat_to_rotmat

PRUNE_OPACITY = 0.005
BIG = 2.0  # split above this many times the median largest axis, clone below
SPLIT_SHRINK = 1.6  # 3DGS: each child 1/1.6 of the parent's size
PARAMS = ("means", "quats", "log_scales", "opacity_logits", "sh")


@dataclass
class Plan:
    """[N] bool masks over the current Gaussians."""

    keep: Tensor  # stays as it is (neither pruned nor split)
    clone: Tensor  # stays, and a copy is added
    split: Tensor  # replaced by two smaller children


def plan(avg_grad: Tensor, log_scales: Tensor, opacity_logits: Tensor, threshold: float, max_gaussians: int) -> Plan:
    """Which Gaussians are kept, cloned, split; the growth capped so that at most
    ``max_gaussians`` remain (the largest gradients first)."""
    size = torch.exp(log_scales.detach()).amax(-1)
    alive = torch.sigmoid(opacity_logits.detach()) > PRUNE_OPACITY
    grow = (avg_grad > threshold) & alive
    room = max(0, max_gaussians - int(alive.sum()))  # each clone or split adds one Gaussian
    if int(grow.sum()) > room:
        ranked = torch.where(grow, avg_grad, torch.full_like(avg_grad, -math.inf)).argsort(descending=True)
        grow = torch.zeros_like(grow)
        grow[ranked[:room]] = True
    big = size > size.median() * BIG
    split = grow & big
    return Plan(keep=alive & ~split, clone=grow & ~big, split=split)


def apply(g: GaussianSet, region: Tensor, p: Plan, gen: torch.Generator) -> tuple[GaussianSet, Tensor, Tensor, Tensor]:
    """The new set (kept, then clones, then two children per split Gaussian), its regions,
    ``source`` [M] the index of the Gaussian each new one comes from and ``fresh`` [M] bool:
    new ones (clones and children), whose optimizer state starts from zero."""
    idx = torch.arange(g.means.shape[0], device=g.means.device)
    parts = [g.subset(p.keep), g.subset(p.clone)]
    source = [idx[p.keep], idx[p.clone]]
    if bool(p.split.any()):
        s = g.subset(p.split)
        rot = quat_to_rotmat(torch.nn.functional.normalize(s.quats, dim=-1))
        for _ in range(2):
            c = g.subset(p.split)
            local = torch.randn(s.means.shape, generator=gen).to(s.means) * torch.exp(s.log_scales)
            c.means = s.means + (rot @ local[..., None])[..., 0]
            c.log_scales = s.log_scales - math.log(SPLIT_SHRINK)
            parts.append(c)
            source.append(idx[p.split])
    merged = parts[0]
    for q in parts[1:]:
        merged = GaussianSet(torch.cat([merged.means, q.means]), torch.cat([merged.quats, q.quats]),
                             torch.cat([merged.log_scales, q.log_scales]),
                             torch.cat([merged.opacity_logits, q.opacity_logits]), torch.cat([merged.sh, q.sh]),
                             binding=torch.cat([merged.binding, q.binding]))
    src = torch.cat(source)
    fresh = torch.ones(len(src), dtype=torch.bool, device=src.device)
    fresh[: int(p.keep.sum())] = False
    return merged, region[src], src, fresh


def carry_adam_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, source: Tensor, fresh: Tensor) -> None:
    """Give ``new`` (over the new Gaussian tensors, same groups by name) ``old``'s Adam state:
    row ``source[i]``'s moments for row i, zeros for the ``fresh`` rows; other groups
    (networks) are carried as they are."""
    by_name = {grp.get("name"): grp for grp in old.param_groups}
    for grp in new.param_groups:
        og = by_name.get(grp.get("name"))
        if og is None:
            continue
        for p_new, p_old in zip(grp["params"], og["params"]):
            st = old.state.get(p_old)
            if not st:
                continue
            if grp.get("name") not in PARAMS:
                new.state[p_new] = st
                continue
            carried = {}
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p_old.shape[0]:
                    v = v[source].clone()
                    v[fresh] = 0
                carried[k] = v
            new.state[p_new] = carried
