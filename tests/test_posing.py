"""The per-Gaussian posing step: the PyTorch twin against the step written out from its
definition (triangle binding, then the deformation), its gradients, and the fused CUDA kernel
against the twin (skipped without a GPU)."""

import json

import numpy as np
import pytest
import torch

from conftest import cuda
from gstalk.avatar.binding import bind_to_world, quat_multiply, triangle_frames
from gstalk.avatar.posing import pose_gaussians, pose_gaussians_torch


def _inputs(B=3, V=40, F=30, N=200, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    verts_rest = r(1, V, 3)
    verts = verts_rest + 0.1 * r(B, V, 3)
    faces = torch.randint(V, (F, 3), generator=g)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    o, rot, s = triangle_frames(verts, faces)
    _, r0, _ = triangle_frames(verts_rest, faces)
    n_tri = faces.shape[0]
    binding = torch.randint(n_tri, (N,), generator=g)
    binding[::7] = -1  # some free Gaussians (torso)
    lm, lq, ls = 0.3 * r(N, 3), r(N, 4), 0.2 * r(N, 3) - 2
    dm, dq, dls = 0.05 * r(B, N, 3), torch.tensor([1.0, 0, 0, 0], dtype=dtype) + 0.1 * r(B, N, 4), 0.1 * r(B, N, 3)
    out = dict(tri_o=o, tri_r=rot, tri_s=s, rest_r=r0[0], local_means=lm, local_quats=lq, local_log_scales=ls,
               binding=binding, d_means=dm, d_quats=dq, d_log_scales=dls)
    return {k: v.to(device) for k, v in out.items()}


def _by_definition(a, deform=True):
    """Binding for the bound Gaussians, world values for the free ones, then the deformation."""
    B = a["tri_o"].shape[0]
    bound = a["binding"] >= 0
    means = a["local_means"][None].expand(B, -1, -1).clone()
    quats = a["local_quats"][None].expand(B, -1, -1).clone()
    scales = torch.exp(a["local_log_scales"])[None].expand(B, -1, -1).clone()
    bm, bq, bs = bind_to_world(a["local_means"][bound], a["local_quats"][bound], a["local_log_scales"][bound],
                               a["binding"][bound], a["tri_o"], a["tri_r"], a["tri_s"])
    means[:, bound], quats[:, bound], scales[:, bound] = bm, bq, bs
    if deform:
        f = a["binding"][bound]
        dm = a["d_means"].clone()
        rel = a["tri_r"][:, f] @ a["rest_r"][f].transpose(-1, -2)
        dm[:, bound] = (rel @ a["d_means"][:, bound][..., None])[..., 0]
        means = means + dm
        quats = quat_multiply(quats, a["d_quats"])
        scales = scales * torch.exp(a["d_log_scales"])
    return means, quats, scales


@pytest.mark.parametrize("deform", [True, False])
def test_twin_matches_the_definition(deform):
    a = _inputs()
    if not deform:
        a.update(d_means=None, d_quats=None, d_log_scales=None)
    got = pose_gaussians_torch(**a)
    want = _by_definition(a, deform)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    free = a["binding"] < 0
    if not deform:  # free Gaussians keep their world values
        torch.testing.assert_close(got[0][:, free], a["local_means"][free][None].expand(3, -1, -1))


def test_twin_gradients():
    a = _inputs(B=2, V=12, F=10, N=12, dtype=torch.float64)
    names = ["local_means", "local_quats", "local_log_scales", "d_means", "d_quats", "d_log_scales", "tri_o", "tri_s"]
    leaves = {k: a[k].clone().requires_grad_(True) for k in names}

    def f(*xs):
        b = {**a, **dict(zip(names, xs))}
        return pose_gaussians_torch(**b)

    assert torch.autograd.gradcheck(f, tuple(leaves[k] for k in names), eps=1e-6, atol=1e-5)


def test_auto_backend_on_cpu_gives_the_definition_and_cuda_needs_a_gpu():
    """'auto' on CPU tensors poses by the definition (the twin: there is no CPU kernel), with
    gradients; asked for by name without a GPU, the CUDA kernel is a GstalkError."""
    from gstalk.errors import GstalkError

    a = _inputs()
    for x, y in zip(pose_gaussians(**a), _by_definition(a)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    lm = a["local_means"].clone().requires_grad_(True)
    pose_gaussians(**{**a, "local_means": lm})[0].sum().backward()
    assert lm.grad is not None and torch.isfinite(lm.grad).all() and lm.grad.abs().sum() > 0
    if not torch.cuda.is_available():
        with pytest.raises(GstalkError, match="CUDA GPU"):
            pose_gaussians(**a, backend="cuda")


@cuda
@pytest.mark.parametrize("deform", [True, False])
def test_cuda_kernel_matches_twin(deform):
    a = _inputs(B=4, V=500, F=800, N=20000, device="cuda")
    if not deform:
        a.update(d_means=None, d_quats=None, d_log_scales=None)
    ref = pose_gaussians(**a, backend="torch")
    got = pose_gaussians(**a, backend="cuda")
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


@cuda
def test_avatar_posed_with_the_kernel_matches_the_twin(tmp_path):
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.conditions import conditions_for, training_expressions
    from gstalk.avatar.model import Frame

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av"), "cuda")
    c = conditions_for(av, motion, 4, 25.0, None, training_expressions(motion))
    with torch.no_grad():
        ref, _ = av.posed(Frame(c.params, c.codes, c.blink), backend="torch")
        got, _ = av.posed(Frame(c.params, c.codes, c.blink), backend="cuda")
    for g, r in zip(got, ref):
        for x, y in zip(g, r):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


def test_benchmark_script_measures_every_stage():
    """scripts/bench.py at a tiny size: every stage of the per-frame path gets a finite time."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("gstalk_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run(600, 32, torch.device("cpu"), budget=0.0)
    assert r["gaussians"] == 600
    from gstalk.render import cpu_ext

    compiled = cpu_ext.available()  # then the PyTorch compositor is timed beside the compiled one
    assert r["render_backend"] == ("cpu" if compiled else "torch")
    stages = ["audio features (per frame)", "audio code", "skinning + triangle frames", "deformation field [reference]",
              "deformation field", "posing step [torch]", "rasterisation",
              *(["rasterisation [torch reference]"] if compiled else []), "copy-out (uint8 to host)",
              "posed + rasterised frame [torch]", f"posed + rasterised frame, batches of {mod.OFFLINE_BATCH} [torch]",
              "whole frame as gstalk render runs it, encoded [torch]", "deformation field [half]",
              "posed + rasterised frame [torch, half field]", "training iteration",
              *(["training iteration [torch reference rasteriser]"] if compiled else [])]
    assert list(r["ms"]) == stages
    assert all(0 < v < 60_000 for v in r["ms"].values())
    hi = r["half_field_image"]  # what the half-precision field changed in the uint8 frame
    assert hi["dtype"] == "bfloat16" and hi["psnr_db"] > 40 and 0 <= hi["changed_values"] < 0.05


def test_offline_frames_in_batches_match_frame_by_frame(tmp_path):
    """gstalk render's frames (posed and rasterized a batch at a time, a camera per frame) are
    the frames the avatar renders one by one."""
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.model import Frame
    from gstalk.avatar.render import render_frame
    from gstalk.avatar.cameras import cameras_for
    from gstalk.avatar.conditions import conditions_for, frames_iter, training_expressions

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=5), "cpu")
    expressions = training_expressions(motion)
    cams = cameras_for(av, motion, 5, "orbit", 40)
    got = list(frames_iter(av, motion, 5, 25.0, cams, expressions=expressions, batch=3))  # batches of 3 and 2
    c = conditions_for(av, motion, 5, 25.0, None, expressions)
    bg = torch.ones(40, 40, 3)
    with torch.no_grad():
        gs, _ = av.posed(Frame(c.params, c.codes, c.blink))
        want = [render_frame(av, g, cams[k], bg)[0] for k, g in enumerate(gs)]
    assert len(got) == 5 and got[0].shape == (40, 40, 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (got[0] - got[3]).abs().max() > 0.05  # the orbit and the motion change the frames


def test_other_viewpoints_keep_the_colours_the_training_camera_saw(tmp_path):
    """The clip's one still camera saw each Gaussian from one direction: from that camera the
    avatar renders its SH as they are; from anywhere else each Gaussian keeps the colour the
    training camera saw instead of extrapolating the SH."""
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.model import Frame
    from gstalk.avatar.render import render_frame, render_frames
    from gstalk.avatar.views import other_view
    from gstalk.avatar.cameras import cameras_for
    from gstalk.avatar.conditions import conditions_for, training_expressions
    from gstalk.gaussians.set import GaussianTensors
    from gstalk.render import Cameras, rasterize
    from gstalk.render.project import sh_colors

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=3), "cpu")
    assert av.cfg.sh_degree == 1
    with torch.no_grad():
        av.sh[:, 1:] = 0.6 * torch.randn(av.sh[:, 1:].shape, generator=torch.Generator().manual_seed(0))
        c = conditions_for(av, motion, 3, 25.0, None, training_expressions(motion))
        g = av.posed(Frame(c.params, c.codes, c.blink))[0][0]
        track = cameras_for(av, motion, 1, "track", 40)
        side = cameras_for(av, motion, 8, "orbit", 40)[1:2]  # 45 degrees round
        bg = torch.zeros(40, 40, 3)
        rgb, _, _ = render_frame(av, g, track, bg)
        assert torch.equal(rgb, rasterize(g, track, sh_degree=1, background=0.0).colors[0])
        seen = other_view(av, g)
        torch.testing.assert_close(seen.colors, sh_colors(g.colors, g.means, track.centers, 1)[0])
        av.view_fill = av.ray_cut = None  # without the view fill and the ray cut (tested below)
        rgb, _, _ = render_frame(av, g, side, bg)
        assert torch.equal(rgb, rasterize(seen, side, background=0.0).colors[0])
        extrapolated = rasterize(g, side, sh_degree=1, background=0.0).colors[0]
        assert (rgb - extrapolated).abs().max() > 0.1
        # the browser viewer's and the viser recording's splats carry these colours too
        from gstalk.render.project import covariance_3d, splat_arrays

        centres, cov, rgb_s, op = splat_arrays(seen)
        np.testing.assert_allclose(rgb_s, seen.colors.clamp(0, 1).numpy())
        np.testing.assert_allclose(centres, seen.means.numpy())
        np.testing.assert_allclose(cov, covariance_3d(seen.quats, seen.scales).numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(op[:, 0], seen.opacities.numpy())
        # the frames-first path does the same per frame
        gb = GaussianTensors(*(t[:2] for t in av.posed_batch(Frame(c.params, c.codes, c.blink))[0]))
        both = render_frames(av, gb, Cameras(torch.cat([track.viewmats, side.viewmats]),
                                              torch.cat([track.Ks, side.Ks]), 40, 40), bg)
        for k, cam in enumerate((track, side)):
            g = GaussianTensors(*(t[k] for t in gb))
            torch.testing.assert_close(both[k], render_frame(av, g, cam, bg)[0], atol=1e-5, rtol=1e-5)


def test_drawn_pixels_are_each_gaussians_share_of_the_frames():
    """A Gaussian alone draws its opacity times its footprint's integral (2 pi sigma^2 pixels,
    with the renderer's 0.3 px^2 low-pass), once a frame; behind an opaque one, nothing."""
    import math

    from gstalk.avatar.views import drawn_pixels
    from gstalk.gaussians.set import GaussianTensors
    from gstalk.render import Cameras

    cams = Cameras(torch.eye(4)[None].expand(2, 4, 4), torch.tensor([[64.0, 0, 32], [0, 64.0, 32], [0, 0, 1]])
                   [None].expand(2, 3, 3), 64, 64)
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [0.6, 0.0, 1.0]])  # the third out of the frame
    scales = torch.tensor([[0.094] * 3, [0.1] * 3, [0.01] * 3])  # 3 px sigma at 2 m
    g = GaussianTensors(means[None].expand(2, -1, -1), torch.tensor([1.0, 0, 0, 0]).expand(2, 3, 4), scales[None]
                        .expand(2, -1, -1), torch.tensor([0.5, 0.0, 1.0])[None].expand(2, -1), torch.zeros(2, 3, 3))
    w = drawn_pixels(g, cams)
    want = 2 * 0.5 * 2 * math.pi * (3.008 ** 2 + 0.3)  # two frames
    assert abs(float(w[0]) - want) < 0.03 * want, (float(w[0]), want)
    assert float(w[2]) == 0.0
    wide = torch.tensor([[0.094] * 3, [1.0] * 3, [0.01] * 3])  # one wide and opaque in front
    opaque = GaussianTensors(g.means, g.quats, wide[None].expand(2, -1, -1),
                             torch.tensor([0.5, 1.0, 1.0])[None].expand(2, -1), g.colors)
    w = drawn_pixels(opaque, cams)
    assert float(w[0]) < 0.02 * want and float(w[1]) > 64 * 64


def test_middle_mean_leaves_out_the_darkest_and_lightest_and_blends_two_colours_on_their_line():
    from gstalk.avatar.views import middle_mean

    brown, blonde = torch.tensor([0.30, 0.20, 0.10]), torch.tensor([0.70, 0.60, 0.40])
    # one odd colour at either end of 8 is left out whole
    c = torch.stack([torch.zeros(3), brown, brown, brown, blonde, blonde, blonde, torch.ones(3)])
    torch.testing.assert_close(middle_mean(c), (brown + blonde) / 2)
    # 64 of two colours, the brown ones' share going from 1/4 to 3/4: each result lies on the
    # line between them and moves towards brown a step at a time (a channel-wise median jumps
    # from blonde to brown where the counts cross, and with a third colour takes red and
    # green from one and blue from another)
    last = None
    for n_brown in range(16, 49):
        c = torch.cat([brown.expand(n_brown, 3), blonde.expand(64 - n_brown, 3)])[torch.randperm(64)]
        m = middle_mean(c[None])[0]
        t = float(((m - blonde) @ (brown - blonde)) / (brown - blonde).square().sum())
        torch.testing.assert_close(m, blonde + t * (brown - blonde))
        if last is not None:
            assert 0 < t - last <= 1 / 32 + 1e-6
        last = t
    assert last == pytest.approx(1.0) and middle_mean(torch.stack([brown] * 17 + [blonde] * 47)[None])[0][0] > 0.6


def test_sides_the_clip_never_showed_face_on_take_the_colour_of_the_nearest_part_it_did(tmp_path, monkeypatch):
    """From the side, the Gaussians that the tracked frames only showed edge-on (or not at
    all) show the middle colour of the nearest seen, opaque, visible head Gaussians of the
    same part of the head, faded in between 5 and 25 degrees away from the training camera; from the
    training camera nothing changes."""
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar import views
    from gstalk.avatar.model import Frame
    from gstalk.render.project import sh_colors
    from gstalk.avatar.render import render_frame
    from gstalk.avatar.views import FILL_K, SEEN_COS, drawn_pixels, fill_weight, other_view
    from gstalk.avatar.cameras import cameras_for
    from gstalk.avatar.conditions import conditions_for, training_expressions
    from gstalk.head.lbs import FlameParams
    from gstalk.render import Cameras

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=4), "cpu")
    with torch.no_grad():
        av.opacity_logits[::3] = -2.0  # some faint Gaussians: they lend no colour
    av.set_view_fill(motion)
    fill, fill_rgb = av.view_fill, av.view_fill_rgb
    n, bound = av.num_gaussians, av.binding >= 0
    moved = torch.zeros(n, dtype=torch.bool)
    moved[fill] = True
    assert bool(moved.any()) and not bool(moved.all())
    assert not bool(moved[~bound].any())  # the free (torso) Gaussians keep their own
    # seen: some tracked frame showed the Gaussian's triangle at under 60 degrees from face-on
    keys = ("expr", "global_rot", "neck", "jaw", "eyes", "eyelids", "translation")
    params = {k: torch.as_tensor(motion[k]).float() for k in keys}
    with torch.no_grad():
        o, r, _ = av.skin(FlameParams(**params))
    tri = av.binding.clamp_min(0)
    to_cam = -o[:, tri]  # the training camera sits at the origin (the tracker's VIEWMAT)
    cos = ((r[:, tri, :, 2] * to_cam).sum(-1) / to_cam.norm(dim=-1)).amax(0)
    seen = bound & (cos >= SEEN_COS)
    assert torch.equal(moved, bound & ~seen)
    # each takes the mean of the middle half, by brightness, of the colours of the FILL_K
    # nearest (rest pose) seen, opaque, visible
    # Gaussians of its part of the head, as the training camera saw them in the first tracked
    # frame; visible: the training camera drew over 0.125 px of it (at 128 px, over the frames)
    with torch.no_grad():
        g4 = av.posed_batch(Frame(FlameParams(**params), deform=False))[0]
    K = av.K.float().clone()
    K[:2] *= 128 / av.cfg.resolution
    drawn = drawn_pixels(g4, Cameras(av.viewmat.float()[None].expand(4, 4, 4), K[None].expand(4, 3, 3), 128, 128)) / 4
    source = seen & (torch.sigmoid(av.opacity_logits.detach()) > 0.6) & (drawn >= 0.125)
    hidden = seen & (torch.sigmoid(av.opacity_logits.detach()) > 0.6) & (drawn < 0.125)
    assert bool(hidden.any())  # behind others: never taught a colour
    part = av.head_parts()
    assert part is not None and bool((part[bound] >= 0).all()) and bool((part[~bound] == -1).all())
    with torch.no_grad():
        g0 = av.posed_batch(Frame(FlameParams(**{k: v[:1] for k, v in params.items()}), deform=False))[0]
        rgb0 = sh_colors(g0.colors[0], g0.means[0], av.training_centre(g0.means[0]), av.cfg.sh_degree)[0]
    x = av.canonical_positions()
    parts_seen = 0
    for j, i in enumerate(fill.tolist()):
        src = torch.nonzero(source & (part == part[i]))[:, 0]
        if len(src) == 0:
            src = torch.nonzero(source)[:, 0]
        else:
            parts_seen += 1
        near = src[torch.cdist(x[i:i + 1].double(), x[src].double())[0].argsort()[:FILL_K]]
        if len(near) < FILL_K:
            near = torch.cat([near, near[-1:].expand(FILL_K - len(near))])
        mid = rgb0[near][rgb0[near].mean(1).argsort()[FILL_K // 4:FILL_K - FILL_K // 4]]
        torch.testing.assert_close(fill_rgb[j], mid.mean(0), atol=1e-5, rtol=1e-5)
    assert parts_seen > 0
    # a single odd source does not paint a patch (as it did when each took its one nearest
    # source): its neighbours outvote it, even for the Gaussian it is nearest to
    t0 = int(fill[0])
    src = torch.nonzero(source & (part == part[t0]))[:, 0]
    assert len(src) > FILL_K // 2
    odd = int(src[torch.cdist(x[t0:t0 + 1].double(), x[src].double())[0].argmin()])
    keep = av.sh[odd, 0].detach().clone()
    with torch.no_grad():
        av.sh[odd, 0] = (torch.tensor([0.0, 0.0, 1.0]) - 0.5) / 0.28209479177387814  # pure blue
    av.set_view_fill(motion)
    assert not bool((av.view_fill_rgb - torch.tensor([0.0, 0.0, 1.0])).abs().amax(1).lt(0.05).any())
    with torch.no_grad():
        av.sh[odd, 0] = keep
    av.set_view_fill(motion)
    torch.testing.assert_close(av.view_fill_rgb, fill_rgb)
    # the hidden ones lend nothing: painted blue, they change no fill colour (counted as
    # sources, they turn some blue)
    keep = av.sh[hidden, 0].detach().clone()
    with torch.no_grad():
        av.sh[hidden, 0] = (torch.tensor([0.0, 0.0, 1.0]) - 0.5) / 0.28209479177387814
    av.set_view_fill(motion)
    torch.testing.assert_close(av.view_fill_rgb, fill_rgb)
    monkeypatch.setattr(views, "SOURCE_PIXELS", 0.0)
    av.set_view_fill(motion)
    assert bool(((av.view_fill_rgb - fill_rgb).abs().amax(1) > 0.05).any())
    monkeypatch.undo()
    with torch.no_grad():
        av.sh[hidden, 0] = keep
    av.set_view_fill(motion)
    torch.testing.assert_close(av.view_fill_rgb, fill_rgb)

    cams = cameras_for(av, motion, 120, "orbit", 40)  # 3 degrees a step
    w = fill_weight(av, cams.centers[:31])
    torch.testing.assert_close(w[[0, 1, 9, 30]], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert 0.4 < float(w[5]) < 0.6  # 15 degrees: half way
    with torch.no_grad():
        c = conditions_for(av, motion, 1, 25.0, None, training_expressions(motion))
        g = av.posed(Frame(c.params, c.codes, c.blink))[0][0]
        plain = other_view(av, g).colors  # no viewpoint given: nothing filled
        near = other_view(av, g, cams.centers[1:2]).colors  # 3 degrees
        side = other_view(av, g, cams.centers[30:31]).colors  # 90 degrees
        half = other_view(av, g, cams.centers[5:6]).colors
    assert torch.equal(near, plain)
    torch.testing.assert_close(side[moved], fill_rgb)
    assert torch.equal(side[~moved], plain[~moved])
    want = plain.clone()
    want[moved] = plain[moved] + w[5] * (fill_rgb - plain[moved])
    torch.testing.assert_close(half, want)
    # the renders: the tracked camera as before; the side view shows the filled colours
    track = cameras_for(av, motion, 1, "track", 40)
    profile = Cameras(cams.viewmats[30:31], cams.Ks[30:31], 40, 40)
    bg = torch.zeros(40, 40, 3)
    with torch.no_grad():
        front = render_frame(av, g, track, bg)[0]
        side_rgb = render_frame(av, g, profile, bg)[0]
        av.view_fill = None
        assert torch.equal(front, render_frame(av, g, track, bg)[0])
        unfilled = render_frame(av, g, profile, bg)[0]
    assert (side_rgb - unfilled).abs().max() > 0.1


def test_gaussians_the_camera_saw_end_on_are_shortened_from_other_views(tmp_path):
    """A Gaussian stretched along the training camera's line of sight draws the same small
    footprint whatever its length; from the side it is a streak. Those (long axis within 25
    degrees of the ray on average over the clip, over 4 times the middle axis) are drawn with
    the long axis cut to 4 times the middle one from other viewpoints, faded in like the view
    fill; the training camera draws them as trained, as do splats for any viewpoint."""
    import math

    from gstalk.avatar.binding import rotmat_to_quat
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.model import Frame
    from gstalk.avatar.render import render_frame
    from gstalk.avatar.views import RAY_RATIO, fill_weight, other_view
    from gstalk.avatar.cameras import cameras_for
    from gstalk.avatar.conditions import conditions_for, training_expressions
    from gstalk.head.lbs import FlameParams
    from gstalk.render import Cameras, rasterize
    from gstalk.render.project import quat_to_rotmat

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=4), "cpu")
    keys = ("expr", "global_rot", "neck", "jaw", "eyes", "eyelids", "translation")
    params = FlameParams(**{k: torch.as_tensor(motion[k]).float() for k in keys})
    bound = torch.nonzero(av.binding >= 0)[:, 0]
    along, across = bound[::7][:20], bound[3::7][:20]
    with torch.no_grad():
        o, r, _ = av.skin(FlameParams(**{k: v[:1] for k, v in params.__dict__.items() if v is not None}))
        g0 = av.posed_batch(Frame(FlameParams(**{k: v[:1] for k, v in params.__dict__.items() if v is not None}),
                                  deform=False))[0]
        for idx, to_ray in ((along, True), (across, False)):
            ray = g0.means[0, idx] - av.training_centre(g0.means[0, idx])
            ray = ray / ray.norm(dim=-1, keepdim=True)
            # a world rotation whose first axis is the ray (or at right angles to it)
            up = torch.tensor([0.0, 1.0, 0.0]).expand_as(ray)
            side = torch.linalg.cross(up, ray)
            side = side / side.norm(dim=-1, keepdim=True)
            first = ray if to_ray else side
            second = side if to_ray else torch.linalg.cross(ray, side)
            third = torch.linalg.cross(first, second)
            world = torch.stack([first, second, third], -1)
            tri = r[0, av.binding[idx]]
            av.quats[idx] = rotmat_to_quat(tri.transpose(-1, -2) @ world)
            av.log_scales[idx] = torch.log(torch.tensor([2.0, 0.2, 0.05]))  # 10 times longer than wide
    av.invalidate()
    av.set_ray_cut(motion)
    av.view_fill = None  # the view fill's size cap is tested below; here every size is the cut's
    cut = torch.zeros(av.num_gaussians, dtype=torch.bool)
    cut[av.ray_cut] = True
    assert bool(cut[along].all()) and not bool(cut[across].any())
    # every cut one, checked independently over every tracked frame
    with torch.no_grad():
        g = av.posed_batch(Frame(params, deform=False))[0]
    ls = av.log_scales.detach()
    top = ls.argmax(-1)
    R = quat_to_rotmat(g.quats)  # [B, N, 3, 3]
    axis = torch.stack([R[b, torch.arange(av.num_gaussians), :, top] for b in range(R.shape[0])])
    ray = g.means - av.training_centre(g.means)
    cos = ((axis * ray).sum(-1).abs() / ray.norm(dim=-1)).mean(0)
    sorted_ls = ls.sort(-1, descending=True).values
    want = (cos > math.cos(math.radians(25))) & (sorted_ls[:, 0] - sorted_ls[:, 1] > math.log(RAY_RATIO))
    assert torch.equal(cut, want)
    f = av.ray_cut_scale
    assert f.shape == (len(av.ray_cut), 3) and bool((f <= 1).all())
    assert torch.equal((f < 1).sum(-1), torch.ones(len(f), dtype=torch.long))  # only the long axis
    # from the side: the long axis RAY_RATIO times the middle one; from the training camera,
    # from 3 degrees and for splats that any viewpoint may draw: as trained
    cams = cameras_for(av, motion, 120, "orbit", 40)
    with torch.no_grad():
        c = conditions_for(av, motion, 1, 25.0, None, training_expressions(motion))
        gp = av.posed(Frame(c.params, c.codes, c.blink))[0][0]
        side = other_view(av, gp, cams.centers[30:31]).scales
        half = other_view(av, gp, cams.centers[5:6]).scales
    assert torch.equal(other_view(av, gp).scales, gp.scales)
    assert torch.equal(other_view(av, gp, cams.centers[1:2]).scales, gp.scales)
    assert torch.equal(side[~cut], gp.scales[~cut])
    s_sorted = side[along].sort(-1, descending=True).values
    torch.testing.assert_close(s_sorted[:, 0], RAY_RATIO * s_sorted[:, 1])
    w = fill_weight(av, cams.centers[5:6])
    torch.testing.assert_close(half[cut], gp.scales[cut] * f ** w)
    # the renders: the training camera's unchanged, the side view's changed by the cut
    track = cameras_for(av, motion, 1, "track", 40)
    profile = Cameras(cams.viewmats[30:31], cams.Ks[30:31], 40, 40)
    bg = torch.zeros(40, 40, 3)
    with torch.no_grad():
        assert torch.equal(render_frame(av, gp, track, bg)[0], rasterize(gp, track, sh_degree=1,
                                                                          background=0.0).colors[0])
        shortened = render_frame(av, gp, profile, bg)[0]
        av.ray_cut = None
        streaks = render_frame(av, gp, profile, bg)[0]
    assert (shortened - streaks).abs().max() > 0.05


def test_gaussians_the_clip_never_showed_face_on_are_no_larger_nor_fainter_than_the_seen_ones(tmp_path):
    """Nothing in training bounds the size or opacity of the Gaussians the clip never showed
    face-on: from other viewpoints each of their axes is drawn no longer than the 0.99
    quantile of the seen head Gaussians' longest axes (rest pose), and each at least 0.6
    opaque, faded in like the view fill; the seen ones and the training camera's view keep
    their trained sizes and opacities."""
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.model import Frame
    from gstalk.avatar.render import render_frame
    from gstalk.avatar.views import FILL_SIZE_QUANTILE, fill_weight, other_view
    from gstalk.gaussians.set import GaussianTensors
    from gstalk.avatar.cameras import cameras_for
    from gstalk.avatar.conditions import conditions_for, training_expressions
    from gstalk.render import Cameras, rasterize

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=4), "cpu")
    av.ray_cut = None  # the cut is tested above; here every size is as trained
    av.set_view_fill(motion)
    filled = torch.zeros(av.num_gaussians, dtype=torch.bool)
    filled[av.view_fill] = True
    seen = (av.binding >= 0) & ~filled
    big = av.view_fill[::5][:10]  # some unseen ones, ten times as large as the largest seen one
    _, _, s_rest = av.rest_frames()
    tri = av.binding.clamp_min(0)
    with torch.no_grad():
        size = torch.exp(av.log_scales) * s_rest[0, tri][:, None]
        av.log_scales[big] += torch.log(10 * size[seen].amax() / size[big].amin(-1, keepdim=True))
        av.opacity_logits[av.view_fill[1::4]] = -3.0  # some faint ones (0.05)
    av.invalidate()
    av.set_view_fill(motion)
    assert torch.equal(av.view_fill, torch.nonzero(filled)[:, 0])  # sizes do not choose which
    with torch.no_grad():
        size = torch.exp(av.log_scales) * s_rest[0, tri][:, None]
    cap = torch.quantile(size[seen].amax(-1), FILL_SIZE_QUANTILE)
    f = av.view_fill_scale
    assert f.shape == (int(filled.sum()), 3) and bool((f <= 1).all())
    drawn = size[filled] * f
    assert bool((drawn <= cap * (1 + 1e-5)).all())
    torch.testing.assert_close(drawn[size[filled] > cap], cap.expand(int((size[filled] > cap).sum())))
    assert torch.equal(f[size[filled] <= cap], torch.ones(int((size[filled] <= cap).sum())))  # smaller ones kept
    assert bool((f[torch.isin(av.view_fill, big)] < 0.2).all())
    cams = cameras_for(av, motion, 120, "orbit", 40)
    with torch.no_grad():
        c = conditions_for(av, motion, 1, 25.0, None, training_expressions(motion))
        gp = av.posed(Frame(c.params, c.codes, c.blink))[0][0]
        side = other_view(av, gp, cams.centers[30:31]).scales  # 90 degrees
        half = other_view(av, gp, cams.centers[5:6]).scales  # 15 degrees
    assert torch.equal(other_view(av, gp).scales, gp.scales)
    assert torch.equal(other_view(av, gp, cams.centers[1:2]).scales, gp.scales)
    assert torch.equal(side[~filled], gp.scales[~filled])
    torch.testing.assert_close(side[filled], gp.scales[filled] * f)
    torch.testing.assert_close(half[filled], gp.scales[filled] * f ** fill_weight(av, cams.centers[5:6]))
    # opacities: the filled ones at least 0.6 from the side, part way at 15 degrees, as trained
    # from the training camera; frames first, one weight a frame
    op = gp.opacities
    assert bool((op[filled] < 0.1).any()) and bool((op[filled] > 0.6).any())
    with torch.no_grad():
        both = other_view(av, GaussianTensors(*(t[None].expand(2, *t.shape) for t in gp)),
                          cams.centers[[30, 5]]).opacities
    w = fill_weight(av, cams.centers[5:6])
    assert torch.equal(other_view(av, gp, cams.centers[1:2]).opacities, op)
    assert torch.equal(both[:, ~filled], op[~filled].expand(2, -1))
    torch.testing.assert_close(both[0, filled], op[filled].clamp_min(0.6))
    torch.testing.assert_close(both[1, filled], op[filled] + w * (op[filled].clamp_min(0.6) - op[filled]))
    track = cameras_for(av, motion, 1, "track", 40)
    profile = Cameras(cams.viewmats[30:31], cams.Ks[30:31], 40, 40)
    bg = torch.zeros(40, 40, 3)
    with torch.no_grad():
        assert torch.equal(render_frame(av, gp, track, bg)[0],
                           rasterize(gp, track, sh_degree=1, background=0.0).colors[0])
        capped = render_frame(av, gp, profile, bg)[0]
        av.view_fill_scale = torch.ones_like(f)
        blobs = render_frame(av, gp, profile, bg)[0]
    assert (capped - blobs).abs().max() > 0.05


def test_an_avatar_with_a_broken_motion_file_is_refused_with_a_message(tmp_path):
    """motion.npz holds what drives the avatar and chooses its view fill: without it, or
    with a key missing, loading says which file and what is wrong."""
    from gstalk.avatar.io import load_avatar
    from gstalk.errors import FileFormatError

    from tinyavatar import make_avatar

    folder = make_avatar(tmp_path / "av", n_frames=3)
    with np.load(folder / "motion.npz") as z:
        motion = {k: z[k] for k in z.files if k != "translation"}
    np.savez(folder / "motion.npz", **motion)
    with pytest.raises(FileFormatError, match="motion.npz lacks translation"):
        load_avatar(folder)
    np.savez(folder / "motion.npz", **motion, translation=np.zeros((0, 3)))
    with pytest.raises(FileFormatError, match="motion.npz: 'translation' has 0 along axis 0, expected T = 3"):
        load_avatar(folder)
    (folder / "motion.npz").write_bytes(b"not a zip")
    with pytest.raises(FileFormatError, match="motion.npz cannot be read"):
        load_avatar(folder)


def test_damaged_avatar_files_and_driver_arguments_are_messages(tmp_path, capsys):
    """A truncated networks file, a config with a field no version wrote, a track file that is
    not one (pickled objects, another npz, a zip that is not an npz), --audio with --expressions
    and a frame rate no video has each end 'gstalk render' with one message and exit status 2,
    before a frame is drawn and without writing the output."""
    from gstalk.avatar.io import load_avatar
    from gstalk.cli import main
    from gstalk.errors import FileFormatError, InputError
    from gstalk.avatar.conditions import load_driver

    from tinyavatar import make_avatar, tone_speech

    folder = make_avatar(tmp_path / "av", n_frames=3)
    wav = tone_speech(tmp_path / "speech.wav")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"format": "x"}], dtype=object))
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04" + bytes(100))
    for bad, match in [(pickled, "pickled.npz cannot be read as a numpy .npz archive"),
                       (folder / "motion.npz", "motion.npz is not a gstalk track"),
                       (tmp_path / "zip.npz", "zip.npz cannot be read as a numpy .npz archive")]:
        with pytest.raises(FileFormatError, match=match):
            load_driver(None, bad, 25.0)
    with pytest.raises(InputError, match="not both"):
        load_driver(wav, folder / "motion.npz", 25.0)
    for fps in (-1.0, 0.0, float("nan"), 1e6):
        with pytest.raises(InputError, match="frame rate must be above 0"):
            load_driver(wav, None, fps)
    out = tmp_path / "talk.mp4"
    capsys.readouterr()
    for args in (["--fps", "-1"], ["--expressions", str(pickled)]):
        assert main(["render", str(folder), "--audio", str(wav), "--out", str(out), "--size", "32", *args]) == 2
        err = capsys.readouterr().err
        assert "gstalk error" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "colour_of_the_sky": "blue"}))
    with pytest.raises(FileFormatError, match="config.json does not match avatar format version"):
        load_avatar(folder)
    (folder / "config.json").write_text(json.dumps(config))
    data = (folder / "networks.safetensors").read_bytes()
    (folder / "networks.safetensors").write_bytes(data[:100])
    with pytest.raises(FileFormatError, match="networks.safetensors cannot be read"):
        load_avatar(folder)
    (folder / "networks.safetensors").write_bytes(data)
    load_avatar(folder)  # whole again: read


def test_a_camera_path_file_gives_its_views_back_and_forth(tmp_path):
    """--camera path.json: its view matrices, one a frame, played back and forth when there are
    fewer than frames; its K where given, else the tracked one scaled to the output size; a
    file that is not such a path is refused, saying what it should hold."""
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.cameras import cameras_for
    from gstalk.errors import FileFormatError, InputError

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=3, resolution=64))
    track = cameras_for(av, motion, 1, "track", 32)
    orbit = cameras_for(av, motion, 3, "orbit", 32)
    path = tmp_path / "path.json"
    path.write_text(json.dumps({"viewmats": orbit.viewmats.tolist()}))
    cams = cameras_for(av, motion, 7, str(path), 32)
    assert len(cams.viewmats) == 7 and cams.width == cams.height == 32
    torch.testing.assert_close(cams.viewmats, orbit.viewmats[[0, 1, 2, 1, 0, 1, 2]])
    torch.testing.assert_close(cams.Ks, track.Ks.expand(7, 3, 3))
    assert float(track.Ks[0, 0, 0]) == pytest.approx(float(av.K[0, 0]) / 2)  # tracked at 64 px, drawn at 32
    K = [[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]
    path.write_text(json.dumps({"viewmats": orbit.viewmats[:1].tolist(), "K": K}))
    cams = cameras_for(av, motion, 2, str(path), 32)
    torch.testing.assert_close(cams.Ks, torch.tensor([K, K]))
    torch.testing.assert_close(cams.viewmats, orbit.viewmats[[0, 0]])
    for bad in ({"viewmats": [[1, 2, 3]]}, {"viewmats": []}, {"views": []},
                {"viewmats": orbit.viewmats.tolist(), "K": [1, 2]}):
        path.write_text(json.dumps(bad))
        with pytest.raises(FileFormatError, match="path.json"):
            cameras_for(av, motion, 2, str(path), 32)
    with pytest.raises(InputError, match="no such camera path file"):
        cameras_for(av, motion, 2, str(tmp_path / "gone.json"), 32)


def test_compiled_field_is_one_graph_and_matches_eager(tmp_path):
    """torch.compile captures the deformation field without graph breaks (fullgraph) and gives
    the eager field's outputs; aot_eager checks the capture without a slow C++ build."""
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.model import Frame
    from gstalk.avatar.conditions import conditions_for, training_expressions

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=3), "cpu")
    c = conditions_for(av, motion, 2, 25.0, None, training_expressions(motion))
    c.codes.normal_()
    fr = Frame(c.params, c.codes, c.blink)
    with torch.no_grad():
        ref = av.deformation(fr)
        av.compile_field(backend="aot_eager")
        got = av.deformation(fr)
    assert av._compiled is not None
    for a, b in zip(got.__dict__.values(), ref.__dict__.values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.enable_grad():  # training calls keep the eager module (gradients flow)
        d = av.deformation(fr)
        d.d_means.sum().backward()
    assert any(p.grad is not None for p in av.field.parameters())


def test_head_expression_padding_keeps_the_clips_mean_face(tmp_path):
    """A lip model predicts the first few expression coefficients: the rest take the training
    clip's mean (its usual face), or zeros when no fill is given; longer inputs are cut."""
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.conditions import head_expr, rest_expr

    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_expr=4))
    fill = rest_expr(motion)
    np.testing.assert_allclose(fill, motion["expr"].mean(0), rtol=1e-6)
    e = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    out = head_expr(av, e, fill)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out[:, :2], e)
    torch.testing.assert_close(out[:, 2:], torch.from_numpy(fill[2:4]).float().expand(3, 2))
    assert (head_expr(av, e)[:, 2:] == 0).all()
    assert head_expr(av, torch.ones(3, 7), fill).shape == (3, 4)


def test_a_field_that_moves_no_colours_leaves_the_posed_colours_a_view(tmp_path):
    """The avatar's field moves no colours (colour=False): the posed batch's SH are a view of
    the canonical ones, not a [B, N, K, 3] copy per batch; a field that does move colours adds
    its offsets to the DC term of each frame."""
    from gstalk.avatar.conditions import conditions_for, training_expressions
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.model import Frame
    from gstalk.deform.field import Deformation
    from gstalk.gaussians.set import SH_C0
    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=3), "cpu")
    assert not av.field.colour
    c = conditions_for(av, motion, 3, 25.0, None, training_expressions(motion))
    with torch.no_grad():
        g, d = av.posed_batch(Frame(c.params, c.codes, c.blink))
    assert d is not None and d.d_colors is None
    assert g.colors.shape == (3, *av.sh.shape) and g.colors.stride(0) == 0  # the same memory for every frame
    torch.testing.assert_close(g.colors[2], av.sh.detach())
    shift = torch.rand(3, av.sh.shape[0], 3)
    moving = Deformation(d.d_means, d.d_quats, d.d_log_scales, d.d_opacity, shift)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(av, "deformation", lambda frame: moving)
        g2, _ = av.posed_batch(Frame(c.params, c.codes, c.blink))
    torch.testing.assert_close(g2.colors[:, :, 0], av.sh.detach()[None, :, 0] + shift / SH_C0)
    torch.testing.assert_close(g2.colors[:, :, 1:], av.sh.detach()[None, :, 1:].expand(3, -1, -1, -1))


def test_per_avatar_constants_follow_the_avatar(tmp_path):
    """What an avatar computes once (its identity in the head model's template, the int32
    binding, the training camera's centre) gives what computing it each time gives, and
    follows a new binding (densification replaces it)."""
    from gstalk.avatar.io import load_avatar
    from gstalk.head.lbs import FlameParams
    from gstalk.render import Cameras
    from tinyavatar import make_avatar

    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=3), "cpu")
    p = FlameParams(jaw=torch.as_tensor(motion["jaw"][:3]).float(), expr=torch.as_tensor(motion["expr"][:3]).float(),
                    global_rot=torch.as_tensor(motion["global_rot"][:3]).float())
    with_shape = FlameParams(**{**p.__dict__, "shape": av.shape[None].expand(3, -1)})
    # (the rotations come from the tiny triangles' frames, which magnify float32 rounding of
    # the vertices, 1e-8 here, a hundredfold)
    for a, b, tol in zip(av.skin(p), av.skin(with_shape), (2e-6, 2e-5, 2e-6)):
        torch.testing.assert_close(a, b, atol=tol, rtol=1e-5)
    assert av.identity_head() is av.identity_head()
    centre = Cameras(av.viewmat[None], av.K[None], 8, 8).centers
    torch.testing.assert_close(av.training_centre(av.means), centre)
    assert av.training_centre(av.means.double()).dtype == torch.float64
    assert av.binding_i32().dtype == torch.int32 and torch.equal(av.binding_i32().long(), av.binding)
    av.binding = torch.flip(av.binding, [0]).clone()
    assert torch.equal(av.binding_i32().long(), av.binding)


def test_cameras_sliced_or_moved_keep_their_check():
    """A camera with NaN or a zero focal length is refused where it is made; its slices and
    copies come from checked values, so they are not checked again (each check waits for a
    GPU), but their shapes are."""
    from gstalk.errors import InputError
    from gstalk.render import Cameras

    v, k = torch.eye(4)[None].repeat(4, 1, 1), (torch.eye(3) * 50)[None].repeat(4, 1, 1)
    bad = v.clone()
    bad[1, 0, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        Cameras(bad, k, 8, 8)
    cams = Cameras(v, k, 8, 8)
    assert len(cams[1:3]) == 2 and len(cams.to("cpu")) == 4 and len(Cameras.cat([cams, cams[0]])) == 5
    with pytest.raises(InputError, match="4, 4"):
        Cameras(v[:, :3], k, 8, 8, checked=True)
