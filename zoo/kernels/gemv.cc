// One-row matrix product y[1, N] = x[1, K] @ w[K, N] (float32, row-major) for XLA:CPU, as an
// XLA FFI handler. zoo.kernels.gemv compiles this file on first use and calls it from decode
// steps, where every weight product has a single row.
//
// Why: XLA:CPU emits its own single-threaded loop for a one-row product, which leaves the second
// core idle while a decode step streams every weight once. Here the rows of w are cut into one
// contiguous block per thread of XLA's intra-op pool; each block streams on its own core into
// its own partial sum, and the caller adds the partial sums up.
//
// Scheduling: the caller claims blocks from a shared counter like the helper tasks do, so the
// product finishes even when no pool thread is free to start a helper (a late helper finds
// nothing left and returns); the caller waits only for blocks some thread is already computing.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Matrix = ffi::Buffer<ffi::F32, 2>;
using MatrixOut = ffi::ResultBuffer<ffi::F32, 2>;

namespace {

constexpr int64_t kTile = 2048;  // output columns per tile: 8 KiB, kept in L1

// out[0:N] = x[k0:k1] @ w[k0:k1, 0:N], k1 - k0 a multiple of 8 except in the last block.
// Each pass over an output tile streams 16 (then 8, then 1) rows of w at once.
void Block(const float* __restrict x, const float* __restrict w, float* __restrict out,
           int64_t N, int64_t k0, int64_t k1) {
  std::fill(out, out + N, 0.0f);
  for (int64_t t0 = 0; t0 < N; t0 += kTile) {
    const int64_t width = std::min(N - t0, kTile);
    float* __restrict y = out + t0;
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      const float* __restrict a = w + k * N + t0;
      const float* xk = x + k;
      for (int64_t j = 0; j < width; ++j) {
        const float lo = xk[0] * a[j] + xk[1] * a[j + N] + xk[2] * a[j + 2 * N] +
                         xk[3] * a[j + 3 * N] + xk[4] * a[j + 4 * N] + xk[5] * a[j + 5 * N] +
                         xk[6] * a[j + 6 * N] + xk[7] * a[j + 7 * N];
        const float hi = xk[8] * a[j + 8 * N] + xk[9] * a[j + 9 * N] +
                         xk[10] * a[j + 10 * N] + xk[11] * a[j + 11 * N] +
                         xk[12] * a[j + 12 * N] + xk[13] * a[j + 13 * N] +
                         xk[14] * a[j + 14 * N] + xk[15] * a[j + 15 * N];
        y[j] += lo + hi;
      }
    }
    for (; k + 8 <= k1; k += 8) {
      const float* __restrict a = w + k * N + t0;
      const float* xk = x + k;
      for (int64_t j = 0; j < width; ++j) {
        y[j] += xk[0] * a[j] + xk[1] * a[j + N] + xk[2] * a[j + 2 * N] +
                xk[3] * a[j + 3 * N] + xk[4] * a[j + 4 * N] + xk[5] * a[j + 5 * N] +
                xk[6] * a[j + 6 * N] + xk[7] * a[j + 7 * N];
      }
    }
    for (; k < k1; ++k) {
      const float* __restrict a = w + k * N + t0;
      const float xk = x[k];
      for (int64_t j = 0; j < width; ++j) y[j] += xk * a[j];
    }
  }
}

struct Product {
  const float* x;
  const float* w;
  float* y;         // block 0's output
  float* partials;  // blocks 1.. write here, N floats each
  int64_t N, K, rows_per_block, blocks;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    for (;;) {
      const int64_t b = next.fetch_add(1, std::memory_order_relaxed);
      if (b >= blocks) return;
      const int64_t k0 = b * rows_per_block, k1 = std::min(K, k0 + rows_per_block);
      Block(x, w, b == 0 ? y : partials + (b - 1) * N, N, k0, k1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// The caller's scratch for partial sums; helpers write into it only while the caller waits.
thread_local std::vector<float> scratch;

ffi::Error RowMatmul(ffi::ThreadPool pool, Matrix x, Matrix w, MatrixOut y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd[0] != 1 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("zoo_row_matmul: expected x [1, K] and w [K, N]");
  }
  const int64_t K = wd[0], N = wd[1];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto p = std::make_shared<Product>();
  p->x = x.typed_data();
  p->w = w.typed_data();
  p->y = y->typed_data();
  p->N = N;
  p->K = K;
  const int64_t rows = (K + threads - 1) / threads;
  p->rows_per_block = std::max<int64_t>(8, (rows + 7) / 8 * 8);
  p->blocks = K == 0 ? 0 : (K + p->rows_per_block - 1) / p->rows_per_block;
  if (p->blocks == 0) {
    std::fill(p->y, p->y + N, 0.0f);
    return ffi::Error::Success();
  }
  const size_t need = static_cast<size_t>((p->blocks - 1) * N);
  if (scratch.size() < need) scratch.resize(need);
  p->partials = scratch.data();

  for (int64_t i = 1; i < p->blocks; ++i) pool.Schedule([p] { p->Work(); });
  p->Work();
  for (int64_t spins = 0; p->done.load(std::memory_order_acquire) < p->blocks; ++spins) {
    if (spins > 4096) std::this_thread::yield();
  }
  float* __restrict out = p->y;
  for (int64_t b = 1; b < p->blocks; ++b) {
    const float* __restrict part = p->partials + (b - 1) * N;
    for (int64_t j = 0; j < N; ++j) out[j] += part[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooRowMatmul, RowMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>());
