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
#include <memory>

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

// Token medoids (CenterCLIP k-medoids), one row at a time (csrc/cpu/vec/token_medoids_rows.cpp holds the whole
// row solve, so each of its loops is compiled for the level). One thread's buffers, reused row after row:
// the row's working copy (n x ld, ld a multiple of kMedoidPad, zero-padded, so the Gram has no tail) and
// its n x n distances stay in L2 from the Gram to the last iteration.
constexpr int64_t kMedoidPad = 16;
template <typename T>
struct MedoidScratch {
  int64_t ld;
  std::unique_ptr<T[]> work, mean, norms, sq, dist, best, label;
  std::unique_ptr<int32_t[]> members;
  std::unique_ptr<int64_t[]> start, cursor;
  MedoidScratch(int64_t n, int64_t dim, int64_t k_count)
      : ld((dim + kMedoidPad - 1) / kMedoidPad * kMedoidPad),
        work(new T[n * ld]),
        mean(new T[ld]),
        norms(new T[n]),
        sq(new T[n + kMedoidPad]),
        dist(new T[n * n]),
        best(new T[n]),
        label(new T[n]),
        members(new int32_t[n]),
        start(new int64_t[k_count + 1]),
        cursor(new int64_t[k_count]) {}
};
template <typename T>
struct MedoidRows {
  // Row x (n x dim, contiguous) -> medoids (k_count indices, ascending) and assignment (n, into the
  // sorted medoids). Returns false, the outputs unspecified, when the row holds a NaN or an Inf.
  bool (*solve)(const T* x, int64_t n, int64_t dim, bool cosine, int64_t k_count, int64_t max_iters,
                MedoidScratch<T>& scratch, int64_t* medoids, int64_t* assignment);
};

struct Kernels {
  const char* level;  // the compiled level in use: "AVX512", "AVX2" or "DEFAULT" (NEON on aarch64)
  int vector_bytes;   // sizeof(at::vec::Vectorized<float>) at that level
  ContrastiveTiles<float> contrastive_f32;
  ContrastiveTiles<double> contrastive_f64;
  MedoidRows<float> medoids_f32;
  MedoidRows<double> medoids_f64;
};

// The table for this process's CPU (chosen once, on first use).
const Kernels& kernels();

// Per-core data cache sizes in bytes (Linux sysfs, then sysconf, then conservative defaults).
struct CacheSizes {
  int64_t l1d, l2;
};
const CacheSizes& cache_sizes();

}  // namespace clipfast::cpu
