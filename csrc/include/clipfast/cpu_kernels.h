// The CPU kernels' vectorised inner loops, behind one table of function pointers.
//
// Each file in csrc/cpu/vec/ is written once on PyTorch's portable vector type at::vec::Vectorized<T>
// (with its Sleef-backed exp/log1p) and compiled once per instruction-set level, exactly as ATen builds its
// own CPU kernels: setup.py compiles it with -DCPU_CAPABILITY=<LEVEL> -DCPU_CAPABILITY_<LEVEL> and the
// level's -m flags (x86-64: AVX512, AVX2 (+FMA), DEFAULT; aarch64: DEFAULT, which is NEON there), and
// every copy lives in its own namespace clipfast::cpu::<LEVEL> (as at::vec's inline CPU_CAPABILITY
// namespace), so the copies never collide at link time. csrc/cpu/dispatch.cpp picks one level per process
// from ATen's own choice (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), capped by what this
// CPU supports and what was compiled. The drivers in csrc/cpu/<op>.cpp are ordinary ATen code and call
// kernels().<op>.
//
// This header is torch-free on purpose: the per-level files include only it and the at::vec headers.
#pragma once
#include <cstdint>

namespace clipfast::cpu {

// Tile passes of the contrastive losses. `tile` is a dense (rows, cols) block of x y^T (unscaled).
template <typename T>
struct ContrastiveTiles {
  // InfoNCE forward: merges scale * tile into the running row states (max, sum) and, when col_max is not
  // null, into column states; col_scratch: cols elements.
  void (*lse)(const T* tile, int64_t rows, int64_t cols, T scale, T* row_max, T* row_sum, T* col_max, T* col_sum,
              T* col_scratch);
  // InfoNCE backward: tile <- row_weight exp(scale tile - row_lse_i) [+ col_weight exp(scale tile - col_lse_j)].
  void (*softmax_grad)(T* tile, int64_t rows, int64_t cols, T scale, const T* row_lse, const T* col_lse,
                       T row_weight, T col_weight);
  // SigLIP forward: row_acc_i += sum_j softplus(scale tile_ij + bias).
  void (*softplus)(const T* tile, int64_t rows, int64_t cols, T scale, T bias, T* row_acc);
  // SigLIP backward: tile <- sigmoid(scale tile + bias), row_acc_i += sum_j of it.
  void (*sigmoid)(T* tile, int64_t rows, int64_t cols, T scale, T bias, T* row_acc);
};

// Token-medoid distances: dist (n x n, both triangles, zero diagonal) from the prepared tokens work
// (n x ld, ld a multiple of kMedoidPad, zero-padded). sq: n + kMedoidPad elements of scratch (receives
// the Gram diagonal).
constexpr int64_t kMedoidPad = 16;
template <typename T>
struct MedoidTiles {
  void (*distances)(const T* work, int64_t n, int64_t ld, bool cosine, T* sq, T* dist);
};

struct Kernels {
  const char* level;  // the compiled level in use: "AVX512", "AVX2" or "DEFAULT" (NEON on aarch64)
  int vector_bytes;   // sizeof(at::vec::Vectorized<float>) at that level
  ContrastiveTiles<float> contrastive_f32;
  ContrastiveTiles<double> contrastive_f64;
  MedoidTiles<float> medoids_f32;
  MedoidTiles<double> medoids_f64;
};

// The table for this process's CPU (chosen once, on first use).
const Kernels& kernels();

// Per-core data cache sizes in bytes (Linux sysfs, then sysconf, then conservative defaults).
struct CacheSizes {
  int64_t l1d, l2;
};
const CacheSizes& cache_sizes();

}  // namespace clipfast::cpu
