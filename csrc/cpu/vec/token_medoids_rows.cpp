// Deterministic k-medoids of one row of tokens (CenterCLIP, arXiv:2205.00823), written once on
// at::vec::Vectorized<T> and compiled once per instruction-set level (clipfast/cpu_kernels.h): the whole
// row solve lives here, so every one of its loops (not only the Gram tiles) is vectorised for the level.
// The driver, csrc/cpu/token_medoids.cpp, hands rows to threads.
//
// Per row x (n x dim), in the computation dtype (fp64 for fp64, fp32 otherwise):
//   distances  Euclidean: c_i = x_i - mean_n x_n (centred, so |a|^2 + |b|^2 - 2 a.b does not cancel for
//              large-norm tokens), G = C C^T, d_ij = sqrt(max(0, G_ii + G_jj - 2 G_ij));
//              cosine: u_i = x_i / max(|x_i|, 1e-8), d_ij = 1 - u_i.u_j.
//              Each pair i < j is computed once and mirrored (exactly symmetric, so a two-token cluster's
//              equal costs tie to the lower index); d_ii = 0.
//   KKZ        m_0 = argmax_i |x_i| (RAW norms), m_k = argmax_j min_{l<k} d(m_l, j) over the tokens not
//              chosen yet, with a running-min vector (O(K N)); the K medoids are distinct tokens.
//   iterations m <- step(m): assign every token to argmin_k d(m_k, j) (a medoid to its own cluster: only
//              zero-distance ties such as duplicate tokens are decided by it); each medoid becomes its
//              cluster's member of least in-cluster distance sum (O(K N) + O(sum of squared cluster
//              sizes)); until a step changes nothing, at most max_iters times.
// Ties go to the lowest index everywhere. See clipfast/reference/token_medoids.py.
//
// Memory: the row is read from memory once (squared norms, mean and the finiteness check in one pass);
// the working copy (n x ld) and the n x n distances then stay in the thread's L2 from the Gram to the last
// iteration.
//
// Gram kernel over the upper triangle only (half the FLOPs of a GEMM, no GEMM dispatch per row): KR x KC
// tiles of dot products held in KR KC vector accumulators (one W-wide slice of D each), so every loaded
// vector feeds KC or KR FMAs and the FMA latency is hidden. 4 x 4 where the level has 32 vector registers
// (AVX-512, NEON); 4 x 3 where it has 16 (AVX2, baseline x86): 12 accumulators, 3 column operands and
// one row operand fill all 16 (7 loads per 12 FMAs; a 3 x 3 tile, 6 per 9, ran 10-20% slower on AVX2).
// The KR row tokens of a tile row stay in L1 while its column tiles stream from L2. Every accumulator is
// one fmadd chain over D in order, reduced by the same fixed lane order, and the diagonal G_ii comes from
// the same chain, so two equal tokens give G_ii = G_jj = G_ij bitwise and d_ij = 0 exactly.
#include <algorithm>
#include <cmath>
#include <limits>

#include "clipfast/cpu_kernels.h"
#include "clipfast/vec_helpers.h"

namespace clipfast::cpu {
namespace CPU_CAPABILITY {
namespace {

using vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512) || defined(__aarch64__)
constexpr int KR = 4, KC = 4;
#else
constexpr int KR = 4, KC = 3;
#endif

constexpr double kCosineNormEps = 1e-8;

template <typename T>
bool all_finite(const T* v, int64_t count) {
  for (int64_t d = 0; d < count; ++d)
    if (!std::isfinite(v[d])) return false;
  return true;
}

// The row's working copy s.work (n x ld, columns >= dim zero): tokens centred on the row mean (Euclidean)
// or scaled to unit norm (cosine); s.norms = the RAW squared norms (KKZ's first pick: the square keeps the
// argmax; cosine's scale). The first pass reads the row from memory (norms, the mean's sums, and the
// finiteness check: a token whose squared norm is not finite has its elements checked, so finite elements
// whose square overflows pass, as in clipfast.inputs.check_no_nan); the second reads it again from cache,
// since the mean needs every token before the first can be centred. Returns false on a NaN or an Inf.
// The centred squared norms are not taken here but from the Gram's own diagonal (see distances).
template <typename T>
bool prepare(const T* x, int64_t n, int64_t dim, bool cosine, MedoidScratch<T>& s) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t ld = s.ld;
  T* mean = s.mean.get();
  T* norms = s.norms.get();
  std::fill(mean, mean + ld, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * dim;
    V squares(T(0));
    for (int64_t d = 0; d < dim; d += W) {
      const V v = d + W <= dim ? V::loadu(xi + d) : V::loadu(xi + d, dim - d);  // zeros past dim
      squares = at::vec::fmadd(v, v, squares);
      if (!cosine) (V::loadu(mean + d) + v).store(mean + d);  // mean has ld >= dim rounded up to W
    }
    norms[i] = vec::sum_lanes(squares);
    if (!std::isfinite(norms[i]) && !all_finite(xi, dim)) return false;
  }
  if (!cosine)
    for (int64_t d = 0; d < ld; d += W) (V::loadu(mean + d) / V(static_cast<T>(n))).store(mean + d);
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * dim;
    T* wi = s.work.get() + i * ld;
    const V scale(cosine ? T(1) / std::max(std::sqrt(norms[i]), static_cast<T>(kCosineNormEps)) : T(1));
    int64_t d = 0;
    for (; d < dim; d += W) {
      const V v = d + W <= dim ? V::loadu(xi + d) : V::loadu(xi + d, dim - d);
      (cosine ? v * scale : v - V::loadu(mean + d)).store(wi + d);  // the mean is zero past dim
    }
    std::fill(wi + d, wi + ld, T(0));
  }
  return true;
}

// g[r][c] = <a[r], b[c]> over ld elements (ld a multiple of the vector width).
template <typename T>
inline void dot_tile(const T* const a[KR], const T* const b[KC], int64_t ld, T g[KR][KC]) {
  using V = Vectorized<T>;
  V acc[KR][KC];
  for (auto& row : acc)
    for (auto& v : row) v = V(T(0));
  for (int64_t d = 0; d < ld; d += V::size()) {
    V vb[KC];
    for (int c = 0; c < KC; ++c) vb[c] = V::loadu(b[c] + d);
    for (int r = 0; r < KR; ++r) {
      const V va = V::loadu(a[r] + d);
      for (int c = 0; c < KC; ++c) acc[r][c] = at::vec::fmadd(va, vb[c], acc[r][c]);
    }
  }
  for (int r = 0; r < KR; ++r)
    for (int c = 0; c < KC; ++c) g[r][c] = vec::sum_lanes(acc[r][c]);
}

// sq[r] = <a[r], a[r]>: the chain of dot_tile, so bitwise equal to the tile entry of two equal tokens.
template <typename T>
inline void dot_self(const T* const a[KR], int64_t ld, T sq[KR]) {
  using V = Vectorized<T>;
  V acc[KR];
  for (auto& v : acc) v = V(T(0));
  for (int64_t d = 0; d < ld; d += V::size())
    for (int r = 0; r < KR; ++r) {
      const V va = V::loadu(a[r] + d);
      acc[r] = at::vec::fmadd(va, va, acc[r]);
    }
  for (int r = 0; r < KR; ++r) sq[r] = vec::sum_lanes(acc[r]);
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
inline void store_pairs(const T g[KR][KC], bool cosine, const T* sq, int64_t n, int64_t i0, int64_t j0, T* dist) {
  for (int64_t r = 0; r < KR && i0 + r < n; ++r)
    for (int64_t c = 0; c < KC && j0 + c < n; ++c) {
      const int64_t i = i0 + r, j = j0 + c;
      if (j <= i) continue;
      const T d = pair_distance(cosine, sq[i], sq[j], g[r][c]);
      dist[i * n + j] = d;
      dist[j * n + i] = d;
    }
}

// s.dist from s.work: the diagonal G_ii first (into s.sq, needed by every pair), then, per block of KR
// rows from i0, the column tiles from j0 = i0 + 1 on (the first one's pairs j <= i are dropped). Rows and
// columns past n in the last tiles are clamped to token n - 1 and their results dropped.
template <typename T>
void distances(int64_t n, bool cosine, MedoidScratch<T>& s) {
  const T* work = s.work.get();
  const int64_t ld = s.ld;
  T* sq = s.sq.get();
  T* dist = s.dist.get();
  const auto token = [&](int64_t i) { return work + std::min(i, n - 1) * ld; };
  const T* a[KR];
  const T* b[KC];
  T g[KR][KC];
  for (int64_t i0 = 0; i0 < n; i0 += KR) {
    for (int r = 0; r < KR; ++r) a[r] = token(i0 + r);
    dot_self(a, ld, sq + i0);  // sq holds n + kMedoidPad >= n + KR elements
  }
  for (int64_t i = 0; i < n; ++i) dist[i * n + i] = T(0);
  for (int64_t i0 = 0; i0 < n; i0 += KR) {
    for (int r = 0; r < KR; ++r) a[r] = token(i0 + r);
    for (int64_t j0 = i0 + 1; j0 < n; j0 += KC) {
      for (int c = 0; c < KC; ++c) b[c] = token(j0 + c);
      dot_tile(a, b, ld, g);
      store_pairs(g, cosine, sq, n, i0, j0, dist);
    }
  }
}

// First index of the maximum (NaNs never win, as in a strict-> scan; index 0 if values[0] is NaN). The
// maximum comes from 16 interleaved running maxima (vectorisable, and exact in any order), then one scan
// finds its first occurrence.
template <typename T>
int64_t first_argmax(const T* values, int64_t n) {
  constexpr int kLanes = 16;
  T lanes[kLanes];
  std::fill(lanes, lanes + kLanes, values[0]);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = values[i + l] > lanes[l] ? values[i + l] : lanes[l];
  T top = values[0];
  for (; i < n; ++i) top = values[i] > top ? values[i] : top;
  for (int l = 0; l < kLanes; ++l) top = lanes[l] > top ? lanes[l] : top;
  for (i = 0; i < n; ++i)
    if (values[i] == top) return i;
  return 0;
}

// KKZ: the largest RAW norm first, then repeatedly the token farthest from the chosen set (nearest[j]:
// the distance from token j to its nearest chosen medoid).
template <typename T>
void kkz(const T* dist, const T* norms, int64_t n, int64_t k_count, T* __restrict nearest, int64_t* medoids) {
  medoids[0] = first_argmax(norms, n);
  std::copy(dist + medoids[0] * n, dist + (medoids[0] + 1) * n, nearest);
  // A chosen token leaves the running for good (distances are >= 0, and min(-inf, d) stays -inf): the
  // medoids are distinct tokens even when fewer than K tokens differ.
  nearest[medoids[0]] = -std::numeric_limits<T>::infinity();
  for (int64_t k = 1; k < k_count; ++k) {
    medoids[k] = first_argmax(nearest, n);
    const T* __restrict row = dist + medoids[k] * n;
    for (int64_t j = 0; j < n; ++j) nearest[j] = row[j] < nearest[j] ? row[j] : nearest[j];  // std::min
    nearest[medoids[k]] = -std::numeric_limits<T>::infinity();
  }
}

// s.label[j] = argmin_k dist[order[k], j] (ties to the lowest k), and s.label[order[k]] = k. Medoid rows
// are scanned one after the other (contiguous) with a running minimum in s.best; a strict < keeps the
// lower k. The label is held as a T (exact for any token count a row can have) so that the update is one
// compare and two blends per vector.
template <typename T>
void assign(const T* dist, int64_t n, const int64_t* order, int64_t k_count, MedoidScratch<T>& s) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  T* best = s.best.get();
  T* label = s.label.get();
  std::copy(dist + order[0] * n, dist + (order[0] + 1) * n, best);
  std::fill(label, label + n, T(0));
  for (int64_t k = 1; k < k_count; ++k) {
    const T* row = dist + order[k] * n;
    const V kv(static_cast<T>(k));
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const V candidate = V::loadu(row + j), current = V::loadu(best + j);
      const V closer = candidate < current;
      V::blendv(current, candidate, closer).store(best + j);
      V::blendv(V::loadu(label + j), kv, closer).store(label + j);
    }
    for (; j < n; ++j)
      if (row[j] < best[j]) {
        best[j] = row[j];
        label[j] = static_cast<T>(k);
      }
  }
  // A medoid token belongs to its own cluster (CenterCLIP's diagonal shift): this only decides exact
  // zero-distance ties (duplicate tokens), and keeps the clusters' medoids distinct through the updates.
  for (int64_t k = 0; k < k_count; ++k) label[order[k]] = static_cast<T>(k);
}

// One assignment + update step of a row; returns whether any medoid changed.
template <typename T>
bool step(const T* dist, int64_t n, int64_t k_count, int64_t* medoids, MedoidScratch<T>& s) {
  assign(dist, n, medoids, k_count, s);
  // Counting sort by cluster: cluster k's members are members[start[k] .. start[k + 1]), ascending.
  int64_t* start = s.start.get();
  int64_t* cursor = s.cursor.get();
  int32_t* members = s.members.get();
  const T* label = s.label.get();
  std::fill(start, start + k_count + 1, 0);
  for (int64_t j = 0; j < n; ++j) ++start[static_cast<int64_t>(label[j]) + 1];
  for (int64_t k = 0; k < k_count; ++k) start[k + 1] += start[k];
  std::copy(start, start + k_count, cursor);
  for (int64_t j = 0; j < n; ++j) members[cursor[static_cast<int64_t>(label[j])]++] = static_cast<int32_t>(j);
  bool changed = false;
  for (int64_t k = 0; k < k_count; ++k) {
    const int32_t* first = members + start[k];
    const int64_t size = start[k + 1] - start[k];
    if (size == 0) continue;  // cannot happen after KKZ (a medoid is nearest to itself)
    int64_t best = first[0];
    T best_cost = 0;
    for (int64_t a = 0; a < size; ++a) {
      const T* row = dist + static_cast<int64_t>(first[a]) * n;
      T cost = 0;
      for (int64_t b = 0; b < size; ++b) cost += row[first[b]];
      if (a == 0 || cost < best_cost) {
        best_cost = cost;
        best = first[a];
      }
    }
    changed |= best != medoids[k];
    medoids[k] = best;
  }
  return changed;
}

// Everything for one row: working copy, distances, KKZ, iterations until a step changes nothing (or
// max_iters), then the sorted medoids and the assignment against them. medoids: in KKZ / cluster order
// until the final sort.
template <typename T>
bool solve_row(const T* x, int64_t n, int64_t dim, bool cosine, int64_t k_count, int64_t max_iters,
               MedoidScratch<T>& s, int64_t* medoids, int64_t* assignment) {
  if (!prepare(x, n, dim, cosine, s)) return false;
  distances(n, cosine, s);
  const T* dist = s.dist.get();
  kkz(dist, s.norms.get(), n, k_count, s.best.get(), medoids);
  for (int64_t it = 0; it < max_iters; ++it)
    if (!step(dist, n, k_count, medoids, s)) break;
  std::sort(medoids, medoids + k_count);
  assign(dist, n, medoids, k_count, s);
  for (int64_t j = 0; j < n; ++j) assignment[j] = static_cast<int64_t>(s.label[j]);
  return true;
}

}  // namespace

void register_token_medoids(Kernels& k) {
  static_assert(kMedoidPad % Vectorized<float>::size() == 0, "row padding must be whole vectors");
  static_assert(kMedoidPad % Vectorized<double>::size() == 0, "row padding must be whole vectors");
  k.medoids_f32 = {&solve_row<float>};
  k.medoids_f64 = {&solve_row<double>};
}

}  // namespace CPU_CAPABILITY
}  // namespace clipfast::cpu
