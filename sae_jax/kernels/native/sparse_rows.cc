// Row gathers, scatters and row reductions of the TopK SAE for XLA:CPU, as XLA FFI handlers
// (sae_jax/native/__init__.py builds and registers them; sae_jax/rows.py calls them where the kernel plan says (CPU devices)).
//
// XLA:CPU runs a gather or scatter as a scalar loop over its elements, and materialises the
// gathered rows before a fused product. Here each row is one vectorised pass, the weight
// gradients are accumulated per target row (a counting sort by latent, so every output row is
// written once, without atomics or a zero fill), and the work is split over XLA's intra-op
// thread pool. Every output element is summed by one task, in pick order, so results repeat
// exactly from run to run (resumed training stays bit-identical). The one exception to "one
// task" is RowGrads' table_sum, added in per-task parts: its last bits can differ between hosts
// with different thread counts.
//
// Shapes: picks are [B, K] (weights float32, indices int32 into the n rows of a table), rows
// are [B, d] float32, tables [n, d] float32 or bfloat16. Picks whose index is outside [0, n)
// are skipped; the callers never produce them.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Matrix = ffi::Buffer<ffi::F32, 2>;
using IndexMatrix = ffi::Buffer<ffi::S32, 2>;
using Vector = ffi::Buffer<ffi::F32, 1>;

namespace {

// Runs task(t) for t in [0, num_tasks) on the calling thread and up to num_threads() pool
// workers; each task runs once. The caller only waits for tasks already started by a worker, so
// it cannot deadlock on a busy pool; workers that start after the last task is taken return
// without touching `task`.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t num_tasks, const F& task) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, num_tasks, &task] {
    for (int64_t t; (t = progress->next.fetch_add(1)) < num_tasks;) {
      task(t);
      progress->finished.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), num_tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (progress->finished.load(std::memory_order_acquire) < num_tasks) {
    std::this_thread::yield();
  }
}

int64_t NumTasks(ffi::ThreadPool& pool) { return 8 * std::max<int64_t>(1, pool.num_threads()); }

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename T>
inline void AddScaled(float* __restrict out, const T* __restrict row, float w, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) out[c] += w * ToFloat(row[c]);
}

// out += sum of w[r] * rows[r] over `count` rows. Four rows per pass: their cache misses overlap
// (the rows are scattered, so the hardware prefetcher cannot predict them) and `out` is read and
// written once per four rows.
template <typename T>
inline void AddScaledRows(float* __restrict out, const T* const* rows, const float* w,
                          int64_t count, int64_t d) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const T* __restrict r0 = rows[r];
    const T* __restrict r1 = rows[r + 1];
    const T* __restrict r2 = rows[r + 2];
    const T* __restrict r3 = rows[r + 3];
    float w0 = w[r], w1 = w[r + 1], w2 = w[r + 2], w3 = w[r + 3];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) {
      out[c] += w0 * ToFloat(r0[c]) + w1 * ToFloat(r1[c]) + w2 * ToFloat(r2[c]) +
                w3 * ToFloat(r3[c]);
    }
  }
  for (; r < count; ++r) AddScaled(out, rows[r], w[r], d);
}

// grad_row += sum of w[r] * rows[r] over `count` rows and, with a table row, dots[r] =
// rows[r] . table_row, in one read of each row, four rows per pass as in AddScaledRows.
template <typename T, bool kDots>
inline void AccumulateRows(float* __restrict grad_row, const T* __restrict table_row,
                           const float* const* rows, const float* w, int64_t count, int64_t d,
                           float* dots) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const float* __restrict r0 = rows[r];
    const float* __restrict r1 = rows[r + 1];
    const float* __restrict r2 = rows[r + 2];
    const float* __restrict r3 = rows[r + 3];
    float w0 = w[r], w1 = w[r + 1], w2 = w[r + 2], w3 = w[r + 3];
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t c = 0; c < d; ++c) {
      grad_row[c] += w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c];
      if constexpr (kDots) {
        float v = ToFloat(table_row[c]);
        s0 += r0[c] * v;
        s1 += r1[c] * v;
        s2 += r2[c] * v;
        s3 += r3[c] * v;
      }
    }
    if constexpr (kDots) dots[r] = s0, dots[r + 1] = s1, dots[r + 2] = s2, dots[r + 3] = s3;
  }
  for (; r < count; ++r) {
    const float* __restrict row = rows[r];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < d; ++c) {
      grad_row[c] += w[r] * row[c];
      if constexpr (kDots) sum += row[c] * ToFloat(table_row[c]);
    }
    if constexpr (kDots) dots[r] = sum;
  }
}

// out[b] = sum_j weights[b, j] * table[indices[b, j]].
template <typename T>
void GatherWeightedSum(ffi::ThreadPool& pool, const float* weights, const int32_t* indices,
                       const T* table, int64_t batch, int64_t picks, int64_t num_rows, int64_t d,
                       float* out) {
  int64_t num_tasks = std::min(batch, NumTasks(pool));
  ParallelFor(pool, num_tasks, [&](int64_t t) {
    std::vector<const T*> rows(picks);
    std::vector<float> w(picks);
    for (int64_t b = batch * t / num_tasks; b < batch * (t + 1) / num_tasks; ++b) {
      int64_t count = 0;
      for (int64_t p = b * picks; p < (b + 1) * picks; ++p) {
        int32_t i = indices[p];
        if (weights[p] == 0.0f || i < 0 || i >= num_rows) continue;
        rows[count] = table + i * d;
        w[count++] = weights[p];
      }
      float* out_b = out + b * d;
      std::fill(out_b, out_b + d, 0.0f);
      AddScaledRows(out_b, rows.data(), w.data(), count, d);
    }
  });
}

// The picks grouped by target row: picks of row i are order[start[i] .. start[i + 1]), in
// increasing pick order (a stable counting sort).
struct PicksByRow {
  std::vector<int64_t> start;
  std::vector<int32_t> order;

  PicksByRow(const int32_t* indices, int64_t num_picks, int64_t num_rows)
      : start(num_rows + 1, 0), order(num_picks) {
    for (int64_t p = 0; p < num_picks; ++p) {
      int32_t i = indices[p];
      if (i >= 0 && i < num_rows) ++start[i + 1];
    }
    for (int64_t i = 0; i < num_rows; ++i) start[i + 1] += start[i];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < num_picks; ++p) {
      int32_t i = indices[p];
      if (i >= 0 && i < num_rows) order[fill[i]++] = static_cast<int32_t>(p);
    }
  }

  // First row of task t of num_tasks, splitting rows so that tasks get similar pick counts
  // (plus one pick's worth per row, for the rows' own reads and writes).
  int64_t TaskStart(int64_t t, int64_t num_tasks) const {
    int64_t num_rows = static_cast<int64_t>(start.size()) - 1;
    int64_t total = start.back() + num_rows;
    int64_t target = total * t / num_tasks;
    int64_t lo = 0, hi = num_rows;
    while (lo < hi) {  // the first row i with start[i] + i >= target
      int64_t mid = (lo + hi) / 2;
      if (start[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
};

// grad[i] = sum over picks p with indices[p] == i of weights[p] * rows[p / K], and
// grad_sums[i] = sum of those weights. With a table, also dots[p] = rows[p / K] . table[i]
// (the decoder's value gradient, read while row i of the table is in cache). With a sum_table,
// also table_sum = sum_i grad_sums[i] * sum_table[i] (the encoder's b_dec gradient, which read
// W_enc once more in XLA, late enough that XLA copied W_enc to update it in place).
template <typename T>
void RowGrads(ffi::ThreadPool& pool, const int32_t* indices, const float* weights,
              const float* rows, int64_t batch, int64_t picks, int64_t num_rows, int64_t d,
              const T* table, float* grad, float* grad_sums, float* dots,
              const float* sum_table = nullptr, float* table_sum = nullptr) {
  PicksByRow by_row(indices, batch * picks, num_rows);
  if (dots != nullptr) std::fill(dots, dots + batch * picks, 0.0f);
  int64_t num_tasks = std::min(num_rows, NumTasks(pool));
  // Per-task partial sums, added in task order: the result does not depend on the threads.
  std::vector<float> partial_sums(sum_table != nullptr ? num_tasks * d : 0, 0.0f);
  ParallelFor(pool, num_tasks, [&](int64_t t) {
    std::vector<const float*> picked;
    std::vector<float> w, row_dots;
    int64_t end = by_row.TaskStart(t + 1, num_tasks);
    for (int64_t i = by_row.TaskStart(t, num_tasks); i < end; ++i) {
      const int32_t* order = by_row.order.data() + by_row.start[i];
      int64_t count = by_row.start[i + 1] - by_row.start[i];
      picked.resize(count), w.resize(count), row_dots.resize(count);
      float sum = 0.0f;
      for (int64_t s = 0; s < count; ++s) {
        picked[s] = rows + (order[s] / picks) * d;
        w[s] = weights[order[s]];
        sum += w[s];
      }
      grad_sums[i] = sum;
      if (sum_table != nullptr) {
        AddScaled(partial_sums.data() + t * d, sum_table + i * d, sum, d);
      }
      float* grad_i = grad + i * d;
      std::fill(grad_i, grad_i + d, 0.0f);
      if (dots == nullptr) {
        AccumulateRows<T, false>(grad_i, nullptr, picked.data(), w.data(), count, d, nullptr);
        continue;
      }
      AccumulateRows<T, true>(grad_i, table + i * d, picked.data(), w.data(), count, d,
                              row_dots.data());
      for (int64_t s = 0; s < count; ++s) dots[order[s]] = row_dots[s];
    }
  });
  if (sum_table != nullptr) {
    std::fill(table_sum, table_sum + d, 0.0f);
    for (int64_t t = 0; t < num_tasks; ++t) {
      AddScaled(table_sum, partial_sums.data() + t * d, 1.0f, d);
    }
  }
}

// out[i] = w[i] / max(|w[i]|, eps): each row is read twice while it is in cache.
void NormalizeRows(ffi::ThreadPool& pool, const float* w, int64_t num_rows, int64_t d, float eps,
                   float* out) {
  int64_t num_tasks = std::min(num_rows, NumTasks(pool));
  ParallelFor(pool, num_tasks, [&](int64_t t) {
    for (int64_t i = num_rows * t / num_tasks; i < num_rows * (t + 1) / num_tasks; ++i) {
      const float* __restrict row = w + i * d;
      float* __restrict out_row = out + i * d;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < d; ++c) sum += row[c] * row[c];
      float scale = 1.0f / std::max(std::sqrt(sum), eps);
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) out_row[c] = row[c] * scale;
    }
  });
}

// out[i] = a[i] . b[i].
void RowDots(ffi::ThreadPool& pool, const float* a, const float* b, int64_t num_rows, int64_t d,
             float* out) {
  int64_t num_tasks = std::min(num_rows, NumTasks(pool));
  ParallelFor(pool, num_tasks, [&](int64_t t) {
    for (int64_t i = num_rows * t / num_tasks; i < num_rows * (t + 1) / num_tasks; ++i) {
      const float* __restrict a_row = a + i * d;
      const float* __restrict b_row = b + i * d;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < d; ++c) sum += a_row[c] * b_row[c];
      out[i] = sum;
    }
  });
}

bool IsTable(ffi::AnyBuffer table) {
  return table.element_type() == ffi::DataType::F32 || table.element_type() == ffi::DataType::BF16;
}

ffi::Error GatherWeightedSumImpl(ffi::ThreadPool pool, Matrix weights,
                                 IndexMatrix indices, ffi::AnyBuffer table,
                                 ffi::ResultBuffer<ffi::F32, 2> out) {
  int64_t batch = weights.dimensions()[0], picks = weights.dimensions()[1];
  auto table_dims = table.dimensions();
  if (table_dims.size() != 2 || !IsTable(table)) {
    return ffi::Error::InvalidArgument("table must be a float32 or bfloat16 matrix");
  }
  int64_t num_rows = table_dims[0], d = table_dims[1];
  if (table.element_type() == ffi::DataType::F32) {
    GatherWeightedSum(pool, weights.typed_data(), indices.typed_data(),
                      static_cast<const float*>(table.untyped_data()), batch, picks, num_rows, d,
                      out->typed_data());
  } else {
    GatherWeightedSum(pool, weights.typed_data(), indices.typed_data(),
                      static_cast<const uint16_t*>(table.untyped_data()), batch, picks, num_rows,
                      d, out->typed_data());
  }
  return ffi::Error::Success();
}

// sum_table is [n, d], or [0, d] when table_sum is not wanted (it is then zeros).
ffi::Error RowGradsImpl(ffi::ThreadPool pool, IndexMatrix indices, Matrix weights, Matrix rows,
                        Matrix sum_table, ffi::ResultBuffer<ffi::F32, 2> grad,
                        ffi::ResultBuffer<ffi::F32, 1> grad_sums,
                        ffi::ResultBuffer<ffi::F32, 1> table_sum) {
  int64_t batch = indices.dimensions()[0], picks = indices.dimensions()[1];
  int64_t num_rows = grad->dimensions()[0], d = grad->dimensions()[1];
  bool with_sum = sum_table.dimensions()[0] != 0;
  if (with_sum && (sum_table.dimensions()[0] != num_rows || sum_table.dimensions()[1] != d)) {
    return ffi::Error::InvalidArgument("sum_table must be [n, d] or [0, d]");
  }
  std::fill(table_sum->typed_data(), table_sum->typed_data() + d, 0.0f);
  RowGrads<float>(pool, indices.typed_data(), weights.typed_data(), rows.typed_data(), batch,
                  picks, num_rows, d, nullptr, grad->typed_data(), grad_sums->typed_data(),
                  nullptr, with_sum ? sum_table.typed_data() : nullptr, table_sum->typed_data());
  return ffi::Error::Success();
}

ffi::Error RowGradsAndDotsImpl(ffi::ThreadPool pool, IndexMatrix indices,
                               Matrix weights, Matrix rows,
                               ffi::AnyBuffer table, ffi::ResultBuffer<ffi::F32, 2> grad,
                               ffi::ResultBuffer<ffi::F32, 1> grad_sums,
                               ffi::ResultBuffer<ffi::F32, 2> dots) {
  int64_t batch = indices.dimensions()[0], picks = indices.dimensions()[1];
  int64_t num_rows = grad->dimensions()[0], d = grad->dimensions()[1];
  if (table.dimensions().size() != 2 || !IsTable(table) || table.dimensions()[0] != num_rows ||
      table.dimensions()[1] != d) {
    return ffi::Error::InvalidArgument("table must be a float32 or bfloat16 [n, d] matrix");
  }
  if (table.element_type() == ffi::DataType::F32) {
    RowGrads(pool, indices.typed_data(), weights.typed_data(), rows.typed_data(), batch, picks,
             num_rows, d, static_cast<const float*>(table.untyped_data()), grad->typed_data(),
             grad_sums->typed_data(), dots->typed_data());
  } else {
    RowGrads(pool, indices.typed_data(), weights.typed_data(), rows.typed_data(), batch, picks,
             num_rows, d, static_cast<const uint16_t*>(table.untyped_data()),
             grad->typed_data(), grad_sums->typed_data(), dots->typed_data());
  }
  return ffi::Error::Success();
}

ffi::Error NormalizeRowsImpl(ffi::ThreadPool pool, Matrix w, float eps,
                             ffi::ResultBuffer<ffi::F32, 2> out) {
  NormalizeRows(pool, w.typed_data(), w.dimensions()[0], w.dimensions()[1], eps,
                out->typed_data());
  return ffi::Error::Success();
}

ffi::Error RowDotsImpl(ffi::ThreadPool pool, Matrix a, Matrix b,
                       ffi::ResultBuffer<ffi::F32, 1> out) {
  if (a.dimensions()[0] != b.dimensions()[0] || a.dimensions()[1] != b.dimensions()[1]) {
    return ffi::Error::InvalidArgument("row_dots needs two matrices of one shape");
  }
  RowDots(pool, a.typed_data(), b.typed_data(), a.dimensions()[0], a.dimensions()[1],
          out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeGatherWeightedSum, GatherWeightedSumImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<IndexMatrix>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeRowGrads, RowGradsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<IndexMatrix>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Ret<Vector>()
                                  .Ret<Vector>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeRowGradsAndDots, RowGradsAndDotsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<IndexMatrix>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<Matrix>()
                                  .Ret<Vector>()
                                  .Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeNormalizeRows, NormalizeRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Attr<float>("eps")
                                  .Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeRowDots, RowDotsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Vector>());
