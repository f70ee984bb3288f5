// Attentive token removal on the CPU (A-CLIP arXiv:2212.08653, EViT arXiv:2202.07800): the selection of
// the highest-scoring patch tokens, the row gather that keeps them (with EViT's fused token of the dropped
// ones) and its backward, a row scatter. Specification: clipfast/reference/token_keep.py.
//
// Shapes: scores (B, L); tokens (B, P + L, D) (P prefix tokens, then L patches); keep_index (B, K) int64.
//
// index: per batch row the n candidates (the L patches or, with block = b > 1, the L / b^2 blocks of the
//   (L / grid_width, grid_width) grid, a block's score being the sum of its b^2 patch scores added in
//   row-major order in the scores' dtype, so the ranking is bitwise that of the reference) get an integer
//   key of the total order "larger first, NaN above +inf, -0.0 == +0.0", ties to the lower index.
//   nth_element puts the count = K (or K / b^2) best first in O(n); they are marked and one scan over the
//   patches emits the kept ones in ascending order, so no sort is needed.
// gather:   kept[b] = [tokens[b, :P], tokens[b, P + keep_index[b, j]] for j < K (, fused[b])],
//           fused[b] = sum over dropped i of w[b, i] * tokens[b, P + i]   (accumulated in fp32, fp64 for fp64)
// backward: with g[b] = grad_kept[b, P + K] (the fused row's gradient, fusion only)
//           grad_tokens[b, r] = grad_kept[b, r] for r < P, grad_kept[b, P + j] at row P + keep_index[b, j],
//           w[b, i] * g[b] at dropped rows with fusion, else 0;
//           grad_w[b, i] = <tokens[b, P + i], g[b]> for dropped i, 0 for kept i   (fp32 / fp64).
//
// Work is split into (batch row, part) tasks so that a small batch still occupies every thread: a part is
// a run of about kPartBytes of output rows, or the fused row (a task per kFuseColumns columns of D: whole
// rows at CLIP widths, so every dropped row is read in one stream, with the next one prefetched). Every
// output row is written exactly once, by one task (rows are memcpy'd, dropped rows computed or cleared in
// place: no zero fill before a scatter, no atomics), so results do not depend on the thread count. Token
// rows are addressed through their batch and row strides; only a non-unit last stride makes a copy. The
// backward without fuse_weights reads only the shape of `tokens` (it may be an expanded stand-in).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "clipfast/checks.h"
#include "clipfast/huge_page_buffer.h"
#include "clipfast/prefetch.h"
#include "clipfast/token_keep_checks.h"

namespace clipfast {
namespace {

constexpr int64_t kPartBytes = 32 * 1024;          // output bytes of one row-copy task
constexpr int64_t kFuseColumns = 2048;             // fused-row columns of one task
constexpr int64_t kParallelBytes = 256 * 1024;     // below this much work per thread, run inline
constexpr int64_t kIndexParallelScores = 4096;     // scores ranked per thread at least (~20 ViT rows)

// Integer key of the selection order: larger keys rank first; every NaN gets the largest key (equal NaNs
// then tie by index, like torch's descending stable sort), -0.0 and +0.0 the same key. Flipping the bits
// of negatives and the sign bit of positives makes the unsigned order the numeric order.
template <typename T>
uint64_t order_key(T value) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  if (value != value) return std::numeric_limits<uint64_t>::max();
  const Bits bits = std::bit_cast<Bits>(value == T(0) ? T(0) : value);
  constexpr Bits sign = Bits(1) << (8 * sizeof(T) - 1);
  return (bits & sign) ? Bits(~bits) : Bits(bits | sign);
}

using Ranked = std::pair<uint64_t, int64_t>;  // (order key, candidate index)

// A lambda, not a function: nth_element then inlines the comparison (a function pointer costs ~10%).
constexpr auto ranks_before = [](const Ranked& a, const Ranked& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
};

at::Tensor token_keep_index_cpu(const at::Tensor& scores_in, int64_t num_keep, int64_t grid_width, int64_t block) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  assert_token_keep_index_args(scores_in, num_keep, grid_width, block);
  const at::Tensor scores = scores_in.detach();
  const int64_t batch = scores.size(0), length = scores.size(1);
  at::Tensor keep_index = at::empty({batch, num_keep}, scores.options().dtype(at::kLong));
  const int64_t block_area = block * block;
  const int64_t width_blocks = block > 1 ? grid_width / block : 0;
  const int64_t candidates = length / block_area, count = num_keep / block_area;
  // Block of patch i in row-major block order (the patch itself when block == 1).
  auto candidate_of = [&](int64_t i) {
    return block == 1 ? i : (i / grid_width / block) * width_blocks + (i % grid_width) / block;
  };
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "token_keep_index_cpu", [&] {
    using T = scalar_t;
    const T* scores_ptr = scores.data_ptr<T>();
    const int64_t batch_stride = scores.stride(0), patch_stride = scores.stride(1);
    int64_t* out_ptr = keep_index.data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, kIndexParallelScores / length);
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<Ranked> ranked(candidates);
      std::vector<uint8_t> chosen(candidates);
      for (int64_t b = begin; b < end; ++b) {
        const T* s = scores_ptr + b * batch_stride;
        for (int64_t c = 0; c < candidates; ++c) {
          T value;
          if (block == 1) {
            value = s[c * patch_stride];
          } else {
            const int64_t first = (c / width_blocks) * block * grid_width + (c % width_blocks) * block;
            value = s[first * patch_stride];
            for (int64_t r = 0; r < block; ++r) {
              for (int64_t col = r == 0 ? 1 : 0; col < block; ++col) {
                value = value + s[(first + r * grid_width + col) * patch_stride];
              }
            }
          }
          ranked[c] = {order_key(value), c};
        }
        if (count < candidates) std::nth_element(ranked.begin(), ranked.begin() + count, ranked.end(), ranks_before);
        std::fill(chosen.begin(), chosen.end(), uint8_t(0));
        for (int64_t k = 0; k < count; ++k) chosen[ranked[k].second] = 1;
        int64_t* out = out_ptr + b * num_keep;
        int64_t written = 0;
        for (int64_t i = 0; i < length; ++i) {
          if (chosen[candidate_of(i)]) out[written++] = i;
        }
        TORCH_INTERNAL_ASSERT(written == num_keep);
      }
    });
  });
  return keep_index;
}

// Row r of batch b of a (B, rows, D) tensor whose last dimension is contiguous.
template <typename T>
struct Rows {
  T* data;
  int64_t batch_stride, row_stride;
  T* row(int64_t b, int64_t r) const { return data + b * batch_stride + r * row_stride; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1)};
}

// Invariants shared by the gather and its backward (`tokens` only by shape, dtype and device).
void assert_gather_args(const char* op, const at::Tensor& tokens, const at::Tensor& keep_index,
                        const std::optional<at::Tensor>& fuse_weights, int64_t num_prefix) {
  assert_token_keep_gather_args(op, tokens, keep_index, fuse_weights, num_prefix);
  const auto dtype = tokens.scalar_type();
  TORCH_INTERNAL_ASSERT(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                        op, ": tokens must be float64, float32, bfloat16 or float16, got ", dtype);
}

void check_patch_index(int64_t i, int64_t length, const char* op) {
  TORCH_CHECK(i >= 0 && i < length, op, ": keep_index value ", i, " out of range [0, ", length, ")");
}

// The plain row copies do without prefetch_row (clipfast/prefetch.h): memcpy streams a row fast enough that
// prefetching the next one measured no gain (interleaved runs, AVX2 machine: 0.97-1.58 ms without vs
// 1.03-1.59 ms with); the fused row's reduction over scattered dropped rows uses it.
// A dropped row's gradients: dst = w * g (cast to the tokens' dtype); returns grad_w = <x, g>.
template <typename T, typename Acc>
Acc dropped_row_backward(T* dst, const T* x, const Acc* g, Acc w, int64_t dim) {
  Acc dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < dim; ++d) {
    dst[d] = static_cast<T>(w * g[d]);
    dot += static_cast<Acc>(x[d]) * g[d];
  }
  return dot;
}

at::Tensor token_keep_gather_cpu(const at::Tensor& tokens_in, const at::Tensor& keep_index_in,
                                 const std::optional<at::Tensor>& fuse_weights_in, int64_t num_prefix) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* kOp = "token_keep_gather";
  assert_gather_args(kOp, tokens_in, keep_index_in, fuse_weights_in, num_prefix);
  const at::Tensor tokens = last_dim_contiguous(tokens_in.detach());
  const at::Tensor keep_index = keep_index_in.detach().contiguous();
  const bool fused = fuse_weights_in.has_value();
  const at::Tensor weights = fused ? fuse_weights_in->detach().contiguous() : at::Tensor();
  const int64_t batch = tokens.size(0), dim = tokens.size(2);
  const int64_t length = tokens.size(1) - num_prefix, num_keep = keep_index.size(1);
  const int64_t copied = num_prefix + num_keep;
  at::Tensor kept = at::empty({batch, copied + (fused ? 1 : 0), dim}, tokens.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tokens.scalar_type(), "token_keep_gather_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const int64_t row_bytes = std::max<int64_t>(1, dim * static_cast<int64_t>(sizeof(T)));
    const int64_t part_rows = std::max<int64_t>(1, kPartBytes / row_bytes);
    const int64_t copy_parts = (copied + part_rows - 1) / part_rows;
    const int64_t fuse_parts = fused ? (dim + kFuseColumns - 1) / kFuseColumns : 0;
    const int64_t parts = copy_parts + fuse_parts;
    const Rows<const T> src = rows_of<const T>(tokens);
    const Rows<T> dst = rows_of<T>(kept);
    const int64_t* index_ptr = keep_index.data_ptr<int64_t>();
    const Acc* weights_ptr = fused ? weights.data_ptr<Acc>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, kParallelBytes / kPartBytes);
    at::parallel_for(0, batch * parts, grain, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> is_kept(fused ? length : 0);
      std::vector<int64_t> dropped;
      std::vector<Acc> acc(fused ? std::min(dim, kFuseColumns) : 0);
      int64_t dropped_batch = -1;  // the batch row `dropped` lists
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / parts, part = task % parts;
        const int64_t* index = index_ptr + b * num_keep;
        auto source_row = [&](int64_t r) {
          if (r < num_prefix) return r;
          check_patch_index(index[r - num_prefix], length, kOp);
          return num_prefix + index[r - num_prefix];
        };
        if (part < copy_parts) {
          const int64_t r0 = part * part_rows, r1 = std::min(copied, r0 + part_rows);
          for (int64_t r = r0; r < r1; ++r) std::memcpy(dst.row(b, r), src.row(b, source_row(r)), dim * sizeof(T));
          continue;
        }
        if (dropped_batch != b) {
          std::fill(is_kept.begin(), is_kept.end(), uint8_t(0));
          for (int64_t j = 0; j < num_keep; ++j) {
            check_patch_index(index[j], length, kOp);
            is_kept[index[j]] = 1;
          }
          dropped.clear();
          for (int64_t i = 0; i < length; ++i) {
            if (!is_kept[i]) dropped.push_back(i);
          }
          dropped_batch = b;
        }
        const int64_t d0 = (part - copy_parts) * kFuseColumns, width = std::min(kFuseColumns, dim - d0);
        std::fill(acc.begin(), acc.begin() + width, Acc(0));
        const Acc* w = weights_ptr + b * length;
        for (size_t k = 0; k < dropped.size(); ++k) {
          if (k + 1 < dropped.size()) prefetch_row(src.row(b, num_prefix + dropped[k + 1]) + d0, width * sizeof(T));
          const Acc wi = w[dropped[k]];
          const T* x = src.row(b, num_prefix + dropped[k]) + d0;
          for (int64_t d = 0; d < width; ++d) acc[d] += wi * static_cast<Acc>(x[d]);
        }
        T* out = dst.row(b, copied) + d0;
        for (int64_t d = 0; d < width; ++d) out[d] = static_cast<T>(acc[d]);
      }
    });
  });
  return kept;
}

std::tuple<at::Tensor, at::Tensor> token_keep_gather_backward_cpu(const at::Tensor& grad_kept_in,
                                                                  const at::Tensor& tokens_in,
                                                                  const at::Tensor& keep_index_in,
                                                                  const std::optional<at::Tensor>& fuse_weights_in,
                                                                  int64_t num_prefix) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* kOp = "token_keep_gather_backward";
  assert_gather_args(kOp, tokens_in, keep_index_in, fuse_weights_in, num_prefix);
  const bool fused = fuse_weights_in.has_value();
  const int64_t batch = tokens_in.size(0), dim = tokens_in.size(2);
  const int64_t length = tokens_in.size(1) - num_prefix, num_keep = keep_index_in.size(1);
  const int64_t kept_rows = num_prefix + num_keep + (fused ? 1 : 0);
  assert_token_keep_grad(kOp, grad_kept_in, tokens_in, kept_rows);
  const at::Tensor grad_kept = last_dim_contiguous(grad_kept_in.detach());
  const at::Tensor keep_index = keep_index_in.detach().contiguous();
  // Only the fused gradient needs the tokens' values.
  const at::Tensor tokens = fused ? last_dim_contiguous(tokens_in.detach()) : at::Tensor();
  const at::Tensor weights = fused ? fuse_weights_in->detach().contiguous() : at::Tensor();
  const auto acc_dtype = compute_dtype(tokens_in.scalar_type());
  // Written once in full, and usually large (B x 197 x 768): huge pages spare it most of its page faults.
  at::Tensor grad_tokens = empty_huge_page_backed({batch, num_prefix + length, dim}, tokens_in.options());
  at::Tensor grad_weights = at::empty({batch, fused ? length : 0}, tokens_in.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tokens_in.scalar_type(), "token_keep_gather_backward_cpu",
                                  [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const int64_t row_bytes = std::max<int64_t>(1, dim * static_cast<int64_t>(sizeof(T)));
    const int64_t part_rows = std::max<int64_t>(1, kPartBytes / row_bytes);
    const int64_t rows = num_prefix + length;
    const int64_t parts = (rows + part_rows - 1) / part_rows;
    const Rows<const T> grad = rows_of<const T>(grad_kept);
    const Rows<T> out = rows_of<T>(grad_tokens);
    const Rows<const T> src = fused ? rows_of<const T>(tokens) : Rows<const T>{nullptr, 0, 0};
    const int64_t* index_ptr = keep_index.data_ptr<int64_t>();
    const Acc* weights_ptr = fused ? weights.data_ptr<Acc>() : nullptr;
    Acc* grad_weights_ptr = fused ? grad_weights.data_ptr<Acc>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, kParallelBytes / kPartBytes);
    at::parallel_for(0, batch * parts, grain, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> slot(length);  // slot[i] = j if keep_index[b, j] == i, else -1
      std::vector<Acc> grad_fused(fused ? dim : 0);
      int64_t slot_batch = -1;  // the batch row slot and grad_fused describe
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / parts, part = task % parts;
        const int64_t r0 = part * part_rows, r1 = std::min(rows, r0 + part_rows);
        if (r1 > num_prefix && slot_batch != b) {
          std::fill(slot.begin(), slot.end(), int64_t(-1));
          const int64_t* index = index_ptr + b * num_keep;
          for (int64_t j = 0; j < num_keep; ++j) {
            const int64_t i = index[j];
            check_patch_index(i, length, kOp);
            TORCH_CHECK(slot[i] < 0, kOp, ": keep_index holds patch ", i, " twice in batch row ", b);
            slot[i] = j;
          }
          if (fused) {
            const T* g = grad.row(b, num_prefix + num_keep);
            for (int64_t d = 0; d < dim; ++d) grad_fused[d] = static_cast<Acc>(g[d]);
          }
          slot_batch = b;
        }
        for (int64_t r = r0; r < r1; ++r) {
          T* dst = out.row(b, r);
          if (r < num_prefix) {
            std::memcpy(dst, grad.row(b, r), dim * sizeof(T));
            continue;
          }
          const int64_t i = r - num_prefix;
          if (fused && i + 1 < length && slot[i + 1] < 0) prefetch_row(src.row(b, r + 1), dim * sizeof(T));
          if (slot[i] >= 0) {
            std::memcpy(dst, grad.row(b, num_prefix + slot[i]), dim * sizeof(T));
            if (fused) grad_weights_ptr[b * length + i] = Acc(0);
          } else if (fused) {
            grad_weights_ptr[b * length + i] =
                dropped_row_backward(dst, src.row(b, r), grad_fused.data(), weights_ptr[b * length + i], dim);
          } else {
            std::memset(dst, 0, dim * sizeof(T));
          }
        }
      }
    });
  });
  return {grad_tokens, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CPU, m) {
  m.impl("token_keep_index", &token_keep_index_cpu);
  m.impl("token_keep_gather", &token_keep_gather_cpu);
  m.impl("token_keep_gather_backward", &token_keep_gather_backward_cpu);
}

}  // namespace clipfast
