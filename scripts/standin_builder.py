"""The builder of gstalk's stand-in head model (see gstalk/head/standin.py for what it is);
``scripts/make_standin_head.py`` writes it to ``assets/flame/standin_head.npz``. An asset
generator, kept out of the runtime package: nothing in gstalk runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.face import regions as R  # noqa: E402
from gstalk.head.standin import (EXPRESSIONS, IOD, LOWER_INNER, LOWER_OUTER, REGIONS,  # noqa: E402
                                 SHAPES, UPPER_INNER, UPPER_OUTER, photo_landmarks)


def _tessellation_edges() -> list[tuple[int, int]]:
    from gstalk.face.mediapipe_models import _mp

    return sorted({tuple(sorted(e)) for e in _mp().solutions.face_mesh.FACEMESH_TESSELATION})


def _frontalise(p: np.ndarray) -> np.ndarray:
    """Detector pixels (x right, y down, z toward camera negative) -> head frame (metres,
    x to the subject's left, y up, z out of the face), centred between the eyes."""
    q = np.stack([p[:, 0], -p[:, 1], -p[:, 2]], 1)
    x = q[263] - q[33]
    x /= np.linalg.norm(x)
    y = q[10] - q[152]
    y -= x * (y @ x)
    y /= np.linalg.norm(y)
    z = np.cross(x, y)
    rot = np.stack([x, y, z])
    centre = 0.5 * (q[33] + q[263])
    q = (q - centre) @ rot.T
    return q * (IOD / np.linalg.norm(q[263] - q[33]))


def _symmetrise(q: np.ndarray) -> np.ndarray:
    mirror = q[:468] * [-1, 1, 1]
    d = np.linalg.norm(mirror[:, None] - q[None, :468], axis=-1)
    m = d.argmin(1)
    out = q.copy()
    ok = m[m] == np.arange(468)
    out[:468][ok] = 0.5 * (q[:468][ok] + mirror[m[ok]])
    mid = ok & (m == np.arange(468))
    out[:468][mid, 0] = 0.0
    return out


def _rbf(points: np.ndarray, centres: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((points[:, None] - centres[None]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2)).max(1)


def _close_mouth(q: np.ndarray) -> np.ndarray:
    """Bring the inner lips together, carrying nearby points along smoothly."""
    src, disp = [], []
    for u, lo in zip(UPPER_INNER[1:-1], LOWER_INNER[1:-1]):
        gap = q[u] - q[lo]
        src += [u, lo]
        disp += [-0.5 * gap, 0.5 * gap]
    src, disp = np.array(src), np.array(disp)
    pts = q[:468]
    d2 = ((pts[:, None] - pts[src][None]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * 0.004**2))
    field = (w[..., None] * disp[None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1e-9)
    strength = np.exp(-d2.min(1) / (2 * 0.008**2))
    out = q.copy()
    out[:468] += field * strength[:, None]
    out[src] = q[src] + disp  # exact closure on the lips
    return out


def _face_triangles(q: np.ndarray, edges: list[tuple[int, int]]) -> np.ndarray:
    adj: dict[int, set[int]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    tris = {tuple(sorted((a, b, c))) for a, b in edges for c in adj[a] & adj[b]}
    tris = sorted(tris)
    # a 3-clique that is not a face has all three edges shared by more than two cliques
    count: dict[tuple[int, int], int] = {}
    for t in tris:
        for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])):
            count[e] = count.get(e, 0) + 1
    tris = np.array([t for t in tris if not all(count[e] > 2 for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))])
    return _orient(tris, q, seed_normal=np.array([0, 0, 1.0]))


def _orient(tris: np.ndarray, q: np.ndarray, seed_normal: np.ndarray) -> np.ndarray:
    """Consistent winding by propagation over shared edges, outward (+z) at the nose."""
    tris = tris.copy()
    edge_tris: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tris):
        for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            edge_tris.setdefault(tuple(sorted((a, b))), []).append(i)
    n = np.cross(q[tris[:, 1]] - q[tris[:, 0]], q[tris[:, 2]] - q[tris[:, 0]])
    area = np.linalg.norm(n, axis=1)
    # seed: the largest-area face-surface triangle most aligned with seed_normal
    score = np.where((tris < 468).all(1) & (area > np.median(area)), n @ seed_normal / np.maximum(area, 1e-12), -2)
    seed = int(np.argmax(score))
    if n[seed] @ seed_normal < 0:
        tris[seed] = tris[seed][[0, 2, 1]]
    done = {seed}
    stack = [seed]
    while stack:
        i = stack.pop()
        t = tris[i]
        for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            for j in edge_tris[tuple(sorted((a, b)))]:
                if j in done:
                    continue
                u = tris[j]
                # a consistent neighbour traverses the shared edge the other way: (b, a)
                directed = {(u[0], u[1]), (u[1], u[2]), (u[2], u[0])}
                if (a, b) in directed:
                    tris[j] = u[[0, 2, 1]]
                done.add(j)
                stack.append(j)
    return tris


def _boundary_loops(tris: np.ndarray) -> list[list[int]]:
    count: dict[tuple[int, int], int] = {}
    for t in tris:
        for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            k = tuple(sorted((a, b)))
            count[k] = count.get(k, 0) + 1
    nxt: dict[int, list[int]] = {}
    for (a, b), c in count.items():
        if c == 1:
            nxt.setdefault(a, []).append(b)
            nxt.setdefault(b, []).append(a)
    loops, seen = [], set()
    for s in nxt:
        if s in seen:
            continue
        loop, prev, cur = [s], None, s
        seen.add(s)
        while True:
            cand = [v for v in nxt[cur] if v != prev]
            if not cand:
                break
            v = cand[0]
            if v == s:
                break
            if v in seen:
                break
            loop.append(v)
            seen.add(v)
            prev, cur = cur, v
        loops.append(loop)
    return loops


def _strip(ring_a: list[int], ring_b: list[int], closed: bool = True) -> list[list[int]]:
    n = len(ring_a)
    out = []
    for i in range(n if closed else n - 1):
        j = (i + 1) % n
        out += [[ring_a[i], ring_a[j], ring_b[j]], [ring_a[i], ring_b[j], ring_b[i]]]
    return out


def _fan(ring: list[int], centre: int) -> list[list[int]]:
    n = len(ring)
    return [[ring[i], ring[(i + 1) % n], centre] for i in range(n)]


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    om = np.arccos(np.clip(a @ b, -1, 1))
    if om < 1e-6:
        return a
    return (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)


class _Builder:
    def __init__(self, verts: np.ndarray, region: int):
        self.v = [p for p in verts]
        self.region = [region] * len(verts)
        self.tris: list[list[int]] = []

    def add(self, p: np.ndarray, region: int) -> int:
        self.v.append(np.asarray(p, np.float64))
        self.region.append(region)
        return len(self.v) - 1

    def ring(self, pts: np.ndarray, region: int) -> list[int]:
        return [self.add(p, region) for p in pts]


def _outward(tris: list[list[int]], v: np.ndarray, centre: np.ndarray) -> list[list[int]]:
    """Flip a group of triangles so that, on average, normals point away from ``centre``."""
    t = np.array(tris)
    n = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
    c = v[t].mean(1) - centre
    if (n * c).sum() < 0:
        t = t[:, [0, 2, 1]]
    return t.tolist()


def _diffuse(adj: list[set[int]], fixed: dict[int, float], n: int, iters: int = 400) -> np.ndarray:
    w = np.zeros(n)
    for i, val in fixed.items():
        w[i] = val
    free = np.array([i for i in range(n) if i not in fixed and adj[i]])
    nbrs = [np.array(sorted(adj[i])) for i in free]
    for _ in range(iters):
        new = np.array([w[nb].mean() for nb in nbrs])
        w[free] = new
    return w


def build_standin() -> dict[str, np.ndarray]:
    """The stand-in model as FLAME-named arrays (plus gstalk metadata)."""
    lmk = photo_landmarks()
    q = _symmetrise(_frontalise(lmk))
    q = _close_mouth(q)
    face_tris = _face_triangles(q, _tessellation_edges())
    loops = _boundary_loops(face_tris)
    oval_set = set(R.FACE_OVAL)
    outer = max(loops, key=len)
    mouth_loop = next(lp for lp in loops if set(lp) & {13, 14})
    reye_loop = next(lp for lp in loops if 33 in lp or 133 in lp)
    leye_loop = next(lp for lp in loops if 263 in lp or 362 in lp)
    assert len(oval_set & set(outer)) > 30, "the face outline was not found"

    b = _Builder(q[:468], REGIONS["face"])
    for i in range(468, 478):  # iris vertices, placed on the eyeballs below
        b.add(q[i], REGIONS["eyeball"])
    tris: list[list[int]] = face_tris.tolist()
    v0 = np.array(b.v)

    # ---- skull: rings from the face outline to a back pole on an ellipsoid
    chin_y, top_y = q[152, 1], q[10, 1]
    centre = np.array([0.0, 0.5 * (chin_y + top_y) + 0.025, q[:468, 2].max() - 0.105])
    radii = np.array([0.079, 0.118, 0.102])
    back = np.array([0.0, 0.15, -1.0])
    back /= np.linalg.norm(back)
    # order the outline loop consistently (counter-clockwise seen from the front)
    pts = v0[outer]
    ang = np.arctan2(pts[:, 1] - pts[:, 1].mean(), pts[:, 0])
    if np.sum(np.diff(np.unwrap(ang))) < 0:
        outer = outer[::-1]
    prev = list(outer)
    n_rings = 9
    for r in range(1, n_rings + 1):
        t = r / (n_rings + 1)
        ring = []
        for i in outer:
            u = (v0[i] - centre) / radii
            u /= np.linalg.norm(u)
            d = _slerp(u, back, t)
            p_ell = centre + radii * d
            blend = min(1.0, t * 3)  # leave the actual outline smoothly
            p_lin = v0[i] + (p_ell - (centre + radii * u)) if blend < 1 else p_ell
            ring.append((1 - blend) * p_lin + blend * p_ell)
        idx = b.ring(np.array(ring), REGIONS["skull"])
        tris += _strip(prev, idx)
        prev = idx
    pole = b.add(centre + radii * back, REGIONS["skull"])
    tris += _fan(prev, pole)


    # ---- mouth pocket behind the lips
    ml = mouth_loop
    mc = v0[ml].mean(0)
    prev = ml
    pocket_src: dict[int, int] = {}  # pocket vertex -> the lip vertex it hangs from
    for depth, shrink in ((0.008, 0.85), (0.018, 0.55)):
        ring = mc + (v0[ml] - mc) * shrink - np.array([0, 0, depth])
        idx = b.ring(ring, REGIONS["mouth"])
        pocket_src.update(zip(idx, ml))
        tris += _strip(prev, idx)
        prev = idx
    cap = b.add(mc - np.array([0, 0, 0.026]), REGIONS["mouth"])
    tris += _fan(prev, cap)
    mouth_rings = (ml, len(ml))

    # ---- eye sockets and eyeballs
    extra: list[list[int]] = []  # closed parts outside the shell (eyeballs, neck)
    eyeball_r = 0.0125
    eye_centres = {}
    for name, loop, iris0 in (("right", reye_loop, 468), ("left", leye_loop, 473)):
        ec = v0[loop].mean(0)
        prev = loop
        for depth, shrink in ((0.006, 0.7),):
            idx = b.ring(ec + (v0[loop] - ec) * shrink - np.array([0, 0, depth]), REGIONS["eye_socket"])
            tris += _strip(prev, idx)
            prev = idx
        cap = b.add(ec - np.array([0, 0, 0.014]), REGIONS["eye_socket"])
        tris += _fan(prev, cap)
        centre_eye = ec - np.array([0, 0, eyeball_r - 0.004])
        eye_centres[name] = centre_eye
        # eyeball: front pole = iris centre; first ring holds the 4 iris points
        iris_r = 0.0058
        alpha = np.arcsin(iris_r / eyeball_r)
        k = 12
        rings = []
        polar = [alpha] + list(np.linspace(alpha + 0.35, np.pi - 0.3, 5))
        for j, th in enumerate(polar):
            ring_idx = []
            for a in range(k):
                phi = 2 * np.pi * a / k  # 0 = subject's left (+x), 90 deg = up
                p = centre_eye + eyeball_r * np.array([np.sin(th) * np.cos(phi), np.sin(th) * np.sin(phi),
                                                       np.cos(th)])
                if j == 0 and a % 3 == 0:
                    # iris points in detector order: +x(image right)=subject's left, up, -x, down
                    vi = iris0 + 1 + a // 3
                    b.v[vi] = p
                    ring_idx.append(vi)
                else:
                    ring_idx.append(b.add(p, REGIONS["eyeball"]))
            rings.append(ring_idx)
        b.v[iris0] = centre_eye + np.array([0, 0, eyeball_r])
        eb = _outward(_fan(rings[0], iris0), np.array(b.v), centre_eye)
        for r0, r1 in zip(rings[:-1], rings[1:]):
            eb += _outward(_strip(r0, r1), np.array(b.v), centre_eye)
        backp = b.add(centre_eye - np.array([0, 0, eyeball_r]), REGIONS["eyeball"])
        eb += _outward(_fan(rings[-1], backp), np.array(b.v), centre_eye)
        extra += eb

    # ---- neck: a capped tube from inside the head down to the shoulders
    neck_c = np.array([0.0, 0.0, centre[2] - 0.005])
    y_top, y_bot = chin_y + 0.03, chin_y - 0.11
    k = 20
    neck_rings = []
    for y in np.linspace(y_top, y_bot, 6):
        ang = 2 * np.pi * np.arange(k) / k
        ring = np.stack([0.056 * np.cos(ang), np.full(k, y), neck_c[2] + 0.05 * np.sin(ang)], 1)
        neck_rings.append(b.ring(ring, REGIONS["neck"]))
    for r0, r1 in zip(neck_rings[:-1], neck_rings[1:]):
        extra += _outward(_strip(r0, r1), np.array(b.v), np.array([0, 0.5 * (y_top + y_bot), neck_c[2]]))
    top = b.add(np.array([0, y_top, neck_c[2]]), REGIONS["neck"])
    bot = b.add(np.array([0, y_bot, neck_c[2]]), REGIONS["neck"])
    extra += _outward(_fan(neck_rings[0], top), np.array(b.v), np.array([0, y_top - 0.02, neck_c[2]]))
    extra += _outward(_fan(neck_rings[-1], bot), np.array(b.v), np.array([0, y_bot + 0.02, neck_c[2]]))

    v = np.array(b.v)
    region = np.array(b.region)
    # the shell (face, skull, mouth pocket, eye sockets) is one connected surface: one
    # winding for all of it, outward as the face is
    shell_tris = _orient(np.array(tris), v, seed_normal=np.array([0, 0, 1.0]))
    f = np.concatenate([shell_tris, np.array(extra, np.int64)]).astype(np.int64)
    nv = len(v)

    # ---- joints (by regressor) and skinning weights
    jr = np.zeros((5, nv))
    jr[0, neck_rings[-1]] = 1.0 / k
    jr[1, neck_rings[1]] = 1.0 / k
    hinge_y = q[61, 1] + 0.02
    hinge_z = q[13, 2] - 0.085
    skull = np.flatnonzero(region == REGIONS["skull"])
    for sx in (-1, 1):
        target = np.array([sx * 0.06, hinge_y, hinge_z])
        near = skull[np.argsort(np.linalg.norm(v[skull] - target, axis=1))[:3]]
        jr[2, near] += 1.0 / 6
    for j, name in ((3, "left"), (4, "right")):
        ids = np.flatnonzero((region == REGIONS["eyeball"]) & (np.linalg.norm(v - eye_centres[name], axis=1) < 0.02))
        jr[j, ids] = 1.0 / len(ids)
    joints = jr @ v

    adj = [set() for _ in range(nv)]
    for t in f:
        for a, c in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            adj[a].add(c)
            adj[c].add(a)
    shell = np.isin(region, [REGIONS["face"], REGIONS["skull"], REGIONS["mouth"], REGIONS["eye_socket"]])
    fixed = {}
    upper = set(UPPER_INNER[1:-1] + UPPER_OUTER)
    lower = set(LOWER_INNER[1:-1] + LOWER_OUTER[1:-1])
    for i in np.flatnonzero(shell):
        p = v[i]
        if i in lower or i == 152:
            fixed[i] = 1.0
        elif i in upper or p[1] > q[2, 1] or p[2] < hinge_z - 0.005:
            fixed[i] = 0.0  # above the upper lip / nose base, or behind the hinge
        elif p[1] < chin_y + 0.012 and p[2] > hinge_z + 0.02:
            fixed[i] = 1.0  # chin and under the chin
    # mouth pocket: lower half follows the jaw (split by the pocket's own height)
    lower_loop = set(LOWER_INNER)
    for i, src in pocket_src.items():  # the pocket follows the lip it hangs from
        if src in (78, 308):
            continue
        fixed[i] = 1.0 if src in lower_loop else 0.0
    jaw_w = _diffuse(adj, fixed, nv)
    jaw_w[~shell] = 0.0
    w = np.zeros((nv, 5))
    w[shell, 2] = jaw_w[shell]
    w[shell, 1] = 1.0 - jaw_w[shell]
    eb = region == REGIONS["eyeball"]
    w[eb & (v[:, 0] > 0), 3] = 1.0
    w[eb & (v[:, 0] < 0), 4] = 1.0
    nk = region == REGIONS["neck"]
    s = np.clip((v[nk, 1] - y_bot) / (y_top - y_bot), 0, 1)
    w[nk, 1] = s
    w[nk, 0] = 1 - s

    exprs = _expressions(v, region, q, jaw_w, leye_loop, reye_loop, ml, mouth_rings)
    shapes = _shapes(v, region, q, jaw_w, eye_centres)
    shapedirs = np.concatenate([shapes, exprs], axis=2)
    kintree = np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64)
    emb_face = np.zeros(478, np.int64)
    emb_bary = np.zeros((478, 3))
    for i in range(478):
        t = int(np.flatnonzero((f == i).any(1))[0])
        emb_face[i] = t
        emb_bary[i, list(f[t]).index(i)] = 1.0
    return {
        "v_template": v.astype(np.float64),
        "shapedirs": shapedirs.astype(np.float64),
        "posedirs": np.zeros((nv, 3, 36)),
        "J_regressor": jr,
        "weights": w,
        "kintree_table": kintree,
        "f": f,
        "n_shape": np.int64(len(SHAPES)),
        "name": np.array("gstalk-standin"),
        "description": np.array("gstalk open stand-in head model (not FLAME): face on the landmark detector's "
                                "topology, generated skull, mouth, eyes and neck"),
        "shape_names": np.array(SHAPES),
        "expression_names": np.array(EXPRESSIONS),
        "vertex_region": region.astype(np.int64),
        "region_names": np.array(list(REGIONS)),
        "joints_rest": joints,
        "lmk_face_idx": emb_face,
        "lmk_b_coords": emb_bary,
        "landmark_indices": np.arange(478),
    }


def _region_field(v: np.ndarray, mask: np.ndarray, centres: np.ndarray, disp: np.ndarray,
                  sigma: float) -> np.ndarray:
    """Displacements interpolated from ``centres`` (with ``disp``), fading with distance."""
    d2 = ((v[:, None] - centres[None]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * sigma**2))
    field = (w[..., None] * disp[None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1e-12)
    fade = np.exp(-d2.min(1) / (2 * sigma**2))
    return field * (fade * mask)[:, None]


def _expressions(v, region, q, jaw_w, leye, reye, mouth_loop, mouth_rings) -> np.ndarray:
    nv = len(v)
    shell = np.isin(region, [REGIONS["face"], REGIONS["skull"], REGIONS["mouth"], REGIONS["eye_socket"]]).astype(float)
    out = np.zeros((nv, 3, len(EXPRESSIONS)))
    lips_c = v[[13, 14, 61, 291, 0, 17]]
    up_m, lo_m = shell * (1 - jaw_w), shell * jaw_w

    def put(name, field):
        out[:, :, EXPRESSIONS.index(name)] += field

    put("mouth_open", _region_field(v, lo_m, v[[14, 17, 84, 314]], np.tile([0, -0.006, -0.001], (4, 1)), 0.012)
        + _region_field(v, up_m, v[[13, 0, 37, 267]], np.tile([0, 0.002, 0], (4, 1)), 0.01))
    put("lip_press", _region_field(v, up_m, v[[0, 37, 267]], np.tile([0, -0.0015, -0.001], (3, 1)), 0.008)
        + _region_field(v, lo_m, v[[17, 84, 314]], np.tile([0, 0.0015, -0.001], (3, 1)), 0.008))
    pk = np.array([[-0.3 * p[0], 0, 0.006] for p in lips_c])
    put("pucker", _region_field(v, shell, lips_c, pk, 0.012))
    corners = v[[61, 291]]
    put("smile", _region_field(v, shell, corners, np.array([[-0.004, 0.005, -0.002], [0.004, 0.005, -0.002]]), 0.011)
        + _region_field(v, shell, v[[205, 425]], np.array([[0, 0.003, 0.001], [0, 0.003, 0.001]]), 0.014))
    put("stretch", _region_field(v, shell, corners, np.array([[-0.005, -0.001, 0], [0.005, -0.001, 0]]), 0.011))
    put("frown", _region_field(v, shell, corners, np.array([[0, -0.004, 0], [0, -0.004, 0]]), 0.011))
    put("cheek_puff", _region_field(v, shell, v[[205, 425]], np.array([[-0.005, 0, 0.004], [0.005, 0, 0.004]]), 0.016))
    brows = [105, 66, 70, 334, 296, 300, 107, 336]
    put("brow_raise", _region_field(v, shell, v[brows], np.tile([0, 0.006, 0], (len(brows), 1)), 0.013))
    bl = np.array([[0.002 * np.sign(-v[i, 0]), -0.004, 0.0005] for i in brows])
    put("brow_lower", _region_field(v, shell, v[brows], bl, 0.012))
    for name, loop in (("blink_left", leye), ("blink_right", reye)):
        out[:, :, EXPRESSIONS.index(name)] += _blink_field(v, shell, loop)
    lower_lids = [145, 153, 144, 374, 380, 373]
    put("squint", _region_field(v, shell, v[lower_lids], np.tile([0, 0.0015, 0], (6, 1)), 0.006)
        + _region_field(v, shell, v[[205, 425]], np.tile([0, 0.002, 0], (2, 1)), 0.012))
    put("upper_lip_raise", _region_field(v, up_m, v[[0, 37, 267, 40, 270]], np.tile([0, 0.003, 0.0005], (5, 1)), 0.008))
    put("lower_lip_depress", _region_field(v, lo_m, v[[17, 84, 314, 181, 405]], np.tile([0, -0.003, 0.0005], (5, 1)),
                                           0.008))
    put("nose_wrinkle", _region_field(v, shell, v[[48, 278, 209, 429]], np.tile([0, 0.002, 0], (4, 1)), 0.008))
    put("mouth_side", _region_field(v, shell, lips_c, np.tile([0.004, 0, 0], (len(lips_c), 1)), 0.012))
    return out


def _blink_field(v, mask, loop) -> np.ndarray:
    """Upper lid down to 80% of the opening, lower lid up the rest."""
    pts = v[loop]
    xs = pts[:, 0]
    i0, i1 = int(np.argmin(xs)), int(np.argmax(xs))
    a, b = sorted((i0, i1))
    half1, half2 = loop[a:b + 1], loop[b:] + loop[:a + 1]
    upper, lower = (half1, half2) if v[half1, 1].mean() > v[half2, 1].mean() else (half2, half1)
    lx, ly = v[lower, 0], v[lower, 1]
    o = np.argsort(lx)
    centres, disp = [], []
    for i in upper:
        y_low = np.interp(v[i, 0], lx[o], ly[o])
        gap = v[i, 1] - y_low
        centres.append(v[i])
        disp.append([0, -0.8 * gap, 0.0005])
    ux, uy = v[upper, 0], v[upper, 1]
    ou = np.argsort(ux)
    for i in lower:
        y_up = np.interp(v[i, 0], ux[ou], uy[ou])
        centres.append(v[i])
        disp.append([0, 0.2 * (y_up - v[i, 1]), 0])
    return _region_field(v, mask, np.array(centres), np.array(disp), 0.0035)


def _shapes(v, region, q, jaw_w, eye_centres) -> np.ndarray:
    nv = len(v)
    head = region != REGIONS["eyeball"]
    eb = region == REGIONS["eyeball"]
    hm = head.astype(float)
    out = np.zeros((nv, 3, len(SHAPES)))
    c = v[head].mean(0)

    def put(name, field):
        out[:, :, SHAPES.index(name)] = field

    for axis, name, amt in ((0, "head_width", 0.04), (1, "head_height", 0.03), (2, "head_depth", 0.04)):
        f = np.zeros((nv, 3))
        f[:, axis] = (v[:, axis] - c[axis]) * amt
        put(name, f)
    face = np.isin(region, [REGIONS["face"], REGIONS["mouth"], REGIONS["eye_socket"]]).astype(float)
    put("face_width", np.stack([v[:, 0] * 0.05 * _rbf(v, v[[234, 454, 93, 323]], 0.03) * hm, 0 * v[:, 1],
                                0 * v[:, 2]], 1))
    put("jaw_width", np.stack([v[:, 0] * 0.06 * jaw_w * hm, 0 * v[:, 1], 0 * v[:, 2]], 1))
    put("chin_length", _region_field(v, hm, v[[152, 148, 377, 175]], np.tile([0, -0.005, 0.001], (4, 1)), 0.014))
    put("nose_length", _region_field(v, face, v[[1, 2, 4, 94]], np.tile([0, -0.002, 0.002], (4, 1)), 0.008))
    nw = np.stack([v[:, 0] * 0.12 * _rbf(v, v[[48, 278, 64, 294]], 0.007) * face, 0 * v[:, 1], 0 * v[:, 2]], 1)
    put("nose_width", nw)
    put("nose_projection", _region_field(v, face, v[[1, 4, 5, 195]], np.tile([0, 0, 0.003], (4, 1)), 0.01))
    eyes_l = v[[263, 362, 386, 374]]
    eyes_r = v[[33, 133, 159, 145]]
    put("eye_spacing", _region_field(v, hm, np.concatenate([eyes_l, eyes_r]),
                                     np.array([[0.0025, 0, 0]] * 4 + [[-0.0025, 0, 0]] * 4), 0.01))
    put("eye_height", _region_field(v, hm, np.concatenate([eyes_l, eyes_r]), np.tile([0, 0.002, 0], (8, 1)), 0.012))
    brows = v[[105, 66, 70, 334, 296, 300]]
    put("brow_ridge", _region_field(v, hm, brows, np.tile([0, 0, 0.002], (6, 1)), 0.012))
    lt = np.concatenate([np.tile([0, 0.0015, 0.0003], (3, 1)), np.tile([0, -0.0015, 0.0003], (3, 1))])
    put("lip_thickness", _region_field(v, face, v[[0, 37, 267, 17, 84, 314]], lt, 0.006))
    put("mouth_width", _region_field(v, face, v[[61, 291]], np.array([[-0.003, 0, 0], [0.003, 0, 0]]), 0.01))
    put("cheekbones", _region_field(v, hm, v[[116, 345, 123, 352]],
                                    np.array([[-0.003, 0, 0.001], [0.003, 0, 0.001]] * 2), 0.015))
    put("forehead_slope", _region_field(v, hm, v[[10, 109, 338, 151]], np.tile([0, 0, -0.004], (4, 1)), 0.025))
    rng = np.random.default_rng(1234)
    for j in range(4):
        k = rng.normal(size=(3, 3)) * 12
        ph = rng.uniform(0, 2 * np.pi, 3)
        amp = rng.normal(size=3) * 0.0012
        rel = v - c
        sym = np.stack([np.abs(rel[:, 0]), rel[:, 1], rel[:, 2]], 1)  # left-right symmetric
        f = np.stack([np.sin(sym @ k[i] + ph[i]) * amp[i] for i in range(3)], 1)
        f[:, 0] *= np.sign(rel[:, 0])
        put(f"smooth_{j + 1}", f * hm[:, None])
    # eyeballs move rigidly with the displacement of their eye region
    for name in ("left", "right"):
        ids = np.flatnonzero(eb & (np.sign(v[:, 0]) == (1 if name == "left" else -1)))
        ring = np.flatnonzero((region == REGIONS["face"]) & (np.linalg.norm(v - eye_centres[name], axis=1) < 0.025))
        out[ids] = out[ring].mean(0, keepdims=True)
    return out
