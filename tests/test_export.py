"""Exporters: every file is read back by an independent reader (plyfile, numpy structured
reads, a decoder written here from the published compressed-PLY layout, trimesh, a GLB
parser) and compared with the source parameters within the format's quantisation."""

import json
import math
import struct

import numpy as np
import pytest
import torch
from plyfile import PlyData

from gstalk.errors import GstalkError

from tinyavatar import make_avatar, tone_speech

N_FRAMES = 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from gstalk.export.exporter import export

    root = tmp_path_factory.mktemp("export")
    av_dir = make_avatar(root / "avatar", n_frames=8)
    wav = tone_speech(root / "speech.wav", seconds=0.6)
    res = export(av_dir, root / "out", ("all",), audio_path=wav, max_frames=N_FRAMES, device="cpu")
    return av_dir, wav, res


@pytest.fixture(scope="module")
def source(exported):
    """The avatar at rest (the static export: its head's centre at the origin) and its posed
    frames (shifted by the same offset), straight from the model."""
    from gstalk.avatar.io import load_avatar
    from gstalk.avatar.conditions import conditions_for, load_driver, posed_iter
    from gstalk.export.exporter import _moved, head_centre, rest_gaussians
    from gstalk.gaussians.set import to_gaussian_set

    av_dir, wav, res = exported
    av, motion = load_avatar(av_dir, "cpu")
    audio, _, n, fps = load_driver(wav, None, av.cfg.fps)
    cond = conditions_for(av, motion, min(n, N_FRAMES), fps, audio)
    rest = rest_gaussians(av, motion)
    offset = head_centre(av, rest)
    frames = [to_gaussian_set(_moved(g, offset)) for g in posed_iter(av, cond)]
    return av, to_gaussian_set(_moved(rest, offset)), frames, cond


def _rdf(g):
    from gstalk.gaussians.axes import convert_axes

    return convert_axes(g, "rdf")


def _vertex(path):
    v = PlyData.read(str(path))["vertex"]
    return v, {p.name for p in v.properties}


def test_axis_conversion_renders_the_same_image(source):
    """The RDF file seen through the correspondingly turned camera gives the same picture,
    view-dependent colour included: the conversion is exact for positions, rotations and SH."""
    from gstalk.gaussians.axes import convert_axes, flip_viewmat
    from gstalk.render import Cameras, look_at, rasterize

    av, canon, _, _ = source
    eye = torch.tensor([0.25, 0.1, 0.5])
    vm = look_at(eye, torch.tensor([0.0, 0.0, 0.0]))
    K = torch.tensor([[80.0, 0, 32], [0, 80.0, 32], [0, 0, 1]])
    a = rasterize(canon.activated(), Cameras(vm[None], K[None], 64, 64), sh_degree=1, background=1.0).colors[0]
    conv = convert_axes(canon, "rdf")
    b = rasterize(conv.activated(), Cameras(flip_viewmat(vm, "rdf")[None], K[None], 64, 64), sh_degree=1,
                  background=1.0).colors[0]
    assert float((a - 1).abs().mean()) > 0.02  # the head is in view
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(conv.means[:, 1], -canon.means[:, 1]) and torch.allclose(conv.means[:, 0], canon.means[:, 0])


def test_the_static_export_has_the_head_at_the_origin_upright_facing_the_viewer(exported, source):
    """The head's Gaussians' opacity-weighted centre is within 2 cm of the origin; in the default
    rdf axes the torso lies below it (+y, y is down) and the mouth in front (-z, toward a camera
    that looks along +z at the origin); the PLY header says so."""
    av, _, _, _ = source
    _, _, res = exported
    v, _ = _vertex(res.files["ply"][0])
    xyz = np.stack([v["x"], v["y"], v["z"]], 1)
    w = 1 / (1 + np.exp(-v["opacity"]))
    bound = av.binding.numpy() >= 0
    centre = (xyz[bound] * w[bound, None]).sum(0) / w[bound].sum()
    assert np.linalg.norm(centre) < 0.02, centre
    region = av.region.numpy()
    torso, mouth = xyz[region == 2].mean(0), xyz[region == 1].mean(0)
    assert torso[1] > 0.05 and mouth[1] > 0.0 and mouth[2] < 0.0, (torso, mouth)
    assert any("origin head" in c for c in PlyData.read(str(res.files["ply"][0])).comments)


def test_origin_camera_keeps_the_tracked_cameras_space(exported, tmp_path):
    """--origin camera: the head stays where the clip had it (the camera at the origin, the head
    in front of it along +z in rdf)."""
    from gstalk.export.exporter import export

    av_dir, _, _ = exported
    r = export(av_dir, tmp_path / "cam", ("ply",), origin="camera", device="cpu")
    v, _ = _vertex(r.files["ply"][0])
    assert np.median(v["z"]) > 0.3 and r.origin == "camera" and r.offset == [0.0, 0.0, 0.0]
    assert any("origin camera" in c for c in PlyData.read(str(r.files["ply"][0])).comments)


def test_standard_ply_has_every_parameter(exported, source):
    _, _, res = exported
    _, canon, _, _ = source
    v, names = _vertex(res.files["ply"][0])
    ref = _rdf(canon)
    assert len(v) == len(ref)
    assert {"x", "f_dc_0", "f_rest_8", "opacity", "scale_2", "rot_3"} <= names and "f_rest_9" not in names
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), ref.means.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.stack([v[f"rot_{i}"] for i in range(4)], 1), ref.quats.numpy(), atol=1e-6)
    np.testing.assert_allclose(v["opacity"], ref.opacity_logits.numpy(), atol=1e-4)
    rest = ref.sh[:, 1:].numpy().transpose(0, 2, 1).reshape(len(ref), -1)
    np.testing.assert_allclose(np.stack([v[f"f_rest_{i}"] for i in range(9)], 1), rest, atol=1e-6)


def test_splat_file_is_32_bytes_a_splat(exported, source):
    from gstalk.gaussians.set import SH_C0

    _, _, res = exported
    _, canon, _, _ = source
    ref = _rdf(canon)
    path = res.files["splat"][0]
    n = len(ref)
    assert path.stat().st_size == 32 * n
    rec = np.fromfile(path, dtype=np.dtype([("p", "<f4", 3), ("s", "<f4", 3), ("c", "u1", 4), ("q", "u1", 4)]))
    # the file is sorted by importance: match records to the source by their exact positions
    src_pos = ref.means.numpy().astype(np.float32)
    key = lambda a: np.lexsort(a.T[::-1])  # noqa: E731
    i_src, i_rec = key(src_pos), key(rec["p"])
    np.testing.assert_array_equal(rec["p"][i_rec], src_pos[i_src])
    rec = rec[i_rec]
    np.testing.assert_allclose(rec["s"], np.exp(ref.log_scales.numpy())[i_src], rtol=1e-5)
    rgb = np.clip(ref.sh[:, 0].numpy() * SH_C0 + 0.5, 0, 1)[i_src]
    assert np.abs(rec["c"][:, :3] / 255.0 - rgb).max() <= 0.5 / 255 + 1e-6
    alpha = torch.sigmoid(ref.opacity_logits).numpy()[i_src]
    assert np.abs(rec["c"][:, 3] / 255.0 - alpha).max() <= 0.5 / 255 + 1e-6
    q = (rec["q"].astype(np.float64) - 128) / 128
    qs = ref.quats.numpy()[i_src]
    qs = qs / np.linalg.norm(qs, axis=1, keepdims=True)
    assert np.abs(np.abs((q / np.linalg.norm(q, axis=1, keepdims=True) * qs).sum(1)) - 1).max() < 2e-3
    # stored in importance order (size times opacity, descending), up to the 8-bit opacity
    raw = np.fromfile(path, dtype=rec.dtype)
    size = np.prod(raw["s"].astype(np.float64), 1)
    order = size * raw["c"][:, 3] / 255.0
    assert np.all(np.diff(order) <= size.max() / 255.0)


def _decode_compressed(path):
    """A decoder for the PlayCanvas compressed PLY written from the published layout."""
    ply = PlyData.read(str(path))
    ch, vx = ply["chunk"], ply["vertex"]
    c = np.stack([ch[p] for p in [p.name for p in ch.properties]], 1).astype(np.float64)
    n = len(vx)
    ci = np.arange(n) // 256

    def unorm(v, bits):
        return (v & ((1 << bits) - 1)) / ((1 << bits) - 1)

    def u111011(v):
        return np.stack([unorm(v >> 21, 11), unorm(v >> 11, 10), unorm(v, 11)], 1)

    lerp = lambda lo, hi, t: lo + (hi - lo) * t  # noqa: E731
    pos = lerp(c[ci, 0:3], c[ci, 3:6], u111011(vx["packed_position"].astype(np.int64)))
    scl = lerp(c[ci, 6:9], c[ci, 9:12], u111011(vx["packed_scale"].astype(np.int64)))
    col = vx["packed_color"].astype(np.int64)
    rgb = lerp(c[ci, 12:15], c[ci, 15:18], np.stack([unorm(col >> 24, 8), unorm(col >> 16, 8), unorm(col >> 8, 8)], 1))
    alpha = unorm(col, 8)
    r = vx["packed_rotation"].astype(np.int64)
    abc = (np.stack([unorm(r >> 20, 10), unorm(r >> 10, 10), unorm(r, 10)], 1) - 0.5) * math.sqrt(2)
    m = np.sqrt(np.clip(1 - (abc ** 2).sum(1), 0, None))
    which = (r >> 30) & 3
    q = np.zeros((n, 4))
    for k in range(4):
        sel = which == k
        others = [i for i in range(4) if i != k]
        q[sel, k] = m[sel]
        q[np.ix_(sel, others)] = abc[sel]
    sh = None
    if "sh" in ply:
        e = ply["sh"]
        sh = np.stack([e[p.name] for p in e.properties], 1).astype(np.float64) * 8 / 256 - 4 + 4 / 256
    return ply, c, pos, scl, rgb, alpha, q, sh


def test_compressed_ply_matches_the_published_layout(exported, source):
    from gstalk.export.splats import CHUNK_PROPS, VERTEX_PROPS
    from gstalk.gaussians.set import SH_C0

    _, _, res = exported
    _, canon, _, _ = source
    ref = _rdf(canon)
    path = res.files["compressed-ply"][0]
    ply, chunks, pos, scl, rgb, alpha, q, sh = _decode_compressed(path)
    # header: published element and property names and types, in order
    assert [e.name for e in ply.elements] == ["chunk", "vertex", "sh"]
    assert [p.name for p in ply["chunk"].properties] == [
        "min_x", "min_y", "min_z", "max_x", "max_y", "max_z", "min_scale_x", "min_scale_y", "min_scale_z",
        "max_scale_x", "max_scale_y", "max_scale_z", "min_r", "min_g", "min_b", "max_r", "max_g", "max_b"]
    assert CHUNK_PROPS == [p.name for p in ply["chunk"].properties]
    assert [p.name for p in ply["vertex"].properties] == VERTEX_PROPS
    assert all(np.dtype(p.val_dtype) == np.uint32 for p in ply["vertex"].properties)
    assert [p.name for p in ply["sh"].properties] == [f"f_rest_{i}" for i in range(9)]
    n = len(ref)
    assert len(ply["chunk"]) == (n + 255) // 256
    # 16 bytes a splat + 72 a chunk + 9 SH bytes a splat + the header
    header = path.read_bytes().index(b"end_header\n") + len(b"end_header\n")
    assert path.stat().st_size == header + 72 * len(ply["chunk"]) + 16 * n + 9 * n
    # values: match decoded splats to the source (the writer reorders) by nearest position
    src = ref.means.numpy()
    d = ((pos[:, None, :] - src[None, :, :]) ** 2).sum(-1)
    idx = d.argmin(1)
    assert len(np.unique(idx)) > 0.99 * n
    ci = np.arange(n) // 256
    ext = chunks[ci, 3:6] - chunks[ci, 0:3]
    assert (np.abs(pos - src[idx]) <= ext / np.array([2047, 1023, 2047]) * 0.51 + 1e-6).mean() > 0.99
    ls = ref.log_scales.numpy()[idx]
    sext = chunks[ci, 9:12] - chunks[ci, 6:9]
    assert (np.abs(scl - ls) <= sext / np.array([2047, 1023, 2047]) * 0.51 + 1e-5).mean() > 0.99
    src_rgb = ref.sh[:, 0].numpy()[idx] * SH_C0 + 0.5
    cext = chunks[ci, 15:18] - chunks[ci, 12:15]
    assert (np.abs(rgb - src_rgb) <= cext / 255 * 0.51 + 1e-5).mean() > 0.99
    assert np.abs(alpha - torch.sigmoid(ref.opacity_logits).numpy()[idx]).max() <= 0.51 / 255
    qs = ref.quats.numpy()[idx]
    qs = qs / np.linalg.norm(qs, axis=1, keepdims=True)
    assert np.median(np.abs((q * qs).sum(1))) > 0.9999 and np.abs((q * qs).sum(1)).min() > 0.998
    rest = ref.sh[:, 1:].numpy().transpose(0, 2, 1).reshape(n, -1)[idx]
    assert np.abs(sh - rest).max() <= 8 / 256 * 0.51 + 1e-6


def test_ply_sequence_has_one_file_per_frame_and_a_manifest(exported, source):
    _, _, res = exported
    _, _, frames, cond = source
    seq = res.files["ply-sequence"][0].parent
    plys = sorted(seq.glob("frame_*.ply"))
    assert [p.name for p in plys] == [f"frame_{k:05d}.ply" for k in range(N_FRAMES)]
    m = json.loads((seq / "manifest.json").read_text())
    assert m["num_frames"] == N_FRAMES and m["files"] == [p.name for p in plys] and m["fps"] == 25.0
    assert m["axes"] == "rdf" and m["audio"] == "audio.wav"
    import soundfile as sf  # librosa's dependency; reads the copied audio back

    a, sr = sf.read(seq / "audio.wav")
    assert sr == 16000 and abs(len(a) / sr - N_FRAMES / 25.0) < 1 / 16000 + 1e-9
    moved = 0.0
    for k in (0, N_FRAMES - 1):
        v, _ = _vertex(plys[k])
        ref = _rdf(frames[k])
        np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), ref.means.numpy(), atol=1e-5)
        np.testing.assert_allclose(v["f_dc_1"], ref.sh[:, 0, 1].numpy(), atol=1e-5)
        moved = max(moved, float(np.abs(np.stack([v["x"], v["y"], v["z"]], 1) - _rdf(frames[0]).means.numpy()).max()))
    assert moved > 1e-3  # the frames differ: the sequence animates


def test_viser_recording_replays_every_frame(exported):
    import msgspec
    import zstandard

    _, _, res = exported
    path = res.files["viser"][0]
    data = path.read_bytes()  # uncompressed size (uint64), then one zstd frame
    size = int.from_bytes(data[:8], "little")
    raw = zstandard.ZstdDecompressor().decompress(data[8:], max_output_size=size)
    assert len(raw) == size
    n_meta = int.from_bytes(raw[:8], "little")
    meta = msgspec.msgpack.decode(raw[8:8 + n_meta])
    assert abs(meta["durationSeconds"] - N_FRAMES / 25.0) < 1e-6
    times = [t for t, _ in meta["messages"]]
    assert times == sorted(times)
    kinds = [m.get("type", "") for _, m in meta["messages"]]
    splat_msgs = [k for k in kinds if "Gaussian" in k or "Buffer" in k or "Update" in k]
    assert len(splat_msgs) >= N_FRAMES  # the first add and one update a frame
    assert len({round(t, 6) for t in times}) >= N_FRAMES - 1
    # it opens at the tracked camera, looking at the head's centre (the origin), upright (y down in rdf)
    cam = {m["type"]: m for _, m in meta["messages"] if m.get("type", "").startswith("SetCamera")}
    assert {"SetCameraPositionMessage", "SetCameraLookAtMessage", "SetCameraUpDirectionMessage"} <= set(cam), cam
    assert np.allclose(cam["SetCameraLookAtMessage"]["look_at"], 0, atol=1e-4)
    assert cam["SetCameraUpDirectionMessage"]["position"][1] < -0.9
    assert 0.2 < np.linalg.norm(cam["SetCameraPositionMessage"]["position"]) < 3
    page = path.with_suffix(".html").read_text()
    assert "__VISER_EMBED_DATA__" in page and page.index("__VISER_EMBED_DATA__") < page.index("</head>")


def test_mesh_sequences_match_the_head_model(exported, source):
    import trimesh

    from gstalk.export.mesh import mesh_vertices

    _, _, res = exported
    av, _, _, cond = source
    verts = mesh_vertices(av.head_model, av.shape, cond.params)
    faces = av.head_model.faces.numpy()
    for fmt in ("obj", "ply"):
        files = res.files[f"mesh-{fmt}"]
        assert [p.name for p in files] == [f"frame_{k:05d}.{fmt}" for k in range(N_FRAMES)]
        for k in (0, N_FRAMES - 1):
            m = trimesh.load(files[k], process=False, force="mesh")
            np.testing.assert_allclose(m.vertices, verts[k], atol=1e-6)
            np.testing.assert_array_equal(m.faces, faces)


def _read_glb(path):
    data = path.read_bytes()
    magic, version, total = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and total == len(data)
    n_js, kind = struct.unpack_from("<I4s", data, 12)
    assert kind == b"JSON"
    doc = json.loads(data[20:20 + n_js])
    n_bin, kind = struct.unpack_from("<I4s", data, 20 + n_js)
    assert kind == b"BIN\x00"
    blob = data[28 + n_js: 28 + n_js + n_bin]
    comps = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}

    def acc(i):
        a = doc["accessors"][i]
        v = doc["bufferViews"][a["bufferView"]]
        dt = {5126: "<f4", 5125: "<u4"}[a["componentType"]]
        arr = np.frombuffer(blob, dt, a["count"] * comps[a["type"]], v["byteOffset"])
        return arr.reshape(a["count"], comps[a["type"]]) if a["type"] != "SCALAR" else arr

    return doc, acc


def test_glb_has_morph_targets_and_a_talking_animation(exported, source):
    import trimesh

    from gstalk.export.mesh import JAW_REF, mesh_vertices
    from gstalk.head.lbs import FlameParams

    _, _, res = exported
    av, _, _, cond = source
    path = res.files["glb"][0]
    scene = trimesh.load(path, process=False)
    geom = list(scene.geometry.values())[0]
    np.testing.assert_array_equal(geom.faces, av.head_model.faces.numpy())
    doc, acc = _read_glb(path)
    prim = doc["meshes"][0]["primitives"][0]
    base = acc(prim["attributes"]["POSITION"])
    np.testing.assert_allclose(geom.vertices, base, atol=1e-6)
    names = doc["meshes"][0]["extras"]["targetNames"]
    E = av.head_model.n_expr
    assert names == [f"expr_{k:02d}" for k in range(E)] + ["jaw_open"] and len(prim["targets"]) == E + 1
    deltas = np.stack([acc(t["POSITION"]) for t in prim["targets"]])
    anim = doc["animations"][0]
    ch = {c["target"]["path"]: anim["samplers"][c["sampler"]] for c in anim["channels"]}
    times = acc(ch["weights"]["input"])
    np.testing.assert_allclose(times, np.arange(N_FRAMES) / 25.0, atol=1e-6)
    w = acc(ch["weights"]["output"]).reshape(N_FRAMES, E + 1)
    rot = acc(ch["rotation"]["output"])  # x, y, z, w
    tr = acc(ch["translation"]["output"])
    truth = mesh_vertices(av.head_model, av.shape, cond.params)
    assert float(cond.params.jaw[:, 0].abs().max()) > 0.02  # the jaw moves in this sequence
    for k in range(N_FRAMES):
        x, y, z, s = rot[k]
        R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - s * z), 2 * (x * z + s * y)],
                      [2 * (x * y + s * z), 1 - 2 * (x * x + z * z), 2 * (y * z - s * x)],
                      [2 * (x * z - s * y), 2 * (y * z + s * x), 1 - 2 * (x * x + y * y)]])
        local = base + np.einsum("t,tvc->vc", w[k], deltas)
        v = local @ R.T + tr[k]
        # exact up to the jaw's linearisation (and the neck/eye turns, which GLB leaves out)
        err = np.abs(v - truth[k]).max()
        jaw = float(cond.params.jaw[k, 0])
        side = float(cond.params.jaw[k, 1:].abs().max())  # jaw yaw/roll: not a morph target
        assert err < 2e-4 + 0.05 * abs(jaw * (jaw - JAW_REF)) + 0.1 * side, (k, err, jaw, side)
        # with the jaw closed the morph targets are exact
        p = FlameParams(**{kk: (None if vv is None else vv[k:k + 1]) for kk, vv in cond.params.__dict__.items()})
        p.jaw = torch.zeros(1, 3)
        closed = mesh_vertices(av.head_model, av.shape, p)[0]
        local0 = base + np.einsum("t,tvc->vc", w[k, :E], deltas[:E])
        np.testing.assert_allclose(local0 @ R.T + tr[k], closed, atol=2e-5)


def test_bad_export_requests_are_clear(exported, tmp_path):
    from gstalk.cli import main
    from gstalk.export.exporter import export

    av_dir, wav, _ = exported
    with pytest.raises(GstalkError, match="past the end"):
        export(av_dir, tmp_path / "o", ("ply",), audio_path=wav, frame=999, device="cpu")
    with pytest.raises(GstalkError, match="unknown export format"):
        export(av_dir, tmp_path / "o", ("obj",), device="cpu")
    # a frame before the avatar at rest (-1), a negative cap, an unknown head motion: refused, not
    # quietly read as the avatar at rest, all frames and the tracked head
    with pytest.raises(GstalkError, match="--frame must be -1 .* got -5"):
        export(av_dir, tmp_path / "o", ("ply",), frame=-5, device="cpu")
    with pytest.raises(GstalkError, match="--max-frames must be 0 or more, got -3"):
        export(av_dir, tmp_path / "o", ("ply-sequence",), max_frames=-3, device="cpu")
    with pytest.raises(SystemExit) as e:  # the argument parser's own refusal, with the choices
        main(["export", str(av_dir), "--head", "sideways", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(GstalkError, match="not a gstalk avatar"):
        export(tmp_path, tmp_path / "o", ("ply",), device="cpu")
    # the CLI: a frame of the training motion as .splat, in gstalk's own axes
    assert main(["export", str(av_dir), "--format", "splat", "--frame", "2", "--axes", "rub",
                 "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    assert (tmp_path / "cli" / "avatar.splat").stat().st_size % 32 == 0
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_gsplats_exporter_writes_what_ours_does_but_drops_broken_gaussians(tmp_path):
    """Could gsplat.export_splats write gstalk's .splat and compressed PLY? Its .splat holds the
    same Gaussians to within one 8-bit step (in another order), its compressed PLY the same
    header and size. It is not used: it drops Gaussians with NaN or infinite values without a
    word, where gstalk refuses the file, and it writes no note of the axes the file is in."""
    import numpy as np
    from gsplat import export_splats

    from gstalk.errors import GstalkError
    from gstalk.export.splats import write_compressed_ply, write_splat
    from gstalk.gaussians.set import GaussianSet

    g = GaussianSet.random(300, sh_degree=1, extent=0.5, seed=0)
    args = (g.means, g.log_scales, g.quats, g.opacity_logits, g.sh[:, :1], g.sh[:, 1:])
    ours = np.frombuffer(write_splat(g, tmp_path / "a.splat").read_bytes(), np.uint8).reshape(-1, 32)
    theirs = np.frombuffer(export_splats(*args, format="splat"), np.uint8).reshape(-1, 32)

    def decode(rows):
        pos = rows[:, :12].copy().view(np.float32).reshape(-1, 3)
        return pos, rows[:, 12:24].copy().view(np.float32).reshape(-1, 3), rows[:, 24:].astype(int)

    (po, so, qo), (pt, st, qt) = decode(ours), decode(theirs)
    match = np.array([int(np.argmin(np.abs(pt - p).sum(1))) for p in po])
    np.testing.assert_allclose(pt[match], po, atol=1e-6)
    np.testing.assert_allclose(st[match], so, rtol=1e-5)
    assert np.abs(qt[match] - qo).max() <= 1  # colour, opacity and rotation bytes
    c_ours = write_compressed_ply(g, tmp_path / "a.ply").read_bytes().replace(b"comment Generated by gstalk\n", b"")
    c_theirs = export_splats(*args, format="ply_compressed")
    head = c_ours.index(b"end_header\n")
    assert c_ours[:head] == c_theirs[:head] and len(c_ours) == len(c_theirs)
    # a broken Gaussian: gsplat leaves it out, gstalk says so
    g.means[7, 0] = float("nan")
    assert len(export_splats(*args, format="splat")) == 299 * 32
    with pytest.raises(GstalkError, match="NaN|finite"):
        write_splat(g, tmp_path / "b.splat")


def test_web_player_motion_is_rebuilt_within_its_tolerances(exported, source):
    """The web player's compression: each attribute of each frame, rebuilt as player.js rebuilds
    it (mean + int16 components x weights), is within its tolerance of the posed frames; values
    that never move are stored once; a low-rank sequence takes as few components as its rank."""
    from gstalk.avatar.conditions import posed_batches, posed_iter
    from gstalk.export.web import STILL, TOLERANCE, Components, choose_components, player_data, rebuild

    def compress(x, tol, still):  # the fewest components within tol
        c = Components(x, still)
        return c.take(c.fewest(tol))

    av, _, _, cond = source
    posed = list(posed_iter(av, cond))
    off = torch.zeros(3)  # no shift: compare in gstalk's world
    manifest, data = player_data(av, posed_batches(av, cond, batch=2), off, 25.0, av.cfg.resolution)
    assert manifest["num_frames"] == len(posed) and manifest["gaussians"] == av.num_gaussians

    def arrays(d):  # every array entry of the manifest: {"offset", "dtype", "shape"}
        if isinstance(d, dict):
            if {"offset", "dtype", "shape"} <= set(d):
                yield d
            for v in d.values():
                yield from arrays(v)

    entries = sorted(arrays(manifest), key=lambda e: e["offset"])
    ends = [e["offset"] + 4 * math.ceil(np.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize / 4) for e in entries]
    assert len(data) == ends[-1] and all(e["offset"] == end for e, end in zip(entries[1:], ends))  # end to end
    col = next(e for e in entries if e is manifest["colors"])
    assert np.frombuffer(data, np.float32, int(np.prod(col["shape"])), col["offset"]).reshape(col["shape"]).shape \
        == (av.num_gaussians, 3)
    means = np.stack([g.means.numpy() for g in posed])
    c = compress(means.astype(np.float64), TOLERANCE["means"], STILL["means"])
    for t in range(len(posed)):
        err = np.abs(rebuild(c, t) - means[t])
        assert np.quantile(err, 0.999) <= TOLERANCE["means"] * 1.01 and err.max() < 10 * TOLERANCE["means"]
    # over a budget the tolerances loosen alike until the components fit (frames of rank 6,
    # each direction 3 times weaker than the one before)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(40, 6)) * 0.01 * 3.0 ** -np.arange(6)
    x = (w @ rng.normal(size=(6, 300 * 3))).reshape(40, 300, 3)
    parts = {"means": Components(x, STILL["means"])}
    ks, loosened = choose_components(parts, 10**9)
    assert loosened == 1.0 and ks["means"] >= 4
    small = parts["means"].nbytes(ks["means"]) // 2
    ks2, loosened = choose_components(parts, small)
    assert loosened > 1.0 and 0 < ks2["means"] < ks["means"] and parts["means"].nbytes(ks2["means"]) <= small
    # a sequence of rank 2 plus Gaussians that never move
    rng = np.random.default_rng(0)
    T, N = 30, 200
    base, d1, d2 = rng.normal(size=(3, N, 3))
    x = base + np.sin(np.arange(T))[:, None, None] * d1 + np.cos(0.3 * np.arange(T))[:, None, None] * d2 * 0.5
    x[:, :50] = base[:50]
    c = compress(x, 1e-4, 1e-6)
    assert c.rows.shape[0] == 2 and c.rows.dtype == np.int16 and len(c.moving) == N - 50
    assert all(np.abs(rebuild(c, t) - x[t]).max() < 1e-3 for t in range(T))
    assert np.array_equal(rebuild(c, 0)[:50], base[:50].astype(np.float32))


def test_web_export_refuses_what_it_cannot_play(exported, tmp_path, monkeypatch):
    """No player libraries: a clear error naming `npm ci`, before anything is written. An
    avatar fitted without audio, exported with --audio: the same refusal as gstalk render's."""
    from gstalk.cli import main
    from gstalk.export.exporter import export
    from gstalk.export.web import LIBS, PLAYER_FILES

    av_dir, wav, _ = exported
    v = tmp_path / "viewer"
    v.mkdir()
    for f in PLAYER_FILES:
        (v / f).write_text("")
    monkeypatch.setenv("GSTALK_VIEWER", str(v))
    with pytest.raises(GstalkError, match="npm ci"):
        export(av_dir, tmp_path / "o", ("web",), audio_path=wav, device="cpu")
    assert not (tmp_path / "o").exists()
    for src in LIBS.values():
        (v / "node_modules" / src).parent.mkdir(parents=True, exist_ok=True)
        (v / "node_modules" / src).write_text("")
    mute = tmp_path / "mute"
    import shutil

    shutil.copytree(av_dir, mute)
    cfg = json.loads((mute / "config.json").read_text())
    cfg["lip_motion"] = "none"
    (mute / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GstalkError, match="fitted without audio"):
        export(mute, tmp_path / "o", ("web",), audio_path=wav, device="cpu")
    assert main(["export", str(mute), "--format", "web", "--audio", str(wav), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
