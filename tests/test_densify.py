"""Densification: the cap holds, split children follow their parent's shape and orientation,
faint Gaussians go, bindings are inherited and Adam's state is carried over."""

import math

import torch

from gstalk.gaussians.set import GaussianSet
from gstalk.train import densify


def _set(n: int, seed: int = 0) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    return GaussianSet(torch.randn(n, 3, generator=g), torch.nn.functional.normalize(torch.randn(n, 4, generator=g)),
                       torch.randn(n, 3, generator=g) * 0.3 - 3, torch.full((n,), 2.0), torch.rand(n, 1, 3, generator=g),
                       binding=torch.arange(n) % 7 - 1)


def test_growth_is_capped_at_max_gaussians_largest_gradients_first():
    g = _set(100)
    grad = torch.linspace(1.0, 2.0, 100)  # every one over the threshold
    p = densify.plan(grad, g.log_scales, g.opacity_logits, threshold=0.5, max_gaussians=110)
    grown = p.clone | p.split
    assert int(grown.sum()) == 10 and bool(grown[90:].all())  # the ten largest gradients
    new, region, source, fresh = densify.apply(g, torch.zeros(100, dtype=torch.long), p, torch.Generator())
    assert new.means.shape[0] == 110 and len(region) == 110 and int(fresh.sum()) == 10 + int(p.split.sum())
    # every new Gaussian carries its source's binding
    assert torch.equal(new.binding, g.binding[source])
    # at the cap nothing grows; faint ones are pruned
    g.opacity_logits[:5] = -10.0
    p = densify.plan(grad, g.log_scales, g.opacity_logits, threshold=0.5, max_gaussians=90)
    assert not bool((p.clone | p.split).any()) and int(p.keep.sum()) == 95


def test_split_children_are_samples_of_the_parent_turned_by_its_rotation():
    n = 400
    q = torch.tensor([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])  # 90 degrees about z
    g = GaussianSet(torch.zeros(n, 3), q.expand(n, 4).clone(),
                    torch.log(torch.tensor([0.1, 0.001, 0.001])).expand(n, 3).clone(), torch.full((n,), 2.0),
                    torch.zeros(n, 1, 3), binding=torch.zeros(n, dtype=torch.long))
    p = densify.Plan(keep=torch.zeros(n, dtype=torch.bool), clone=torch.zeros(n, dtype=torch.bool),
                     split=torch.ones(n, dtype=torch.bool))
    new, _, source, fresh = densify.apply(g, torch.zeros(n, dtype=torch.long), p, torch.Generator().manual_seed(0))
    assert new.means.shape[0] == 2 * n and bool(fresh.all())
    spread = new.means.std(0)
    # the long axis (local x) points along world y after the turn: the children spread along y
    assert 0.08 < float(spread[1]) < 0.12 and float(spread[0]) < 0.005 and float(spread[2]) < 0.005
    torch.testing.assert_close(new.log_scales, g.log_scales[source] - math.log(densify.SPLIT_SHRINK))


def test_adam_state_is_carried_for_kept_gaussians_and_zero_for_new_ones():
    g = _set(20)
    old_p = torch.nn.Parameter(g.means.clone())
    opt = torch.optim.Adam([{"params": [old_p], "name": "means"}])
    (old_p ** 2).sum().backward()
    opt.step()
    grad = torch.zeros(20)
    grad[3] = 1.0
    p = densify.plan(grad, g.log_scales, g.opacity_logits, threshold=0.5, max_gaussians=100)
    new, _, source, fresh = densify.apply(g, torch.zeros(20, dtype=torch.long), p, torch.Generator())
    new_p = torch.nn.Parameter(new.means.clone())
    new_opt = torch.optim.Adam([{"params": [new_p], "name": "means"}])
    densify.carry_adam_state(opt, new_opt, source, fresh)
    old, carried = opt.state[old_p], new_opt.state[new_p]
    assert float(carried["step"]) == float(old["step"]) == 1.0
    kept = ~fresh
    torch.testing.assert_close(carried["exp_avg"][kept], old["exp_avg"][source[kept]])
    torch.testing.assert_close(carried["exp_avg_sq"][kept], old["exp_avg_sq"][source[kept]])
    assert bool(fresh.any()) and float(carried["exp_avg"][fresh].abs().sum()) == 0.0
    # and the optimizer steps on from there
    (new_p ** 2).sum().backward()
    new_opt.step()
