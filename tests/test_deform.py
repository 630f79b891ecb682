import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cpu_kernel, cuda
from gstalk.errors import InputError
from gstalk.deform.field import REGION_MOUTH, REGION_TORSO, DeformationField
from gstalk.deform.hashgrid import PRIMES, HashGrid, TriPlane, hash_encode_torch, level_resolutions


def slow_reference(x: np.ndarray, tables: np.ndarray, res: list[int]) -> np.ndarray:
    """Point by point, level by level, corner by corner, with uint32 hashing as in Instant-NGP."""
    n, dim = x.shape
    L, T, F = tables.shape
    out = np.zeros((n, L * F))
    for i in range(n):
        for lv in range(L):
            pos = x[i] * res[lv]
            p0 = np.floor(pos).astype(int)
            fr = pos - p0
            acc = np.zeros(F)
            for c in range(2**dim):
                bits = [(c >> d) & 1 for d in range(dim)]
                coords = [int(p0[d]) + bits[d] for d in range(dim)]
                w = np.prod([fr[d] if bits[d] else 1 - fr[d] for d in range(dim)])
                if (res[lv] + 1) ** dim <= T:
                    idx, stride = 0, 1
                    for d in range(dim):
                        idx += coords[d] * stride
                        stride *= res[lv] + 1
                else:
                    h = 0
                    for d in range(dim):
                        h ^= (coords[d] * PRIMES[d]) & 0xFFFFFFFF
                    idx = h % T
                acc += w * tables[lv, idx]
            out[i, lv * F:(lv + 1) * F] = acc
    return out


@pytest.mark.parametrize("dim", [2, 3])
def test_hash_encoding_matches_slow_reference(dim):
    g = HashGrid(dim, levels=6, features=2, log2_table=10, base=4, finest=200)
    with torch.no_grad():
        g.tables.normal_()
    res = g.resolutions
    assert (res[0] + 1) ** dim <= 1024 < (res[-1] + 1) ** dim  # both dense and hashed levels
    x = torch.rand(64, dim, dtype=torch.float64)
    ours = hash_encode_torch(x, g.tables.double(), res).detach().numpy()
    ref = slow_reference(x.numpy(), g.tables.detach().double().numpy(), res)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
    assert g(x.float()).shape == (64, 12)


def test_hash_encoding_gradients():
    res = level_resolutions(3, 4, 32)
    tables = (torch.randn(3, 256, 2, dtype=torch.float64) * 0.1).requires_grad_(True)
    x = (torch.rand(8, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, t: hash_encode_torch(x, t, res), (x, tables), eps=1e-7, atol=1e-6)


def test_triplane_is_three_planes():
    tp = TriPlane(levels=4, features=2, log2_table=8, finest=64)
    x = torch.rand(10, 3)
    out = tp(x)
    assert out.shape == (10, 24) and tp.out_dim == 24
    torch.testing.assert_close(out[:, 8:16], tp.grids[1](x[:, [1, 2]]))


def test_field_is_identity_at_initialisation():
    f = DeformationField(audio_dim=16, expr_dim=5)
    x = torch.rand(200, 3) * 0.2 - 0.1
    region = torch.randint(0, 3, (200,))
    d = f(x, torch.randn(4, 16), blink=torch.rand(4), expr=torch.randn(4, 5), neck=torch.randn(4, 3), region=region)
    assert d.d_means.shape == (4, 200, 3) and d.d_quats.shape == (4, 200, 4)
    assert torch.all(d.d_means == 0) and torch.all(d.d_log_scales == 0) and torch.all(d.d_colors == 0)
    assert torch.all(d.d_quats == torch.tensor([1.0, 0, 0, 0]))


def test_field_learns_an_audio_to_offset_mapping():
    """Points near the 'mouth' move with the audio code, the rest stay: loss falls >= 20x."""
    torch.manual_seed(0)
    f = DeformationField(audio_dim=8, encoding="triplane", levels=6, log2_table=12, finest=128, hidden=64)
    x = torch.rand(400, 3) * torch.tensor([0.3, 0.4, 0.35]) + torch.tensor([-0.15, -0.25, -0.15])
    mouth = torch.exp(-((x - torch.tensor([0.0, -0.06, 0.08])) ** 2).sum(-1) / (2 * 0.03**2))
    audio = torch.randn(32, 8)
    target = 0.01 * torch.tanh(audio[:, None, :3]) * mouth[None, :, None]  # [B, N, 3]
    opt = torch.optim.Adam(f.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        d = f(x, audio)
        loss = ((d.d_means - target) * 100).square().mean()  # in cm: keeps Adam out of its epsilon
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])
    # audio acts where the mouth is: the learned gate is larger there
    gates = torch.sigmoid(f.gates(f.spatial(x)))[:, 0]
    assert gates[mouth > 0.5].mean() > gates[mouth < 0.05].mean()


def test_mouth_and_torso_branches():
    f = DeformationField(audio_dim=4)
    for m in (f.mouth_out[-1], f.torso_out[-1]):
        torch.nn.init.normal_(m.weight, std=0.1)
    x = torch.rand(6, 3) * 0.1
    region = torch.tensor([0, REGION_MOUTH, REGION_TORSO, 0, REGION_MOUTH, REGION_TORSO])
    a = torch.randn(2, 4)
    d1 = f(x, a, neck=torch.zeros(2, 3), region=region)
    d2 = f(x, a, neck=torch.ones(2, 3), region=region)
    assert torch.allclose(d1.d_means[:, [0, 1, 3, 4]], d2.d_means[:, [0, 1, 3, 4]])  # neck moves the torso only
    assert not torch.allclose(d1.d_means[:, 2], d2.d_means[:, 2])
    assert torch.all(d1.d_quats[:, [2, 5]] == torch.tensor([1.0, 0, 0, 0]))  # torso: position only


def test_relative_field_is_the_identity_at_neutral_conditions():
    """A trained (non-zero) field in relative mode gives no offset at the neutral conditions,
    whatever its audio-independent part, and the same motion between two conditions as the
    absolute field."""
    torch.manual_seed(1)
    f = DeformationField(audio_dim=4, expr_dim=3)
    for m in (f.face_out[-1], f.mouth_out[-1], f.torso_out[-1]):
        torch.nn.init.normal_(m.weight, std=0.1)
        torch.nn.init.normal_(m.bias, std=0.1)
    x = torch.rand(50, 3) * 0.2 - 0.1
    region = torch.randint(0, 3, (50,))
    zero = dict(blink=torch.zeros(1), expr=torch.zeros(1, 3), neck=torch.zeros(1, 3), region=region)
    d0 = f(x, torch.zeros(1, 4), relative=True, **zero)
    assert torch.all(d0.d_means == 0) and torch.all(d0.d_quats == torch.tensor([1.0, 0, 0, 0]))
    assert torch.all(d0.d_opacity == 0) and torch.all(d0.d_log_scales == 0)
    assert f(x, torch.zeros(1, 4), relative=False, **zero).d_means.abs().max() > 1e-4  # absolute: it is not
    a = torch.randn(2, 4)
    cond = dict(blink=torch.rand(2), expr=torch.randn(2, 3), neck=torch.randn(2, 3), region=region)
    rel, ab = f(x, a, relative=True, **cond), f(x, a, relative=False, **cond)
    torch.testing.assert_close(rel.d_means[1] - rel.d_means[0], ab.d_means[1] - ab.d_means[0])


def test_audio_prior_gates_keep_audio_at_the_mouth():
    """The prior on the audio stream: no audio-driven motion far from the mouth."""
    torch.manual_seed(2)
    f = DeformationField(audio_dim=4)
    torch.nn.init.normal_(f.face_out[-1].weight, std=0.1)
    x = torch.tensor([[0.0, -0.06, 0.08], [0.0, 0.05, 0.09], [0.05, 0.02, 0.07]])  # mouth, forehead, cheek
    centre, r = x[0], 0.02
    prior = torch.exp(-0.5 * (x - centre).square().sum(-1) / r**2)
    gates = torch.stack([prior, torch.ones(3)], 1)
    a = torch.randn(3, 4)
    d = f(x, a, prior_gates=gates, relative=True)
    moved = d.d_means.norm(dim=-1).amax(0)
    assert moved[0] > 1e-4 and moved[1] < 1e-6 and moved[2] < 1e-5


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    src = Path(__file__).resolve().parents[1] / "csrc"
    for cu in sorted(src.glob("*.cu")):
        r = subprocess.run(["nvcc", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")), "-std=c++17", "-O3",
                            "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_80,code=sm_80"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]


@cuda
@pytest.mark.parametrize("dim", [2, 3])
def test_cuda_hash_encoding_matches_torch(dim):
    g = HashGrid(dim, levels=8, features=2, log2_table=14, base=8, finest=512, backend="torch").cuda()
    with torch.no_grad():
        g.tables.normal_()
    x = torch.rand(5000, dim, device="cuda")
    ref = g(x)
    gt_ref = torch.autograd.grad(ref.square().sum(), g.tables)[0]
    g.backend = "cuda"
    out = g(x)
    gt = torch.autograd.grad(out.square().sum(), g.tables)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gt, gt_ref, atol=1e-4, rtol=1e-4)


@cpu_kernel
@pytest.mark.parametrize("dim,dtype", [(2, torch.float64), (3, torch.float64), (2, torch.float32), (3, torch.float32)])
def test_compiled_cpu_hash_encoding_matches_torch(dim, dtype):
    """csrc/hashgrid_cpu.cpp against the PyTorch reference, dense and hashed levels: the
    encoding (float64 to the last bit in 2D) and the tables' gradient."""
    g = HashGrid(dim, levels=8, features=2, log2_table=12, base=4, finest=300, backend="torch").to(dtype)
    assert any((r + 1) ** dim <= g.table_size for r in g.resolutions)  # dense levels
    assert any((r + 1) ** dim > g.table_size for r in g.resolutions)  # hashed levels
    with torch.no_grad():
        g.tables.normal_()
    x = torch.rand(3000, dim, dtype=dtype, generator=torch.Generator().manual_seed(dim))
    w = torch.randn(3000, g.out_dim, dtype=dtype, generator=torch.Generator().manual_seed(9))
    ref = g(x)
    gt_ref = torch.autograd.grad((ref * w).sum(), g.tables)[0]
    g.backend = "cpu"
    out = g(x)
    gt = torch.autograd.grad((out * w).sum(), g.tables)[0]
    if dim == 2 and dtype == torch.float64:
        assert torch.equal(out, ref)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gt, gt_ref, **tol)
    assert float(gt.abs().max()) > 0
    # the kernel's own gradient is the same from run to run (the reference's float32 one is not)
    assert torch.equal(torch.autograd.grad((g(x) * w).sum(), g.tables)[0], gt)


@cpu_kernel
def test_compiled_cpu_hash_encoding_is_picked_only_where_it_applies(monkeypatch):
    from gstalk.kernels import cpu as kcpu

    g = HashGrid(2, levels=4, features=2, log2_table=10)
    x = torch.rand(10, 2)
    assert g.which_backend(x) == "cpu"
    assert g.which_backend(x.requires_grad_()) == "torch"  # positions that need a gradient
    assert g.which_backend(torch.rand(10, 2, dtype=torch.float16)) == "torch"
    g.backend = "cpu"
    with pytest.raises(InputError, match="no gradient for the positions"):
        g(x)
    with pytest.raises(InputError, match="float32 or float64"):
        g(torch.rand(10, 2, dtype=torch.float64))  # tables are float32
    # a NaN position (a diverged fit) is refused before it can index outside the tables: by the
    # module, on either backend, and by the kernel itself
    nan = torch.tensor([[float("nan"), 0.5]])
    for backend in ("cpu", "torch"):
        with pytest.raises(InputError, match="NaN positions"):
            HashGrid(2, levels=4, features=2, log2_table=10, backend=backend)(nan)
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 1\)"):
        kcpu.load().hash_encode_forward(nan, g.tables.detach(), g.resolutions)
    monkeypatch.setenv("GSTALK_CPU_KERNEL", "0")
    kcpu.load.cache_clear()
    try:
        assert HashGrid(2, levels=4, features=2, log2_table=10).which_backend(torch.rand(10, 2)) == "torch"
        with pytest.raises(InputError, match="could not be built"):
            g(torch.rand(10, 2))
    finally:
        monkeypatch.delenv("GSTALK_CPU_KERNEL")
        kcpu.load.cache_clear()


def test_expression_prior_keeps_expressions_off_the_hair():
    """With the expression prior, the field's blink and expression streams move Gaussians on
    the face but not those bound to the scalp, neck or eyeballs (where the head model's
    expressions move nothing); without it they move both."""
    import numpy as np

    from gstalk.avatar.init import expression_activity

    from gstalk.avatar.model import Frame
    from gstalk.avatar.synthetic import standin_avatar
    from gstalk.head.lbs import FlameParams
    from gstalk.head.standin import REGIONS

    av = standin_avatar(per_triangle=1, n_expr=16, expr_cond=8, seed=3)
    act = expression_activity(av.head_model)
    vreg = torch.as_tensor(np.asarray(av.head_model.meta["vertex_region"]))[av.head_model.faces[:, 0]]
    assert act[vreg == REGIONS["skull"]].max() < 0.05 and act[vreg == REGIONS["neck"]].max() == 0
    assert act[vreg == REGIONS["face"]].mean() > 0.5
    still = av.binding >= 0
    still[still.clone()] = act[av.binding[still]] == 0
    moving = (av.binding >= 0) & (act[av.binding.clamp_min(0)] == 1)
    assert still.sum() > 50 and moving.sum() > 50
    frame = Frame(FlameParams(expr=torch.full((1, 16), 0.8)), audio=torch.zeros(1, av.cfg.code_dim),
                  blink=torch.ones(1))
    moved = {}
    for on in (False, True):
        av.cfg.expr_prior = on
        av.invalidate()
        with torch.no_grad():
            moved[on] = av.deformation(frame).d_means[0].norm(dim=-1)
    assert moved[False][still].mean() > 1e-5 and moved[False][moving].mean() > 1e-5
    assert moved[True][still].max() == 0 and moved[True][moving].mean() > 0.5 * moved[False][moving].mean()


def _perturbed_field(seed=0, expr_dim=8, colour=False):
    torch.manual_seed(seed)
    f = DeformationField(audio_dim=16, expr_dim=expr_dim, encoding="triplane", levels=4, log2_table=10, finest=64,
                         colour=colour)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return f


@pytest.mark.parametrize("relative,expr_dim,colour", [(True, 8, False), (False, 0, True)])
def test_frozen_field_matches_the_field(relative, expr_dim, colour):
    """The factored inference form (per-point parts once, each stream's conditions through its
    block of the first layer, each branch on its own Gaussians) gives the field's offsets."""
    from gstalk.deform.frozen import FrozenField

    f = _perturbed_field(expr_dim=expr_dim, colour=colour)
    g = torch.Generator().manual_seed(1)
    N, B = 300, 3
    x = torch.rand(N, 3, generator=g) * 0.3 - 0.15
    region = torch.zeros(N, dtype=torch.long)
    region[:40], region[40:70] = REGION_MOUTH, REGION_TORSO
    prior = torch.rand(N, 3 if expr_dim else 2, generator=g)
    audio, blink = torch.randn(B, 16, generator=g).tanh(), torch.rand(B, generator=g)
    expr = torch.randn(B, expr_dim, generator=g) if expr_dim else None
    neck = 0.2 * torch.randn(B, 3, generator=g)
    with torch.no_grad():
        for reg, pr in [(region, prior), (None, None)]:  # with every branch; all face, no prior
            ref = f(x, audio, blink=blink, expr=expr, neck=neck, region=reg, prior_gates=pr, relative=relative)
            got = FrozenField(f, x, reg, pr, relative)(audio, blink, expr, neck)
            for k, want in ref.__dict__.items():
                torch.testing.assert_close(getattr(got, k), want, atol=1e-6, rtol=1e-5)
            assert (ref.d_means[:, 70:] - ref.d_means[:, 70:].mean(1, keepdim=True)).abs().max() > 1e-4
        if relative:  # exactly the identity at the neutral conditions
            d = FrozenField(f, x, region, prior, True)(torch.zeros(1, 16))
            assert float(d.d_means.abs().max()) == 0 and float(d.d_opacity.abs().max()) == 0


def _half_and_float32(dtype, device="cpu", n=500, frames=4, seed=2):
    """The factored field's offsets in float32 on the CPU and in ``dtype`` on ``device`` for the
    same random points and conditions: (float32 offsets, half offsets, the half field)."""
    from gstalk.deform.frozen import FrozenField

    f = _perturbed_field()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g) * 0.3 - 0.15
    audio, expr = torch.randn(frames, 16, generator=g).tanh(), torch.randn(frames, 8, generator=g)
    with torch.no_grad():
        ref = FrozenField(f, x)(audio, None, expr)
        half = FrozenField(f.to(device), x.to(device), dtype=dtype)
        return ref, half(audio.to(device), None, expr.to(device)), half


def _assert_within_share(ref, got, tol):
    """Every offset in float32 and within ``tol`` of the float32 offsets' largest magnitude."""
    for k in ("d_means", "d_log_scales", "d_opacity"):
        want, out = getattr(ref, k), getattr(got, k).cpu()
        assert out.dtype == torch.float32
        span = float(want.abs().max())
        assert span > 0 and float((out - want).abs().max()) <= tol * span


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.06), (torch.float16, 0.01)])
def test_half_precision_field_is_close_to_float32(dtype, tol):
    """In half precision the offsets come out in float32, within a small share of their range of
    the float32 field's, and still exactly zero at the neutral conditions."""
    ref, got, half = _half_and_float32(dtype)
    assert half.face_point.dtype == dtype
    _assert_within_share(ref, got, tol)
    with torch.no_grad():
        assert float(half(torch.zeros(1, 16)).d_means.abs().max()) == 0


def test_avatar_precision_changes_the_frame_by_little_and_saves_nothing():
    """Avatar.set_precision('half') (bfloat16 on a CPU) renders nearly the float32 frame; the
    inference field is a cache, never in the avatar's state; unknown names are refused."""
    from gstalk.avatar.model import Frame
    from gstalk.avatar.render import render_frame
    from gstalk.avatar.synthetic import standin_avatar
    from gstalk.errors import InputError
    from gstalk.head.lbs import FlameParams
    from gstalk.render import Cameras

    av = standin_avatar(n_gaussians=3000, resolution=64, field_noise=0.05)
    keys = set(av.state_dict())
    cam = Cameras(av.viewmat[None], av.K[None], 64, 64)
    p = FlameParams(jaw=torch.tensor([[0.15, 0.0, 0.0]]), expr=torch.full((1, av.head_model.n_expr), 0.3),
                    translation=torch.tensor([[0.0, 0.0, -0.6]]))
    code = torch.randn(1, av.cfg.code_dim, generator=torch.Generator().manual_seed(3))
    bg = torch.ones(64, 64, 3)
    images = {}
    with torch.no_grad():
        for prec in ("float32", "half"):
            av.set_precision(prec)
            g = av.gaussians_at(Frame(p, audio=code, blink=torch.zeros(1)))[0]
            images[prec] = render_frame(av, g, cam, bg)[0]
            off = av.gaussians_at(Frame(p, audio=code, deform=False))[0]
        assert av.frozen_field().dtype == torch.bfloat16
        moved = render_frame(av, off, cam, bg)[0]
    assert set(av.state_dict()) == keys
    mse = float((images["half"] - images["float32"]).square().mean())
    assert mse < 1e-5 and float((moved - images["float32"]).square().mean()) > 10 * mse
    with pytest.raises(InputError, match="precision"):
        av.set_precision("int8")


@cuda
def test_half_precision_field_on_cuda_is_close_to_float32_on_cpu():
    """'half' on a GPU is float16: the GPU's half-precision offsets against the CPU's float32."""
    from gstalk.deform.frozen import precision_dtype

    dt = precision_dtype("half", "cuda")
    assert dt == torch.float16
    ref, got, _ = _half_and_float32(dt, "cuda", n=2000, frames=8, seed=4)
    _assert_within_share(ref, got, 0.01)
