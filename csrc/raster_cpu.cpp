// Tiled Gaussian compositing on the CPU: forward and backward, the same arithmetic as
// gstalk/render/reference.py's `composite` (its twin and the reference of the tests).
//
// Per pixel, front to back over the tile's depth-sorted list:
//   sigma = 0.5 (a dx^2 + c dy^2) + b dx dy,   conic (a, b, c), d = pixel centre - mean
//   alpha = min(0.999, o exp(-sigma)), skipped when sigma < 0 or alpha < alpha_threshold
//   stop at the first Gaussian that would take T to t_min or below (that one excluded)
//   out_f += alpha T f,   alpha_out += alpha T,   T *= 1 - alpha
//
// Each tile is walked Gaussian by Gaussian, front to back, over only the pixels of the
// Gaussian's footprint box (where sigma can be within its alpha threshold), with each pixel's
// transmittance kept; every pixel still sees its Gaussians in depth order with the same
// arithmetic, so the result is the pixel-by-pixel one. The forward pass also returns each
// pixel's final transmittance and the list position where it stopped; the backward pass walks
// the list back to front from there, recovering T before each Gaussian as T / (1 - alpha).
// It writes one gradient row per (tile, Gaussian) intersection, a slot of the sorted list that
// only its own tile touches, so tiles run in parallel without atomics; the caller sums the
// rows per Gaussian (index_add_).
//
// `tile_lists` (at the end) builds the depth-sorted per-tile lists both passes read, the twin
// of reference.py's `_tile_lists`.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

void check(const torch::Tensor& t, const char* name, int dims) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions");
}

struct Layout {
    int64_t width, height, tile_size, tiles_x, n_tiles, feat;
};

Layout layout(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& opacities,
              const torch::Tensor& feats, const torch::Tensor& gauss_sorted, const torch::Tensor& starts,
              const torch::Tensor& counts, int64_t width, int64_t height, int64_t tile_size) {
    check(means2d, "means2d", 2);
    check(conics, "conics", 2);
    check(opacities, "opacities", 1);
    check(feats, "feats", 2);
    check(gauss_sorted, "gauss_sorted", 1);
    check(starts, "starts", 1);
    check(counts, "counts", 1);
    const auto n = means2d.size(0);
    TORCH_CHECK(means2d.size(1) == 2 && conics.size(0) == n && conics.size(1) == 3 && opacities.size(0) == n &&
                    feats.size(0) == n,
                "means2d [N, 2], conics [N, 3], opacities [N] and feats [N, F] must agree");
    TORCH_CHECK(conics.scalar_type() == means2d.scalar_type() && opacities.scalar_type() == means2d.scalar_type() &&
                    feats.scalar_type() == means2d.scalar_type(),
                "means2d, conics, opacities and feats must share one dtype");
    TORCH_CHECK(gauss_sorted.scalar_type() == torch::kLong && starts.scalar_type() == torch::kLong &&
                    counts.scalar_type() == torch::kLong,
                "gauss_sorted, starts and counts must be int64");
    TORCH_CHECK(width > 0 && height > 0 && tile_size > 0, "width, height and tile_size must be positive");
    Layout l{width, height, tile_size, (width + tile_size - 1) / tile_size, 0, feats.size(1)};
    l.n_tiles = l.tiles_x * ((height + tile_size - 1) / tile_size);
    TORCH_CHECK(starts.size(0) == l.n_tiles && counts.size(0) == l.n_tiles, "starts and counts need one entry per tile");
    return l;
}

// Per Gaussian, the sigma beyond which its alpha is below the threshold whatever the rounding
// (log(o / threshold) plus a margin): a pixel further out is skipped without an exp.
template <typename scalar_t>
std::vector<scalar_t> sigma_limits(const scalar_t* op, int64_t n, scalar_t alpha_threshold) {
    std::vector<scalar_t> lim(n);
    for (int64_t g = 0; g < n; ++g)
        lim[g] = op[g] > 0 ? std::log(op[g] / alpha_threshold) + scalar_t(1e-3) : scalar_t(-1);
    return lim;
}

// One Gaussian's footprint at a pixel; returns false when it is skipped there.
template <typename scalar_t>
inline bool footprint(const scalar_t* mu, const scalar_t* con, scalar_t o, scalar_t limit, scalar_t x, scalar_t y,
                      scalar_t alpha_threshold, scalar_t& dx, scalar_t& dy, scalar_t& alpha, bool& clamped) {
    dx = x - mu[0];
    dy = y - mu[1];
    const scalar_t sigma = scalar_t(0.5) * (con[0] * dx * dx + con[2] * dy * dy) + con[1] * dx * dy;
    if (sigma < 0 || sigma > limit) return false;
    const scalar_t a = o * std::exp(-sigma);
    clamped = a > scalar_t(0.999);
    alpha = clamped ? scalar_t(0.999) : a;
    return alpha >= alpha_threshold;
}

// The pixels [x0, x1) x [y0, y1) of a tile that a Gaussian may reach: the box around its ellipse
// sigma <= limit (half-widths sqrt(2 limit Sigma_xx), sqrt(2 limit Sigma_yy), Sigma the inverse
// of the conic), one pixel wider for rounding. Returns false when it reaches none.
template <typename scalar_t>
inline bool reach(const scalar_t* mu, const scalar_t* con, scalar_t limit, int64_t& x0, int64_t& y0, int64_t& x1,
                  int64_t& y1) {
    if (limit < 0) return false;
    const double a = con[0], b = con[1], c = con[2], det = a * c - b * b;
    if (det > 0 && a > 0 && c > 0) {
        const double rx = std::sqrt(2.0 * double(limit) * c / det), ry = std::sqrt(2.0 * double(limit) * a / det);
        // pixel px has its centre at px + 0.5
        const double lx = std::floor(double(mu[0]) - rx - 0.5) - 1, hx = std::ceil(double(mu[0]) + rx - 0.5) + 2;
        const double ly = std::floor(double(mu[1]) - ry - 0.5) - 1, hy = std::ceil(double(mu[1]) + ry - 0.5) + 2;
        if (lx > double(x0)) x0 = int64_t(lx);
        if (hx < double(x1)) x1 = int64_t(hx);
        if (ly > double(y0)) y0 = int64_t(ly);
        if (hy < double(y1)) y1 = int64_t(hy);
    }  // else (not positive definite): the whole tile, checked pixel by pixel
    return x0 < x1 && y0 < y1;
}

// The inputs both passes read, as raw pointers, with each Gaussian's sigma limit.
template <typename scalar_t>
struct Scene {
    const scalar_t *mu, *con, *op, *ft;
    const int64_t *gs, *st, *ct;
    scalar_t thr;
    std::vector<scalar_t> lim;
    Scene(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& opacities,
          const torch::Tensor& feats, const torch::Tensor& gauss_sorted, const torch::Tensor& starts,
          const torch::Tensor& counts, double alpha_threshold)
        : mu(means2d.data_ptr<scalar_t>()), con(conics.data_ptr<scalar_t>()), op(opacities.data_ptr<scalar_t>()),
          ft(feats.data_ptr<scalar_t>()), gs(gauss_sorted.data_ptr<int64_t>()), st(starts.data_ptr<int64_t>()),
          ct(counts.data_ptr<int64_t>()), thr(scalar_t(alpha_threshold)),
          lim(sigma_limits(op, opacities.size(0), thr)) {}
};

// A tile's slice of the sorted list (from s, n long) and its pixels [x0, x1) x [y0, y1),
// w wide, npx in all.
struct Tile {
    int64_t n, s, x0, y0, x1, y1, w, npx;
    Tile(const Layout& l, const int64_t* starts, const int64_t* counts, int64_t tile)
        : n(counts[tile]), s(starts[tile]), x0((tile % l.tiles_x) * l.tile_size),
          y0((tile / l.tiles_x) * l.tile_size), x1(std::min(x0 + l.tile_size, l.width)),
          y1(std::min(y0 + l.tile_size, l.height)), w(x1 - x0), npx(w * (y1 - y0)) {}
    int64_t local(int64_t px, int64_t py) const { return (py - y0) * w + (px - x0); }
};

}  // namespace

// -> [H, W, F + 1] composited features, then alpha (no background); [H, W] final transmittance;
// [H, W] int64 list position where the pixel stopped (the tile's list length if it did not)
std::vector<torch::Tensor> composite_forward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor opacities,
                                             torch::Tensor feats, torch::Tensor gauss_sorted, torch::Tensor starts,
                                             torch::Tensor counts, int64_t width, int64_t height, int64_t tile_size,
                                             double alpha_threshold, double t_min) {
    const Layout l = layout(means2d, conics, opacities, feats, gauss_sorted, starts, counts, width, height, tile_size);
    const int64_t F = l.feat, C = F + 1;
    auto out = torch::zeros({height, width, C}, feats.options());
    auto t_final = torch::ones({height, width}, feats.options());
    auto stop_at = torch::zeros({height, width}, counts.options());
    AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "composite_forward", [&] {
        const Scene<scalar_t> sc(means2d, conics, opacities, feats, gauss_sorted, starts, counts, alpha_threshold);
        scalar_t* o = out.data_ptr<scalar_t>();
        scalar_t* tf = t_final.data_ptr<scalar_t>();
        int64_t* sa = stop_at.data_ptr<int64_t>();
        const scalar_t tmin = scalar_t(t_min);
        at::parallel_for(0, l.n_tiles, 1, [&](int64_t t0, int64_t t1) {
            std::vector<scalar_t> T(l.tile_size * l.tile_size);
            std::vector<int64_t> stop(l.tile_size * l.tile_size);
            for (int64_t tile = t0; tile < t1; ++tile) {
                const Tile tl(l, sc.st, sc.ct, tile);
                const int64_t n = tl.n;
                if (n == 0) continue;
                std::fill(T.begin(), T.begin() + tl.npx, scalar_t(1));
                std::fill(stop.begin(), stop.begin() + tl.npx, n);
                int64_t n_done = 0;
                for (int64_t k = 0; k < n && n_done < tl.npx; ++k) {
                    const int64_t g = sc.gs[tl.s + k];
                    const scalar_t *mg = sc.mu + 2 * g, *cg = sc.con + 3 * g, *f = sc.ft + g * F;
                    int64_t bx0 = tl.x0, by0 = tl.y0, bx1 = tl.x1, by1 = tl.y1;
                    if (!reach(mg, cg, sc.lim[g], bx0, by0, bx1, by1)) continue;
                    for (int64_t py = by0; py < by1; ++py) {
                        for (int64_t px = bx0; px < bx1; ++px) {
                            const int64_t i = tl.local(px, py);
                            if (stop[i] != n) continue;  // this pixel has stopped
                            scalar_t dx, dy, alpha;
                            bool clamped;
                            if (!footprint(mg, cg, sc.op[g], sc.lim[g], scalar_t(px) + scalar_t(0.5),
                                           scalar_t(py) + scalar_t(0.5), sc.thr, dx, dy, alpha, clamped))
                                continue;
                            const scalar_t t_next = T[i] * (1 - alpha);
                            if (t_next <= tmin) {
                                stop[i] = k;
                                ++n_done;
                                continue;
                            }
                            const scalar_t wt = alpha * T[i];
                            scalar_t* pix = o + (py * width + px) * C;
                            for (int64_t c = 0; c < F; ++c) pix[c] += wt * f[c];
                            pix[F] += wt;
                            T[i] = t_next;
                        }
                    }
                }
                for (int64_t py = tl.y0; py < tl.y1; ++py)
                    for (int64_t px = tl.x0; px < tl.x1; ++px) {
                        tf[py * width + px] = T[tl.local(px, py)];
                        sa[py * width + px] = stop[tl.local(px, py)];
                    }
            }
        });
    });
    return {out, t_final, stop_at};
}

// grad_out [H, W, F + 1] (with the forward pass's final transmittance and stop positions) ->
// per intersection (slot of gauss_sorted): d means2d [M, 2], d conics [M, 3], d opacities [M],
// d feats [M, F]
std::vector<torch::Tensor> composite_backward(torch::Tensor grad_out, torch::Tensor t_final, torch::Tensor stop_at,
                                              torch::Tensor means2d, torch::Tensor conics, torch::Tensor opacities,
                                              torch::Tensor feats, torch::Tensor gauss_sorted, torch::Tensor starts,
                                              torch::Tensor counts, int64_t width, int64_t height, int64_t tile_size,
                                              double alpha_threshold) {
    const Layout l = layout(means2d, conics, opacities, feats, gauss_sorted, starts, counts, width, height, tile_size);
    const int64_t F = l.feat, C = F + 1, M = gauss_sorted.size(0);
    grad_out = grad_out.contiguous().to(feats.scalar_type());
    check(grad_out, "grad_out", 3);
    check(t_final, "t_final", 2);
    check(stop_at, "stop_at", 2);
    TORCH_CHECK(grad_out.size(0) == height && grad_out.size(1) == width && grad_out.size(2) == C,
                "grad_out must be [H, W, F + 1]");
    TORCH_CHECK(t_final.size(0) == height && t_final.size(1) == width && stop_at.size(0) == height &&
                    stop_at.size(1) == width && t_final.scalar_type() == feats.scalar_type() &&
                    stop_at.scalar_type() == torch::kLong,
                "t_final and stop_at must be the forward pass's [H, W] outputs");
    auto g_mu = torch::zeros({M, 2}, feats.options());
    auto g_con = torch::zeros({M, 3}, feats.options());
    auto g_op = torch::zeros({M}, feats.options());
    auto g_ft = torch::zeros({M, F}, feats.options());
    AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "composite_backward", [&] {
        const Scene<scalar_t> sc(means2d, conics, opacities, feats, gauss_sorted, starts, counts, alpha_threshold);
        const scalar_t* go = grad_out.data_ptr<scalar_t>();
        const scalar_t* tf = t_final.data_ptr<scalar_t>();
        const int64_t* sa = stop_at.data_ptr<int64_t>();
        scalar_t* dmu = g_mu.data_ptr<scalar_t>();
        scalar_t* dcon = g_con.data_ptr<scalar_t>();
        scalar_t* dop = g_op.data_ptr<scalar_t>();
        scalar_t* dft = g_ft.data_ptr<scalar_t>();
        at::parallel_for(0, l.n_tiles, 1, [&](int64_t t0, int64_t t1) {
            const int64_t P = l.tile_size * l.tile_size;
            std::vector<scalar_t> T(P), suffix(P * C);  // per pixel: T behind the Gaussian, and sum of w f behind it
            for (int64_t tile = t0; tile < t1; ++tile) {
                const Tile tl(l, sc.st, sc.ct, tile);
                if (tl.n == 0) continue;
                int64_t last = 0;  // the furthest list position any pixel of the tile reached
                for (int64_t py = tl.y0; py < tl.y1; ++py)
                    for (int64_t px = tl.x0; px < tl.x1; ++px) {
                        T[tl.local(px, py)] = tf[py * width + px];
                        last = std::max(last, sa[py * width + px]);
                    }
                std::fill(suffix.begin(), suffix.begin() + tl.npx * C, scalar_t(0));
                for (int64_t k = std::min(last, tl.n - 1); k >= 0; --k) {
                    const int64_t slot = tl.s + k, g = sc.gs[slot];
                    const scalar_t *mg = sc.mu + 2 * g, *cg = sc.con + 3 * g, *f = sc.ft + g * F;
                    const scalar_t o = sc.op[g];
                    int64_t bx0 = tl.x0, by0 = tl.y0, bx1 = tl.x1, by1 = tl.y1;
                    if (!reach(mg, cg, sc.lim[g], bx0, by0, bx1, by1)) continue;
                    for (int64_t py = by0; py < by1; ++py) {
                        for (int64_t px = bx0; px < bx1; ++px) {
                            if (k >= sa[py * width + px]) continue;  // at or past where this pixel stopped
                            const int64_t i = tl.local(px, py);
                            scalar_t dx, dy, alpha;
                            bool clamped;
                            if (!footprint(mg, cg, o, sc.lim[g], scalar_t(px) + scalar_t(0.5),
                                           scalar_t(py) + scalar_t(0.5), sc.thr, dx, dy, alpha, clamped))
                                continue;
                            const scalar_t inv = 1 / (1 - alpha);
                            const scalar_t t_before = T[i] * inv, wt = alpha * t_before;
                            const scalar_t* gp = go + (py * width + px) * C;
                            scalar_t* sf = suffix.data() + i * C;
                            scalar_t d_alpha = gp[F] * (t_before - sf[F] * inv);
                            for (int64_t c = 0; c < F; ++c) {
                                dft[slot * F + c] += wt * gp[c];
                                d_alpha += gp[c] * (t_before * f[c] - sf[c] * inv);
                                sf[c] += wt * f[c];
                            }
                            sf[F] += wt;
                            T[i] = t_before;
                            if (clamped) continue;  // min(0.999, .) passes no gradient there
                            dop[slot] += d_alpha * alpha / o;
                            const scalar_t d_sigma = -d_alpha * alpha;
                            dcon[slot * 3 + 0] += d_sigma * scalar_t(0.5) * dx * dx;
                            dcon[slot * 3 + 1] += d_sigma * dx * dy;
                            dcon[slot * 3 + 2] += d_sigma * scalar_t(0.5) * dy * dy;
                            dmu[slot * 2 + 0] -= d_sigma * (cg[0] * dx + cg[1] * dy);
                            dmu[slot * 2 + 1] -= d_sigma * (cg[2] * dy + cg[1] * dx);
                        }
                    }
                }
            }
        });
    });
    return {g_mu, g_con, g_op, g_ft};
}

// Unsigned keys that order as the floats do (the sign bit flipped for positives, every bit for
// negatives; -0 taken as +0), for a radix sort.
template <typename scalar_t>
struct SortKey;
template <>
struct SortKey<float> {
    using type = uint32_t;
};
template <>
struct SortKey<double> {
    using type = uint64_t;
};

template <typename scalar_t>
typename SortKey<scalar_t>::type sort_key(scalar_t x) {
    using U = typename SortKey<scalar_t>::type;
    if (x == scalar_t(0)) x = scalar_t(0);
    U u;
    std::memcpy(&u, &x, sizeof(U));
    const U top = U(1) << (8 * sizeof(U) - 1);
    return (u & top) ? ~u : (u | top);
}

// Indices of `keys` in ascending order, equal keys in index order (torch.argsort(stable=True)):
// a least-significant-digit radix sort, 8 bits a pass, skipping digits every key shares.
template <typename U>
std::vector<int64_t> stable_order(std::vector<U> keys, std::vector<int64_t> idx) {
    const size_t n = keys.size();
    std::vector<U> k2(n);
    std::vector<int64_t> i2(n);
    for (int shift = 0; shift < int(8 * sizeof(U)); shift += 8) {
        size_t count[257] = {0};
        for (size_t i = 0; i < n; ++i) ++count[((keys[i] >> shift) & 0xff) + 1];
        if (n == 0 || count[((keys[0] >> shift) & 0xff) + 1] == n) continue;
        for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
        for (size_t i = 0; i < n; ++i) {
            const size_t at = count[(keys[i] >> shift) & 0xff]++;
            k2[at] = keys[i];
            i2[at] = idx[i];
        }
        keys.swap(k2);
        idx.swap(i2);
    }
    return idx;
}

// Tile lists: every visible Gaussian (both radii > 0) listed in the tiles its screen
// rectangle touches, each tile's list in depth order, as reference.py's `_tile_lists` builds
// them with one sort on (tile, depth rank). Here the visible Gaussians are sorted by depth
// (stably, as that rank is), then counted and placed into their tiles in that order, so the
// intersections themselves are never sorted. The rectangle is computed as the reference
// computes it, in the means' dtype; bands of tile rows run in parallel, each writing only its
// own tiles' counts and slots.
// -> gauss_sorted [M] int64, counts [T] int64, starts [T] int64
std::vector<torch::Tensor> tile_lists(torch::Tensor means2d, torch::Tensor radii, torch::Tensor depths,
                                      int64_t tiles_x, int64_t tiles_y, int64_t tile_size) {
    check(means2d, "means2d", 2);
    check(radii, "radii", 2);
    check(depths, "depths", 1);
    const int64_t n = means2d.size(0), n_tiles = tiles_x * tiles_y;
    TORCH_CHECK(means2d.size(1) == 2 && radii.size(0) == n && radii.size(1) == 2 && depths.size(0) == n,
                "means2d [N, 2], radii [N, 2] and depths [N] must agree");
    TORCH_CHECK(radii.scalar_type() == torch::kInt && depths.scalar_type() == means2d.scalar_type(),
                "radii must be int32, depths of the means' dtype");
    TORCH_CHECK(tiles_x > 0 && tiles_y > 0 && tile_size > 0, "tiles_x, tiles_y and tile_size must be positive");
    const int32_t* r = radii.data_ptr<int32_t>();
    std::vector<int64_t> order;
    std::vector<int64_t> rect;  // x0, x1, y0, y1 per entry of `order`
    AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "tile_lists", [&] {
        const scalar_t* m = means2d.data_ptr<scalar_t>();
        const scalar_t* d = depths.data_ptr<scalar_t>();
        std::vector<typename SortKey<scalar_t>::type> keys;
        std::vector<int64_t> vis;
        for (int64_t g = 0; g < n; ++g)
            if (r[2 * g] > 0 && r[2 * g + 1] > 0) {
                vis.push_back(g);
                keys.push_back(sort_key(d[g]));
            }
        order = stable_order(std::move(keys), std::move(vis));
        const scalar_t ts = scalar_t(tile_size);
        // (floor(value) + add).clamp(0, hi).long(), as the reference writes it
        auto cell = [](scalar_t value, scalar_t add, int64_t hi) -> int64_t {
            const scalar_t f = std::floor(value) + add;
            if (!(f > scalar_t(0))) return 0;
            return f >= scalar_t(hi) ? hi : int64_t(f);
        };
        rect.resize(4 * order.size());
        for (size_t k = 0; k < order.size(); ++k) {
            const int64_t g = order[k];
            const scalar_t mx = m[2 * g], my = m[2 * g + 1], rx = scalar_t(r[2 * g]), ry = scalar_t(r[2 * g + 1]);
            int64_t* q = rect.data() + 4 * k;
            q[0] = cell((mx - rx) / ts, scalar_t(0), tiles_x);
            q[1] = cell((mx + rx) / ts, scalar_t(1), tiles_x);
            q[2] = cell((my - ry) / ts, scalar_t(0), tiles_y);
            q[3] = cell((my + ry) / ts, scalar_t(1), tiles_y);
        }
    });
    const int64_t v = int64_t(order.size());
    const auto opts = torch::TensorOptions().dtype(torch::kLong);
    auto counts = torch::zeros({n_tiles}, opts);
    int64_t* cnt = counts.data_ptr<int64_t>();
    auto each_band = [&](auto&& visit) {
        at::parallel_for(0, tiles_y, 1, [&](int64_t r0, int64_t r1) {
            for (int64_t k = 0; k < v; ++k) {
                const int64_t* q = rect.data() + 4 * k;
                const int64_t y0 = std::max(q[2], r0), y1 = std::min(q[3], r1);
                for (int64_t ty = y0; ty < y1; ++ty)
                    for (int64_t tx = q[0]; tx < q[1]; ++tx) visit(ty * tiles_x + tx, order[k]);
            }
        });
    };
    each_band([&](int64_t tile, int64_t) { ++cnt[tile]; });
    auto starts = torch::empty({n_tiles}, opts);
    int64_t* st = starts.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t t = 0; t < n_tiles; ++t) {
        st[t] = total;
        total += cnt[t];
    }
    auto gauss_sorted = torch::empty({total}, opts);
    int64_t* gs = gauss_sorted.data_ptr<int64_t>();
    std::vector<int64_t> cursor(st, st + n_tiles);
    each_band([&](int64_t tile, int64_t g) { gs[cursor[tile]++] = g; });
    return {gauss_sorted, counts, starts};
}

// csrc/hashgrid_cpu.cpp, built into the same module
torch::Tensor hash_encode_forward(torch::Tensor x, torch::Tensor tables, std::vector<int64_t> resolutions);
torch::Tensor hash_encode_backward(torch::Tensor grad, torch::Tensor x, std::vector<int64_t> resolutions,
                                   int64_t levels, int64_t table_size, int64_t features);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("composite_forward", &composite_forward, "tiled Gaussian compositing, forward (CPU)");
    m.def("composite_backward", &composite_backward, "tiled Gaussian compositing, backward (CPU)");
    m.def("tile_lists", &tile_lists, "depth-sorted per-tile lists of Gaussians (CPU)");
    m.def("hash_encode_forward", &hash_encode_forward, "multi-resolution hash encoding, forward (CPU)");
    m.def("hash_encode_backward", &hash_encode_backward, "multi-resolution hash encoding, tables' gradient (CPU)");
}
