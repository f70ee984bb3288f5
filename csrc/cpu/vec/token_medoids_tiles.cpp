// Token-medoid distance tiles (see csrc/cpu/token_medoids.cpp), written once on at::vec::Vectorized<T> and
// compiled once per instruction-set level (clipfast/cpu_kernels.h).
//
// Gram kernel over the upper triangle only (half the FLOPs of a GEMM, no GEMM dispatch per row): KT x KT
// tiles of dot products held in KT^2 vector accumulators (one W-wide slice of D each), so every loaded
// vector feeds KT FMAs and the FMA latency is hidden. KT = 4 where the level has 32 vector registers
// (AVX-512, NEON), 3 where it has 16 (AVX2, baseline x86): 16 or 9 accumulators plus the 2 KT operands.
// The KT row tokens of a tile row stay in L1 while its column tiles stream from L2 (a row's n x ld tokens
// and n x n distances stay in L2 from the Gram to the last iteration).
//
// Every accumulator is reduced by the same fixed lane order, and the diagonal tiles (which give G_ii) use
// the same kernel as the others, so two equal tokens give G_ii = G_jj = G_ij bitwise and d_ij = 0 exactly;
// each pair is computed once and mirrored, so the matrix is exactly symmetric.
#include <algorithm>
#include <cmath>

#include "clipfast/cpu_kernels.h"
#include "clipfast/vec_helpers.h"

namespace clipfast::cpu {
namespace CPU_CAPABILITY {
namespace {

#if defined(CPU_CAPABILITY_AVX512) || defined(__aarch64__)
constexpr int KT = 4;
#else
constexpr int KT = 3;
#endif

// g[r][c] = <a[r], b[c]> over ld elements (ld a multiple of the vector width).
template <typename T>
inline void dot_tile(const T* const a[KT], const T* const b[KT], int64_t ld, T g[KT][KT]) {
  using V = at::vec::Vectorized<T>;
  V acc[KT][KT];
  for (auto& row : acc)
    for (auto& v : row) v = V(T(0));
  for (int64_t d = 0; d < ld; d += V::size()) {
    V vb[KT];
    for (int c = 0; c < KT; ++c) vb[c] = V::loadu(b[c] + d);
    for (int r = 0; r < KT; ++r) {
      const V va = V::loadu(a[r] + d);
      for (int c = 0; c < KT; ++c) acc[r][c] = at::vec::fmadd(va, vb[c], acc[r][c]);
    }
  }
  for (int r = 0; r < KT; ++r)
    for (int c = 0; c < KT; ++c) g[r][c] = vec::sum_lanes(acc[r][c]);
}

// Euclidean on centred tokens: sqrt(max(0, (G_ii + G_jj) - 2 G_ij)) (a NaN maps to 0, as std::max(0, x));
// cosine on unit tokens: 1 - G_ij.
template <typename T>
inline T pair_distance(bool cosine, T sq_i, T sq_j, T g) {
  if (cosine) return T(1) - g;
  const T d2 = (sq_i + sq_j) - (g + g);
  return std::sqrt(T(0) < d2 ? d2 : T(0));
}

// The pairs i < j of the tile at (i0, j0) that lie inside the matrix, written to both triangles.
template <typename T>
inline void store_pairs(const T g[KT][KT], bool cosine, const T* sq, int64_t n, int64_t i0, int64_t j0, T* dist) {
  for (int64_t r = 0; r < KT && i0 + r < n; ++r)
    for (int64_t c = 0; c < KT && j0 + c < n; ++c) {
      const int64_t i = i0 + r, j = j0 + c;
      if (j <= i) continue;
      const T d = pair_distance(cosine, sq[i], sq[j], g[r][c]);
      dist[i * n + j] = d;
      dist[j * n + i] = d;
    }
}

// Diagonal tiles first (they give G_ii, needed by every other tile), then the tiles strictly above the
// diagonal. Rows past n in the last tile are clamped to row n - 1 and their results dropped.
template <typename T>
void distances(const T* work, int64_t n, int64_t ld, bool cosine, T* sq, T* dist) {
  const int64_t blocks = (n + KT - 1) / KT;
  const T* a[KT];
  const T* b[KT];
  T g[KT][KT];
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * KT;
    for (int r = 0; r < KT; ++r) a[r] = work + std::min(i0 + r, n - 1) * ld;
    dot_tile(a, a, ld, g);
    for (int r = 0; r < KT; ++r) sq[i0 + r] = g[r][r];
    store_pairs(g, cosine, sq, n, i0, i0, dist);
  }
  for (int64_t i = 0; i < n; ++i) dist[i * n + i] = T(0);
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int64_t i0 = bi * KT;
    for (int r = 0; r < KT; ++r) a[r] = work + std::min(i0 + r, n - 1) * ld;
    for (int64_t bj = bi + 1; bj < blocks; ++bj) {
      const int64_t j0 = bj * KT;
      for (int c = 0; c < KT; ++c) b[c] = work + std::min(j0 + c, n - 1) * ld;
      dot_tile(a, b, ld, g);
      store_pairs(g, cosine, sq, n, i0, j0, dist);
    }
  }
}

}  // namespace

void register_token_medoids(Kernels& k) {
  static_assert(kMedoidPad % at::vec::Vectorized<float>::size() == 0, "row padding must be whole vectors");
  static_assert(kMedoidPad % at::vec::Vectorized<double>::size() == 0, "row padding must be whole vectors");
  k.medoids_f32 = {&distances<float>};
  k.medoids_f64 = {&distances<double>};
}

}  // namespace CPU_CAPABILITY
}  // namespace clipfast::cpu
