import math

import pytest
import torch

from conftest import cpu_kernel, cuda, front_camera, small_scene
from gstalk.errors import InputError
from gstalk.gaussians import GaussianSet, GaussianTensors
from gstalk.render import Cameras, orbit_cameras, rasterize
from gstalk.render.project import covariance_3d, eval_sh, project, quat_to_rotmat


def brute_force(g: GaussianTensors, cams: Cameras, cam: int, bg: float, sh_degree=None):
    """Per-pixel compositing over *all* Gaussians sorted by depth: no tiles, no radii."""
    covars = covariance_3d(g.quats, g.scales)
    p = project(g.means, covars, cams.viewmats, cams.Ks, cams.width, cams.height)
    if sh_degree is None:
        colors = g.colors
    else:
        d = g.means - cams.centers[cam]
        colors = (eval_sh(sh_degree, g.colors, d / d.norm(dim=-1, keepdim=True)) + 0.5).clamp_min(0)
    order = torch.argsort(p.depths[cam])
    order = order[p.depths[cam][order] > 0.01]
    ys, xs = torch.meshgrid(torch.arange(cams.height, dtype=g.means.dtype) + 0.5,
                            torch.arange(cams.width, dtype=g.means.dtype) + 0.5, indexing="ij")
    img = torch.zeros(cams.height, cams.width, colors.shape[-1], dtype=g.means.dtype)
    acc = torch.zeros(cams.height, cams.width, dtype=g.means.dtype)
    T = torch.ones(cams.height, cams.width, dtype=g.means.dtype)
    done = torch.zeros(cams.height, cams.width, dtype=torch.bool)
    for i in order.tolist():
        dx, dy = xs - p.means2d[cam, i, 0], ys - p.means2d[cam, i, 1]
        a, b, c = p.conics[cam, i]
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = torch.clamp(g.opacities[i] * torch.exp(-sigma), max=0.999)
        use = (sigma >= 0) & (alpha >= 1 / 255) & ~done
        nt = T * (1 - alpha)
        stop = use & (nt <= 1e-4)
        done = done | stop
        use = use & ~stop
        w = torch.where(use, alpha * T, torch.zeros_like(T))
        img = img + w[..., None] * colors[i]
        acc = acc + w
        T = torch.where(use, nt, T)
    return img + (1 - acc[..., None]) * bg, acc


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=cpu_kernel)])
@pytest.mark.parametrize("tile_size", [4, 16])
def test_tiled_matches_brute_force(tile_size, backend):
    g = small_scene(80, seed=3)
    g.opacity_logits = g.opacity_logits + 5.0  # dense enough that early termination happens
    cams = orbit_cameras(2, 3.0, 37, 29, fov_y_deg=40.0, elevation_deg=15.0)
    out = rasterize(g, cams, background=0.25, tile_size=tile_size, backend=backend)
    assert out.backend == backend
    assert out.colors.shape == (2, 29, 37, 3) and out.alphas.shape == (2, 29, 37, 1)
    for c in range(2):
        ref, acc = brute_force(g.activated(), cams, c, 0.25, sh_degree=0)
        torch.testing.assert_close(out.colors[c], ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.alphas[c, ..., 0], acc, atol=2e-5, rtol=1e-4)
    assert float(out.alphas.max()) > 0.999  # opaque in places: T falls to the 1e-4 cut-off


def test_sh_degree_3_matches_brute_force():
    g = small_scene(25, sh_degree=3, seed=5)
    cams = orbit_cameras(1, 3.0, 32, 32, start_deg=40.0)
    out = rasterize(g, cams, background=1.0)
    ref, _ = brute_force(g.activated(), cams, 0, 1.0, sh_degree=3)
    torch.testing.assert_close(out.colors[0], ref, atol=2e-5, rtol=1e-4)


def test_single_gaussian_depth_position_and_colour():
    cam = front_camera(33, 33, distance=2.0)
    g = GaussianSet.from_points(torch.tensor([[0.0, 0.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.0]]),
                                scale=0.05, opacity=0.99)
    out = rasterize(g, cam)
    # the mean projects to the image centre (16.5, 16.5) at depth 1.5
    torch.testing.assert_close(out.means2d[0, 0], torch.tensor([16.5, 16.5]))
    torch.testing.assert_close(out.gaussian_depths[0, 0], torch.tensor(1.5))
    assert abs(float(out.depths[0, 16, 16, 0]) - 1.5) < 1e-5
    centre = out.colors[0, 16, 16]
    assert centre[0] > 0.95 and centre[1] < 0.02 and abs(float(out.alphas[0, 16, 16, 0]) - 0.99) < 0.01
    assert float(out.alphas[0, 0, 0, 0]) == 0.0 and float(out.depths[0, 0, 0, 0]) == 0.0
    assert out.radii[0, 0].tolist()[0] > 0 and out.visible.all()


def test_camera_conventions():
    # a point above the target appears above the image centre; one to the world's +x
    # appears to the right for a camera on +z looking at -z
    cam = front_camera(64, 64)
    pts = torch.tensor([[0.0, 0.5, 0.0], [0.5, 0.0, 0.0]])
    p = project(pts, torch.eye(3).expand(2, 3, 3) * 1e-4, cam.viewmats, cam.Ks, 64, 64)
    assert p.means2d[0, 0, 1] < 32 and abs(float(p.means2d[0, 0, 0]) - 32) < 1e-4
    assert p.means2d[0, 1, 0] > 32
    torch.testing.assert_close(cam.centers[0], torch.tensor([0.0, 0.0, 3.0]))
    r = cam.viewmats[0, :3, :3]
    torch.testing.assert_close(r @ r.T, torch.eye(3), atol=1e-6, rtol=0)
    assert float(torch.det(r)) == pytest.approx(1.0, abs=1e-6)


def test_culls_behind_camera_and_outside_image():
    cam = front_camera(32, 32, distance=2.0)
    g = GaussianSet.from_points(torch.tensor([[0.0, 0.0, 3.0], [50.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), scale=0.05)
    out = rasterize(g, cam)
    assert out.visible[0].tolist() == [False, False, True]


def test_quaternion_rotation_matrix():
    q = torch.tensor([[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]]) * 3.0  # 90 deg about z, unnormalised
    r = quat_to_rotmat(q)[0]
    torch.testing.assert_close(r @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def test_gradcheck_all_parameters_float64():
    torch.manual_seed(0)
    cam = front_camera(12, 10, distance=2.5, dtype=torch.float64)
    means = (torch.rand(4, 3, dtype=torch.float64) - 0.5) * 0.6
    means[:, 2] = torch.tensor([0.3, 0.1, -0.1, -0.3], dtype=torch.float64)  # distinct depths
    scales = torch.rand(4, 3, dtype=torch.float64) * 0.1 + 0.12
    quats = torch.randn(4, 4, dtype=torch.float64)
    opac = torch.rand(4, dtype=torch.float64) * 0.5 + 0.3
    colors = torch.rand(4, 3, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (means, scales, quats, opac, colors)]

    def f(m, s, q, o, c):
        out = rasterize(GaussianTensors(m, q, s, o, c), cam, background=0.3, tile_size=8)
        return out.colors, out.alphas, out.depths

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_sh_colours_float64():
    torch.manual_seed(1)
    cam = front_camera(10, 10, distance=2.5, dtype=torch.float64)
    means = (torch.rand(3, 3, dtype=torch.float64) - 0.5) * 0.4
    scales = torch.full((3, 3), 0.15, dtype=torch.float64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 3, dtype=torch.float64)
    opac = torch.full((3,), 0.6, dtype=torch.float64)
    sh = torch.randn(3, 16, 3, dtype=torch.float64) * 0.2 + 0.3
    m, c = means.clone().requires_grad_(True), sh.clone().requires_grad_(True)

    def f(m, c):
        return rasterize(GaussianTensors(m, quats, scales, opac, c), cam, sh_degree=3).colors

    assert torch.autograd.gradcheck(f, [m, c], eps=1e-6, atol=1e-6, rtol=1e-4)


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_fit_small_set_to_target_image():
    """Optimising a random Gaussian set towards a rendered target raises PSNR past 24 dB."""
    cams = orbit_cameras(1, 3.0, 48, 48, fov_y_deg=35.0)
    target = rasterize(small_scene(60, seed=11), cams, background=1.0).colors.detach()
    g = small_scene(150, seed=12)
    g.opacity_logits = torch.zeros(150)
    params = g.optimizable()
    opt = torch.optim.Adam([
        {"params": [params["means"]], "lr": 0.01}, {"params": [params["sh"]], "lr": 0.05},
        {"params": [params["log_scales"], params["quats"]], "lr": 0.02},
        {"params": [params["opacity_logits"]], "lr": 0.05}])
    start = psnr(rasterize(g, cams, background=1.0).colors.detach(), target)
    for _ in range(150):
        out = rasterize(g, cams, background=1.0)
        loss = (out.colors - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = psnr(rasterize(g, cams, background=1.0).colors.detach(), target)
    assert end > 24.0 and end > start + 8.0, (start, end)


def test_screen_space_gradient_for_densification():
    g = small_scene(20, seed=2)
    g.optimizable()
    out = rasterize(g, front_camera())
    out.colors.sum().backward()
    grad = out.means2d.grad
    assert grad is not None and grad.shape == (1, 20, 2)
    assert bool((grad[0][out.visible[0]].abs().sum(-1) > 0).any())
    assert float(grad[0][~out.visible[0]].abs().sum()) == 0.0


def test_batched_cameras_match_single():
    g = small_scene(30, sh_degree=1, seed=4)
    cams = orbit_cameras(3, 3.0, 24, 20)
    both = rasterize(g, cams).colors
    for i in range(3):
        torch.testing.assert_close(both[i], rasterize(g, cams[i]).colors[0])
    listed = rasterize(g, [cams[0], cams[2]]).colors
    torch.testing.assert_close(listed[1], both[2])


def test_plain_features_and_background_per_camera():
    g = small_scene(10)
    t = g.activated()
    feats = torch.rand(10, 5)
    cams = orbit_cameras(2, 3.0, 16, 16)
    out = rasterize(t._replace(colors=feats), cams, background=torch.tensor([[0.0] * 5, [1.0] * 5]))
    assert out.colors.shape == (2, 16, 16, 5)
    empty = out.alphas[..., 0] < 1e-6
    assert bool(empty.any())
    assert torch.all(out.colors[0][empty[0]] == 0) and torch.all(out.colors[1][empty[1]] == 1)


def test_empty_and_all_culled_scenes():
    g = GaussianSet.random(0)
    out = rasterize(g, front_camera(16, 16), background=0.5)
    assert torch.all(out.colors == 0.5) and torch.all(out.alphas == 0)


def test_bad_inputs_give_clear_errors():
    g = small_scene(5)
    t = g.activated()
    cam = front_camera()
    with pytest.raises(InputError, match="quats"):
        rasterize(t._replace(quats=t.quats[:4]), cam)
    with pytest.raises(InputError, match="means must be"):
        rasterize(t._replace(means=t.means[:, :2]), cam)
    with pytest.raises(InputError, match="colors"):
        rasterize(t._replace(colors=torch.zeros(5, 2, 3)), cam, sh_degree=1)
    with pytest.raises(InputError, match="NaN or infinite"):
        vm = cam.viewmats.clone()
        vm[0, 0, 3] = float("nan")
        rasterize(t, Cameras(vm, cam.Ks, 40, 32))
    with pytest.raises(InputError, match="NaN or infinite"):
        Cameras(cam.viewmats, cam.Ks * float("inf"), 40, 32)
    with pytest.raises(InputError, match=r"\[C, 4, 4\]"):
        Cameras(torch.eye(3)[None], cam.Ks, 40, 32)
    with pytest.raises(InputError, match="one K per camera"):
        Cameras(cam.viewmats.expand(2, 4, 4), cam.Ks, 40, 32)
    with pytest.raises(InputError, match="background"):
        rasterize(g, cam, background=torch.zeros(7))
    with pytest.raises(InputError, match="sh_degree 2"):
        rasterize(g, cam, sh_degree=2)
    with pytest.raises(InputError, match="cameras must be"):
        rasterize(g, "front")
    with pytest.raises(InputError, match="dtype"):
        rasterize(t._replace(opacities=t.opacities.double()), cam)
    with pytest.raises(InputError, match="missing"):
        rasterize({"means": t.means}, cam)
    with pytest.raises(InputError, match="unknown render backend"):
        rasterize(g, cam, backend="vulkan")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gsplat_backend_refused_without_cuda():
    from gstalk.errors import GstalkError

    with pytest.raises(GstalkError, match="needs a CUDA GPU"):
        rasterize(small_scene(3), front_camera(), backend="gsplat")
    from gstalk.render import cpu_ext

    assert rasterize(small_scene(3), front_camera()).backend == ("cpu" if cpu_ext.available() else "torch")


def _render_with_grads(g: GaussianSet, cams: Cameras, backend: str, **kw) -> tuple[dict, dict]:
    params = g.optimizable()
    out = rasterize(g, cams, backend=backend, **kw)
    assert out.backend == backend
    # a loss that weighs every output: colour channels, alpha and depth differently
    w = torch.linspace(0.5, 1.5, out.colors.shape[-1], dtype=out.colors.dtype)
    (out.colors.mul(w).square().sum() + out.alphas.sum() + 0.1 * out.depths.sum()).backward()
    images = {"colors": out.colors.detach(), "alphas": out.alphas.detach(), "depths": out.depths.detach(),
              "means2d_grad": out.means2d.grad.clone()}
    return images, {k: v.grad.clone() for k, v in params.items()}


@cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backend_matches_reference_with_gradients(dtype):
    """The compiled CPU compositor (csrc/raster_cpu.cpp) against its PyTorch twin: images,
    the screen-space gradient densification reads, and every parameter's gradient."""
    def scene():
        g = small_scene(300, sh_degree=2, seed=12, dtype=dtype)
        g.opacity_logits = g.opacity_logits + 3.0  # opaque enough to reach the early stop and the 0.999 clamp
        return g

    cams = orbit_cameras(2, 3.0, 45, 38, elevation_deg=10.0).to(dtype=dtype)
    ref_img, ref_grad = _render_with_grads(scene(), cams, "torch", background=0.3, tile_size=8)
    cpu_img, cpu_grad = _render_with_grads(scene(), cams, "cpu", background=0.3, tile_size=8)
    tol = {"atol": 1e-10, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-3}
    assert float(ref_img["alphas"].max()) > 0.999 and float(ref_img["means2d_grad"].abs().max()) > 0
    for k in ref_img:
        torch.testing.assert_close(cpu_img[k], ref_img[k], **tol, msg=k)
    for k in ref_grad:
        assert float(ref_grad[k].abs().max()) > 0, k
        scale = float(ref_grad[k].abs().max())
        torch.testing.assert_close(cpu_grad[k] / scale, ref_grad[k] / scale, **tol, msg=k)


@cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_tile_lists_equal_the_reference(dtype):
    """The compiled tile lists (counting sort over depth-sorted Gaussians) are the reference's
    (one sort on tile and depth rank) element for element: Gaussians half outside the image,
    equal depths (stable order), tile sizes that do not divide the image, nothing visible."""
    from gstalk.render import cpu_ext, reference

    gen = torch.Generator().manual_seed(5)
    n, w, h = 600, 70, 53
    means2d = (torch.rand(n, 2, generator=gen, dtype=dtype) * 1.4 - 0.2) * torch.tensor([w, h], dtype=dtype)
    radii = torch.randint(0, 12, (n, 2), generator=gen, dtype=torch.int32)
    radii[torch.rand(n, generator=gen) < 0.1] = 0  # culled
    depths = torch.randint(1, 40, (n,), generator=gen).to(dtype)  # many equal depths
    for tile_size in (16, 7, 1):
        tx, ty = (w + tile_size - 1) // tile_size, (h + tile_size - 1) // tile_size
        ref = reference._tile_lists(means2d, radii, depths, tx, ty, tile_size)
        fast = cpu_ext.tile_lists(means2d, radii, depths, tx, ty, tile_size)
        assert int(ref[1].sum()) > n  # Gaussians span several tiles
        for a, b in zip(fast, ref):
            assert a.dtype == b.dtype and torch.equal(a, b)
    none = cpu_ext.tile_lists(means2d, torch.zeros_like(radii), depths, 5, 4, 16)
    assert none[0].numel() == 0 and torch.equal(none[1], torch.zeros(20, dtype=torch.long))


@cpu_kernel
def test_cpu_backend_draws_frames_and_empty_views():
    from gstalk.render import rasterize_frames

    gb = _frames(2, seed=23)
    cams = orbit_cameras(2, 3.0, 40, 33, elevation_deg=10.0)
    ref = rasterize_frames(gb, cams, background=0.5, backend="torch")
    fast = rasterize_frames(gb, cams, background=0.5, backend="cpu")
    assert fast.backend == "cpu"
    torch.testing.assert_close(fast.colors, ref.colors, atol=1e-5, rtol=0)
    # float16: 'auto' draws it with the reference, 'cpu' refuses it clearly
    half = small_scene(20).activated()
    half = GaussianTensors(*(t.half() for t in half))
    assert rasterize(half, front_camera().to(dtype=torch.float16)).backend == "torch"
    with pytest.raises(InputError, match="float32 or float64"):
        rasterize(half, front_camera(), backend="cpu")
    # nothing in view: the background, zero alpha, and zero gradients
    g = small_scene(5)
    params = g.optimizable()
    away = rasterize(g, orbit_cameras(1, 3.0, 20, 20, target=(0.0, 10.0, 0.0)), background=0.7, backend="cpu")
    assert float(away.alphas.detach().abs().max()) == 0
    assert torch.allclose(away.colors.detach(), torch.full_like(away.colors, 0.7))
    away.colors.sum().backward()
    assert all(float(p.grad.abs().max()) == 0 for p in params.values())


def test_cpu_kernel_can_be_switched_off(monkeypatch):
    """GSTALK_CPU_KERNEL=0: 'auto' draws with the PyTorch reference, 'cpu' is refused clearly."""
    from gstalk.kernels import cpu as kcpu

    monkeypatch.setenv("GSTALK_CPU_KERNEL", "0")
    kcpu.load.cache_clear()
    try:
        assert rasterize(small_scene(3), front_camera()).backend == "torch"
        with pytest.raises(InputError, match="could not be built"):
            rasterize(small_scene(3), front_camera(), backend="cpu")
    finally:
        monkeypatch.delenv("GSTALK_CPU_KERNEL")
        kcpu.load.cache_clear()


def test_projection_and_sh_match_gsplat_torch_reference():
    """gsplat's own pure-PyTorch projection and SH (CPU) agree with ours."""
    impl = pytest.importorskip("gsplat.cuda._torch_impl")
    g = small_scene(50, sh_degree=3, seed=7).activated()
    cams = orbit_cameras(2, 3.0, 64, 48, elevation_deg=20.0)
    covars = covariance_3d(g.quats, g.scales)
    ours = project(g.means, covars, cams.viewmats, cams.Ks, 64, 48, opacities=None)
    radii, means2d, depths, conics, _ = impl._fully_fused_projection(
        g.means, covars, cams.viewmats, cams.Ks, 64, 48, eps2d=0.3)
    torch.testing.assert_close(ours.means2d, means2d)
    torch.testing.assert_close(ours.depths, depths)
    torch.testing.assert_close(ours.conics, conics, rtol=1e-4, atol=1e-5)
    assert torch.equal(ours.radii, radii.to(torch.int32))
    dirs = torch.nn.functional.normalize(torch.randn(50, 3), dim=-1)
    for deg in range(4):
        torch.testing.assert_close(eval_sh(deg, g.colors, dirs), impl._spherical_harmonics(deg, dirs, g.colors))


@cuda
@pytest.mark.parametrize("sh_degree", [0, 3])
def test_gsplat_backend_matches_reference(sh_degree):
    g = small_scene(300, sh_degree=sh_degree, seed=9)
    cams = orbit_cameras(2, 3.0, 96, 80, elevation_deg=10.0)
    ref = rasterize(g, cams, background=0.5, backend="torch")
    fast = rasterize(g.to("cuda"), cams, background=0.5, backend="gsplat")
    assert fast.backend == "gsplat"
    torch.testing.assert_close(fast.colors.cpu(), ref.colors, atol=2e-3, rtol=0)
    torch.testing.assert_close(fast.alphas.cpu(), ref.alphas, atol=2e-3, rtol=0)
    vis = ref.alphas[..., 0] > 0.5
    torch.testing.assert_close(fast.depths.cpu()[vis], ref.depths[vis], atol=1e-3, rtol=1e-3)
    assert torch.equal(fast.visible.cpu(), ref.visible)
    torch.testing.assert_close(fast.means2d.detach().cpu(), ref.means2d.detach(), atol=1e-3, rtol=0)


@cuda
def test_gsplat_backend_gradients_match_reference():
    g = small_scene(100, seed=10)
    cams = orbit_cameras(1, 3.0, 64, 64)
    grads = []
    for backend, dev in (("torch", "cpu"), ("gsplat", "cuda")):
        h = g.to(dev)
        params = h.optimizable()
        rasterize(h, cams, backend=backend, background=0.2).colors.square().sum().backward()
        grads.append({k: v.grad.cpu() for k, v in params.items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-3, rtol=1e-2, msg=k)


def _frames(n_frames: int, seed: int) -> GaussianTensors:
    """B different sets of the same N Gaussians (each frame moved and recoloured), frames first."""
    g = small_scene(200, sh_degree=1, seed=seed).activated(1)
    gen = torch.Generator().manual_seed(seed)
    shift = 0.2 * torch.randn(n_frames, 1, 3, generator=gen)
    tint = 0.3 * torch.randn(n_frames, 1, 1, 3, generator=gen)
    return GaussianTensors(g.means[None] + shift, g.quats[None].expand(n_frames, -1, -1),
                           g.scales[None].expand(n_frames, -1, -1), g.opacities[None].expand(n_frames, -1),
                           g.colors[None] + tint)


def test_frames_in_one_call_match_one_frame_at_a_time():
    """rasterize_frames: frame b's Gaussians through camera b, as rasterize draws each alone."""
    from gstalk.render import rasterize_frames

    gb = _frames(3, seed=21)
    cams = orbit_cameras(3, 3.0, 48, 40, elevation_deg=10.0)
    out = rasterize_frames(gb, cams, background=[0.1, 0.5, 0.9], backend="torch")
    assert out.colors.shape == (3, 40, 48, 3) and out.means2d.shape == (3, 200, 2) and out.radii.shape == (3, 200, 2)
    for b in range(3):
        one = rasterize(GaussianTensors(*(t[b] for t in gb)), cams[b], background=[0.1, 0.5, 0.9], backend="torch")
        torch.testing.assert_close(out.colors[b], one.colors[0])
        torch.testing.assert_close(out.alphas[b], one.alphas[0])
        assert torch.equal(out.radii[b], one.radii[0])
    assert not torch.allclose(out.colors[0], out.colors[1])  # the frames differ
    with pytest.raises(InputError, match="3 frames need 3 cameras"):
        rasterize_frames(gb, cams[:2])
    with pytest.raises(InputError, match=r"\[B, N, 3\]"):
        rasterize_frames(GaussianTensors(*(t[0] for t in gb)), cams[:1])
    with pytest.raises(InputError, match="same 3 frames"):
        rasterize_frames(gb._replace(opacities=gb.opacities[:2]), cams)


@cuda
def test_gsplat_frames_in_one_launch_match_reference():
    from gstalk.render import rasterize_frames

    gb = _frames(4, seed=22)
    cams = orbit_cameras(4, 3.0, 96, 80, elevation_deg=10.0)
    ref = rasterize_frames(gb, cams, background=0.5, backend="torch")
    fast = rasterize_frames(GaussianTensors(*(t.cuda() for t in gb)), cams, background=0.5, backend="gsplat")
    assert fast.backend == "gsplat" and fast.colors.shape == ref.colors.shape
    torch.testing.assert_close(fast.colors.cpu(), ref.colors, atol=2e-3, rtol=0)
    torch.testing.assert_close(fast.alphas.cpu(), ref.alphas, atol=2e-3, rtol=0)
    assert torch.equal(fast.visible.cpu(), ref.visible)
    torch.testing.assert_close(fast.means2d.detach().cpu(), ref.means2d.detach(), atol=1e-3, rtol=0)


def test_cpu_kernel_build_recovers_from_a_killed_build_and_falls_back_on_failure(monkeypatch, tmp_path, capsys):
    """A build lock left by a killed build is removed (torch would wait for it forever), a fresh
    one is left to its builder, and a failed build falls back to the PyTorch compositor."""
    import os
    import time

    import torch.utils.cpp_extension as cpp
    from gstalk.kernels import cpu as kcpu
    from gstalk.render import cpu_ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("GSTALK_CPU_KERNEL", raising=False)
    monkeypatch.setattr(kcpu.shutil, "which", lambda name: "/usr/bin/c++")
    calls = []
    monkeypatch.setattr(cpp, "load", lambda **kw: calls.append(kw) or "module")
    where = kcpu.build_directory()
    assert where.parent.parent == tmp_path
    where.mkdir(parents=True)
    try:
        lock = where / "lock"
        for age, kept in ((2 * kcpu.STALE_LOCK_S, False), (1.0, True)):
            lock.write_text("")
            os.utime(lock, (time.time() - age, time.time() - age))
            kcpu.load.cache_clear()
            assert kcpu.load() == "module"
            assert lock.exists() == kept
            assert calls[-1]["build_directory"] == str(where)
        assert "building the CPU kernels" in capsys.readouterr().err  # nothing built there yet: says so
        # built here from these sources: silent; from a checkout elsewhere, or edited since: says so
        so = where / "gstalk_raster_cpu.so"
        so.write_text("")
        ninja = where / "build.ninja"
        ninja.write_text(" ".join(str(kcpu.CSRC / f) for f in kcpu.SOURCES))
        assert not kcpu.needs_build(where)
        ninja.write_text(" ".join(f"/elsewhere/csrc/{f}" for f in kcpu.SOURCES))
        assert kcpu.needs_build(where)
        ninja.write_text(" ".join(str(kcpu.CSRC / f) for f in kcpu.SOURCES))
        os.utime(so, (time.time() - 1e6, time.time() - 1e6))  # sources newer than the build
        assert kcpu.needs_build(where)

        def broken(**kw):
            raise RuntimeError("Error building extension 'gstalk_raster_cpu'")

        monkeypatch.setattr(cpp, "load", broken)
        kcpu.load.cache_clear()
        assert kcpu.load() is None and not cpu_ext.available()
        with pytest.raises(InputError, match="could not be built"):
            rasterize(small_scene(3), front_camera(), backend="cpu")
        assert rasterize(small_scene(3), front_camera()).backend == "torch"
    finally:
        kcpu.load.cache_clear()


def test_a_gpu_where_gsplat_cannot_compile_gets_a_gstalk_error_or_the_twin(monkeypatch):
    """gsplat compiles its CUDA code on its first call (nvcc needed). Where that fails, asking
    for it by name is a GstalkError that says so, not a traceback from inside gsplat, and
    'auto' renders with the PyTorch rasterizer instead (the rule of gstalk.kernels)."""
    import gsplat

    from gstalk.errors import GstalkError
    from gstalk.kernels import cuda
    from gstalk.render.rasterize import select_backend

    def no_nvcc(*a, **k):
        raise RuntimeError("Ninja is required to load C++ extensions: nvcc not found")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gsplat, "rasterization", no_nvcc)
    cuda.gsplat_available.cache_clear()
    try:
        with pytest.raises(GstalkError, match="gsplat's CUDA code cannot be compiled.*nvcc"):
            cuda.gsplat_check()
        with pytest.raises(GstalkError, match="gsplat's CUDA code cannot be compiled"):
            select_backend("gsplat", torch.device("cuda"))
        assert select_backend("auto", torch.device("cuda")) == "torch"
        assert select_backend("auto", torch.device("cpu")) in ("cpu", "torch")
    finally:
        cuda.gsplat_available.cache_clear()


def test_cuda_home_is_found_behind_an_nvcc_wrapper(monkeypatch, tmp_path):
    """CUDA_HOME unset and nvcc on the PATH a wrapper script: the toolkit is the folder that
    holds the headers, found through the wrapper, not the wrapper's own folder."""
    from gstalk.kernels import cuda

    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    real = toolkit / "bin" / "nvcc"
    # as CUDA 13's nvcc does: its dry run names the toolkit ("#$ TOP=<toolkit>/bin/..")
    real.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --dryrun ] && echo '#$ TOP=" + str(toolkit / "bin")
                    + "/..' >&2; done\nexit 0\n")
    real.chmod(0o755)
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper = wrappers / "nvcc"
    wrapper.write_text(f"#!/bin/sh\nexec {real} \"$@\"\n")  # the wrapper names the toolkit's nvcc
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrappers}:/usr/bin:/bin")  # the shell tools a wrapper uses, no other nvcc
    assert cuda.cuda_home() == toolkit.resolve()
    # a wrapper that finds it relatively: the dry run says where it is
    wrapper.write_text('#!/bin/sh\nexec "$(dirname "$0")/../cuda-13.0/bin/nvcc" "$@"\n')
    assert cuda.cuda_home() == toolkit.resolve()
    (wrappers / "nvcc").unlink()
    (wrappers / "nvcc").symlink_to(real)  # a symlink is followed
    assert cuda.cuda_home() == toolkit.resolve()
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda")
    assert str(cuda.cuda_home()) == "/opt/cuda"
