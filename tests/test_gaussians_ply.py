import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from gstalk.errors import FileFormatError, InputError
from gstalk.gaussians import GaussianSet, load_ply, save_ply, standard_property_names


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_round_trip_is_bit_exact(tmp_path, degree):
    g = GaussianSet.random(257, sh_degree=degree, seed=degree)
    g.binding = torch.randint(-1, 5000, (257,))
    g.extra["uv"] = torch.rand(257, 2)
    g.extra["region"] = torch.randint(0, 4, (257,), dtype=torch.int32)
    path = save_ply(g, tmp_path / "g.ply")
    h = load_ply(path)
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        a, b = getattr(g, name), getattr(h, name)
        assert a.shape == b.shape
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name  # bit for bit
    assert torch.equal(h.binding, g.binding)
    assert torch.equal(h.extra["uv"], g.extra["uv"])
    assert torch.equal(h.extra["region"], g.extra["region"])
    assert h.sh_degree == degree


def test_header_order_matches_standard_layout(tmp_path):
    g = GaussianSet.random(10, sh_degree=3)
    g.binding = torch.arange(10)
    ply = PlyData.read(str(save_ply(g, tmp_path / "g.ply")))
    names = [p.name for p in ply["vertex"].properties]
    std = standard_property_names(3)
    assert names[: len(std)] == std
    assert std[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert std[9] == "f_rest_0" and std[9 + 44] == "f_rest_44" and std[54] == "opacity"
    assert std[-7:] == ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names[len(std):] == ["binding"]
    assert all(p.val_dtype in ("float32", "f4") for p in ply["vertex"].properties[: len(std)])


def test_f_rest_is_channel_major(tmp_path):
    g = GaussianSet.random(3, sh_degree=1)
    g.sh[:, 1:, 0], g.sh[:, 1:, 1], g.sh[:, 1:, 2] = 1.0, 2.0, 3.0  # red, green, blue
    v = PlyData.read(str(save_ply(g, tmp_path / "g.ply")))["vertex"]
    rest = np.stack([v[f"f_rest_{i}"] for i in range(9)], 1)
    assert np.all(rest[:, 0:3] == 1.0) and np.all(rest[:, 3:6] == 2.0) and np.all(rest[:, 6:9] == 3.0)


def test_reads_a_plain_viewer_ply(tmp_path):
    """A file written by another tool (standard fields only, extra unknown property)."""
    n = 5
    names = standard_property_names(1) + ["some_other_tool_field"]
    data = np.zeros(n, dtype=[(nm, "f4") for nm in names])
    rng = np.random.default_rng(0)
    for nm in names:
        data[nm] = rng.normal(size=n).astype(np.float32)
    PlyData([PlyElement.describe(data, "vertex")]).write(str(tmp_path / "x.ply"))
    g = load_ply(tmp_path / "x.ply")
    assert len(g) == n and g.sh_degree == 1 and g.binding is None
    np.testing.assert_array_equal(g.means[:, 1].numpy(), data["y"])
    np.testing.assert_array_equal(g.sh[:, 2, 0].numpy(), data["f_rest_1"])  # red, 2nd rest coeff
    np.testing.assert_array_equal(g.sh[:, 1, 2].numpy(), data["f_rest_6"])  # blue, 1st rest coeff


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileFormatError, match="no such PLY"):
        load_ply(tmp_path / "missing.ply")
    (tmp_path / "junk.ply").write_bytes(b"not a ply at all")
    with pytest.raises(FileFormatError, match="not a readable PLY"):
        load_ply(tmp_path / "junk.ply")
    data = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(data, "vertex")]).write(str(tmp_path / "points.ply"))
    with pytest.raises(FileFormatError, match="missing properties"):
        load_ply(tmp_path / "points.ply")


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path):
    g = GaussianSet.random(4)
    path = save_ply(g, tmp_path / "g.ply")
    before = path.read_bytes()
    bad = GaussianSet.random(4)
    bad.extra["x"] = torch.zeros(4)  # clashes with the standard 'x' property
    with pytest.raises(InputError, match="clashes"):
        save_ply(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.ply"]  # no temp files left


def test_gaussian_set_validates_shapes():
    g = GaussianSet.random(4)
    with pytest.raises(InputError, match="quats"):
        GaussianSet(g.means, g.quats[:, :3], g.log_scales, g.opacity_logits, g.sh)
    with pytest.raises(InputError, match="SH"):
        GaussianSet(g.means, g.quats, g.log_scales, g.opacity_logits, torch.zeros(4, 5, 3))
    with pytest.raises(InputError, match="binding"):
        GaussianSet(g.means, g.quats, g.log_scales, g.opacity_logits, g.sh, binding=torch.zeros(3))
