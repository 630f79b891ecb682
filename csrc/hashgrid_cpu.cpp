// Multi-resolution hash encoding on the CPU, forward and backward: the same arithmetic, in the
// same order, as gstalk/deform/hashgrid.py's `hash_encode_torch` (its twin and the reference of
// the tests), for float32 and float64.
//
// Per point and level: pos = x * res, p0 = floor(pos), frac = pos - p0; each of the 2^D cell
// corners (bit d of corner c = offset along d) has the weight prod_d (bit ? frac_d : 1 - frac_d)
// and the table row grid_index(p0 + offset): dense when (res + 1)^D rows fit the table, else the
// spatial hash XOR_d (coord_d * prime_d) & (T - 1). The output is sum_c weight_c * row_c, summed
// over corners in order. Points run in parallel in the forward pass. The backward pass gives the
// tables' gradient only (the positions are the avatar's fixed canonical ones; the caller checks
// they need none): levels run in parallel, each adding its points' contributions to its own
// table in point, then corner order, as the reference's index backward does.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr uint64_t PRIMES[3] = {1u, 2654435761u, 805459861u};

struct Grid {
    int64_t n, dim, levels, table_size, features, corners;
    std::vector<int64_t> res;
};

Grid grid(const torch::Tensor& x, int64_t levels, int64_t table_size, int64_t features,
          const std::vector<int64_t>& res) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous CPU [N, D]");
    TORCH_CHECK(x.size(1) == 2 || x.size(1) == 3, "x must hold 2D or 3D points");
    TORCH_CHECK(int64_t(res.size()) == levels && levels > 0, "one resolution per level");
    TORCH_CHECK(table_size > 0 && (table_size & (table_size - 1)) == 0, "the table size must be a power of two");
    return {x.size(0), x.size(1), levels, table_size, features, int64_t(1) << x.size(1), res};
}

// Points outside [0, 1) (or NaN) would index outside the tables: refused before any lookup
// (HashGrid clamps its input to [0, 1 - 1e-6]).
template <typename scalar_t>
void check_unit(const scalar_t* xp, int64_t count) {
    bool ok = true;
    for (int64_t i = 0; i < count; ++i) ok = ok && xp[i] >= scalar_t(0) && xp[i] < scalar_t(1);
    TORCH_CHECK(ok, "hash encoding: points must lie in [0, 1) (a NaN or a point outside the box)");
}

// Corner rows and weights of one point at one level.
template <typename scalar_t>
void corners(const scalar_t* xp, int64_t dim, int64_t res, int64_t table_size, int64_t* row, scalar_t* weight) {
    int64_t p0[3];
    scalar_t frac[3];
    for (int64_t d = 0; d < dim; ++d) {
        const scalar_t pos = xp[d] * scalar_t(res);
        const scalar_t f = std::floor(pos);
        frac[d] = pos - f;
        p0[d] = int64_t(f);
    }
    int64_t dense = 1;
    for (int64_t d = 0; d < dim; ++d) dense *= res + 1;
    const bool is_dense = dense <= table_size;
    for (int64_t c = 0; c < (int64_t(1) << dim); ++c) {
        scalar_t w = scalar_t(0);
        uint64_t h = 0;
        int64_t idx = 0, stride = 1;
        for (int64_t d = 0; d < dim; ++d) {
            const int64_t bit = (c >> d) & 1, coord = p0[d] + bit;
            const scalar_t wd = bit ? frac[d] : scalar_t(1) - frac[d];
            w = d == 0 ? wd : w * wd;
            idx += coord * stride;
            stride *= res + 1;
            h ^= uint64_t(coord) * PRIMES[d];
        }
        row[c] = is_dense ? idx : int64_t(h & uint64_t(table_size - 1));
        weight[c] = w;
    }
}

}  // namespace

// x [N, D] in [0, 1), tables [L, T, F] -> [N, L * F]
torch::Tensor hash_encode_forward(torch::Tensor x, torch::Tensor tables, std::vector<int64_t> resolutions) {
    TORCH_CHECK(tables.device().is_cpu() && tables.is_contiguous() && tables.dim() == 3 &&
                    tables.scalar_type() == x.scalar_type(),
                "tables must be a contiguous CPU [L, T, F] of the points' dtype");
    const Grid g = grid(x, tables.size(0), tables.size(1), tables.size(2), resolutions);
    auto out = torch::empty({g.n, g.levels * g.features}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_forward", [&] {
        const scalar_t* xp = x.data_ptr<scalar_t>();
        check_unit(xp, g.n * g.dim);
        const scalar_t* tb = tables.data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, g.n, 256, [&](int64_t i0, int64_t i1) {
            int64_t row[8];
            scalar_t weight[8];
            for (int64_t i = i0; i < i1; ++i)
                for (int64_t lv = 0; lv < g.levels; ++lv) {
                    corners(xp + i * g.dim, g.dim, g.res[lv], g.table_size, row, weight);
                    scalar_t* dst = o + (i * g.levels + lv) * g.features;
                    const scalar_t* level = tb + lv * g.table_size * g.features;
                    for (int64_t f = 0; f < g.features; ++f) {
                        scalar_t acc = scalar_t(0);
                        for (int64_t c = 0; c < g.corners; ++c) acc += weight[c] * level[row[c] * g.features + f];
                        dst[f] = acc;
                    }
                }
        });
    });
    return out;
}

// grad [N, L * F] -> the tables' gradient [L, T, F]
torch::Tensor hash_encode_backward(torch::Tensor grad, torch::Tensor x, std::vector<int64_t> resolutions,
                                   int64_t levels, int64_t table_size, int64_t features) {
    const Grid g = grid(x, levels, table_size, features, resolutions);
    TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() && grad.scalar_type() == x.scalar_type() &&
                    grad.dim() == 2 && grad.size(0) == g.n && grad.size(1) == levels * features,
                "grad must be a contiguous CPU [N, L * F] of the points' dtype");
    auto out = torch::zeros({levels, table_size, features}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_backward", [&] {
        const scalar_t* xp = x.data_ptr<scalar_t>();
        check_unit(xp, g.n * g.dim);
        const scalar_t* gp = grad.data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, levels, 1, [&](int64_t l0, int64_t l1) {
            int64_t row[8];
            scalar_t weight[8];
            for (int64_t lv = l0; lv < l1; ++lv) {
                scalar_t* level = o + lv * table_size * features;
                for (int64_t i = 0; i < g.n; ++i) {
                    corners(xp + i * g.dim, g.dim, g.res[lv], table_size, row, weight);
                    const scalar_t* src = gp + (i * levels + lv) * features;
                    for (int64_t c = 0; c < g.corners; ++c)
                        for (int64_t f = 0; f < features; ++f) level[row[c] * features + f] += src[f] * weight[c];
                }
            }
        });
    });
    return out;
}
