import pickle
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch

from gstalk.config import TrackOptions
from gstalk.head.embedding import IBUG68_TO_MESH, derive_embedding, load_embedding, read_embedding_file
from gstalk.head.flame import FlameFileError, HeadModel, load_head_model, read_flame_file
from gstalk.head.lbs import FlameParams, VertexSubset, axis_angle_to_matrix, flame_forward, matrix_to_axis_angle
from gstalk.head.standin import EXPRESSIONS
from gstalk.head.tracker import TrackingError, fit_landmarks, head_rotation, load_track, save_track


@pytest.fixture(scope="module")
def model():
    return load_head_model()


# ------------------------------------------------------------------ FLAME files
class _FakeCh:
    """Pickles like a chumpy object: module 'chumpy.ch', class 'Ch', state {'x': array}."""

    def __init__(self, x):
        self.x = x
        self._cache = {"whatever": 1}


def _write_official_like_pickle(path, n_vert=5023, n_face=9976):
    import scipy.sparse

    mod = types.ModuleType("chumpy.ch")
    mod.Ch = _FakeCh
    _FakeCh.__module__, _FakeCh.__qualname__ = "chumpy.ch", "Ch"
    sys.modules["chumpy"] = types.ModuleType("chumpy")
    sys.modules["chumpy.ch"] = mod
    rng = np.random.default_rng(0)
    jr = scipy.sparse.random(5, n_vert, density=0.01, format="csc", random_state=0)
    d = {
        "v_template": rng.normal(size=(n_vert, 3)),
        "shapedirs": _FakeCh(rng.normal(size=(n_vert, 3, 400)) * 1e-3),
        "posedirs": rng.normal(size=(n_vert, 3, 36)) * 1e-3,
        "J_regressor": jr,
        "weights": np.abs(rng.normal(size=(n_vert, 5))),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        "f": rng.integers(0, n_vert, size=(n_face, 3)).astype(np.uint32),
        "J": rng.normal(size=(5, 3)),
        "bs_style": "lbs", "bs_type": "lrotmin",
    }
    try:
        with open(path, "wb") as f:
            pickle.dump(d, f, protocol=2)
    finally:
        del sys.modules["chumpy.ch"], sys.modules["chumpy"]
    return d


def test_loads_official_layout_without_chumpy(tmp_path):
    d = _write_official_like_pickle(tmp_path / "generic_model.pkl")
    assert "chumpy" not in sys.modules
    raw = read_flame_file(tmp_path / "generic_model.pkl")
    np.testing.assert_array_equal(raw["shapedirs"], d["shapedirs"].x)
    np.testing.assert_array_equal(raw["J_regressor"], d["J_regressor"].toarray())
    m = load_head_model(tmp_path / "generic_model.pkl", n_shape=100, n_expr=50)
    assert m.n_shape == 100 and m.n_expr == 50 and m.num_vertices == 5023
    assert m.posedirs.shape == (36, 5023 * 3) and m.faces.shape == (9976, 3)
    assert m.parents.tolist() == [-1, 0, 1, 1, 1]
    torch.testing.assert_close(m.exprdirs[..., 0], torch.as_tensor(d["shapedirs"].x[..., 300], dtype=torch.float32))
    full = load_head_model(tmp_path / "generic_model.pkl")
    assert full.n_shape == 300 and full.n_expr == 100


def test_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(FlameFileError, match="the FLAME file asks to load 'posix.system', which gstalk refuses"):
        read_flame_file(tmp_path / "evil.pkl")
    # a DECA landmark embedding (a pickle inside a .npy) is refused in its own name
    np.save(tmp_path / "landmark_embedding.npy", np.array({"full_lmk_faces_idx": Evil()}, dtype=object),
            allow_pickle=True)
    with pytest.raises(FlameFileError, match="the DECA landmark embedding .*landmark_embedding.npy asks to load") as e:
        read_embedding_file(tmp_path / "landmark_embedding.npy")
    assert "FLAME file" not in str(e.value)


def test_missing_fields_and_files(tmp_path):
    np.savez(tmp_path / "partial.npz", v_template=np.zeros((10, 3)), f=np.zeros((2, 3), np.int64))
    with pytest.raises(FlameFileError, match="missing shapedirs, posedirs, J_regressor, weights, kintree_table"):
        load_head_model(tmp_path / "partial.npz")
    with pytest.raises(FlameFileError, match="flame.is.tue.mpg.de"):
        load_head_model(tmp_path / "nope.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x00\x01garbage")
    with pytest.raises(FlameFileError, match="cannot read"):
        load_head_model(tmp_path / "junk.pkl")


def test_env_variable_selects_model(tmp_path, monkeypatch):
    _write_official_like_pickle(tmp_path / "flame2023.pkl", n_vert=300, n_face=500)
    monkeypatch.setenv("GSTALK_FLAME", str(tmp_path / "flame2023.pkl"))
    m = load_head_model()
    assert m.num_vertices == 300 and m.reference()["source"].endswith("flame2023.pkl") and not m.is_standin
    monkeypatch.delenv("GSTALK_FLAME")
    assert load_head_model().is_standin


# ------------------------------------------------------------------ skinning
def test_rotation_conversions():
    aa = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) * 0.8
    # angles past pi come back as the equivalent rotation the other way round: keep below it
    n = aa.norm(dim=-1, keepdim=True)
    aa = torch.where(n > 3.0, aa / n * 3.0, aa)
    r = axis_angle_to_matrix(aa)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3).expand(100, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(matrix_to_axis_angle(r), aa, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(axis_angle_to_matrix(torch.zeros(1, 3))[0], torch.eye(3))
    # a quarter turn about z takes x to y (right-handed), and about x takes y to z
    quarter = axis_angle_to_matrix(torch.tensor([[0.0, 0.0, np.pi / 2], [np.pi / 2, 0.0, 0.0]]))
    torch.testing.assert_close(quarter[0] @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(quarter[1] @ torch.tensor([0.0, 1, 0]), torch.tensor([0.0, 0, 1]), atol=1e-6, rtol=0)


def test_lbs_properties(model):
    g = torch.Generator().manual_seed(0)
    b = 3
    p = FlameParams(shape=torch.randn(b, model.n_shape, generator=g), expr=torch.randn(b, model.n_expr, generator=g),
                    jaw=torch.randn(b, 3, generator=g) * 0.2, neck=torch.randn(b, 3, generator=g) * 0.2,
                    eyes=torch.randn(b, 6, generator=g) * 0.2, global_rot=torch.randn(b, 3, generator=g) * 0.3,
                    translation=torch.randn(b, 3, generator=g))
    full = flame_forward(model, p)
    ids = torch.tensor([0, 13, 14, 152, 468, 700, model.num_vertices - 1])
    sub = flame_forward(model, p, vertex_ids=ids)
    torch.testing.assert_close(sub.vertices, full.vertices[:, ids])
    # zero pose: vertices are the blendshaped template
    rest = flame_forward(model, FlameParams(shape=p.shape, expr=p.expr))
    manual = (model.v_template + torch.einsum("vck,bk->bvc", model.shapedirs, p.shape)
              + torch.einsum("vck,bk->bvc", model.exprdirs, p.expr))
    torch.testing.assert_close(rest.vertices, manual)
    # a global rotation rotates everything rigidly about joint 0
    rot = FlameParams(global_rot=torch.tensor([[0.0, 0.7, 0.0]]))
    v0, v1 = flame_forward(model, FlameParams()).vertices[0], flame_forward(model, rot).vertices[0]
    j0 = (model.J_regressor @ model.v_template)[0]
    torch.testing.assert_close(v1, (v0 - j0) @ axis_angle_to_matrix(torch.tensor([0.0, 0.7, 0.0])).T + j0,
                               atol=1e-5, rtol=0)
    # the jaw moves the chin, not the forehead
    vj = flame_forward(model, FlameParams(jaw=torch.tensor([[0.3, 0.0, 0.0]]))).vertices[0]
    assert (vj[152] - v0[152]).norm() > 0.01 and (vj[10] - v0[10]).norm() < 1e-6


def test_the_rigid_and_subset_shortcuts_pose_as_the_general_path(model):
    """A head with only a global rotation and translation (the tracker's rigid stage) takes a
    shortcut, and a VertexSubset is gathered once: both give what the general skinning does."""
    g = torch.Generator().manual_seed(1)
    b = 4
    p = FlameParams(shape=torch.randn(b, model.n_shape, generator=g), expr=torch.randn(b, model.n_expr, generator=g),
                    global_rot=torch.randn(b, 3, generator=g) * 0.4, translation=torch.randn(b, 3, generator=g))
    z = torch.zeros(b, 3)
    general = flame_forward(model, FlameParams(**{**p.__dict__, "jaw": z, "neck": z, "eyes": torch.zeros(b, 6)}))
    rigid = flame_forward(model, p)
    for k in ("vertices", "joints", "transforms"):
        torch.testing.assert_close(getattr(rigid, k), getattr(general, k), atol=1e-6, rtol=1e-5)
    ids = torch.tensor([3, 99, 152, 700])
    posed = FlameParams(**{**p.__dict__, "jaw": torch.randn(b, 3, generator=g) * 0.2,
                           "shape": p.shape[:1].expand(b, -1)})  # one identity shared by the batch
    sub = flame_forward(model, posed, vertex_ids=VertexSubset.of(model, ids)).vertices
    full = flame_forward(model, FlameParams(**{**posed.__dict__, "shape": p.shape[:1].repeat(b, 1)})).vertices
    torch.testing.assert_close(sub, full[:, ids])


def test_an_identity_baked_into_the_template_gives_the_same_head(model):
    """with_identity(shape) (an avatar's fixed identity, added once) poses to the same
    vertices as the model given that shape in every call, for any pose and expression."""
    g = torch.Generator().manual_seed(5)
    shape = torch.randn(model.n_shape, generator=g)
    baked = model.with_identity(shape)
    assert baked.n_shape == 0 and baked.n_expr == model.n_expr and model.n_shape > 0
    b = 3
    p = dict(expr=torch.randn(b, model.n_expr, generator=g), jaw=torch.randn(b, 3, generator=g) * 0.2,
             neck=torch.randn(b, 3, generator=g) * 0.2, global_rot=torch.randn(b, 3, generator=g) * 0.3,
             eyes=torch.randn(b, 6, generator=g) * 0.2, translation=torch.randn(b, 3, generator=g))
    ref = flame_forward(model, FlameParams(shape=shape[None].expand(b, -1), **p))
    got = flame_forward(baked, FlameParams(**p))
    torch.testing.assert_close(got.vertices, ref.vertices, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.joints, ref.joints, atol=2e-6, rtol=1e-5)


def test_lbs_matches_smplx(model):
    lbs = pytest.importorskip("smplx.lbs")
    g = torch.Generator().manual_seed(3)
    b = 2
    betas = torch.randn(b, model.n_shape + model.n_expr, generator=g)
    pose = torch.randn(b, 15, generator=g) * 0.3
    dirs = torch.cat([model.shapedirs, model.exprdirs], -1)
    posedirs = model.posedirs.clone()
    posedirs += torch.randn(posedirs.shape, generator=g) * 1e-3  # non-zero correctives too
    m = HeadModel(**{**model.__dict__, "posedirs": posedirs})
    ref, ref_j = lbs.lbs(betas, pose, model.v_template, dirs, posedirs, model.J_regressor, model.parents,
                         model.weights)
    ours = flame_forward(m, FlameParams(shape=betas[:, : model.n_shape], expr=betas[:, model.n_shape:],
                                        global_rot=pose[:, :3], neck=pose[:, 3:6], jaw=pose[:, 6:9],
                                        eyes=pose[:, 9:15]))
    torch.testing.assert_close(ours.vertices, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.joints, ref_j, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ stand-in
def test_standin_is_a_closed_head_with_the_flame_layout(model):
    assert model.is_standin and model.parents.tolist() == [-1, 0, 1, 1, 1]
    assert model.n_expr >= 12
    names = set(model.meta["expression_names"].tolist())
    for need in ("mouth_open", "lip_press", "pucker", "smile", "stretch", "cheek_puff", "brow_raise", "brow_lower",
                 "blink_left", "blink_right"):
        assert need in names
    f = model.faces.numpy()
    region = model.meta["vertex_region"]
    for parts in ([0, 1, 2, 3], [4], [5]):  # shell, eyeballs, neck: each closed and consistently wound
        sel = np.isin(region[f], parts).all(1)
        edges = {}
        for t in f[sel]:
            for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
                edges[(a, b)] = edges.get((a, b), 0) + 1
        assert all(c == 1 and (b, a) in edges for (a, b), c in edges.items())
    # the face looks along +z: the nose tip is in front of the eyes; y is up
    v = model.v_template
    assert v[1, 2] > v[33, 2] and v[10, 1] > v[152, 1]
    # every expression direction moves something, by millimetres
    mags = model.exprdirs.norm(dim=1).amax(0)
    assert torch.all((mags > 5e-4) & (mags < 0.03))


def test_standin_embedding_is_exact(model):
    emb = load_embedding(model)
    assert emb.landmark_indices.tolist() == list(range(478))
    pts = emb.points(model.v_template[None], model.faces)[0]
    torch.testing.assert_close(pts, model.v_template[:478])


def test_standin_generation_is_deterministic(tmp_path):
    import sys
    from pathlib import Path

    from gstalk.head.flame import STANDIN_PATH

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from standin_builder import build_standin  # the asset generator lives beside the script that runs it

    d = build_standin()
    with np.load(STANDIN_PATH) as shipped:
        for k in ("v_template", "shapedirs", "weights", "J_regressor"):
            np.testing.assert_allclose(d[k], shipped[k], atol=1e-6)
        np.testing.assert_array_equal(d["f"], shipped["f"])


def test_derived_embedding_for_another_model(model, tmp_path):
    """A 'user model': the stand-in scaled, moved and with its vertices reordered."""
    rng = np.random.default_rng(0)
    v = model.v_template.numpy() * 1.15 + np.array([0.01, -0.03, 0.02])
    perm = rng.permutation(len(v))
    inv = np.argsort(perm)
    f = inv[model.faces.numpy()]
    other = HeadModel(v_template=torch.from_numpy(v[perm]), shapedirs=model.shapedirs[perm],
                      exprdirs=model.exprdirs[perm], posedirs=model.posedirs, J_regressor=model.J_regressor[:, perm],
                      weights=model.weights[perm], parents=model.parents, faces=torch.from_numpy(f), source="other")
    emb = derive_embedding(other)
    pts = emb.points(other.v_template[None], other.faces)[0].numpy()
    err = np.linalg.norm(pts - v[:478], axis=1)
    assert np.median(err) < 1e-3 and np.percentile(err, 95) < 3e-3


def test_embedding_files(tmp_path, model):
    np.savez(tmp_path / "mp.npz", lmk_face_idx=np.array([1, 2]), lmk_b_coords=np.full((2, 3), 1 / 3),
             landmark_indices=np.array([4, 5]))
    e = read_embedding_file(tmp_path / "mp.npz")
    assert e.landmark_indices.tolist() == [4, 5]
    deca = {"full_lmk_faces_idx": np.arange(68)[None], "full_lmk_bary_coords": np.full((1, 68, 3), 1 / 3)}
    np.save(tmp_path / "landmark_embedding.npy", deca, allow_pickle=True)
    e = read_embedding_file(tmp_path / "landmark_embedding.npy")
    assert len(IBUG68_TO_MESH) == 68 and e.landmark_indices.tolist() == IBUG68_TO_MESH
    assert e.face_idx.tolist() == list(range(68))


# ------------------------------------------------------------------ tracking
def synth_track(model, T=50, W=256, focal=1.8 * 256, noise=0.5, seed=1):
    t = np.linspace(0, 1, T)
    g = torch.Generator().manual_seed(seed)
    shape = torch.randn(1, model.n_shape, generator=g)
    expr = torch.zeros(T, model.n_expr)
    ex = {EXPRESSIONS.index("smile"): 0.5 + 0.5 * np.sin(2 * np.pi * t * 1.5),
          EXPRESSIONS.index("brow_raise"): np.clip(np.sin(2 * np.pi * t * 2.3), 0, 1),
          EXPRESSIONS.index("pucker"): np.clip(np.cos(2 * np.pi * t * 1.1), 0, 1)}
    for k, c in ex.items():
        expr[:, k] = torch.tensor(c, dtype=torch.float32)
    jaw = torch.zeros(T, 3)
    jaw[:, 0] = torch.tensor(0.15 * (0.5 + 0.5 * np.sin(2 * np.pi * t * 3)), dtype=torch.float32)
    rot = torch.zeros(T, 3)
    rot[:, 1] = torch.tensor(0.35 * np.sin(2 * np.pi * t), dtype=torch.float32)  # +-20 deg yaw
    rot[:, 0] = torch.tensor(0.15 * np.cos(2 * np.pi * t * 0.7), dtype=torch.float32)
    trans = torch.zeros(T, 3)
    trans[:, 2] = -0.6
    trans[:, 0] = torch.tensor(0.02 * np.sin(2 * np.pi * t), dtype=torch.float32)
    p = FlameParams(shape=shape.expand(T, -1), expr=expr, jaw=jaw, global_rot=rot, translation=trans)
    emb = load_embedding(model)
    l3 = emb.points(flame_forward(model, p).vertices, model.faces).numpy()
    z = -l3[..., 2]
    uv = np.stack([focal * l3[..., 0] / z + W / 2, focal * (-l3[..., 1]) / z + W / 2], -1)
    nz = np.random.default_rng(seed).normal(0, noise, uv.shape)
    return uv + nz, nz, dict(shape=shape[0], expr=expr, jaw=jaw, rot=rot, ex=ex), emb


def test_tracking_recovers_ground_truth(model, tmp_path):
    lmk, nz, truth, emb = synth_track(model)
    tr = fit_landmarks(lmk, np.ones(len(lmk), bool), 256, 256, model, emb, TrackOptions())
    rt = axis_angle_to_matrix(truth["rot"]).numpy()
    ang = np.degrees(np.arccos(np.clip((np.einsum("tij,tij->t", rt, head_rotation(tr)) - 1) / 2, -1, 1)))
    assert ang.max() < 2.0, ang.max()
    noise = np.linalg.norm(nz, axis=-1).mean()
    assert np.nanmean(tr.residual_px) < noise + 1.5
    assert np.corrcoef(tr.jaw[:, 0], truth["jaw"][:, 0])[0, 1] > 0.9
    for k in truth["ex"]:
        assert np.corrcoef(tr.expr[:, k], truth["expr"][:, k])[0, 1] > 0.9, EXPRESSIONS[k]
    assert abs(tr.K[0, 0] / (1.8 * 256) - 1) < 0.25  # focal found by the search, roughly
    # the track file round-trips
    save_track(tr, tmp_path / "track.npz")
    back = load_track(tmp_path / "track.npz")
    np.testing.assert_array_equal(back.expr, tr.expr)
    assert back.model["name"] == "gstalk-standin" and back.width == 256


def test_missing_landmarks_are_interpolated_and_flagged(model):
    lmk, _, truth, emb = synth_track(model, T=30)
    valid = np.ones(30, bool)
    valid[10:14] = False
    lmk[10:14] = np.nan
    opts = TrackOptions(iters_rigid=120, iters_shape=120, iters_all=200, focal_search=False)
    tr = fit_landmarks(lmk, valid, 256, 256, model, emb, opts, focal=1.8 * 256)
    assert not tr.valid[10:14].any() and tr.valid[:10].all() and np.isnan(tr.residual_px[10:14]).all()
    assert np.isfinite(tr.global_rot).all()
    # interpolated poses lie between their neighbours
    yaw = tr.global_rot[:, 1]
    assert min(yaw[9], yaw[14]) - 0.05 < yaw[12] < max(yaw[9], yaw[14]) + 0.05
    valid[:20] = False
    with pytest.raises(TrackingError, match="missing in 67%"):
        fit_landmarks(lmk, valid, 256, 256, model, emb, opts)


def test_track_cli_on_a_prepared_clip(tmp_path):
    from gstalk.cli import main
    from gstalk.prepare import prepare
    from synthclip import make_clip
    from gstalk.config import PrepareOptions

    clip = make_clip(tmp_path / "c.mp4", seconds=2.2, vfr=False, rotation=0, audio=False)
    prepare(clip.path, tmp_path / "ds", PrepareOptions(resolution=96, preview=False), log=lambda m: None)
    assert main(["track", str(tmp_path / "ds"), "--iters-rigid", "60", "--iters-shape", "60", "--iters-all", "80",
                 "--no-focal-search"]) == 0
    tr = load_track(tmp_path / "ds" / "track.npz")
    assert tr.num_frames == 55 and tr.valid.all() and tr.width == 96
    assert np.nanmedian(tr.residual_px) < 3.0  # px at 96 px
    assert (tmp_path / "ds" / "track_preview.mp4").is_file()
    assert main(["track", str(tmp_path / "missing")]) == 2


def _mesh_masks(model, params, focal, W):
    """Filled projected triangles of the whole head model, per frame (a person silhouette)."""
    import cv2

    v = flame_forward(model, params).vertices.detach().numpy()
    z = -v[..., 2]
    uv = np.stack([focal * v[..., 0] / z + W / 2, focal * (-v[..., 1]) / z + W / 2], -1)
    faces = model.faces.numpy()
    out = np.zeros((len(v), W, W), np.uint8)
    for t in range(len(v)):
        cv2.fillPoly(out[t], list(np.round(uv[t][faces] * 4).astype(np.int32)), 1, shift=2)
    return out.astype(bool)


def test_silhouette_stage_pulls_the_head_inside_the_masks(model):
    """Landmarks biased outward (a detector that puts the face outline too wide) make the head
    too large; stage 4 against the true silhouettes brings it back inside them."""
    from gstalk.head.tracker import silhouette_vertices

    T, W, focal = 16, 128, 1.8 * 128
    lmk, _, truth, emb = synth_track(model, T=T, W=W, focal=focal, noise=0.3)
    p_true = FlameParams(shape=truth["shape"][None].expand(T, -1), expr=truth["expr"], jaw=truth["jaw"],
                         global_rot=truth["rot"],
                         translation=torch.tensor([[0.02 * np.sin(2 * np.pi * t), 0, -0.6]
                                                   for t in np.linspace(0, 1, T)], dtype=torch.float32))
    masks = _mesh_masks(model, p_true, focal, W)
    centre = lmk.mean(1, keepdims=True)
    biased = centre + 1.12 * (lmk - centre)
    opts = TrackOptions(iters_rigid=150, iters_shape=150, iters_all=150, focal_search=False, iters_silhouette=150)
    valid = np.ones(T, bool)
    plain = fit_landmarks(biased, valid, W, W, model, emb, replace(opts, iters_silhouette=0), focal=focal)
    refined = fit_landmarks(biased, valid, W, W, model, emb, opts, focal=focal, person_masks=masks)

    def scores(tr):
        p = tr.params()
        fitted = _mesh_masks(model, p, float(tr.K[0, 0]), W)
        iou = (fitted & masks).sum() / (fitted | masks).sum()
        outside = (fitted & ~masks).sum() / fitted.sum()
        return iou, outside

    iou0, out0 = scores(plain)
    iou1, out1 = scores(refined)
    assert out0 > 0.08  # the bias shows: the landmark-only head sticks out of the silhouette
    assert out1 < 0.7 * out0 and iou1 > iou0 + 0.05, (iou0, out0, iou1, out1)
    assert np.isfinite(refined.residual_px).all()
    assert len(silhouette_vertices(model, emb)) > 500  # skull and face, not the neck or eyeballs


def test_chunked_stages_give_the_full_batch_track(model, monkeypatch):
    """The stages over every frame compute their landmark and silhouette terms a chunk of
    frames at a time (memory that does not grow with the clip); the track is the one a single
    batch gives, silhouette included, and the masks may come one frame at a time."""
    import gstalk.head.tracker as tracker

    T, W, focal = 24, 96, 1.8 * 96
    lmk, _, truth, emb = synth_track(model, T=T, W=W, focal=focal, noise=0.3)
    p_true = FlameParams(shape=truth["shape"][None].expand(T, -1), expr=truth["expr"], jaw=truth["jaw"],
                         global_rot=truth["rot"], translation=torch.tensor([[0.0, 0, -0.6]] * T))
    masks = _mesh_masks(model, p_true, focal, W)
    opts = TrackOptions(iters_rigid=40, iters_shape=40, iters_all=40, focal_search=False, iters_silhouette=20)
    valid = np.ones(T, bool)
    whole = fit_landmarks(lmk, valid, W, W, model, emb, opts, focal=focal, person_masks=masks)
    monkeypatch.setattr(tracker, "CHUNK", 7)  # 4 chunks, the last one short
    reads = []
    chunked = fit_landmarks(lmk, valid, W, W, model, emb, opts, focal=focal,
                            person_masks=lambda t: reads.append(t) or masks[t])
    assert sorted(reads) == list(range(T))  # each mask read once
    for k in ("expr", "jaw", "global_rot", "translation", "shape", "residual_px"):
        np.testing.assert_allclose(getattr(chunked, k), getattr(whole, k), atol=2e-4, err_msg=k)
