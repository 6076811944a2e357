// CPU kernels for the products of small channel-group matrices with long feature rows.
//
// The CE block multiplies many small (g x g, g = 16 by default) matrices with (g x M) slices of
// an NCHW feature map, M = H*W. BLAS libraries tune for large square products and reach a
// fraction of the machine's speed at these shapes (K = 16); these loops keep a tile of the
// output in vector registers and stream the feature rows once. Vectors are GCC vector
// extensions as wide as the target's registers (CENET_VEC_BYTES: 64 bytes with AVX-512, 32
// with AVX2, 16 with SSE2 or NEON), so the code compiles for any -march.
//
// X (B,g,M) holds B = N*G blocks of g feature rows: batch b is group b mod G of sample b / G.
//   group_apply(W (G,g,g), X, diag (B,g) or empty, bias (B,g) or empty, transpose, out):
//       out_b = (W_{b mod G}[^T] + Diag(diag_b)) X_b + bias_b                      (B,g,M)
//   group_apply_pair(W1, X1, d1, W2, X2, d2, bias, out):
//       out_b = (W1^T + Diag(d1_b)) X1_b + (W2 + Diag(d2_b)) X2_b + bias_b  (one pass)
//   group_gram(X, Y, G, with_diag, symmetric, with_sums) -> (sum_{b mod G = j} X_b Y_b^T
//       (G,g,g), per-batch diagonals (B,g) or empty, per-batch row sums (B,g) or empty);
//       symmetric: X is Y, half the tiles; row sums only then (the moments in one pass)
//   ce_eval(X (N,C,M), W (G,g,g) or empty, fc1 (Hd,C), ln_w, ln_b, ln_eps, fc2 (C,Hd),
//       scale (1), g, out): the eval-mode CE block, out_n = (W + Diag(d_n)) X_n with the IR
//       weights d_n computed from X_n on the way (variances, the gate of ir_gate in
//       cenet_kernels.h), a few samples per task
//   ce_eval_nhwc(X (N,M,C), ... as ce_eval): the same on a channels-last map, no layout copy
//       (g = 16, 32 or 64)
//   linear_rows(A (S,K), W (R,K), out (S,R)): out = A W^T, the gate's layers (dot products)
//
// Products whose output is half the last-level cache or more (at least 12 MiB) write it with
// non-temporal stores (staged; stream_threshold(bytes) -> previous value reads or sets the
// threshold).
//
// C++ functions of namespace CENET_NS (cenet_kernels.h), called by ce_step.cpp, which registers
// the public ops (CPU, float32 and float64, contiguous inputs).

#include "cenet_kernels.h"

#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <tuple>
#include <vector>

namespace CENET_NS {
namespace {

constexpr int kVecBytes = CENET_VEC_BYTES;

// Register tiles per instruction set: AVX-512 and aarch64 have 32 vector registers, AVX2 and
// SSE2 16. The product tile (matmul_tile) keeps 2 x kApplyRows accumulators: with 16
// registers, 8 rows (16 accumulators, 2 rows of X and a broadcast) spill, and 4 rows made the
// AVX2 eval block 1.2-1.3x faster (2.98 -> 2.34 ms at (32,1024,14,14), 12.2 -> 9.4 ms at
// (32,256,56,56), 2 threads of an AVX-512 Xeon) and its training step 5-15 %. The gram tile
// (gram_tile) keeps kGramTile^2 accumulators and 2 x kGramTile rows: 4 x 4 spills on AVX2 too,
// but 2 x 2 (twice the loads per product) measured 3-15 % slower there, so 4 everywhere.
// (CENET_APPLY_ROWS, CENET_GRAM_TILE override them, for experiments.)
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif
#ifndef CENET_APPLY_ROWS
#define CENET_APPLY_ROWS (kVecRegs >= 32 ? 8 : 4)
#endif
#ifndef CENET_GRAM_TILE
#define CENET_GRAM_TILE 4
#endif
constexpr int kApplyRows = CENET_APPLY_ROWS;
constexpr int kGramTile = CENET_GRAM_TILE;

template <typename T>
struct Vec {
  static constexpr int kLanes = kVecBytes / sizeof(T);
  typedef T type __attribute__((vector_size(kVecBytes)));
  // Same-size integer lanes, for bit masks (casts between same-size vectors reinterpret).
  typedef std::conditional_t<sizeof(T) == 8, int64_t, int32_t> lane_int;
  typedef lane_int mask __attribute__((vector_size(kVecBytes)));
};

// All-ones in the last n lanes, zeros before: masks the lanes of an overlapping last window.
template <typename T>
inline typename Vec<T>::mask last_lanes(int64_t n) {
  typename Vec<T>::mask mk = {};
  for (int i = 0; i < Vec<T>::kLanes; ++i) mk[i] = i >= Vec<T>::kLanes - n ? -1 : 0;
  return mk;
}

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// The first n < kLanes elements, the other lanes 0.
template <typename T>
inline typename Vec<T>::type load_partial(const T* p, int64_t n) {
  typename Vec<T>::type v = {};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
}

template <typename T>
inline void store_partial(T* p, typename Vec<T>::type v, int64_t n) {
  std::memcpy(p, &v, n * sizeof(T));
}

template <typename T>
inline typename Vec<T>::type splat(T s) {
  return typename Vec<T>::type{} + s;
}


// Where element (r, p) of a product's output goes: base[r * ld + p - col0]. Straight into the
// block of out (ld = M, col0 = 0), or into a staging buffer that holds columns [col0, col0 + ld)
// of each row (see staged).
template <typename T>
struct Out {
  T* base;
  int64_t ld, col0;
  T* at(int64_t r, int64_t p) const { return base + r * ld + (p - col0); }
};

// The K rows of the right-hand side of a product, each of m elements: rows [0, split) from x,
// rows [split, K) from x2 (two feature maps multiplied at once: out = A1 X1 + A2 X2; one map:
// x2 = x, split = K).
template <typename T>
struct Rows {
  const T* x;
  const T* x2;
  int64_t split, m;
  const T* row(int64_t k) const { return k < split ? x + k * m : x2 + (k - split) * m; }
};

// out[r0:r0+RT, p0:p0+2L] of one batch: RT rows of A (leading dimension K) times the K x 2L
// tile of the rows. KC > 0 fixes K = KC, and the split of the rows at KS, at compile time (the
// loop unrolled, the accumulators never leave the registers).
template <typename T, int RT, int KC = 0, int KS = KC, bool ACC = false>
inline void matmul_tile(const T* a, const Rows<T>& src, const T* bias, const Out<T>& out, int64_t r0,
                        int64_t k_runtime, int64_t p0) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  const int64_t k_dim = KC > 0 ? KC : k_runtime, m = src.m;
  const T* x = src.x + p0;
  const T* x2 = src.x2 + p0;
  V acc0[RT], acc1[RT];
  for (int r = 0; r < RT; ++r) acc0[r] = acc1[r] = V{};
  auto step = [&](int64_t k) {
    const T* row = KC > 0 ? (k < KS ? x + k * m : x2 + (k - KS) * m) : src.row(k) + p0;
    const V x0 = load<T>(row);
    const V x1 = load<T>(row + L);
    for (int r = 0; r < RT; ++r) {
      const T s = a[(r0 + r) * k_dim + k];
      acc0[r] += s * x0;
      acc1[r] += s * x1;
    }
  };
  if constexpr (KC > 0) {
#pragma GCC unroll 32
    for (int k = 0; k < KC; ++k) step(k);
  } else {
    for (int64_t k = 0; k < k_dim; ++k) step(k);
  }
  for (int r = 0; r < RT; ++r) {
    // (the bias added last: a conditional start value makes GCC keep the tile in memory)
    V b0 = splat<T>(bias ? bias[r0 + r] : T(0)), b1 = b0;
    T* o = out.at(r0 + r, p0);
    if constexpr (ACC) {
      b0 += load<T>(o);
      b1 += load<T>(o + L);
    }
    store<T>(o, acc0[r] + b0);
    store<T>(o + L, acc1[r] + b1);
  }
}

// out[r0:r0+RT, p0:p0+n] for n < kLanes tail positions, through zero-padded vectors.
template <typename T, int RT, bool ACC>
inline void matmul_tail(const T* a, const Rows<T>& src, const T* bias, const Out<T>& out, int64_t r0,
                        int64_t k_dim, int64_t p0, int64_t n) {
  using V = typename Vec<T>::type;
  V acc[RT];
  for (int r = 0; r < RT; ++r) {
    acc[r] = splat<T>(bias ? bias[r0 + r] : T(0));
    if constexpr (ACC) {
      const T* o = out.at(r0 + r, p0);
      acc[r] += n == Vec<T>::kLanes ? load<T>(o) : load_partial<T>(o, n);
    }
  }
  for (int64_t k = 0; k < k_dim; ++k) {
    const T* row = src.row(k) + p0;
    const V xv = n == Vec<T>::kLanes ? load<T>(row) : load_partial<T>(row, n);
    for (int r = 0; r < RT; ++r) acc[r] += a[(r0 + r) * k_dim + k] * xv;
  }
  for (int r = 0; r < RT; ++r) {
    if (n == Vec<T>::kLanes) {
      store<T>(out.at(r0 + r, p0), acc[r]);
    } else {
      store_partial<T>(out.at(r0 + r, p0), acc[r], n);
    }
  }
}

// out[:, p_begin:p_end] = A (r_dim x k_dim) times the rows, plus bias, for one batch.
// ACC: add to out rather than overwrite it.
template <typename T, bool ACC = false>
void matmul_range(const T* a, const Rows<T>& src, const T* bias, const Out<T>& out, int64_t r_dim,
                  int64_t k_dim, int64_t p_begin, int64_t p_end) {
  constexpr int L = Vec<T>::kLanes;
  const int64_t steps = (p_end - p_begin) / (2 * L);
  int64_t p = p_begin;
  for (int64_t s = 0; s < steps; ++s, p += 2 * L) {
    constexpr int R = kApplyRows;
    if (r_dim == 16 && k_dim == 16 && src.split == 16) {  // the default group size, unrolled
      for (int r = 0; r < 16; r += R) matmul_tile<T, R, 16, 16, ACC>(a, src, bias, out, r, k_dim, p);
      continue;
    }
    if (r_dim == 16 && k_dim == 32 && src.split == 16) {  // the same, paired
      for (int r = 0; r < 16; r += R) matmul_tile<T, R, 32, 16, ACC>(a, src, bias, out, r, k_dim, p);
      continue;
    }
    int64_t r = 0;
    for (; r + R <= r_dim; r += R) matmul_tile<T, R, 0, 0, ACC>(a, src, bias, out, r, k_dim, p);
    for (; r < r_dim; ++r) matmul_tile<T, 1, 0, 0, ACC>(a, src, bias, out, r, k_dim, p);
  }
  auto columns = [&](int64_t q, int64_t n) {  // every row, n <= L columns from q
    int64_t r = 0;
    for (; r + kApplyRows <= r_dim; r += kApplyRows)
      matmul_tail<T, kApplyRows, ACC>(a, src, bias, out, r, k_dim, q, n);
    for (; r < r_dim; ++r) matmul_tail<T, 1, ACC>(a, src, bias, out, r, k_dim, q, n);
  };
  if (p + L <= p_end) {  // one more full vector
    columns(p, L);
    p += L;
  }
  if (p < p_end && p_end - p_begin >= L && !ACC) {
    // The last vector window of this range again, overlapping columns already done: they
    // get the same values, written by this thread only, and no partial loads are needed.
    columns(p_end - L, L);
  } else if (p < p_end) {  // a range shorter than a vector: zero-padded partial vectors
    columns(p, p_end - p);
  }
}

// Positions per task: long enough to amortize the tile set-up, short enough to split a sample.
constexpr int64_t kChunk = 512;
constexpr int64_t kMaxGroup = 64;

// Outputs of at least stream_bytes are written with non-temporal stores (see staged): they
// do not fit the caches next to their inputs anyway, and ordinary stores would read every line
// before writing it and evict the lines the next tasks read. Smaller outputs stay in cache
// for the layer that reads them next. The threshold is half the last-level cache that
// sysconf reports, at least 12 MiB (12 MiB where it reports none): on a 2-vCPU VM whose share
// of a small L3 holds 8-16 MiB, streaming outputs of 12 MiB and more made the eval block
// 1.2x faster at (32,1024,14,14); on one that reports a 480 MiB L3, the same outputs written
// through the cache made BN+CE+ReLU there 1.2x faster (4.8 vs 5.8 ms) and ResNet-50's eval
// 2-5 % faster.
constexpr int64_t kMinStreamBytes = int64_t(12) << 20;

int64_t default_stream_bytes() {
  long llc = 0;  // the largest cache level sysconf knows of (glibc; 0 where it reports none)
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL4_CACHE_SIZE)
  llc = std::max({sysconf(_SC_LEVEL2_CACHE_SIZE), sysconf(_SC_LEVEL3_CACHE_SIZE),
                  sysconf(_SC_LEVEL4_CACHE_SIZE)});
#endif
  return std::max<int64_t>(kMinStreamBytes, int64_t(std::max(llc, 0L)) / 2);
}

std::atomic<int64_t> g_stream_bytes{default_stream_bytes()};

inline bool stream_output(int64_t bytes) {
  return bytes >= g_stream_bytes.load(std::memory_order_relaxed);
}

// One vector to p (aligned to the vector's size) with a non-temporal store where the target
// has one: the line is written without being read into the caches. Elsewhere an ordinary store.
template <typename T>
inline void stream_store(T* p, typename Vec<T>::type v) {
#if defined(__has_builtin) && !defined(__x86_64__) && !defined(__i386__)
#if __has_builtin(__builtin_nontemporal_store)
#define CENET_HAVE_NT_STORE 1
  __builtin_nontemporal_store(v, reinterpret_cast<typename Vec<T>::type*>(p));  // clang
  return;
#endif
#endif
#if !defined(CENET_HAVE_NT_STORE)
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    _mm512_stream_ps(reinterpret_cast<float*>(p), (__m512)v);
  } else {
    _mm512_stream_pd(reinterpret_cast<double*>(p), (__m512d)v);
  }
#elif defined(__AVX__)
  if constexpr (sizeof(T) == 4) {
    _mm256_stream_ps(reinterpret_cast<float*>(p), (__m256)v);
  } else {
    _mm256_stream_pd(reinterpret_cast<double*>(p), (__m256d)v);
  }
#elif defined(__SSE2__)
  if constexpr (sizeof(T) == 4) {
    _mm_stream_ps(reinterpret_cast<float*>(p), (__m128)v);
  } else {
    _mm_stream_pd(reinterpret_cast<double*>(p), (__m128d)v);
  }
#else
  store<T>(p, v);
#endif
#endif
}

// dst[0:n] = src[0:n], the whole 64-byte lines of dst with non-temporal stores (no read of the
// line, no cache pollution), the partial lines at either end with ordinary stores.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  constexpr int L = Vec<T>::kLanes;
  int64_t i = 0;
  const int64_t head = ((64 - int64_t(reinterpret_cast<uintptr_t>(dst) % 64)) % 64) / sizeof(T);
  if (reinterpret_cast<uintptr_t>(dst) % sizeof(T) != 0 || head >= n) {
    std::memcpy(dst, src, n * sizeof(T));
    return;
  }
  std::memcpy(dst, src, head * sizeof(T));
  for (i = head; i + L <= n; i += L) stream_store<T>(dst + i, load<T>(src + i));
  std::memcpy(dst + i, src + i, (n - i) * sizeof(T));
}

// Orders a thread's non-temporal stores before whatever it does next (the end of a parallel
// region, after which other threads read the output).
inline void stream_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

// Computes rows x [p0, p1) of a block whose rows start M elements apart at out, through
// compute(Out, q0, q1) for column ranges [q0, q1). With stream, each range is computed into
// a buffer that stays in L1 and then written to out with non-temporal stores (whole rows at
// once when they fit: the block is one contiguous region).
template <typename T, typename F>
inline void staged(T* out, int64_t rows, int64_t m, int64_t p0, int64_t p1, bool stream,
                   F&& compute) {
  if (!stream) {
    compute(Out<T>{out, m, 0}, p0, p1);
    return;
  }
  constexpr int64_t kStage = 32768 / sizeof(T);
  alignas(64) T buf[kStage];
  if (p0 == 0 && p1 == m && rows * m <= kStage) {
    compute(Out<T>{buf, m, 0}, 0, m);
    stream_copy<T>(out, buf, rows * m);
    return;
  }
  constexpr int64_t step = 2 * Vec<T>::kLanes;
  const int64_t width = std::max<int64_t>(step, kStage / rows / step * step);
  for (int64_t q = p0; q < p1; q += width) {
    const int64_t q1 = std::min(p1, q + width);
    compute(Out<T>{buf, width, q}, q, q1);
    for (int64_t r = 0; r < rows; ++r) stream_copy<T>(out + r * m + q, buf + r * width, q1 - q);
  }
}

// a (g rows, leading dimension lda) = W[^T] + Diag(d) for one group; W or d null: zeros.
template <typename T>
inline void build_group_matrix(T* a, int64_t lda, const T* w, bool transpose, const T* d,
                               int64_t g) {
  for (int64_t r = 0; r < g; ++r)
    for (int64_t k = 0; k < g; ++k)
      a[r * lda + k] = w ? (transpose ? w[k * g + r] : w[r * g + k]) : T(0);
  if (d)
    for (int64_t r = 0; r < g; ++r) a[r * lda + r] += d[r];
}

void check_group_args(const at::Tensor& w, const at::Tensor& x, const char* name) {
  TORCH_CHECK(w.dim() == 3 && x.dim() == 3 && w.size(1) == w.size(2) && w.size(1) == x.size(1),
              name, ": expected W (G,g,g) and X (B,g,M), got ", w.sizes(), " and ", x.sizes());
  TORCH_CHECK(x.size(0) % w.size(0) == 0, name, ": B = ", x.size(0),
              " is not a multiple of G = ", w.size(0));
  TORCH_CHECK(w.size(1) <= kMaxGroup, name, ": group size ", w.size(1), " > ", kMaxGroup);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), name, ": dtypes differ");
}

}  // namespace

int64_t stream_threshold(int64_t bytes) {
  return bytes < 0 ? g_stream_bytes.load() : g_stream_bytes.exchange(bytes);
}

// out_b = (W_{b mod G}[^T] + Diag(diag_b)) X_b + bias_b for every batch b (one sample's group).
void group_apply(const at::Tensor& w, const at::Tensor& x, const at::Tensor& diag,
                 const at::Tensor& bias, bool transpose, at::Tensor& out) {
  check_group_args(w, x, "group_apply");
  const int64_t groups = w.size(0), g = w.size(1), b_dim = x.size(0), m = x.size(2);
  const bool has_diag = diag.numel() > 0, has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_diag || (diag.dim() == 2 && diag.size(0) == b_dim && diag.size(1) == g),
              "group_apply: expected diag (B,g), got ", diag.sizes());
  TORCH_CHECK(!has_bias || (bias.dim() == 2 && bias.size(0) == b_dim && bias.size(1) == g),
              "group_apply: expected bias (B,g), got ", bias.sizes());
  TORCH_CHECK(out.is_contiguous() && out.numel() == b_dim * g * m &&
                  out.scalar_type() == x.scalar_type(),
              "group_apply: out must be a contiguous tensor of B*g*M elements in X's dtype");
  auto wc = w.contiguous();
  auto xc = x.contiguous();
  auto dc = has_diag ? diag.contiguous().to(x.scalar_type()) : diag;
  auto bc = has_bias ? bias.contiguous().to(x.scalar_type()) : bias;
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  const bool stream = stream_output(out.numel() * out.element_size());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_apply", [&] {
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* dp = has_diag ? dc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = has_bias ? bc.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, b_dim * chunks, 1, [&](int64_t begin, int64_t end) {
      scalar_t a[kMaxGroup * kMaxGroup];
      int64_t built = -1;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bi = t / chunks, c = t % chunks;
        if (bi != built) {
          build_group_matrix<scalar_t>(a, g, wp + (bi % groups) * g * g, transpose,
                                       dp ? dp + bi * g : nullptr, g);
          built = bi;
        }
        const int64_t p0 = c * kChunk, p1 = std::min(m, p0 + kChunk);
        const Rows<scalar_t> src{xp + bi * g * m, xp + bi * g * m, g, m};
        staged<scalar_t>(op + bi * g * m, g, m, p0, p1, stream,
                         [&](const Out<scalar_t>& o, int64_t q0, int64_t q1) {
                           matmul_range<scalar_t>(a, src, bp ? bp + bi * g : nullptr, o, g, g, q0,
                                                  q1);
                         });
      }
      if (stream) stream_fence();
    });
  });
}

namespace {

// out[r, p] += d[r] * x[r, p] for the g rows of a block, positions [p0, p1).
template <typename T>
void add_scaled_rows(const T* d, const T* x, const Out<T>& out, int64_t g, int64_t m, int64_t p0,
                     int64_t p1) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  for (int64_t r = 0; r < g; ++r) {
    const V s = splat<T>(d[r]);
    const T* xr = x + r * m;
    T* orow = out.at(r, p0);
    int64_t p = p0;
    for (; p + L <= p1; p += L, orow += L) store<T>(orow, load<T>(orow) + s * load<T>(xr + p));
    for (; p < p1; ++p, ++orow) *orow += d[r] * xr[p];
  }
}

}  // namespace

// out_b = (W1_{b mod G}^T + Diag(d1_b)) X1_b + (W2_{b mod G} + Diag(d2_b)) X2_b + bias_b: two
// products summed in one pass over the feature maps (the input gradient of the CE block, from
// its product and its moments). d1, d2, bias (B,g) or empty; W2 empty: no W2 term (the
// diagonal only, an element-wise pass over the range just written).
void group_apply_pair(const at::Tensor& w1, const at::Tensor& x1, const at::Tensor& d1,
                      const at::Tensor& w2, const at::Tensor& x2, const at::Tensor& d2,
                      const at::Tensor& bias, at::Tensor& out) {
  check_group_args(w1, x1, "group_apply_pair");
  const bool has_w2 = w2.numel() > 0;  // otherwise the second term is Diag(d2_b) X2_b
  if (has_w2) check_group_args(w2, x2, "group_apply_pair");
  TORCH_CHECK(x1.sizes() == x2.sizes() && (!has_w2 || w1.sizes() == w2.sizes()) &&
                  x1.scalar_type() == x2.scalar_type(),
              "group_apply_pair: the two products differ in shape or dtype: ", x1.sizes(), ", ",
              x2.sizes(), ", ", w1.sizes(), ", ", w2.sizes());
  const int64_t groups = w1.size(0), g = w1.size(1), b_dim = x1.size(0), m = x1.size(2);
  for (const at::Tensor* t : {&d1, &d2, &bias})
    TORCH_CHECK(t->numel() == 0 || (t->dim() == 2 && t->size(0) == b_dim && t->size(1) == g),
                "group_apply_pair: expected diagonals and bias (B,g), got ", t->sizes());
  TORCH_CHECK(out.is_contiguous() && out.numel() == b_dim * g * m &&
                  out.scalar_type() == x1.scalar_type(),
              "group_apply_pair: out must be a contiguous tensor of B*g*M elements in X's dtype");
  auto w1c = w1.contiguous(), w2c = w2.contiguous(), x1c = x1.contiguous(), x2c = x2.contiguous();
  auto opt = [&](const at::Tensor& t) { return t.numel() ? t.contiguous().to(x1.scalar_type()) : t; };
  auto d1c = opt(d1), d2c = opt(d2), bc = opt(bias);
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  const bool stream = stream_output(out.numel() * out.element_size());
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "group_apply_pair", [&] {
    using T = scalar_t;
    const T* w1p = w1c.data_ptr<T>();
    const T* w2p = has_w2 ? w2c.data_ptr<T>() : nullptr;
    const T *x1p = x1c.data_ptr<T>(), *x2p = x2c.data_ptr<T>();
    const T* d1p = d1c.numel() ? d1c.data_ptr<T>() : nullptr;
    const T* d2p = d2c.numel() ? d2c.data_ptr<T>() : nullptr;
    const T* bp = bc.numel() ? bc.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    at::parallel_for(0, b_dim * chunks, 1, [&](int64_t begin, int64_t end) {
      // Short rows: one product of the 2g rows of both maps, a = [W1^T + D1 | W2 + D2]
      // (g x 2g). Long rows: 2g interleaved streams read slower than two passes of g over a
      // range of out that stays in cache, a1 = W1^T + D1 and a2 = W2 + D2 (g x g each).
      const bool two_pass = m >= 512 || !has_w2;
      const int64_t lda = two_pass ? g : 2 * g;
      T a[kMaxGroup * 2 * kMaxGroup];
      T* a1 = a;
      T* a2 = two_pass ? a + g * g : a + g;
      int64_t built = -1;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bi = t / chunks, c = t % chunks;
        if (bi != built) {
          const int64_t j = bi % groups;
          build_group_matrix<T>(a1, lda, w1p + j * g * g, true, d1p ? d1p + bi * g : nullptr, g);
          build_group_matrix<T>(a2, lda, has_w2 ? w2p + j * g * g : nullptr, false,
                                d2p ? d2p + bi * g : nullptr, g);
          built = bi;
        }
        const int64_t p0 = c * kChunk, p1 = std::min(m, p0 + kChunk);
        const T* bb = bp ? bp + bi * g : nullptr;
        const T *xa = x1p + bi * g * m, *xb = x2p + bi * g * m;
        staged<T>(op + bi * g * m, g, m, p0, p1, stream,
                  [&](const Out<T>& o, int64_t q0, int64_t q1) {
                    if (!has_w2) {
                      matmul_range<T>(a1, Rows<T>{xa, xa, g, m}, bb, o, g, g, q0, q1);
                      if (d2p) add_scaled_rows<T>(d2p + bi * g, xb, o, g, m, q0, q1);
                    } else if (two_pass) {
                      matmul_range<T>(a1, Rows<T>{xa, xa, g, m}, bb, o, g, g, q0, q1);
                      matmul_range<T, true>(a2, Rows<T>{xb, xb, g, m}, nullptr, o, g, g, q0, q1);
                    } else {
                      matmul_range<T>(a, Rows<T>{xa, xb, g, m}, bb, o, g, 2 * g, q0, q1);
                    }
                  });
      }
      if (stream) stream_fence();
    });
  });
}

namespace {

template <typename T>
inline T hsum_tree(typename Vec<T>::type v) {
  // Butterfly: half the lanes at a time (log2(lanes) shuffle-adds).
  constexpr int L = Vec<T>::kLanes;
  alignas(kVecBytes) T lanes[L];
  store<T>(lanes, v);
  for (int width = L / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

// One level of the transposing reduction: u and v hold partial sums of rows in blocks of 2W
// lanes; the result holds the blocks of u, then those of v, each folded to W lanes.
template <typename T, int W>
inline typename Vec<T>::type fold_pair(typename Vec<T>::type u, typename Vec<T>::type v) {
  constexpr int L = Vec<T>::kLanes;
  typename Vec<T>::mask lo, hi;
  for (int i = 0; i < L; ++i) {
    const int src = i < L / 2 ? 0 : L, blk = (i % (L / 2)) / W, lane = i % W;
    lo[i] = src + blk * 2 * W + lane;
    hi[i] = lo[i] + W;
  }
  return __builtin_shuffle(u, v, lo) + __builtin_shuffle(u, v, hi);
}

// The levels of hsum_rows from blocks of 2W lanes down: the 2W vectors of v folded pairwise
// into W (in place), then the next level.
template <typename T, int W>
inline void fold_levels(typename Vec<T>::type* v) {
  for (int i = 0; i < W; ++i) v[i] = fold_pair<T, W>(v[2 * i], v[2 * i + 1]);
  if constexpr (W > 1) fold_levels<T, W / 2>(v);
}

// Lane r of the result is the sum of the lanes of rows[r], for kLanes vectors (a transposing
// tree of shuffles: about 3 vector operations a row instead of a scalar sum of every lane).
template <typename T>
inline typename Vec<T>::type hsum_rows(const typename Vec<T>::type* rows) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  static_assert(L >= 2 && (L & (L - 1)) == 0, "hsum_rows: a power of 2 lanes");
  V v[L];
  for (int i = 0; i < L; ++i) v[i] = rows[i];
  fold_levels<T, L / 2>(v);
  return v[0];
}

// out[r][k] += sum over the samples n in [n0, n1) of X_n[r0+r] . Y_n[k0+k], where X_n, Y_n are
// the (g, M) blocks of one group at stride `stride` (elements) from sample to sample. The tile
// stays in registers across samples; the per-sample diagonal X_n[r] . Y_n[r] goes to
// diag[n * diag_stride + r] if diag is given. (No lane of acc is ever indexed: that would make
// GCC keep the tile in memory.)
// SUMS (a tile on the diagonal of a symmetric product): also the per-sample row sums of X to
// sums[n * diag_stride + r], from the rows already in registers.
template <typename T, int RT, int KT, bool SUMS = false>
void gram_tile(const T* x, const T* y, int64_t stride, int64_t n0, int64_t n1, T* out,
               T* diag, int64_t diag_stride, int64_t r0, int64_t k0, int64_t g, int64_t m,
               T* sums = nullptr) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  using Mask = typename Vec<T>::mask;
  const bool on_diagonal = diag && r0 == k0 && RT == KT;
  const Mask tail_mask = last_lanes<T>(m % L);
  V acc[RT][KT], dsum[RT];
  for (int r = 0; r < RT; ++r) {
    dsum[r] = V{};
    for (int k = 0; k < KT; ++k) acc[r][k] = V{};
  }
  for (int64_t n = n0; n < n1; ++n) {
    const T* xn = x + n * stride;
    const T* yn = y + n * stride;
    V rs[RT];
    for (int r = 0; r < RT; ++r) rs[r] = V{};
    int64_t p = 0;
    for (; p + L <= m; p += L) {
      V xv[RT], yv[KT];
      for (int r = 0; r < RT; ++r) xv[r] = load<T>(xn + (r0 + r) * m + p);
      for (int k = 0; k < KT; ++k) yv[k] = load<T>(yn + (k0 + k) * m + p);
      // (An empty asm per loaded row, to keep the rows in registers, made no difference with
      // AVX-512 and cost 2-6 % with AVX2's 16 registers: the compiler places them.)
      for (int r = 0; r < RT; ++r)
        for (int k = 0; k < KT; ++k) acc[r][k] += xv[r] * yv[k];
      if constexpr (SUMS)
        for (int r = 0; r < RT; ++r) rs[r] += xv[r];
    }
    if (p < m) {  // tail: the last full window with the lanes already summed masked off,
      V xv[RT], yv[KT];  // or zero-padded vectors for rows shorter than a vector
      if (m >= L) {
        for (int r = 0; r < RT; ++r)
          xv[r] = (V)((Mask)load<T>(xn + (r0 + r) * m + m - L) & tail_mask);
        for (int k = 0; k < KT; ++k) yv[k] = load<T>(yn + (k0 + k) * m + m - L);
      } else {
        for (int r = 0; r < RT; ++r) xv[r] = load_partial<T>(xn + (r0 + r) * m + p, m - p);
        for (int k = 0; k < KT; ++k) yv[k] = load_partial<T>(yn + (k0 + k) * m + p, m - p);
      }
      for (int r = 0; r < RT; ++r)
        for (int k = 0; k < KT; ++k) acc[r][k] += xv[r] * yv[k];
      if constexpr (SUMS)
        for (int r = 0; r < RT; ++r) rs[r] += xv[r];
    }
    if constexpr (SUMS)
      for (int r = 0; r < RT; ++r) sums[n * diag_stride + r0 + r] = hsum_tree<T>(rs[r]);
    if constexpr (RT == KT) {
      if (on_diagonal) {
        for (int r = 0; r < RT; ++r) {
          diag[n * diag_stride + r0 + r] = hsum_tree<T>(acc[r][r]);
          dsum[r] += acc[r][r];
          acc[r][r] = V{};
        }
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int k = 0; k < KT; ++k)
      out[(r0 + r) * g + k0 + k] +=
          hsum_tree<T>(on_diagonal && r == k ? acc[r][k] + dsum[r] : acc[r][k]);
}

// Adds sum_n X_n Y_n^T over samples [n0, n1) of one group to out (g, g). With symmetric, X is Y
// and only the tiles on and above the diagonal are computed (the rest is mirrored later).
// sums (symmetric only): the per-sample row sums too, from the diagonal tiles.
template <typename T>
void gram_group(const T* x, const T* y, int64_t stride, int64_t n0, int64_t n1, T* out, T* diag,
                int64_t diag_stride, int64_t g, int64_t m, bool symmetric, T* sums) {
  constexpr int GT = kGramTile;
  int64_t r = 0;
  for (; r + GT <= g; r += GT) {
    int64_t k = symmetric ? r : 0;
    for (; k + GT <= g; k += GT) {
      if (sums && k == r)
        gram_tile<T, GT, GT, true>(x, y, stride, n0, n1, out, diag, diag_stride, r, k, g, m, sums);
      else
        gram_tile<T, GT, GT>(x, y, stride, n0, n1, out, diag, diag_stride, r, k, g, m);
    }
    for (; k < g; ++k)
      gram_tile<T, GT, 1>(x, y, stride, n0, n1, out, diag, diag_stride, r, k, g, m);
  }
  for (; r < g; ++r)
    for (int64_t k = symmetric ? r : 0; k < g; ++k) {
      if (sums && k == r)
        gram_tile<T, 1, 1, true>(x, y, stride, n0, n1, out, diag, diag_stride, r, k, g, m, sums);
      else
        gram_tile<T, 1, 1>(x, y, stride, n0, n1, out, diag, diag_stride, r, k, g, m);
    }
}

}  // namespace

// sum_G[j] = sum over b with b mod G = j of X_b Y_b^T (G,g,g); diag (B,g) the per-batch diagonals.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_gram(const at::Tensor& x,
                                                          const at::Tensor& y, int64_t groups,
                                                          bool with_diag, bool symmetric,
                                                          bool with_sums) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == y.sizes() && x.size(1) <= kMaxGroup,
              "group_gram: expected X and Y (B,g,M) of one shape, g <= ", kMaxGroup, ", got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(groups > 0 && x.size(0) % groups == 0, "group_gram: B = ", x.size(0),
              " is not a multiple of G = ", groups);
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "group_gram: dtypes differ");
  TORCH_CHECK(!with_sums || symmetric, "group_gram: row sums need symmetric (X is Y)");
  const int64_t b_dim = x.size(0), g = x.size(1), m = x.size(2), n_dim = b_dim / groups;
  auto xc = x.contiguous();
  auto yc = y.contiguous();
  const int64_t threads = at::get_num_threads();
  // Tasks: (group, run of samples). A run's blocks of X and Y stay within ~512 KiB so that the
  // tiles re-read them from L2; at least 2 tasks per thread for balance.
  const int64_t block_bytes = 2 * g * m * x.element_size();
  const int64_t per_run = std::max<int64_t>(1, (512 << 10) / std::max<int64_t>(1, block_bytes));
  int64_t runs = std::max<int64_t>((n_dim + per_run - 1) / per_run,
                                   (2 * threads + groups - 1) / groups);
  runs = std::min(runs, n_dim);
  auto partial = at::zeros({threads, groups, g, g}, x.options());
  auto diag = at::empty({with_diag ? b_dim : 0, g}, x.options());
  auto sums = at::empty({with_sums ? b_dim : 0, g}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_gram", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    scalar_t* pp = partial.data_ptr<scalar_t>();
    scalar_t* dp = with_diag ? diag.data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = with_sums ? sums.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, groups * runs, 1, [&](int64_t begin, int64_t end) {
      scalar_t* acc = pp + at::get_thread_num() * groups * g * g;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t j = t / runs, run = t % runs;
        const int64_t n0 = run * n_dim / runs, n1 = (run + 1) * n_dim / runs;
        gram_group<scalar_t>(xp + j * g * m, yp + j * g * m, groups * g * m, n0, n1,
                             acc + j * g * g, dp ? dp + j * g : nullptr, groups * g, g, m,
                             symmetric, sp ? sp + j * g : nullptr);
      }
    });
  });
  // The threads' partial sums added, and with symmetric the upper triangle mirrored (a loop:
  // the ATen calls for it cost more than the arithmetic at these sizes).
  auto total = at::empty({groups, g, g}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_gram", [&] {
    const scalar_t* pp = partial.data_ptr<scalar_t>();
    scalar_t* tp = total.data_ptr<scalar_t>();
    const int64_t size = groups * g * g;
    for (int64_t i = 0; i < size; ++i) {
      const int64_t r = i / g % g, k = i % g;
      const int64_t src = symmetric && r > k ? i - (r - k) * (g - 1) : i;  // (k, r) of the group
      scalar_t v = 0;
      for (int64_t t = 0; t < threads; ++t) v += pp[t * size + src];
      tp[i] = v;
    }
  });
  return {total, diag, sums};
}

namespace {

// Sums and sums of squares of one row of m elements, as vectors whose lanes are still to add.
template <typename T>
inline void row_sum_sq_lanes(const T* row, int64_t m, typename Vec<T>::type& sum,
                             typename Vec<T>::type& sq) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  V s0 = splat<T>(0), s1 = s0, q0 = s0, q1 = s0;
  int64_t p = 0;
  for (; p + 2 * L <= m; p += 2 * L) {
    const V v0 = load<T>(row + p), v1 = load<T>(row + p + L);
    s0 += v0;
    s1 += v1;
    q0 += v0 * v0;
    q1 += v1 * v1;
  }
  if (p + L <= m) {
    const V v0 = load<T>(row + p);
    s0 += v0;
    q0 += v0 * v0;
    p += L;
  }
  if (p < m) {
    const V v0 = load_partial<T>(row + p, m - p);
    s1 += v0;
    q1 += v0 * v0;
  }
  sum = s0 + s1;
  sq = q0 + q1;
}

// Sum and sum of squares of one row of m elements.
template <typename T>
inline void row_sum_sq(const T* row, int64_t m, T& sum, T& sq) {
  typename Vec<T>::type s, q;
  row_sum_sq_lanes<T>(row, m, s, q);
  sum = hsum_tree<T>(s);
  sq = hsum_tree<T>(q);
}

// Population variance of each of the C rows (M positions) of one sample (CE paper, Eqn 7);
// rows in blocks of kLanes, whose vector sums are reduced together (hsum_rows).
template <typename T>
void row_variances(const T* x, int64_t c_dim, int64_t m, T* var) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  int64_t c = 0;
  for (; c + L <= c_dim; c += L) {
    V s[L], q[L];
    for (int r = 0; r < L; ++r) row_sum_sq_lanes<T>(x + (c + r) * m, m, s[r], q[r]);
    const V mean = hsum_rows<T>(s) / T(m);
    // E[x^2] - E[x]^2 with E[x]^2 rounded first, as the unfused path computes it: a fused
    // multiply-subtract would leave the rounding error of x^2 where the variance is exactly
    // 0 (1x1 maps), and the gate's LayerNorm magnifies such noise.
    V mean_sq = mean * mean;
    CENET_OPAQUE(mean_sq);
    V v = hsum_rows<T>(q) / T(m) - mean_sq;
    v = v > T(0) ? v : splat<T>(0);
    store<T>(var + c, v);
  }
  for (; c < c_dim; ++c) {
    T s, q;
    row_sum_sq<T>(x + c * m, m, s, q);
    const T mean = s / m;
    T mean_sq = mean * mean;
    CENET_OPAQUE(mean_sq);
    var[c] = std::max(q / m - mean_sq, T(0));
  }
}

// exp(x) for float lanes (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial
// in r, times 2^n through the exponent bits): within 2 ulp of std::exp; x below -87.3 gives
// about 1e-38 rather than a denormal or 0, above 88.3 about 2e38 rather than inf.
inline Vec<float>::type exp_lanes(Vec<float>::type x) {
  using V = Vec<float>::type;
  using I = Vec<float>::mask;
  x = x < -87.3f ? splat<float>(-87.3f) : x;
  x = x > 88.3f ? splat<float>(88.3f) : x;
  const V fx = x * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(fx, I);  // truncation: one too many where fx < 0
  n -= __builtin_convertvector(n, V) > fx ? I{} + 1 : I{};
  const V nf = __builtin_convertvector(n, V);
  const V r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  V p = splat<float>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  const I bits = (n + 127) << 23;
  V pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return y * pow2n;
}

// out[s0+s][r0+r] = A_{s0+s} . W_{r0+r} for an RT x ST tile (rows of W x samples), the
// K-long dot products as vectors of partial sums; the last window of a row that is not a
// whole vector overlaps the previous one, its lanes already summed masked off in A's vector
// (rows shorter than a vector: zero-padded partial vectors).
template <typename T, int RT, int ST>
inline void linear_tile(const T* a, const T* w, int64_t k_dim, int64_t r_dim, int64_t s0,
                        int64_t r0, T* out) {
  using V = typename Vec<T>::type;
  using Mask = typename Vec<T>::mask;
  constexpr int L = Vec<T>::kLanes;
  V acc[ST * RT];
  for (int i = 0; i < ST * RT; ++i) acc[i] = V{};
  const T* as = a + s0 * k_dim;
  const T* wr = w + r0 * k_dim;
  int64_t k = 0;
  for (; k + L <= k_dim; k += L) {
    V av[ST], wv[RT];
    for (int s = 0; s < ST; ++s) av[s] = load<T>(as + s * k_dim + k);
    for (int r = 0; r < RT; ++r) wv[r] = load<T>(wr + r * k_dim + k);
    for (int s = 0; s < ST; ++s)
      for (int r = 0; r < RT; ++r) acc[s * RT + r] += av[s] * wv[r];
  }
  if (k < k_dim) {
    V av[ST], wv[RT];
    if (k_dim >= L) {
      const Mask tail = last_lanes<T>(k_dim - k);
      for (int s = 0; s < ST; ++s)
        av[s] = (V)((Mask)load<T>(as + s * k_dim + k_dim - L) & tail);
      for (int r = 0; r < RT; ++r) wv[r] = load<T>(wr + r * k_dim + k_dim - L);
    } else {
      for (int s = 0; s < ST; ++s) av[s] = load_partial<T>(as + s * k_dim, k_dim);
      for (int r = 0; r < RT; ++r) wv[r] = load_partial<T>(wr + r * k_dim, k_dim);
    }
    for (int s = 0; s < ST; ++s)
      for (int r = 0; r < RT; ++r) acc[s * RT + r] += av[s] * wv[r];
  }
  if constexpr (ST * RT == L) {  // the L sums of the tile in one vector, sample by sample
    const V sums = hsum_rows<T>(acc);
    for (int s = 0; s < ST; ++s)
      for (int r = 0; r < RT; ++r) out[(s0 + s) * r_dim + r0 + r] = sums[s * RT + r];
  } else {
    for (int s = 0; s < ST; ++s)
      for (int r = 0; r < RT; ++r) out[(s0 + s) * r_dim + r0 + r] = hsum_tree<T>(acc[s * RT + r]);
  }
}

// Register tile of linear_rows: kLinearRT rows of W times kLinearST samples, one vector of
// accumulators each, kLanes in all (AVX-512 float: 4 x 4, 16 of the 32 registers and 8 loads;
// AVX2 float: 4 x 2 of 16).
template <typename T>
constexpr int kLinearRT = Vec<T>::kLanes >= 8 ? 4 : 2;
template <typename T>
constexpr int kLinearST = Vec<T>::kLanes / kLinearRT<T> > 0 ? Vec<T>::kLanes / kLinearRT<T> : 1;

}  // namespace

template <typename T>
void linear_rows(const T* a, int64_t samples, int64_t k_dim, const T* w, int64_t r_dim, T* out) {
  constexpr int RT = kLinearRT<T>, ST = kLinearST<T>;
  // Blocks of RT rows of W outermost (they stay in L1 while every sample passes): W, the
  // larger operand, is read once; the samples' rows come from L1 or L2.
  const int64_t row_blocks = (r_dim + RT - 1) / RT;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, samples * k_dim * RT));
  at::parallel_for(0, row_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t r0 = rb * RT;
      int64_t s = 0;
      if (r0 + RT <= r_dim) {
        for (; s + ST <= samples; s += ST) linear_tile<T, RT, ST>(a, w, k_dim, r_dim, s, r0, out);
        for (; s < samples; ++s) linear_tile<T, RT, 1>(a, w, k_dim, r_dim, s, r0, out);
      } else {
        for (int64_t r = r0; r < r_dim; ++r) {
          for (s = 0; s + ST <= samples; s += ST)
            linear_tile<T, 1, ST>(a, w, k_dim, r_dim, s, r, out);
          for (; s < samples; ++s) linear_tile<T, 1, 1>(a, w, k_dim, r_dim, s, r, out);
        }
      }
    }
  });
}

template <typename T>
void scaled_sigmoid(T* d, int64_t n, T scale) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int L = Vec<float>::kLanes;
    for (; i + L <= n; i += L)
      store<float>(d + i, scale / (1.0f + exp_lanes(-load<float>(d + i))));
  }
  for (; i < n; ++i) d[i] = scale / (T(1) + std::exp(-d[i]));
}

template void linear_rows<float>(const float*, int64_t, int64_t, const float*, int64_t, float*);
template void linear_rows<double>(const double*, int64_t, int64_t, const double*, int64_t,
                                  double*);
template void scaled_sigmoid<float>(float*, int64_t, float);
template void scaled_sigmoid<double>(double*, int64_t, double);

// Eval-mode CE block on X (N,C,M): out_n = (W + Diag(d_n)) X_n, d_n the IR weights of sample n
// and W (G,g,g) the block-diagonal BD matrix, or none (IR only). With at least 4 samples per
// thread, each thread takes whole samples: the variance pass brings a sample into cache and
// the product reads it from there. Otherwise all weights first, then the product split over
// positions as in group_apply. fc1 (Hd,C) and fc2 (C,Hd) as nn.Linear stores them. scale: a
// one-element tensor (the factor of the IR weights, read here so that the caller never
// synchronizes on it).
void ce_eval(const at::Tensor& x, const at::Tensor& w, const at::Tensor& fc1,
             const at::Tensor& ln_w, const at::Tensor& ln_b, double ln_eps, const at::Tensor& fc2,
             const at::Tensor& scale_t, int64_t group_size, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 3, "ce_eval: expected X (N,C,M), got ", x.sizes());
  TORCH_CHECK(scale_t.numel() == 1, "ce_eval: expected a one-element scale, got ",
              scale_t.sizes());
  const double scale = scale_t.item<double>();
  const int64_t n_dim = x.size(0), c_dim = x.size(1), m = x.size(2), g = group_size;
  TORCH_CHECK(fc1.dim() == 2, "ce_eval: expected fc1 (Hd,C), got ", fc1.sizes());
  const int64_t hd = fc1.size(0);
  const bool has_w = w.numel() > 0;
  TORCH_CHECK(g > 0 && g <= kMaxGroup && c_dim % g == 0, "ce_eval: group size ", g,
              " must divide C = ", c_dim, " and be at most ", kMaxGroup);
  TORCH_CHECK(!has_w || (w.dim() == 3 && w.size(0) * g == c_dim && w.size(1) == g &&
                         w.size(2) == g),
              "ce_eval: expected W (C/g, g, g), got ", w.sizes());
  TORCH_CHECK(fc1.size(1) == c_dim && fc2.dim() == 2 && fc2.size(0) == c_dim &&
                  fc2.size(1) == hd && ln_w.numel() == hd && ln_b.numel() == hd,
              "ce_eval: expected fc1 (Hd,C), fc2 (C,Hd), LayerNorm weights (Hd), got ",
              fc1.sizes(), ", ", fc2.sizes(), ", ", ln_w.sizes(), ", ", ln_b.sizes());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&w, &fc1, &ln_w, &ln_b,
                                                                       &fc2, &out})
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == x.scalar_type(), "ce_eval: dtypes differ");
  TORCH_CHECK(out.is_contiguous() && out.numel() == x.numel(),
              "ce_eval: out must be contiguous with X's number of elements");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto f1 = fc1.contiguous(), f2 = fc2.contiguous();  // (no copies for nn.Linear's weights)
  auto lw = ln_w.contiguous(), lb = ln_b.contiguous();
  const int64_t groups = c_dim / g;
  const bool stream = stream_output(out.numel() * out.element_size());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ce_eval", [&] {
    using T = scalar_t;
    const T* xp = xc.data_ptr<T>();
    const T* wp = has_w ? wc.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    auto gates = [&](const T* var, int64_t samples, T* hid, T* d) {
      ir_gate<T>(var, samples, c_dim, f1.data_ptr<T>(), lw.data_ptr<T>(), lb.data_ptr<T>(),
                 T(ln_eps), f2.data_ptr<T>(), hd, T(scale), hid, d);
    };
    // One group of one sample, positions [p0, p1).
    auto product = [&](int64_t n, int64_t j, const T* d, int64_t p0, int64_t p1) {
      T a[kMaxGroup * kMaxGroup];
      build_group_matrix<T>(a, g, wp ? wp + j * g * g : nullptr, false, d + j * g, g);
      const int64_t off = (n * c_dim + j * g) * m;
      staged<T>(op + off, g, m, p0, p1, stream, [&](const Out<T>& o, int64_t q0, int64_t q1) {
        matmul_range<T>(a, Rows<T>{xp + off, xp + off, g, m}, nullptr, o, g, g, q0, q1);
      });
    };
    if (n_dim >= 4 * at::get_num_threads()) {
      // Samples a few at a time (the gate weights read once for them): as many as stay in a
      // core's L2 cache (about 512 KiB of them) from the variances to the product; for a gate
      // whose weights outweigh a sample (2 MiB at C = 1024 against 784 KiB at 14x14), up to
      // 16, whose gates are then computed in tiles, and which the product reads back from L3
      // rather than the weights once per sample (2.9 -> 2.1 ms at (32, 1024, 14, 14) on a
      // machine with a large L3). A thread's samples are split into blocks of equal size.
      const int64_t sample_bytes = c_dim * m * int64_t(sizeof(T));
      const int64_t gate_bytes = 2 * c_dim * hd * int64_t(sizeof(T));
      const int64_t most = gate_bytes > sample_bytes
                               ? 16
                               : std::clamp<int64_t>((int64_t(512) << 10) / sample_bytes, 1, 8);
      at::parallel_for(0, n_dim, 1, [&](int64_t begin, int64_t end) {
        const int64_t blocks = (end - begin + most - 1) / most;
        const int64_t block = (end - begin + blocks - 1) / blocks;
        std::vector<T> buf(block * (2 * c_dim + hd));
        T *var = buf.data(), *d = var + block * c_dim, *hid = d + block * c_dim;
        for (int64_t n0 = begin; n0 < end; n0 += block) {
          const int64_t samples = std::min(block, end - n0);
          for (int64_t s = 0; s < samples; ++s)
            row_variances<T>(xp + (n0 + s) * c_dim * m, c_dim, m, var + s * c_dim);
          gates(var, samples, hid, d);
          for (int64_t s = 0; s < samples; ++s)
            for (int64_t j = 0; j < groups; ++j) product(n0 + s, j, d + s * c_dim, 0, m);
        }
        if (stream) stream_fence();
      });
      return;
    }
    std::vector<T> var(n_dim * c_dim), dall(n_dim * c_dim), hid(n_dim * hd);
    at::parallel_for(0, n_dim * c_dim, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row_variances<T>(xp + r * m, 1, m, var.data() + r);
    });
    gates(var.data(), n_dim, hid.data(), dall.data());  // (split over W's rows)
    const int64_t chunks = (m + kChunk - 1) / kChunk;
    at::parallel_for(0, n_dim * groups * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c = t % chunks, j = (t / chunks) % groups, n = t / chunks / groups;
        product(n, j, dall.data() + n * c_dim, c * kChunk, std::min(m, (c + 1) * kChunk));
      }
      if (stream) stream_fence();
    });
  });
}

namespace {

// y_p = blockdiag(A_0 .. A_{groups-1}) x_p for `count` consecutive positions of a channels-last
// map (rows of c_dim = groups * G elements). at holds every A_j^T row-major, one after the
// other (column k of A_j at at + (j * G + k) * G). Positions go in blocks of P, and for each
// block every group in turn, so the rows are read in order (the prefetcher streams them) while
// the matrices, C * G elements, stay in L1/L2; P independent accumulator chains per column.
// G fixed at compile time, a multiple of the vector width.
template <typename T, int G>
void nhwc_rows(const T* at, int64_t groups, const T* x, T* y, int64_t c_dim, int64_t count) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  static_assert(G % L == 0, "nhwc_rows: G a multiple of the vector width");
  constexpr int B = G / L;
  constexpr int P = 4;
  int64_t p = 0;
  for (; p + P <= count; p += P) {
    for (int64_t j = 0; j < groups; ++j) {
      const T* a = at + j * G * G;
      const T* xp = x + p * c_dim + j * G;
      V acc[P][B];
      for (int i = 0; i < P; ++i)
        for (int b = 0; b < B; ++b) acc[i][b] = load<T>(a + b * L) * xp[i * c_dim];
      for (int k = 1; k < G; ++k) {
        V col[B];
        for (int b = 0; b < B; ++b) col[b] = load<T>(a + k * G + b * L);
        for (int i = 0; i < P; ++i) {
          const T xk = xp[i * c_dim + k];
          for (int b = 0; b < B; ++b) acc[i][b] += col[b] * xk;
        }
      }
      T* yp = y + p * c_dim + j * G;
      for (int i = 0; i < P; ++i)
        for (int b = 0; b < B; ++b) store<T>(yp + i * c_dim + b * L, acc[i][b]);
    }
  }
  for (; p < count; ++p)
    for (int64_t j = 0; j < groups; ++j) {
      const T* a = at + j * G * G;
      const T* xp = x + p * c_dim + j * G;
      V acc[B];
      for (int b = 0; b < B; ++b) acc[b] = load<T>(a + b * L) * xp[0];
      for (int k = 1; k < G; ++k)
        for (int b = 0; b < B; ++b) acc[b] += load<T>(a + k * G + b * L) * xp[k];
      for (int b = 0; b < B; ++b) store<T>(y + p * c_dim + j * G + b * L, acc[b]);
    }
}

template <typename T>
void nhwc_apply(const T* at, int64_t g, int64_t groups, const T* x, T* y, int64_t c_dim,
                int64_t count) {
  // g in {16, 32, 64} (checked by ce_eval_nhwc): multiples of every ISA's vector width
  if (g == 16) return nhwc_rows<T, 16>(at, groups, x, y, c_dim, count);
  if (g == 32) return nhwc_rows<T, 32>(at, groups, x, y, c_dim, count);
  nhwc_rows<T, 64>(at, groups, x, y, c_dim, count);
}

}  // namespace

// The eval-mode CE block on a channels-last map X (N,M,C) (M = H*W positions, channels
// contiguous): out_n = X_n (W + Diag(d_n))^T, i.e. (W + Diag(d_n)) x_p at every position p, as
// ce_eval computes it on NCHW maps, without a layout copy. Positions in chunks of about 256 KiB
// (sample, chunk) are the tasks: first the per-channel sums and sums of squares of each chunk
// (float within a chunk, double across chunks), then the gates of all samples and their
// matrices, then the products, reading each chunk's rows in order (nhwc_rows).
void ce_eval_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor& fc1,
                  const at::Tensor& ln_w, const at::Tensor& ln_b, double ln_eps,
                  const at::Tensor& fc2, const at::Tensor& scale_t, int64_t group_size,
                  at::Tensor& out) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "ce_eval_nhwc: expected a contiguous X (N,M,C), got ",
              x.sizes());
  TORCH_CHECK(scale_t.numel() == 1, "ce_eval_nhwc: expected a one-element scale");
  const double scale = scale_t.item<double>();
  const int64_t n_dim = x.size(0), m = x.size(1), c_dim = x.size(2), g = group_size;
  TORCH_CHECK(fc1.dim() == 2 && fc1.size(1) == c_dim, "ce_eval_nhwc: expected fc1 (Hd,C), got ",
              fc1.sizes());
  const int64_t hd = fc1.size(0);
  const bool has_w = w.numel() > 0;
  TORCH_CHECK((g == 16 || g == 32 || g == 64) && c_dim % g == 0, "ce_eval_nhwc: group size ",
              g, " must be 16, 32 or 64 and divide C = ", c_dim,
              " (other groups: ce_eval on an NCHW copy)");
  TORCH_CHECK(!has_w || (w.dim() == 3 && w.size(0) * g == c_dim && w.size(1) == g &&
                         w.size(2) == g),
              "ce_eval_nhwc: expected W (C/g, g, g), got ", w.sizes());
  TORCH_CHECK(fc2.dim() == 2 && fc2.size(0) == c_dim && fc2.size(1) == hd &&
                  ln_w.numel() == hd && ln_b.numel() == hd,
              "ce_eval_nhwc: expected fc2 (C,Hd) and LayerNorm weights (Hd)");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&w, &fc1, &ln_w, &ln_b,
                                                                       &fc2, &out})
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == x.scalar_type(),
                "ce_eval_nhwc: dtypes differ");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes(),
              "ce_eval_nhwc: out must be contiguous and of X's shape");
  if (x.numel() == 0) return;
  auto wc = w.contiguous();
  auto f1 = fc1.contiguous(), f2 = fc2.contiguous();
  auto lw = ln_w.contiguous(), lb = ln_b.contiguous();
  const int64_t groups = c_dim / g;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ce_eval_nhwc", [&] {
    using T = scalar_t;
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::kLanes;
    const T* xp = x.data_ptr<T>();
    const T* wp = has_w ? wc.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    const int64_t row_bytes = c_dim * int64_t(sizeof(T));
    const int64_t chunk = std::clamp<int64_t>((int64_t(256) << 10) / row_bytes, 8, 1024);
    const int64_t chunks = (m + chunk - 1) / chunk;
    // per (sample, chunk): sums and sums of squares of every channel, in double
    std::vector<double> part(n_dim * chunks * 2 * c_dim);
    at::parallel_for(0, n_dim * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> acc(2 * c_dim);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / chunks, p0 = (t % chunks) * chunk, p1 = std::min(m, p0 + chunk);
        T *s = acc.data(), *q = s + c_dim;
        const T* base = xp + (n * m + p0) * c_dim;
        constexpr int CB = 4;  // channel vectors per sweep: 2 x CB accumulators in registers
        int64_t c = 0;
        for (; c + CB * L <= c_dim; c += CB * L) {
          V vs[CB] = {}, vq[CB] = {};
          for (int64_t p = 0; p < p1 - p0; ++p)
            for (int b = 0; b < CB; ++b) {
              const V v = load<T>(base + p * c_dim + c + b * L);
              vs[b] += v;
              vq[b] += v * v;
            }
          for (int b = 0; b < CB; ++b) {
            store<T>(s + c + b * L, vs[b]);
            store<T>(q + c + b * L, vq[b]);
          }
        }
        for (; c < c_dim; ++c) {
          T cs = 0, cq = 0;
          for (int64_t p = 0; p < p1 - p0; ++p) {
            const T v = base[p * c_dim + c];
            cs += v;
            cq += v * v;
          }
          s[c] = cs;
          q[c] = cq;
        }
        double* dst = part.data() + t * 2 * c_dim;
        for (int64_t c = 0; c < 2 * c_dim; ++c) dst[c] = double(acc[c]);
      }
    });
    std::vector<T> var(n_dim * c_dim), d(n_dim * c_dim), hid(n_dim * hd);
    for (int64_t n = 0; n < n_dim; ++n)
      for (int64_t c = 0; c < c_dim; ++c) {
        double s = 0, q = 0;
        for (int64_t k = 0; k < chunks; ++k) {
          const double* src = part.data() + (n * chunks + k) * 2 * c_dim;
          s += src[c];
          q += src[c_dim + c];
        }
        const double mean = s / double(m);
        var[n * c_dim + c] = T(std::max(q / double(m) - mean * mean, 0.0));
      }
    ir_gate<T>(var.data(), n_dim, c_dim, f1.data_ptr<T>(), lw.data_ptr<T>(), lb.data_ptr<T>(),
               T(ln_eps), f2.data_ptr<T>(), hd, T(scale), hid.data(), d.data());
    // (W + Diag(d_n))^T of every group of every sample: N * C * g elements
    std::vector<T> mats(n_dim * c_dim * g);
    for (int64_t n = 0; n < n_dim; ++n)
      for (int64_t j = 0; j < groups; ++j)
        build_group_matrix<T>(mats.data() + (n * groups + j) * g * g, g,
                              wp ? wp + j * g * g : nullptr, true, d.data() + n * c_dim + j * g,
                              g);
    at::parallel_for(0, n_dim * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / chunks, p0 = (t % chunks) * chunk, p1 = std::min(m, p0 + chunk);
        const int64_t off = (n * m + p0) * c_dim;
        nhwc_apply<T>(mats.data() + n * c_dim * g, g, groups, xp + off, op + off, c_dim,
                      p1 - p0);
      }
    });
  });
}

}  // namespace CENET_NS
