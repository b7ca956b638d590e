// The sampler's float32 CPU kernels, XLA FFI handlers built and registered by cpu_kernels.py. Each
// shares its work out over XLA's intra-op thread pool in chunks; the calling thread works too.
//
// sami_panel_matmul: y [R, N] = x [R, K] @ W, W packed as panels [P, K, 16]: panel p holds output
// columns 16p .. 16p+15 (zero beyond N), each column's K weights 16 floats apart.
// Why: XLA's CPU GEMM packs each weight panel before using it, so a decode step's products of a few
// rows ([16, 576] x [576, 3072]) stream the weights at a third of the memory's rate. Here the weights
// are stored packed once, and each tile of ROWS rows x PANELS panels reads them straight from memory
// (prefetched ahead) into ROWS x PANELS accumulators of 16 floats.
//
// sami_block_matmul: the same product for W stored as blocks of 8-bit integers (see QBlock): each weight is
// rebuilt exactly as the float32 (q * d) + m it stands for, so the outputs are bit for bit the panel matmul's.
//
// sami_dense_matmul: training's products x W, dy W^T and x^T dy with each operand read as XLA holds it (see
// DenseMatmul).
//
// All three run products of more than 16 rows on AMX tiles where the CPU has them, to float32's accuracy (see
// amx_tile; sami_amx turns that off). Where the build has AVX2 and FMA but no AVX-512, sami_dense_matmul runs on a
// packed float32 GEMM on AVX2's registers instead (see fma::product).
//
// sami_attention: a prefill's or a decode step's attention over a layer's KV cache, see Attention.
//
// sami_attention_train, sami_attention_grad: training's attention and its gradients, see AttentionTrain.
//
// sami_top_p_threshold: each row's nucleus threshold for top-p sampling, see TopPThreshold.
//
// sami_argmax: each row's index of its largest value, for greedy decoding, see Argmax.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define SAMI_FMA_GEMM 1
#endif
#if defined(__AVX512F__) && defined(__AMX_BF16__) && defined(__linux__)
#define SAMI_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));  // 1 AVX-512 register, 2 AVX or 4 SSE/NEON ones

#ifdef __AVX512F__
constexpr int64_t kRows = 12, kPanels = 2;  // 24 accumulators of the 32 zmm registers
constexpr int64_t kOnePass = 16;            // up to 16 rows in one pass over the weights, as 16 x 1 panel
#else
constexpr int64_t kRows = 4, kPanels = 1;  // 8 of the 16 ymm registers
constexpr int64_t kOnePass = kRows;
#endif
constexpr int64_t kWidth = 16;     // columns per panel
// Panel rows (of 64 bytes) to prefetch ahead: into L2 where the weights stream from memory once (a decode
// step), into L1 where a group's weights are read again from L2 for each block of rows (a prefill).
constexpr int64_t kPrefetchMemory = 128, kPrefetchL2 = 32;

inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Runs f(0), ..., f(n - 1) on XLA's intra-op pool and the calling thread, and returns when all are done.
// The state is held by a shared_ptr so that a helper the pool starts late finds it alive (and nothing left).
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F f) {
  struct State {
    F f;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    State(F f, int64_t n) : f(std::move(f)), n(n) {}
    void run() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        f(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(f), n);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// y[:rows, col : col + 16 * NP] from the row block xt [K, stride] (rows transposed, zero-padded;
// stride >= ROWS) and NP consecutive panels starting at w, which are in L2 if IN_L2.
template <int64_t ROWS, int64_t NP, bool IN_L2>
void tile(const float* xt, int64_t stride, int64_t K, const float* w, float* y, int64_t N, int64_t col,
          int64_t rows) {
  f32x16 acc[ROWS][NP] = {};
  for (int64_t k = 0; k < K; ++k) {
    f32x16 wk[NP];
    for (int64_t j = 0; j < NP; ++j) {
      const float* panel = w + j * K * kWidth;
      if constexpr (IN_L2) __builtin_prefetch(panel + (k + kPrefetchL2) * kWidth, 0, 3);  // past the end is harmless
      else __builtin_prefetch(panel + (k + kPrefetchMemory) * kWidth, 0, 1);
      wk[j] = load(panel + k * kWidth);
    }
    for (int64_t r = 0; r < ROWS; ++r) {
      const float b = xt[k * stride + r];
      for (int64_t j = 0; j < NP; ++j) acc[r][j] += b * wk[j];
    }
  }
  for (int64_t j = 0; j < NP; ++j) {
    const int64_t n = std::min<int64_t>(kWidth, N - col - kWidth * j);
    if (n <= 0) break;
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * N + col + kWidth * j, &acc[r][j], n * sizeof(float));
  }
}

// The rows of the smallest tile that covers `rows`.
constexpr int64_t tile_height(int64_t rows) {
  return rows == 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : rows <= kRows ? kRows : kOnePass;
}

// a [16 rows] of 16 lanes, transposed in place: four rounds that exchange the off-diagonal halves of blocks of
// 8, 4, 2 and 1 rows and columns (two two-register shuffles per pair of rows and round).
#define SAMI_ROUND(D, LO, HI)                                      \
  for (int i = 0; i < 16; ++i)                                     \
    if (!(i & D)) {                                                \
      const f32x16 top = a[i], bottom = a[i + D];                  \
      a[i] = __builtin_shufflevector(top, bottom, SAMI_UNPACK LO);     \
      a[i + D] = __builtin_shufflevector(top, bottom, SAMI_UNPACK HI); \
    }
#define SAMI_UNPACK(...) __VA_ARGS__
inline void transpose16(f32x16* a) {
  SAMI_ROUND(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
             (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  SAMI_ROUND(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
             (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  SAMI_ROUND(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
             (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  SAMI_ROUND(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
             (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}
#undef SAMI_ROUND
#undef SAMI_UNPACK

// rows (<= width <= 16) of K floats, `stride` apart from x, transposed: out row k (out_stride apart) holds
// their k-th floats in its first `width` lanes, those past `rows` zero. 16 x 16 register transposes. (A scalar
// loop took about 50 us for 16 x 576 floats: its loads 2304 bytes apart alias its stores.)
void transpose_rows(const float* x, int64_t stride, int64_t rows, int64_t K, int64_t width, float* out,
                    int64_t out_stride) {
  int64_t k0 = 0;
  for (; k0 + kWidth <= K; k0 += kWidth) {
    f32x16 a[16] = {};
    for (int64_t r = 0; r < rows; ++r) a[r] = load(x + r * stride + k0);
    transpose16(a);
    for (int64_t i = 0; i < kWidth; ++i) std::memcpy(out + (k0 + i) * out_stride, &a[i], width * sizeof(float));
  }
  for (; k0 < K; ++k0)
    for (int64_t r = 0; r < width; ++r) out[k0 * out_stride + r] = r < rows ? x[r * stride + k0] : 0.0f;
}

// The smallest tile that covers `rows` (a decode step at batch 1 does not pay for 12 rows). Rows past
// kRows (a one-pass block, one panel at a time) take the 16-row tile.
template <int64_t NP, bool IN_L2>
void tile_rows(const float* xt, int64_t stride, int64_t K, const float* w, float* y, int64_t N, int64_t col,
               int64_t rows) {
  if (rows == 1) return tile<1, NP, IN_L2>(xt, stride, K, w, y, N, col, rows);
  if (rows <= 2) return tile<2, NP, IN_L2>(xt, stride, K, w, y, N, col, rows);
  if (rows <= 4) return tile<4, NP, IN_L2>(xt, stride, K, w, y, N, col, rows);
  if constexpr (NP == 1 && kOnePass > kRows) {
    if (rows > kRows) return tile<kOnePass, 1, IN_L2>(xt, stride, K, w, y, N, col, rows);
  }
  return tile<kRows, NP, IN_L2>(xt, stride, K, w, y, N, col, rows);
}

// Weights that are exactly (q * d) + m in float32 for an 8-bit integer q and a float32 scale d and offset m per
// 32 consecutive inputs of an output column (what GGUF's Q8_0, Q4_0/1 and Q5_0/1 dequantize to) are stored at
// 1.25 bytes a weight instead of 4: panel p as K / 32 blocks of kBlockBytes, each the 16 columns' d [16]
// and m [16] (float32), then q [32, 16] (int8, row k of the block's 16 columns). A decode step's products
// stream these bytes from memory, and the rebuilt weights go into the same sums in the same order.
constexpr int64_t kBlock = 32, kBlockBytes = 2 * kWidth * sizeof(float) + kBlock * kWidth;
// Blocks (640 bytes) to prefetch ahead into L2 in a decode step: as far ahead, in time, as kPrefetchMemory
// rows of a float32 panel.
constexpr int64_t kPrefetchBlocks = 4;

struct QBlock {
  f32x16 d, m;
  const int8_t* q;
  explicit QBlock(const uint8_t* b) : d(load(reinterpret_cast<const float*>(b))),
                                      m(load(reinterpret_cast<const float*>(b) + kWidth)),
                                      q(reinterpret_cast<const int8_t*>(b + 2 * kWidth * sizeof(float))) {}
  // Row kk's 16 weights, (q * d) + m. pack_blocks keeps d to 16 significant bits, so q * d is exact and one
  // FMA rounds as the float32 dequantization's multiply and add do.
  f32x16 row(int64_t kk) const {
#ifdef __AVX512F__  // (GCC compiles the vector extensions' int8 -> float conversion to 16 scalar ones)
    return _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kk * kWidth)))),
        d, m);
#else
    typedef int8_t i8x16 __attribute__((vector_size(16)));
    i8x16 qi;
    std::memcpy(&qi, q + kk * kWidth, sizeof qi);
    return __builtin_convertvector(qi, f32x16) * d + m;
#endif
  }
};

// The block tile: y[:rows, col : col + 16] from the row block xt [K, stride] and one block-stored panel.
template <int64_t ROWS>
void qtile(const float* xt, int64_t stride, int64_t K, const uint8_t* w, float* y, int64_t N, int64_t col,
           int64_t rows) {
  f32x16 acc[ROWS] = {};
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const uint8_t* ahead = w + (b + kPrefetchBlocks) * kBlockBytes;  // past the end is harmless
    for (int64_t l = 0; l < kBlockBytes; l += 64) __builtin_prefetch(ahead + l, 0, 1);
    const QBlock blk(w + b * kBlockBytes);
    for (int64_t kk = 0; kk < kBlock; ++kk) {
      const f32x16 wk = blk.row(kk);
      const float* xk = xt + (b * kBlock + kk) * stride;
      for (int64_t r = 0; r < ROWS; ++r) acc[r] += xk[r] * wk;
    }
  }
  const int64_t n = std::min<int64_t>(kWidth, N - col);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * N + col, &acc[r], n * sizeof(float));
}

void qtile_rows(const float* xt, int64_t stride, int64_t K, const uint8_t* w, float* y, int64_t N, int64_t col,
                int64_t rows) {
  const int64_t h = tile_height(rows);  // (an if chain: kRows may equal 4 or kOnePass)
  if (h == 1) return qtile<1>(xt, stride, K, w, y, N, col, rows);
  if (h == 2) return qtile<2>(xt, stride, K, w, y, N, col, rows);
  if (h == 4) return qtile<4>(xt, stride, K, w, y, N, col, rows);
  if (h == kRows) return qtile<kRows>(xt, stride, K, w, y, N, col, rows);
  return qtile<kOnePass>(xt, stride, K, w, y, N, col, rows);
}

// Panels p0 .. p1 of block-stored weights rebuilt as float32 panels into out [p1 - p0, K, 16].
void dequantize(const uint8_t* w, int64_t K, int64_t p0, int64_t p1, float* out) {
  const int64_t panel_bytes = K / kBlock * kBlockBytes;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const QBlock blk(w + p * panel_bytes + b * kBlockBytes);
      for (int64_t kk = 0; kk < kBlock; ++kk) {
        const f32x16 wk = blk.row(kk);
        std::memcpy(out + ((p - p0) * K + b * kBlock + kk) * kWidth, &wk, sizeof wk);
      }
    }
}

// The f16 value nearest x >= 0 (11 significant bits, none below 2^-24) and the spacing there: a guess at a
// GGUF block's scale from a rebuilt weight.
inline double nearest_f16(double x, double* spacing) {
  int e;
  std::frexp(x, &e);
  *spacing = std::ldexp(1.0, std::max(e - 11, -24));
  return std::nearbyint(x / *spacing) * *spacing;
}

// Finds d, m and q for column j of a block, whose 32 weights are v[kk * kWidth] (see pack_blocks): true if
// some form rebuilds all 32 exactly.
bool match_column(const float* v, float* d, float* m, int8_t* q) {
  float lo = v[0], hi = v[0];
  for (int64_t kk = 1; kk < kBlock; ++kk) lo = std::min(lo, v[kk * kWidth]), hi = std::max(hi, v[kk * kWidth]);
  if (!std::isfinite(lo) || !std::isfinite(hi)) return false;
  // GGUF's forms, as gguf.quants dequantizes them: d * q + m for q in [0, n] (Q4_1: n = 15, Q5_1: 31; the
  // smallest weight is m), or d * q for |q| <= 127 whose largest |q| is n (Q8_0: 127; Q4_0, Q5_0: 8, 16).
  struct Form { bool affine; int n; };
  static constexpr Form kForms[] = {{true, 15}, {false, 127}, {false, 8}, {false, 16}, {true, 31}};
  if (lo == hi) {  // a constant block (the zero padding of the last panel)
    *d = 0.0f;
    *m = lo;
    for (int64_t kk = 0; kk < kBlock; ++kk) q[kk * kWidth] = 0;
    return true;
  }
  for (const Form& f : kForms) {
    const float base = f.affine ? lo : 0.0f;
    const double span = f.affine ? static_cast<double>(hi) - lo : std::max(-static_cast<double>(lo), static_cast<double>(hi));
    double step;
    const double guess = nearest_f16(span / f.n, &step);
    for (double cand : {guess, guess + step, guess - step}) {
      const float dc = static_cast<float>(cand);
      uint32_t bits;
      std::memcpy(&bits, &dc, sizeof bits);
      if (!(dc > 0.0f) || !std::isfinite(dc) || (bits & 0xFF)) continue;  // (QBlock::row needs 16 bits at most)
      bool ok = true;
      for (int64_t kk = 0; kk < kBlock && ok; ++kk) {
        const float x = v[kk * kWidth];
        const float qf = std::min<float>(std::max<float>(std::nearbyint((x - base) / dc), f.affine ? 0 : -128), f.affine ? f.n : 127);
        volatile float prod = qf * dc;  // (volatile: two roundings, as the float32 dequantization)
        ok = prod + base == x;
        q[kk * kWidth] = static_cast<int8_t>(qf);
      }
      if (ok) {
        *d = dc;
        *m = base;
        return true;
      }
    }
  }
  return false;
}

// Products of many rows (a prefill's) on AMX, where the CPU has it: y = x W as six bf16 tile products. Each
// float32 is split exactly into three bf16 pieces, x = x0 + x1 + x2 and w = w0 + w1 + w2 (8 significant bits
// each), and y sums the six products xi wj with i + j <= 2: every piece product is exact in float32 and the
// three dropped ones are below 2^-23 of x w, so y is a float32 sum of the same terms to float32's rounding (the
// float32 tile's error, not bf16's: tests check it against float64). A non-finite x or w gives NaN there.
// A tile product (16 x 16 outputs over 32 inputs: 8,192 multiply-adds) took 7 ns on random data, in which the
// float32 tile does 500-650, so the six could run 2-2.7x its rate; in the model they run about 1.4x (SmolLM2's
// batch-16 prefill 2.1 -> 1.5 s). Used only for more rows than one pass (kOnePass): a decode step's products
// stream their weights once, and its blocks on AMX measured slower.
#ifdef SAMI_AMX
constexpr int64_t kTileRows = 16, kTileK = 32, kTileElems = kTileRows * kTileK;  // bf16 per tile (1 KB)
constexpr int64_t kPieces = 3;
constexpr int64_t kAmxSlabRows = 128;                // rows per slab (their pieces: 128 x K x 6 bytes)
constexpr int64_t kAmxGroupBytes = 768 << 10;        // a group's weight pieces
constexpr int64_t kSplitUnit = 4;                    // row blocks or panels split by one thread at a time

std::atomic<bool> amx_on{true};  // sami_amx(0) turns the AMX path off (tests compare the two)

// Whether this process may use AMX: Linux grants the tile state on request, once per process.
bool amx_ready() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted && amx_on.load(std::memory_order_relaxed);
}

// The tile configuration for a chunk's work: every tile 16 rows of 64 bytes. Loaded at each chunk, since other
// code (oneDNN, through XLA or torch) may use the tiles on the same thread; the configuration found is put back
// after (or the tiles released if there was none), for code that keeps its own configured between its calls.
class TileScope {
 public:
  TileScope() {
    _tile_storeconfig(saved_);  // (64 zero bytes if the tiles were not configured)
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t colsb[16] = {};
      uint8_t rows[16] = {};
    } config;
    for (int i = 0; i < 8; ++i) config.colsb[i] = 64, config.rows[i] = kTileRows;
    _tile_loadconfig(&config);
  }
  ~TileScope() {
    if (saved_[0] != 0) {
      _tile_loadconfig(saved_);
    } else {
      _tile_release();
    }
  }

 private:
  alignas(64) uint8_t saved_[64];
};

// 16 floats split exactly into three bf16 pieces, each in its lanes' top 16 bits (the low 16 zero).
inline void split3(__m512 x, __m512i* piece) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i hi = _mm512_and_si512(_mm512_castps_si512(x), top);
  const __m512 r = _mm512_sub_ps(x, _mm512_castsi512_ps(hi));  // exact: x's low 16 bits
  const __m512i mid = _mm512_and_si512(_mm512_castps_si512(r), top);
  piece[0] = hi;
  piece[1] = mid;
  piece[2] = _mm512_castps_si512(_mm512_sub_ps(r, _mm512_castsi512_ps(mid)));  // exact, 8 bits at most
}

// An aligned buffer of bf16 tiles (tile loads of lines split across cache lines ran at half speed).
struct TileBuffer {
  uint16_t* data = nullptr;
  int64_t size = 0;
  ~TileBuffer() { std::free(data); }
  uint16_t* get(int64_t n) {
    if (n > size) {
      std::free(data);
      data = static_cast<uint16_t*>(std::aligned_alloc(64, ((n * 2 + 63) / 64) * 64));
      size = n;
    }
    return data;
  }
};

// Buffers of finished products kept for the next ones: a fresh allocation of megabytes is mapped anew and pays
// a page fault at each first touch of 4 KB (about 3 ms for a prefill product's 12 MB of pieces).
std::mutex spare_mutex;
std::vector<std::unique_ptr<TileBuffer>> spare_buffers;

struct PooledBuffer {
  std::unique_ptr<TileBuffer> buf;  // taken from the spares at the first get (only AMX products use one)
  ~PooledBuffer() {
    if (!buf) return;
    std::lock_guard<std::mutex> lock(spare_mutex);
    spare_buffers.push_back(std::move(buf));
  }
  uint16_t* get(int64_t n) {
    if (!buf) {
      std::lock_guard<std::mutex> lock(spare_mutex);
      if (spare_buffers.empty()) {
        buf = std::make_unique<TileBuffer>();
      } else {
        buf = std::move(spare_buffers.back());
        spare_buffers.pop_back();
      }
    }
    return buf->get(n);
  }
};

// The mask of the first n (none if n <= 0, all 16 if n >= 16) lanes.
inline __mmask16 lanes(int64_t n) {
  return n >= kWidth ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1);
}

// Inputs 0 .. 31 of a row x (n of them there, zeros past them) as their three pieces' 16 pairs: lane t of pair[i]
// holds piece i of x[2t] in its low 16 bits and of x[2t + 1] in its high 16 (a row of an A tile).
inline void row_pairs(const float* x, int64_t n, __m512i* pair) {
  __m512i lo[kPieces], hi[kPieces];
  split3(_mm512_maskz_loadu_ps(lanes(n), x), lo);
  split3(_mm512_maskz_loadu_ps(lanes(n - kWidth), x + kWidth), hi);
  for (int64_t i = 0; i < kPieces; ++i)
    pair[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(lo[i], 16))),
                                 _mm512_cvtepi32_epi16(_mm512_srli_epi32(hi[i], 16)), 1);
}

// rows (<= 16) of x [rows, K] as A tiles out [KC][3][16 rows][32 inputs], zero past `rows` and K.
void split_rows(const float* x, int64_t rows, int64_t K, uint16_t* out) {
  const int64_t KC = (K + kTileK - 1) / kTileK;
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int64_t kc = 0; kc < KC; ++kc) {
      __m512i pair[kPieces];
      row_pairs(x + r * K + kc * kTileK, r < rows ? K - kc * kTileK : 0, pair);
      for (int64_t i = 0; i < kPieces; ++i)
        _mm512_storeu_si512(out + (kc * kPieces + i) * kTileElems + r * kTileK, pair[i]);
    }
}

// Each piece's 16 x 16 pairs turned by a register transpose and stored as the tile at out[i * kTileElems].
inline void store_transposed(f32x16 (&pairs)[kPieces][kTileRows], uint16_t* out) {
  for (int64_t i = 0; i < kPieces; ++i) {
    transpose16(pairs[i]);
    for (int64_t r = 0; r < kTileRows; ++r) std::memcpy(out + i * kTileElems + r * kTileK, &pairs[i][r], sizeof(f32x16));
  }
}

// One panel from the rows of W^T: rows (<= 16) of w [rows, K] (output columns, each over the K inputs) as B tiles
// out [KC][3][16 pairs of inputs][16 x 2], zero past `rows` and K: each row's pairs as split_rows forms them,
// then turned by a 16 x 16 register transpose.
void split_rows_t(const float* w, int64_t rows, int64_t K, uint16_t* out) {
  const int64_t KC = (K + kTileK - 1) / kTileK;
  for (int64_t kc = 0; kc < KC; ++kc) {
    f32x16 pairs[kPieces][kTileRows];
    for (int64_t c = 0; c < kTileRows; ++c) {
      __m512i pair[kPieces];
      row_pairs(w + c * K + kc * kTileK, c < rows ? K - kc * kTileK : 0, pair);
      for (int64_t i = 0; i < kPieces; ++i) pairs[i][c] = reinterpret_cast<f32x16>(pair[i]);
    }
    store_transposed(pairs, out + kc * kPieces * kTileElems);
  }
}

// Inputs 2t and 2t + 1 of 16 columns (a and b) as their three pieces' pairs: lane c of pair[i] holds piece i
// of a[c] in its low 16 bits and of b[c] in its high 16 (AMX's pairs of consecutive inputs).
inline void pair3(__m512 a, __m512 b, __m512i* pair) {
  __m512i pa[kPieces], pb[kPieces];
  split3(a, pa);
  split3(b, pb);
  for (int64_t i = 0; i < kPieces; ++i) pair[i] = _mm512_or_si512(pb[i], _mm512_srli_epi32(pa[i], 16));
}

// One float32 panel's rows 2t and 2t + 1 (16 weights each, a and b) as row t of its three B tiles, at
// out[i * kTileElems].
inline void split_pair(__m512 a, __m512 b, uint16_t* out) {
  __m512i pair[kPieces];
  pair3(a, b, pair);
  for (int64_t i = 0; i < kPieces; ++i) _mm512_storeu_si512(out + i * kTileElems, pair[i]);
}

// Row blocks b0 .. b1 - 1 (16 rows each) of x^T for x [D, M] (the product's inputs down D) as A tiles
// [KC][3][16 rows][32 inputs] at out + (b - b0) * KC * 3 tiles, zero past M and D: each 32 inputs' pairs formed 16
// columns at a time, as split_pair does for a panel, then turned into tile rows by a 16 x 16 register transpose.
// The blocks go by within each 32 inputs, so that x's rows are read along their length (the blocks one at a
// time read 64 bytes a row, a new page each for x [832, 1536]: 15% of such a product's time, against 13%).
void split_cols(const float* x, int64_t D, int64_t M, int64_t b0, int64_t b1, uint16_t* out) {
  const int64_t KC = (D + kTileK - 1) / kTileK;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t kc = 0; kc < KC; ++kc)
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t a0 = b * kTileRows;
      const __mmask16 mask = lanes(M - a0);
      f32x16 pairs[kPieces][kTileRows];
      for (int64_t t = 0; t < kTileRows; ++t) {
        const int64_t d = kc * kTileK + 2 * t;
        __m512i pair[kPieces];
        pair3(d < D ? _mm512_maskz_loadu_ps(mask, x + d * M + a0) : zero,
              d + 1 < D ? _mm512_maskz_loadu_ps(mask, x + (d + 1) * M + a0) : zero, pair);
        for (int64_t i = 0; i < kPieces; ++i) pairs[i][t] = reinterpret_cast<f32x16>(pair[i]);
      }
      store_transposed(pairs, out + ((b - b0) * KC + kc) * kPieces * kTileElems);
    }
}

// The 32 x 32 outputs of row blocks a0, a1 and panels b0, b1 (their A and B tiles, [KC][3] each) into c (row
// stride ldc floats). Per 32 inputs: 24 tile products and 14 tile loads, the largest piece product (x0 w0) last.
// (Passes over ranges of the inputs, so that a pair of panels' tiles stay in L1 while the row blocks go by,
// measured no faster. The order below, against 18 loads: 0-7% faster at SmolLM2's shapes, with the tiles
// stored straight into y.)
void amx_tile(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1, int64_t KC, float* c,
              int64_t ldc) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kc = 0; kc < KC; ++kc, a0 += kPieces * kTileElems, a1 += kPieces * kTileElems,
               b0 += kPieces * kTileElems, b1 += kPieces * kTileElems) {
#define SAMI_LOAD_X(i)                      \
  _tile_loadd(4, a0 + (i) * kTileElems, 64); \
  _tile_loadd(5, a1 + (i) * kTileElems, 64);
#define SAMI_LOAD_W(j)                      \
  _tile_loadd(6, b0 + (j) * kTileElems, 64); \
  _tile_loadd(7, b1 + (j) * kTileElems, 64);
#define SAMI_PRODUCTS        \
  _tile_dpbf16ps(0, 4, 6); \
  _tile_dpbf16ps(1, 4, 7); \
  _tile_dpbf16ps(2, 5, 6); \
  _tile_dpbf16ps(3, 5, 7);
    // The six piece products (x i, w j) in an order that changes one side at a time: 14 tile loads.
    SAMI_LOAD_X(0) SAMI_LOAD_W(2) SAMI_PRODUCTS
    SAMI_LOAD_W(1) SAMI_PRODUCTS
    SAMI_LOAD_X(1) SAMI_PRODUCTS
    SAMI_LOAD_W(0) SAMI_PRODUCTS
    SAMI_LOAD_X(2) SAMI_PRODUCTS
    SAMI_LOAD_X(0) SAMI_PRODUCTS
#undef SAMI_LOAD_X
#undef SAMI_LOAD_W
#undef SAMI_PRODUCTS
  }
  const int64_t stride = ldc * sizeof(float);
  _tile_stored(0, c, stride);
  _tile_stored(1, c + kWidth, stride);
  _tile_stored(2, c + kTileRows * ldc, stride);
  _tile_stored(3, c + kTileRows * ldc + kWidth, stride);
}
#else
bool amx_ready() { return false; }
#endif

constexpr int64_t kSlabBlocks = 8;  // row blocks per slab of a product with many rows
// Weights per chunk. A decode step's (one slab) streams them from memory once: small chunks share the work out
// evenly. A prefill's group of panels stays in each core's L2 while its slabs of rows go by, so that the rows
// are read from memory once per group: as large as L2 keeps beside a slab (with 256 KB groups, and the panels
// prefetched into L2 only, SmolLM2's prefill of 16 x 128 tokens took about 5% longer).
constexpr int64_t kStreamGroupBytes = 256 << 10, kSlabGroupBytes = 1 << 20;

std::atomic<uint64_t> next_job_id{1};

// One product, shared by the threads that take chunks (a slab of rows x a group of panels) from it. On the float32
// tile each slab of x is transposed into row blocks by the first thread that needs it; on AMX both operands are split
// into their pieces before the chunks (run_on_amx).
struct Job {
  const float* x = nullptr;     // [R, K], or [K, R] if x_transposed (AMX only)
  const float* w = nullptr;     // float32 panels, or
  const uint8_t* wq = nullptr;  // block-stored ones, or
  const float* w_rows = nullptr;  // weights as they are, [K, N], or
  const float* w_cols = nullptr;  // transposed, [N, K] (these two on AMX only)
  bool x_transposed = false;
  float* y = nullptr;
  uint64_t id = next_job_id.fetch_add(1, std::memory_order_relaxed);
  int64_t R = 0, K = 0, N = 0, P = 0, block = 0, slab = 0, slabs = 0, group = 0, chunks = 0;
  std::vector<float> xt;                         // x as row blocks [blocks, K, block], zero-padded
  std::unique_ptr<std::atomic<int>[]> state;     // per slab (see once)
  bool amx = false;                              // AMX tiles (see amx_tile) instead of the float32 tile
#ifdef SAMI_AMX
  int64_t KC = 0;                                // K in tiles of 32 inputs
  PooledBuffer xa, wb;                           // the slabs' and the panels' bf16 pieces
#endif

  // Runs fill() in the first thread to ask for an item whose state is `st` (0 to do, 1 being done, 2 ready);
  // the others wait for it.
  template <class F>
  static void once(std::atomic<int>& st, F fill) {
    int expected = 0;
    if (st.compare_exchange_strong(expected, 1, std::memory_order_acquire)) {
      fill();
      st.store(2, std::memory_order_release);
    } else {
      while (st.load(std::memory_order_acquire) != 2) std::this_thread::yield();
    }
  }

  const float* slab_xt(int64_t s) {
    once(state[s], [&] {
      for (int64_t r0 = s * slab; r0 < std::min(R, (s + 1) * slab); r0 += block)  // each row block [K, block]
        transpose_rows(x + r0 * K, K, std::min(block, R - r0), K, block, xt.data() + r0 * K, block);
    });
    return xt.data() + s * slab * K;
  }

  // Chunk c: panel group c / slabs, slab c % slabs (consecutive chunks share a group's weights).
  void chunk(int64_t c) {
#ifdef SAMI_AMX
    if (amx) return run_amx(c);
#endif
    slabs > 1 ? run<true>(c) : run<false>(c);
  }

  template <bool IN_L2>
  void run(int64_t c) {
    const int64_t p0 = c / slabs * group, p1 = std::min(P, p0 + group), s = c % slabs;
    const float* xs = slab_xt(s);
    if (wq != nullptr && R <= kOnePass) {  // a decode step (one block of rows): the blocks stream from memory once
      for (int64_t p = p0; p < p1; ++p)
        qtile_rows(xs, block, K, wq + p * (K / kBlock * kBlockBytes), y, N, p * kWidth, R);
      return;
    }
    const float* wg = wq == nullptr ? w + p0 * K * kWidth : rebuilt_group(p0, p1);  // the group's float32 panels
    for (int64_t r0 = s * slab; r0 < std::min(R, (s + 1) * slab); r0 += block) {
      const int64_t rows = std::min(block, R - r0);
      const float* xb = xs + (r0 - s * slab) * K;
      int64_t p = p0;
      for (; rows <= kRows && p + kPanels <= p1; p += kPanels)
        tile_rows<kPanels, IN_L2>(xb, block, K, wg + (p - p0) * K * kWidth, y + r0 * N, N, p * kWidth, rows);
      for (; p < p1; ++p)
        tile_rows<1, IN_L2>(xb, block, K, wg + (p - p0) * K * kWidth, y + r0 * N, N, p * kWidth, rows);
    }
  }

#ifdef SAMI_AMX
  static constexpr int64_t kTilesBytes = kPieces * kTileElems;  // (per 32 inputs of a row block or panel)

  // Row blocks b0 .. b1 - 1 (zero past R) as A tiles [KC][3][16][32] each, in xa.
  void split_blocks(int64_t b0, int64_t b1) {
    uint16_t* out = xa.buf->data + b0 * KC * kTilesBytes;
    if (x_transposed) return split_cols(x, K, R, b0, b1, out);
    for (int64_t b = b0; b < b1; ++b, out += KC * kTilesBytes)
      split_rows(x + b * kTileRows * K, std::clamp<int64_t>(R - b * kTileRows, 0, kTileRows), K, out);
  }

  // Panels p0 .. p1 - 1 (zero past P) as B tiles [KC][3][16 pairs of inputs][16 x 2] each, in wb.
  void split_panels(int64_t p0, int64_t p1) {
    uint16_t* out = wb.buf->data + p0 * KC * kTilesBytes;
    const __m512 zero = _mm512_setzero_ps();
    if (w_rows != nullptr) {  // from the rows of W, each pair of rows across the panels (read along W's rows)
      for (int64_t t = 0; t < KC * kTileRows; ++t)  // inputs 2t and 2t + 1
        for (int64_t p = p0; p < p1; ++p) {
          const __mmask16 mask = lanes(N - p * kWidth);
          auto row = [&](int64_t k) { return k < K ? _mm512_maskz_loadu_ps(mask, w_rows + k * N + p * kWidth) : zero; };
          split_pair(row(2 * t), row(2 * t + 1),
                     out + ((p - p0) * KC + t / kTileRows) * kTilesBytes + t % kTileRows * kTileK);
        }
      return;
    }
    thread_local std::vector<float> rebuilt;  // a block-stored panel as float32 [K, 16]
    for (int64_t p = p0; p < p1; ++p, out += KC * kTilesBytes) {
      if (w_cols != nullptr) {  // the panel's 16 columns from 16 rows of W^T
        split_rows_t(w_cols + p * kWidth * K, std::clamp<int64_t>(N - p * kWidth, 0, kWidth), K, out);
        continue;
      }
      // The panel's 16 weights of input k at src + k * 16: a float32 panel [K, 16], or a block-stored one
      // rebuilt; none past P (zero tiles).
      const float* src = nullptr;
      if (p < P && wq == nullptr) {
        src = w + p * K * kWidth;
      } else if (p < P) {
        rebuilt.resize(K * kWidth);
        dequantize(wq, K, p, p + 1, rebuilt.data());
        src = rebuilt.data();
      }
      auto row = [&](int64_t k) { return src != nullptr && k < K ? _mm512_loadu_ps(src + k * kWidth) : zero; };
      for (int64_t t = 0; t < KC * kTileRows; ++t)  // inputs 2t and 2t + 1
        split_pair(row(2 * t), row(2 * t + 1), out + t / kTileRows * kTilesBytes + t % kTileRows * kTileK);
    }
  }

  // Chunk c on AMX: the slab's row blocks x the group's panels, two by two.
  void run_amx(int64_t c) {
    const int64_t g = c / slabs, s = c % slabs, p0 = g * group, r_slab = s * slab;
    const uint16_t* xs = xa.buf->data + r_slab / kTileRows * KC * kTilesBytes;
    const uint16_t* ws = wb.buf->data + p0 * KC * kTilesBytes;
    const int64_t rows = std::min(R - r_slab, slab), n = std::min(group * kWidth, N - p0 * kWidth);  // outputs here
    const int64_t per = KC * kTilesBytes;  // bf16 per row block or panel
    alignas(64) float edge[2 * kTileRows * 2 * kWidth];  // a 32 x 32 block that reaches past y's edge
    const TileScope tiles;
    for (int64_t p = 0; p * kWidth < n; p += 2)
      for (int64_t b = 0; b * kTileRows < rows; b += 2) {
        float* out = y + (r_slab + b * kTileRows) * N + (p0 + p) * kWidth;
        const int64_t m = std::min(2 * kTileRows, rows - b * kTileRows), k = std::min(2 * kWidth, n - p * kWidth);
        const bool inside = m == 2 * kTileRows && k == 2 * kWidth;
        amx_tile(xs + b * per, xs + (b + 1) * per, ws + p * per, ws + (p + 1) * per, KC, inside ? out : edge,
                 inside ? N : 2 * kWidth);
        if (!inside)
          for (int64_t r = 0; r < m; ++r) std::memcpy(out + r * N, edge + r * 2 * kWidth, k * sizeof(float));
      }
  }
#endif

  // A group of block-stored panels for more rows than one tile, rebuilt as float32 panels into this thread's
  // buffer once for all of its slabs that the thread takes (consecutive chunks share a group).
  const float* rebuilt_group(int64_t p0, int64_t p1) {
    thread_local std::vector<float> buf;
    thread_local uint64_t buf_job = 0;
    thread_local int64_t buf_p0 = -1;
    if (buf_job != id || buf_p0 != p0) {
      buf.resize(group * K * kWidth);
      dequantize(wq, K, p0, p1, buf.data());
      buf_job = id;
      buf_p0 = p0;
    }
    return buf.data();
  }
};

// A job for y [R, N] = x [R, K] times the weights, whose sources the caller sets.
std::unique_ptr<Job> new_job(float* y, int64_t R, int64_t K, int64_t N) {
  auto job = std::make_unique<Job>();
  job->y = y;
  job->R = R;
  job->K = K;
  job->N = N;
  job->P = (N + kWidth - 1) / kWidth;  // the panels that hold outputs
  return job;
}

#ifdef SAMI_AMX
// Runs the job on AMX tiles, shared out over the pool: first both operands split into their pieces, a few row
// blocks or panels at a time, then the tile products. (Splitting each slab and group at its first use, as the
// float32 tile does, kept the other thread waiting for it: x W and dy W^T ran 5-13% longer, x^T dy about as long.)
void run_on_amx(ffi::ThreadPool& pool, Job& job) {
  job.amx = true;
  const int64_t R = job.R, P = job.P, KC = job.KC = (job.K + kTileK - 1) / kTileK;
  job.slab = std::min(kAmxSlabRows, (R + 2 * kTileRows - 1) / (2 * kTileRows) * 2 * kTileRows);
  job.slabs = (R + job.slab - 1) / job.slab;
  job.group = std::max<int64_t>(2, kAmxGroupBytes / (KC * Job::kTilesBytes * 2) / 2 * 2);
  const int64_t groups = (P + job.group - 1) / job.group;
  const int64_t blocks = job.slabs * job.slab / kTileRows, panels = groups * job.group;
  job.xa.get(blocks * KC * Job::kTilesBytes);
  job.wb.get(panels * KC * Job::kTilesBytes);
  const int64_t block_units = (blocks + kSplitUnit - 1) / kSplitUnit, panel_units = (panels + kSplitUnit - 1) / kSplitUnit;
  parallel_for(pool, block_units + panel_units, [j = &job, blocks, panels, block_units](int64_t u) {
    if (u < block_units) return j->split_blocks(u * kSplitUnit, std::min(blocks, (u + 1) * kSplitUnit));
    u -= block_units;
    j->split_panels(u * kSplitUnit, std::min(panels, (u + 1) * kSplitUnit));
  });
  job.chunks = groups * job.slabs;
  parallel_for(pool, job.chunks, [j = &job](int64_t c) { j->chunk(c); });
}
#endif

#ifdef SAMI_FMA_GEMM
// Training's products on AVX2 (no AVX-512): a packed GEMM in the manner of BLIS, on 8-lane registers (the f32x16
// tiles above are pairs of ymm registers there, which GCC moves through the stack). b's rows are packed once per call
// as panels of 16 columns [k blocks][panels][kc][16]; each block of a's rows is packed for all of K
// ([k blocks][mc / 6][kc][6]) and runs a 6 x 16 register tile (12 accumulators; 2 loads and 6 broadcasts per 12
// multiply-adds) down each panel through the k blocks. On a 2-core AMD EPYC (Zen 3) the 15 products of a SmolLM2
// layer and its vocabulary head at the CPU benchmark's shapes (x W, dy W^T, x^T dy) took 0.87-0.95 the time of
// XLA's dots (median 0.91; session 36).
namespace fma {

constexpr int64_t MR = 6, NR = 16;
constexpr int64_t KC = 192;  // a panel's block of b, kc x 16 floats (12 KB), stays in L1 for a block of rows
constexpr int64_t MC = 96;   // a block of a's rows
constexpr int64_t kRowsBytes = 256 << 10;  // a block of a's rows, packed for all of K, stays in L2
constexpr size_t kKeepBytes = 64 << 20;    // packed b kept for the next call up to this size

// An operand as XLA holds it: element (i, k) at p[i * si + k * sk] (a's row i, or b's column i).
struct Operand {
  const float* p;
  int64_t si, sk;
};

// c[6, 16] (row stride ldc) = (or +=, with accumulate) a[kc][6] times b[kc][16], both packed.
inline void tile(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                 bool accumulate) {
  __m256 acc[MR][2];
  for (int64_t r = 0; r < MR; ++r) {
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + NR - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
    for (int64_t r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
    a += MR;
    b += NR;
  }
  for (int64_t r = 0; r < MR; ++r) {
    float* row = c + r * ldc;
    if (accumulate) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(row));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(row + 8));
    }
    _mm256_storeu_ps(row, acc[r][0]);
    _mm256_storeu_ps(row + 8, acc[r][1]);
  }
}

// tile for the first `rows` rows and `cols` columns of c alone (through a buffer where either is short of a tile's).
inline void tile_part(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t rows, int64_t cols,
                      bool accumulate) {
  if (rows == MR && cols == NR) return tile(kc, a, b, c, ldc, accumulate);
  alignas(32) float edge[MR * NR];
  for (int64_t t = 0; t < rows && accumulate; ++t) std::memcpy(edge + t * NR, c + t * ldc, cols * sizeof(float));
  tile(kc, a, b, edge, NR, accumulate);
  for (int64_t t = 0; t < rows; ++t) std::memcpy(c + t * ldc, edge + t * NR, cols * sizeof(float));
}

// r[0..7] transposed in place: lane j of r[i] becomes lane i of r[j].
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Panel p of b's rows [k0, k0 + kc) as [kc][16] (columns past N zero).
void pack_panel(Operand b, int64_t N, int64_t k0, int64_t kc, int64_t p, float* out) {
  const int64_t j0 = p * NR, cols = std::min(NR, N - j0);
  if (b.si == 1 && cols == NR) {  // rows of b contiguous: 16 floats a step
    for (int64_t k = 0; k < kc; ++k) std::memcpy(out + k * NR, b.p + (k0 + k) * b.sk + j0, NR * sizeof(float));
    return;
  }
  int64_t k = 0;
  if (b.sk == 1 && cols == NR) {  // b held transposed (its columns contiguous): 8 x 8 blocks turned in registers
    for (; k + 8 <= kc; k += 8) {
      for (int64_t half = 0; half < NR; half += 8) {
        __m256 r[8];
        for (int64_t j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(b.p + (j0 + half + j) * b.si + k0 + k);
        transpose8(r);
        for (int64_t i = 0; i < 8; ++i) _mm256_store_ps(out + (k + i) * NR + half, r[i]);
      }
    }
  }
  if (cols < NR) std::fill(out, out + kc * NR, 0.0f);
  for (int64_t j = 0; j < cols; ++j) {  // one column of b a step (the rest of the rows, where turned above)
    const float* col = b.p + (j0 + j) * b.si + k0 * b.sk;
    for (int64_t kk = k; kk < kc; ++kk) out[kk * NR + j] = col[kk * b.sk];
  }
}

// a's rows [i0, i0 + mc) and columns [k0, k0 + kc) as [ceil(mc / 6)][kc][6] (rows past M zero; writes up to 2
// floats past its end).
void pack_rows(Operand a, int64_t M, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* out) {
  for (int64_t i = 0; i < mc; i += MR) {
    float* o = out + i * kc;
    const int64_t rows = std::min(MR, M - i0 - i);
    if (a.si == 1 && rows == MR) {  // a held transposed: its 6 rows are contiguous at each k
      for (int64_t k = 0; k < kc; ++k) std::memcpy(o + k * MR, a.p + i0 + i + (k0 + k) * a.sk, MR * sizeof(float));
      continue;
    }
    int64_t k = 0;
    if (a.sk == 1 && rows == MR) {  // rows contiguous: 8 columns of the 6 rows turned in registers, each stored as
      for (; k + 8 <= kc; k += 8) {  // 8 floats of which the next store overwrites the last 2
        __m256 r[8];
        for (int64_t t = 0; t < MR; ++t) r[t] = _mm256_loadu_ps(a.p + (i0 + i + t) * a.si + k0 + k);
        r[6] = r[7] = _mm256_setzero_ps();
        transpose8(r);
        for (int64_t t = 0; t < 8; ++t) _mm256_storeu_ps(o + (k + t) * MR, r[t]);
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      const float* row = a.p + (i0 + i + r) * a.si + k0 * a.sk;
      for (int64_t kk = k; kk < kc; ++kk) o[kk * MR + r] = r < rows ? row[kk * a.sk] : 0.0f;
    }
  }
}

// n floats of v, 32-byte aligned, and 8 to spare after them. v only grows: a thread's buffer serves products of
// many sizes, and growing it back after a shrink would zero the difference on every call.
float* aligned(std::vector<float>& v, size_t n) {
  if (v.size() < n + 16) v.resize(n + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 31) & ~uintptr_t{31});
}

// y [M, N] (row-major) = a b, a [M, K] and b [K, N] as Operands, shared out over the pool by blocks of rows.
void product(ffi::ThreadPool& pool, Operand a, Operand b, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t P = (N + NR - 1) / NR, blocks_k = (K + KC - 1) / KC;
  // Kept by the calling thread between calls (no page faults anew), unless larger than kKeepBytes.
  thread_local std::vector<float> packed_b;
  float* bp = aligned(packed_b, blocks_k * P * KC * NR);
  struct Trim {
    ~Trim() {
      if (packed_b.capacity() * sizeof(float) > kKeepBytes) std::vector<float>().swap(packed_b);
    }
  } trim;
  parallel_for(pool, blocks_k * P, [=](int64_t u) {
    const int64_t kb = u / P, k0 = kb * KC, kc = std::min(KC, K - k0);
    pack_panel(b, N, k0, kc, u % P, bp + (kb * P + u % P) * KC * NR);
  });
  // Blocks of rows, as many as a multiple of the workers, each a multiple of 6 rows, at most MC and at most what
  // keeps the block's packed rows (all of K) within kRowsBytes of L2.
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t most = std::max(MR, std::min(MC, kRowsBytes / int64_t{sizeof(float)} / K / MR * MR));
  const int64_t units = ((M + most - 1) / most + workers - 1) / workers * workers;
  const int64_t mc = ((M + units - 1) / units + MR - 1) / MR * MR;
  parallel_for(pool, (M + mc - 1) / mc, [=](int64_t u) {
    thread_local std::vector<float> packed_a;  // [k blocks][mc / 6][kc][6]
    float* ap = aligned(packed_a, blocks_k * mc * KC);
    const int64_t i0 = u * mc, rows = std::min(mc, M - i0), tiles = (rows + MR - 1) / MR;
    for (int64_t kb = 0; kb < blocks_k; ++kb) pack_rows(a, M, i0, rows, kb * KC, std::min(KC, K - kb * KC),
                                                       ap + kb * mc * KC);
    // Each panel's [mc, 16] of y through all k blocks, so that it stays in L1 while the blocks add to it. The next
    // block of b (the panel's next k block, or the next panel's first) is fetched into L1 in shares, one before each
    // tile: it comes from L3, and its first tiles otherwise waited for it. In a SAMI step on a 2-core AMD EPYC
    // (session 39) the tiles ran 3-6% faster (thread time per FLOP) and the step took paired 0.958, 0.954 and 0.981 of
    // the time in three runs of 5 to 10 rounds; alone, with b in cache, a product took 0.96-1.01.
    for (int64_t p = 0; p < P; ++p) {
      const int64_t j0 = p * NR, cols = std::min(NR, N - j0);
      for (int64_t kb = 0; kb < blocks_k; ++kb) {
        const int64_t kc = std::min(KC, K - kb * KC);
        const float* panel = bp + (kb * P + p) * KC * NR;
        const float* rows_kb = ap + kb * mc * KC;
        const bool last_kb = kb + 1 == blocks_k;
        const int64_t next_kb = last_kb ? 0 : kb + 1, next_p = last_kb ? p + 1 : p;
        const char* next = reinterpret_cast<const char*>(bp + (next_kb * P + next_p) * KC * NR);
        // (a panel's row of 16 floats is one cache line, or two halves where bp is not 64-byte aligned)
        const int64_t lines = next_p < P ? std::min(KC, K - next_kb * KC) + 1 : 0;
        const int64_t share = (lines + tiles - 1) / tiles;
        for (int64_t i = 0, l = 0; i < rows; i += MR) {
          for (const int64_t end = std::min(lines, l + share); l < end; ++l) _mm_prefetch(next + l * 64, _MM_HINT_T0);
          tile_part(kc, rows_kb + i * kc, panel, y + (i0 + i) * N + j0, N, std::min(MR, rows - i), cols, kb > 0);
        }
      }
    }
  });
}


// b [K, N] (an Operand) as panels [ceil(N / 16)][K][16] (columns past N zero) in buf, 32-byte aligned.
const float* pack_panels(Operand b, int64_t K, int64_t N, std::vector<float>& buf) {
  const int64_t P = (N + NR - 1) / NR;
  float* out = aligned(buf, P * K * NR);
  for (int64_t p = 0; p < P; ++p) pack_panel(b, N, 0, K, p, out + p * K * NR);
  return out;
}

// What a block of 6 rows of block_product multiplies: k in [k0, k1), panels [p0, p1).
struct Span {
  int64_t k0, k1, p0, p1;
};

// c [M, N] (row stride ldc) = a b, or += with accumulate, on the calling thread alone, with b packed by pack_panels
// (K rows): each block of 6 rows from i0 only over span(i0)'s k and panels, the rest of c untouched. Attention's
// products, whose causal masks leave each block of queries a range of slots.
template <class F>
void block_product(Operand a, int64_t M, const float* bp, int64_t K, int64_t N, float* c, int64_t ldc,
                   bool accumulate, F span) {
  thread_local std::vector<float> packed;
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const Span sp = span(i0);
    if (sp.p0 >= sp.p1) continue;
    const int64_t kc = std::max<int64_t>(0, sp.k1 - sp.k0), rows = std::min(MR, M - i0);
    float* ap = aligned(packed, kc * MR);
    if (kc > 0) pack_rows(a, M, i0, MR, sp.k0, kc, ap);
    for (int64_t p = sp.p0; p < sp.p1; ++p)
      tile_part(kc, ap, bp + (p * K + sp.k0) * NR, c + i0 * ldc + p * NR, ldc, rows, std::min(NR, N - p * NR),
                accumulate);
  }
}
}  // namespace fma
#endif

// Shares one product out over the pool: x [R, K] times the weights (float32 panels w, or block-stored wq) into
// y [R, N].
void product(ffi::ThreadPool& pool, const float* x, const float* w, const uint8_t* wq, float* y, int64_t R,
             int64_t K, int64_t N) {
  if (R == 0 || N == 0) return;
  auto job = new_job(y, R, K, N);
  job->x = x;
  job->w = w;
  job->wq = wq;
#ifdef SAMI_AMX
  if (R > kOnePass && amx_ready()) return run_on_amx(pool, *job);
#endif
  // A decode step's few rows are one block and one slab, so that the weights stream from memory once; a
  // block holds as many rows as its tile reads.
  const int64_t block = job->block = R <= kOnePass ? tile_height(R) : kRows;
  const int64_t slab = job->slab = R <= kOnePass ? block : kSlabBlocks * kRows;
  job->slabs = (R + slab - 1) / slab;
  job->xt.assign(job->slabs * slab * K, 0.0f);
  job->state.reset(new std::atomic<int>[job->slabs]());
  // (Groups are sized by their float32 panels; block-stored ones stream 3.2x fewer bytes in the same chunks.)
  const int64_t group_bytes = job->slabs > 1 ? kSlabGroupBytes : kStreamGroupBytes;
  job->group = std::max<int64_t>(kPanels, group_bytes / (K * kWidth * sizeof(float)) / kPanels * kPanels);
  job->chunks = (job->P + job->group - 1) / job->group * job->slabs;
  parallel_for(pool, job->chunks, [j = job.get()](int64_t c) { j->chunk(c); });
}

ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kWidth || wd[1] != xd[1] ||
      yd[0] != xd[0] || yd[1] > wd[0] * kWidth) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "sami_panel_matmul: want x [R, K], w [P, K, 16] and y [R, N] with N <= 16 P");
  }
  product(pool, x.typed_data(), w.typed_data(), nullptr, y->typed_data(), xd[0], xd[1], yd[1]);
  return ffi::Error::Success();
}

// A buffer's dimensions as "[a, b, ...]", for error messages.
template <class Dims>
std::string dims(const Dims& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// y [M, N] = op(x) op(w), op(a) = a or a^T as transpose_x / transpose_w say: x [M, K] or [K, M], w [K, N] or
// [N, K] (not both transposed), all as XLA holds them; or w a stack [L, ...] of such weights, of which `index` [] picks
// one (a layer's weights read in place from the scan's stack, which XLA would otherwise copy out for the call).
// Training's products: x W, dy W^T and the weight gradient x^T dy. On AMX each operand's tiles are formed from it as
// it is (rows, or columns turned in registers), so no transposed or packed copy goes through memory; else x^T and
// the weights' panels are formed for the float32 tiles.
ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> y, bool transpose_x, bool transpose_w) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const size_t stacked = wd.size() == 3 ? 1 : 0;
  const bool ranks = xd.size() == 2 && wd.size() == 2 + stacked && yd.size() == 2 && index.dimensions().size() == 0;
  const int64_t M = ranks ? xd[transpose_x ? 1 : 0] : 0, K = ranks ? xd[transpose_x ? 0 : 1] : 0,
                N = ranks ? wd[stacked + (transpose_w ? 0 : 1)] : 0;
  const int64_t layer = ranks ? *index.typed_data() : 0, layers = stacked ? wd[0] : 1;
  if (!ranks || wd[stacked + (transpose_w ? 1 : 0)] != K || yd[0] != M || yd[1] != N || (transpose_x && transpose_w) ||
      layer < 0 || layer >= layers) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "sami_dense_matmul: want x [M, K] (or [K, M] with transpose_x), w [K, N] (or [N, K] with "
                      "transpose_w, not both; or a stack [L, ...] of them and an index in [0, L)) and y [M, N]; got "
                      "x " + dims(xd) + ", w " + dims(wd) + ", index " + std::to_string(layer) + ", y " + dims(yd) +
                      (transpose_x ? " with transpose_x" : "") + (transpose_w ? " with transpose_w" : ""));
  }
  const float* xs = x.typed_data();
  const float* ws = w.typed_data() + layer * K * N;
  float* out = y->typed_data();
  if (K == 0) {
    std::fill(out, out + M * N, 0.0f);
    return ffi::Error::Success();
  }
#ifdef SAMI_AMX
  if (M > kOnePass && amx_ready()) {
    auto job = new_job(out, M, K, N);
    job->x = xs;
    job->x_transposed = transpose_x;
    (transpose_w ? job->w_cols : job->w_rows) = ws;
    run_on_amx(pool, *job);
    return ffi::Error::Success();
  }
#endif
#ifdef SAMI_FMA_GEMM
  fma::product(pool, transpose_x ? fma::Operand{xs, 1, M} : fma::Operand{xs, K, 1},
               transpose_w ? fma::Operand{ws, K, 1} : fma::Operand{ws, 1, N}, out, M, K, N);
#else
  const int64_t P = (N + kWidth - 1) / kWidth;
  std::vector<float> xt(transpose_x ? M * K : 0), panels(P * K * kWidth, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t m = 0; m < (transpose_x ? M : 0); ++m) xt[m * K + k] = xs[k * M + m];
    for (int64_t n = 0; n < N; ++n) panels[(n / kWidth * K + k) * kWidth + n % kWidth] = transpose_w ? ws[n * K + k] : ws[k * N + n];
  }
  product(pool, transpose_x ? xt.data() : xs, panels.data(), nullptr, out, M, K, N);
#endif
  return ffi::Error::Success();
}

ffi::Error BlockMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] % kBlock != 0 ||
      wd[1] != xd[1] / kBlock * kBlockBytes || yd[0] != xd[0] || yd[1] > wd[0] * kWidth) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "sami_block_matmul: want x [R, K] (K a multiple of 32), w [P, K / 32 * 640] uint8 and "
                      "y [R, N] with N <= 16 P");
  }
  product(pool, x.typed_data(), nullptr, w.typed_data(), y->typed_data(), xd[0], xd[1], yd[1]);
  return ffi::Error::Success();
}

// The sum of v's lanes, as a tree (a chain of 16 scalar adds made the decode attention's scores 4x slower).
inline float hsum(f32x16 v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// sum of a[i] * b[i] over n floats
inline float dot(const float* a, const float* b, int64_t n) {
  f32x16 acc = {};
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) acc += load(a + i) * load(b + i);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// e^x for each lane, within 2 ulp of float32's for x in [-87.3, 88.7] (clamped there: e^x below 1.2e-38 is
// taken as that, not as a denormal or 0): 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, a degree-7 Taylor
// polynomial for e^r (its error below 5e-9) and ln 2 in two parts so that r is exact.
// (V: f32x16, or 8 lanes for AVX2's registers.)
template <class V>
inline V exp_lanes(V x) {
  typedef int32_t I __attribute__((vector_size(sizeof(V))));
  const V lo = V{} - 87.3f, hi = V{} + 88.7f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const V t = x * 1.44269504088896341f + kRound;
  const V n = t - kRound;
  const V r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
  V poly = r * (1.0f / 5040) + 1.0f / 720;
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  I bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n: t's bits minus kRound's are n
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return poly * scale;
}

// Softmax in place over p[lo, hi) of scale * p, lo a multiple of 16 (p readable up to hi rounded up to 16):
// over the lanes that keep(s0) marks (all ones) in each block of 16 from s0; the other lanes get 0. Returns the
// log of the sum of exp(scale * p) over the kept lanes (what the backward pass rebuilds the softmax from).
template <class Keep>
float softmax(float* p, int64_t lo, int64_t hi, float scale, Keep keep) {
  const f32x16 lowest = f32x16{} + std::numeric_limits<float>::lowest();
  f32x16 top = lowest;
  for (int64_t s0 = lo; s0 < hi; s0 += kWidth) {
    f32x16 x = load(p + s0) * scale;
    x = keep(s0) ? x : lowest;
    top = top > x ? top : x;
    std::memcpy(p + s0, &x, sizeof x);
  }
  float mx = top[0];
  for (int64_t j = 1; j < kWidth; ++j) mx = std::max(mx, top[j]);
  f32x16 sum = {};
  for (int64_t s0 = lo; s0 < hi; s0 += kWidth) {
    f32x16 e = exp_lanes(load(p + s0) - mx);
    e = keep(s0) ? e : f32x16{};
    sum += e;
    std::memcpy(p + s0, &e, sizeof e);
  }
  const float total = hsum(sum);
  const f32x16 inv = f32x16{} + 1.0f / total;
  for (int64_t s0 = lo; s0 < hi; s0 += kWidth) {
    const f32x16 x = load(p + s0) * inv;
    std::memcpy(p + s0, &x, sizeof x);
  }
  return mx + std::log(total);
}

typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
// Register tiles of attend_block and attend_block_grad: queries per chunk, 16-slot blocks of a chunk's scores step,
// 16-column blocks of its weighted sums, and slots x 16-column blocks of a rank update. Sized for the 32 zmm registers.
// Without AVX-512 each f32x16 is two of AVX2's 16 ymm registers (GCC moves them through the stack in halves), and
// these tiles spilled: the smaller ones below, the fastest of those tried, took one SAMI window's attention (2-core
// AMD EPYC, session 35) from 72 to 19 ms forward and from 212 to 63 ms forward and backward, against XLA's 8 and 19.
// Training's attention runs on the packed AVX2 GEMM there instead (fma::attend_train); these serve the sampler.
#ifdef __AVX512F__
constexpr int64_t kQueries = 8, kScoreBlocks = 2, kSumBlocks = 2, kRankSlots = 4, kRankBlocks = 4;
#else
constexpr int64_t kQueries = 4, kScoreBlocks = 1, kSumBlocks = 1, kRankSlots = 8, kRankBlocks = 1;
#endif

// mean [D]: the mean of all S values (D floats each, kv_stride apart), what a query with no unmasked slot takes;
// computed on first use (mean empty), once for all such queries of a (row, KV head).
void value_mean(const float* v, int64_t kv_stride, int64_t D, int64_t S, std::vector<float>& mean) {
  if (!mean.empty()) return;
  mean.assign(D, 0.0f);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < D; ++c) mean[c] += v[s * kv_stride + c];
  for (float& x : mean) x /= static_cast<float>(S);
}

// That query's gradient to the values: dout / S added to each of the S slots of dv.
void spread_to_values(const float* dout, float* dv, int64_t kv_stride, int64_t D, int64_t S) {
  const float inv = 1.0f / static_cast<float>(S);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < D; ++c) dv[s * kv_stride + c] += dout[c] * inv;
}

// Each token's first and last unmasked slot in mask [T, S] (first > last: none), found 8 mask bytes at a time;
// returns the number of slots that any token reads, [0, used) (a fresh prefill's cache past its tokens is never
// read).
int64_t mask_ranges(const bool* mask, int64_t T, int64_t S, std::vector<int64_t>& first, std::vector<int64_t>& last) {
  first.resize(T);
  last.resize(T);
  int64_t used = 0;
  for (int64_t t = 0; t < T; ++t) {
    const bool* mt = mask + t * S;
    auto word = [&](int64_t s) {  // mask bytes s .. s + 7 (s + 8 <= S)
      uint64_t w;
      std::memcpy(&w, mt + s, sizeof w);
      return w;
    };
    int64_t f = 0, l = S - 1;
    while (f + 8 <= S && word(f) == 0) f += 8;
    while (f < S && !mt[f]) ++f;
    while (l >= f + 8 && word(l - 7) == 0) l -= 8;
    while (l >= f && !mt[l]) --l;
    first[t] = f;
    last[t] = l;
    if (f <= l) used = std::max(used, l + 1);
  }
  return used;
}

// Slots [0, used) of x (D floats each, `stride` apart) transposed into xt [D, S16], 16 at a time (columns from used
// up to a multiple of 16 zero; past that they hold an earlier unit's: read, but always masked).
void transpose_slots(const float* x, int64_t stride, int64_t D, int64_t used, int64_t S16, std::vector<float>& xt) {
  xt.resize(D * S16);
  for (int64_t s0 = 0; s0 < used; s0 += kWidth)
    transpose_rows(x + s0 * stride, stride, std::min(kWidth, used - s0), D, kWidth, xt.data() + s0, S16);
}

// A chunk of attention's queries c0 .. c0 + nq - 1 (token-major, G heads per token): their masks in m
// [kQueries, S16] (zero past S), which of them have no unmasked slot (empty), and the slots [lo, hi) that the
// others read, lo a multiple of 16 (lo >= hi: none).
struct QueryChunk {
  int64_t nq = 0, lo = 0, hi = 0;
  bool empty[kQueries] = {};
  QueryChunk(const bool* mask, int64_t S, int64_t S16, int64_t G, int64_t c0, int64_t n, const int64_t* first,
             const int64_t* last, uint8_t* m) {
    nq = std::min(kQueries, n - c0);
    lo = S;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t t = (c0 + i) / G;
      std::memcpy(m + i * S16, mask + t * S, S);
      std::memset(m + i * S16 + S, 0, S16 - S);
      empty[i] = first[t] > last[t];
      if (!empty[i]) lo = std::min(lo, first[t]), hi = std::max(hi, last[t] + 1);
    }
    lo = lo / kWidth * kWidth;
  }
};

// Query i's mask bytes s0 .. s0 + 15 in m [kQueries, S16] as all-ones lanes.
inline auto keep_lanes(const uint8_t* m, int64_t S16, int64_t i, int64_t s0) {
  u8x16 bytes;
  std::memcpy(&bytes, m + i * S16 + s0, sizeof bytes);
  return __builtin_convertvector(bytes, i32x16) != 0;
}

// p[i * S16 + s] = xs[i] . column s of xt [D, S16] for s in [lo, hi) and i < nq: 16 NB slots x kQueries queries per
// step, the sum over d in kQueries NB independent chains (xs[nq ..] repeat xs[nq - 1]: a fixed shape keeps the sums
// in registers).
template <int NB>
inline void scores_step(const float* const* xs, const float* xt, int64_t S16, int64_t D, int64_t s0, int64_t nq,
                        float* p) {
  f32x16 acc[kQueries][NB] = {};
  for (int64_t d = 0; d < D; ++d) {
    f32x16 xd[NB];
    for (int b = 0; b < NB; ++b) xd[b] = load(xt + d * S16 + s0 + b * kWidth);
    for (int64_t i = 0; i < kQueries; ++i) {
      const float x = xs[i][d];
      for (int b = 0; b < NB; ++b) acc[i][b] += x * xd[b];
    }
  }
  for (int64_t i = 0; i < nq; ++i) std::memcpy(p + i * S16 + s0, acc[i], sizeof acc[i]);
}

// (16 kScoreBlocks slots a step where they are there: each broadcast query element serves kScoreBlocks multiply-adds.)
void chunk_scores(const float* const* xs, const float* xt, int64_t S16, int64_t D, int64_t lo, int64_t hi, int64_t nq,
                  float* p) {
  constexpr int64_t NB = kScoreBlocks;
  int64_t s0 = lo;
  for (; s0 + NB * kWidth <= hi; s0 += NB * kWidth) scores_step<NB>(xs, xt, S16, D, s0, nq, p);
  for (; s0 < hi; s0 += kWidth) scores_step<1>(xs, xt, S16, D, s0, nq, p);
}

// rows[s * stride + c] += the sum over i < nq of w[i * S16 + s] * xs[i][c], for s in [lo, hi) and c < D: a chunk's
// rank-nq update of the keys' or values' gradient, kRankSlots slots x kRankBlocks 16-column blocks of sums in registers
// where D allows.
void rank_update(float* rows, int64_t stride, int64_t lo, int64_t hi, const float* w, int64_t S16, int64_t nq,
                 const float* const* xs, int64_t D) {
  constexpr int64_t U = kRankSlots, J = kRankBlocks;
  int64_t c = 0;
  for (; c + J * kWidth <= D; c += J * kWidth) {
    int64_t s = lo;
    for (; s + U <= hi; s += U) {
      f32x16 acc[U][J];
      for (int u = 0; u < U; ++u)
        for (int j = 0; j < J; ++j) acc[u][j] = load(rows + (s + u) * stride + c + j * kWidth);
      for (int64_t i = 0; i < nq; ++i) {
        f32x16 x[J];
        for (int j = 0; j < J; ++j) x[j] = load(xs[i] + c + j * kWidth);
        for (int u = 0; u < U; ++u) {
          const float wi = w[i * S16 + s + u];
          for (int j = 0; j < J; ++j) acc[u][j] += wi * x[j];
        }
      }
      for (int u = 0; u < U; ++u) std::memcpy(rows + (s + u) * stride + c, acc[u], sizeof acc[u]);
    }
    for (; s < hi; ++s) {
      f32x16 acc[J];
      for (int j = 0; j < J; ++j) acc[j] = load(rows + s * stride + c + j * kWidth);
      for (int64_t i = 0; i < nq; ++i)
        for (int j = 0; j < J; ++j) acc[j] += w[i * S16 + s] * load(xs[i] + c + j * kWidth);
      std::memcpy(rows + s * stride + c, acc, sizeof acc);
    }
  }
  for (; c + kWidth <= D; c += kWidth)
    for (int64_t s = lo; s < hi; ++s) {
      f32x16 acc = load(rows + s * stride + c);
      for (int64_t i = 0; i < nq; ++i) acc += w[i * S16 + s] * load(xs[i] + c);
      std::memcpy(rows + s * stride + c, &acc, sizeof acc);
    }
  for (; c < D; ++c)
    for (int64_t s = lo; s < hi; ++s)
      for (int64_t i = 0; i < nq; ++i) rows[s * stride + c] += w[i * S16 + s] * xs[i][c];
}

// os[i][c] = the sum over s in [lo, hi) of p[i * S16 + s] * rows[s * stride + c], for i < nq and c < D: 16 kSumBlocks
// columns x kQueries queries per step.
void chunk_weighted(const float* p, int64_t S16, int64_t nq, const float* rows, int64_t stride, int64_t D, int64_t lo,
                    int64_t hi, float* const* os) {
  constexpr int64_t J = kSumBlocks;
  int64_t c = 0;
  for (; c + J * kWidth <= D; c += J * kWidth) {
    f32x16 acc[kQueries][J] = {};
    for (int64_t s = lo; s < hi; ++s) {
      f32x16 v[J];
      for (int j = 0; j < J; ++j) v[j] = load(rows + s * stride + c + j * kWidth);
      for (int64_t i = 0; i < kQueries; ++i) {
        const float pis = p[std::min(i, nq - 1) * S16 + s];
        for (int j = 0; j < J; ++j) acc[i][j] += pis * v[j];
      }
    }
    for (int64_t i = 0; i < nq; ++i) std::memcpy(os[i] + c, acc[i], sizeof acc[i]);
  }
  for (; c < D; ++c)
    for (int64_t i = 0; i < nq; ++i) {
      float acc = 0.0f;
      for (int64_t s = lo; s < hi; ++s) acc += p[i * S16 + s] * rows[s * stride + c];
      os[i][c] = acc;
    }
}

// Attention's queries of one (row, KV head) for T > 1 (a prefill, or training), kQueries (token, query head) pairs
// at a time so that each key and value read from cache serves all of them, as in a GEMM's register tile: the keys
// transposed once into kt [D, S16], a chunk's scores over the slots from its first unmasked one to its last
// (chunk_scores), a softmax per query, the values' weighted sums (chunk_weighted); masked slots get probability 0
// (what the float32-minimum score gives beside an unmasked one). q, out: [T, H, G, D] at this head; k, v: S slots
// of D floats, kv_stride apart; mask [T, S]; lse (if not null): [T, H, G] at this head, each query's log-sum-exp
// of its scaled scores (0 for a query with no unmasked slot, which gets the mean of all S values).
void attend_block(const float* q, const float* k, const float* v, int64_t kv_stride, const bool* mask, float* out,
                  float* lse, int64_t T, int64_t H, int64_t G, int64_t D, int64_t S, float scale) {
  thread_local std::vector<int64_t> first, last;
  const int64_t used = mask_ranges(mask, T, S, first, last);
  const int64_t S16 = (S + kWidth - 1) / kWidth * kWidth;
  thread_local std::vector<float> kt, p;         // keys [D, S16]; probabilities [kQueries, S16]
  thread_local std::vector<uint8_t> m;            // the chunk's tokens' masks [kQueries, S16]
  thread_local std::vector<float> mean;           // the mean of all S values: a query with no unmasked slot's
  mean.clear();
  transpose_slots(k, kv_stride, D, used, S16, kt);
  p.resize(kQueries * S16);
  m.resize(kQueries * S16);
  const int64_t n = T * G;  // queries, token-major
  auto at = [=](int64_t j) { return j / G * H * G + j % G; };  // query j's index in [T, H, G]
  for (int64_t c0 = 0; c0 < n; c0 += kQueries) {
    const QueryChunk ch(mask, S, S16, G, c0, n, first.data(), last.data(), m.data());
    const float* qs[kQueries];
    float* os[kQueries];
    for (int64_t i = 0; i < kQueries; ++i) qs[i] = q + at(c0 + std::min(i, ch.nq - 1)) * D;
    for (int64_t i = 0; i < ch.nq; ++i) os[i] = out + at(c0 + i) * D;
    chunk_scores(qs, kt.data(), S16, D, ch.lo, ch.hi, ch.nq, p.data());
    for (int64_t i = 0; i < ch.nq; ++i) {
      const float l = ch.empty[i] ? 0.0f : softmax(p.data() + i * S16, ch.lo, ch.hi, scale, [&](int64_t s0) {
        return keep_lanes(m.data(), S16, i, s0);
      });
      if (lse != nullptr) lse[at(c0 + i)] = l;
    }
    chunk_weighted(p.data(), S16, ch.nq, v, kv_stride, D, ch.lo, ch.hi, os);
    for (int64_t i = 0; i < ch.nq; ++i) {
      if (!ch.empty[i]) continue;
      value_mean(v, kv_stride, D, S, mean);
      std::memcpy(os[i], mean.data(), D * sizeof(float));
    }
  }
}

// attend_block's gradients for one (row, KV head), from its queries, keys, values, mask, outputs, lse and the
// outputs' gradient dout (laid out as q): dq (as q), and dk, dv (as k and v, all S slots written). Per chunk of
// kQueries queries, the probabilities p = exp(scale * q.k - lse) and dp = dout . v (chunk_scores over keys and
// values transposed), ds = scale * p * (dp - dout . out), then dq = ds k (chunk_weighted), and each slot's
// dk += ds q and dv += p dout over the chunk's queries. A query with no unmasked slot took the mean of all values:
// it adds dout / S to every slot's dv and has dq = 0 (its scores are constants).
void attend_block_grad(const float* q, const float* k, const float* v, int64_t kv_stride, const bool* mask,
                       const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv,
                       int64_t T, int64_t H, int64_t G, int64_t D, int64_t S, float scale) {
  thread_local std::vector<int64_t> first, last;
  const int64_t used = mask_ranges(mask, T, S, first, last);
  const int64_t S16 = (S + kWidth - 1) / kWidth * kWidth;
  thread_local std::vector<float> kt, vt, p, ds;  // keys, values [D, S16]; p and ds [kQueries, S16]
  thread_local std::vector<uint8_t> m;
  transpose_slots(k, kv_stride, D, used, S16, kt);
  transpose_slots(v, kv_stride, D, used, S16, vt);
  p.resize(kQueries * S16);
  ds.resize(kQueries * S16);
  m.resize(kQueries * S16);
  for (int64_t s = 0; s < S; ++s) {
    std::fill(dk + s * kv_stride, dk + s * kv_stride + D, 0.0f);
    std::fill(dv + s * kv_stride, dv + s * kv_stride + D, 0.0f);
  }
  const int64_t n = T * G;
  auto at = [=](int64_t j) { return j / G * H * G + j % G; };
  const f32x16 scales = f32x16{} + scale;
  for (int64_t c0 = 0; c0 < n; c0 += kQueries) {
    const QueryChunk ch(mask, S, S16, G, c0, n, first.data(), last.data(), m.data());
    const float* qs[kQueries];
    const float* dos[kQueries];
    float* dqs[kQueries];
    for (int64_t i = 0; i < kQueries; ++i) {
      qs[i] = q + at(c0 + std::min(i, ch.nq - 1)) * D;
      dos[i] = dout + at(c0 + std::min(i, ch.nq - 1)) * D;
    }
    for (int64_t i = 0; i < ch.nq; ++i) dqs[i] = dq + at(c0 + i) * D;
    chunk_scores(qs, kt.data(), S16, D, ch.lo, ch.hi, ch.nq, p.data());
    chunk_scores(dos, vt.data(), S16, D, ch.lo, ch.hi, ch.nq, ds.data());
    for (int64_t i = 0; i < ch.nq; ++i) {
      float* pi = p.data() + i * S16;
      float* di = ds.data() + i * S16;
      if (ch.empty[i]) {  // (no slot of its own: zeros, so that the chunk's sums skip it)
        if (ch.lo < ch.hi) std::fill(pi + ch.lo, pi + ch.hi, 0.0f), std::fill(di + ch.lo, di + ch.hi, 0.0f);
        continue;
      }
      const f32x16 l = f32x16{} + lse[at(c0 + i)], row = f32x16{} + dot(dos[i], out + at(c0 + i) * D, D);
      for (int64_t s0 = ch.lo; s0 < ch.hi; s0 += kWidth) {
        f32x16 e = exp_lanes(load(pi + s0) * scales - l);
        e = keep_lanes(m.data(), S16, i, s0) ? e : f32x16{};
        const f32x16 d = e * (load(di + s0) - row) * scales;
        std::memcpy(pi + s0, &e, sizeof e);
        std::memcpy(di + s0, &d, sizeof d);
      }
    }
    chunk_weighted(ds.data(), S16, ch.nq, k, kv_stride, D, ch.lo, ch.hi, dqs);
    rank_update(dk, kv_stride, ch.lo, ch.hi, ds.data(), S16, ch.nq, qs, D);
    rank_update(dv, kv_stride, ch.lo, ch.hi, p.data(), S16, ch.nq, dos, D);
    for (int64_t i = 0; i < ch.nq; ++i) {
      if (!ch.empty[i]) continue;
      std::fill(dqs[i], dqs[i] + D, 0.0f);
      spread_to_values(dos[i], dv, kv_stride, D, S);
    }
  }
}

// r[j] = the sum of v[j]'s 16 lanes, for j = 0..15: a transpose-and-add tree, about 3 operations a sum where
// hsum takes 8.
inline f32x16 reduce16(const f32x16* v) {
  f32x16 t[8], u[4], w[2];
  for (int j = 0; j < 8; ++j)  // lanes 0-7: halves of v[2j]; 8-15: of v[2j + 1]
    t[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)
    u[j] = __builtin_shufflevector(t[2 * j], t[2 * j + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(t[2 * j], t[2 * j + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)
    w[j] = __builtin_shufflevector(u[2 * j], u[2 * j + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(u[2 * j], u[2 * j + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const f32x16 x = __builtin_shufflevector(w[0], w[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                   __builtin_shufflevector(w[0], w[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  // x's lane 2i holds v[o(i)]'s sum and lane 2i + 1 v[8 + o(i)]'s, o = 0 4 2 6 1 5 3 7 (a bit reversal)
  return __builtin_shufflevector(x, x, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// Attention's one query token (a decode step) of one (row, KV head) over its unmasked slots: the scores of 16
// slots at a time for up to 4 query heads (each key read once for all of them, its partial sums added across
// lanes by reduce16), a vectorized softmax, and the values in 8 independent sums per head (two slots x four
// 16-column chunks). q, out: [G, D]; k, v: [S, D]; mask [S]. (One slot at a time, with a dot product and an
// hsum per slot and head, a scalar softmax and one sum per 16 columns, it took 5.0 us per (row, KV head) at
// SmolLM2's 150 slots, against 2.3 now.)
void attend_one(const float* q, const float* k, const float* v, const bool* mask, float* out, int64_t G,
                int64_t D, int64_t S, float scale) {
  thread_local std::vector<int64_t> slots;
  thread_local std::vector<float> p;  // [G, n16] scores, then probabilities (n16: n rounded up to 16), 0 past n
  slots.clear();
  for (int64_t s = 0; s < S; ++s)
    if (mask[s]) slots.push_back(s);
  const bool none = slots.empty();
  if (none)
    for (int64_t s = 0; s < S; ++s) slots.push_back(s);
  const int64_t n = static_cast<int64_t>(slots.size()), n16 = (n + kWidth - 1) / kWidth * kWidth;
  p.assign(G * n16, 0.0f);
  if (none) {
    for (int64_t g = 0; g < G; ++g) std::fill(p.begin() + g * n16, p.begin() + g * n16 + n, 1.0f / S);
  } else {
    if (D % kWidth == 0) {
      constexpr int64_t kHeads = 4;
      f32x16 part[kHeads][kWidth];
      for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
        const int64_t ng = std::min(kHeads, G - g0);
        const float* qh[kHeads];  // (a group's missing heads repeat its last: a fixed shape keeps sums in registers)
        for (int64_t h = 0; h < kHeads; ++h) qh[h] = q + (g0 + std::min(h, ng - 1)) * D;
        for (int64_t i0 = 0; i0 < n; i0 += kWidth) {
          for (int64_t j = 0; j < kWidth; ++j) {
            const float* key = k + slots[std::min(i0 + j, n - 1)] * D;
            f32x16 acc[kHeads] = {};
            for (int64_t c = 0; c < D; c += kWidth) {
              const f32x16 kc = load(key + c);
              for (int64_t h = 0; h < kHeads; ++h) acc[h] += load(qh[h] + c) * kc;
            }
            for (int64_t h = 0; h < kHeads; ++h) part[h][j] = acc[h];
          }
          for (int64_t h = 0; h < ng; ++h) {
            const f32x16 scores = reduce16(part[h]);
            std::memcpy(p.data() + (g0 + h) * n16 + i0, &scores, sizeof scores);
          }
        }
      }
    } else {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t g = 0; g < G; ++g) p[g * n16 + i] = dot(q + g * D, k + slots[i] * D, D);
    }
    f32x16 lane;
    for (int64_t j = 0; j < kWidth; ++j) lane[j] = static_cast<float>(j);
    for (int64_t g = 0; g < G; ++g)
      softmax(p.data() + g * n16, 0, n, scale, [lane, n](int64_t s0) { return lane < static_cast<float>(n - s0); });
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = p.data() + g * n16;
    float* og = out + g * D;
    int64_t c = 0;
    for (; c + 4 * kWidth <= D; c += 4 * kWidth) {
      f32x16 acc[2][4] = {};
      int64_t i = 0;
      for (; i + 2 <= n; i += 2)
        for (int64_t u = 0; u < 2; ++u)
          for (int64_t j = 0; j < 4; ++j) acc[u][j] += pg[i + u] * load(v + slots[i + u] * D + c + j * kWidth);
      for (; i < n; ++i)
        for (int64_t j = 0; j < 4; ++j) acc[0][j] += pg[i] * load(v + slots[i] * D + c + j * kWidth);
      for (int64_t j = 0; j < 4; ++j) {
        const f32x16 x = acc[0][j] + acc[1][j];
        std::memcpy(og + c + j * kWidth, &x, sizeof x);
      }
    }
    for (; c + kWidth <= D; c += kWidth) {
      f32x16 acc = {};
      for (int64_t i = 0; i < n; ++i) acc += pg[i] * load(v + slots[i] * D + c);
      std::memcpy(og + c, &acc, sizeof acc);
    }
    for (; c < D; ++c) {
      float acc = 0.0f;
      for (int64_t i = 0; i < n; ++i) acc += pg[i] * v[slots[i] * D + c];
      og[c] = acc;
    }
  }
}

// out [B, T, H, G, D] = softmax over s of (q [B, T, H, G, D] . k [B, H, S, D]) / sqrt(D), masked by
// mask [B, T, S], times v [B, H, S, D]: the attention of T query tokens per row over H KV heads of G query heads
// each, the keys and values in the KV cache's layout (a decode step: T = 1; a prefill: T = the prompt). The
// same function as attention.py's masked softmax in float32: a masked slot's score is the float32 minimum, so it
// adds exactly 0 beside any unmasked one and is skipped here (neither its key nor its value read: a cache's
// slots past the step are most of it early on, and a causal prefill's query t reads slots up to t only); a
// query with no unmasked slot (padding) gets the uniform mean of all its values, as that softmax gives. Work
// units: the B x H (row, KV head) pairs: a decode step's through attend_one (SmolLM2's 30 layers at batch 16:
// 6.7-7.9 ms a step, 10.4 before its rewrite), a prefill's through attend_block, 8 queries at a time (its
// batch-16 prompts of 128 tokens: about 3 ms a layer, where XLA's einsum attention takes 8-11).
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  const auto od = out->dimensions();
  const bool ok = qd.size() == 5 && kd.size() == 4 && vd.size() == 4 && md.size() == 3 && od.size() == 5 &&
                  kd[0] == qd[0] && kd[1] == qd[2] && kd[3] == qd[4] && std::equal(kd.begin(), kd.end(), vd.begin()) &&
                  md[0] == qd[0] && md[1] == qd[1] && md[2] == kd[2] && std::equal(qd.begin(), qd.end(), od.begin());
  if (!ok) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "sami_attention: want q [B, T, H, G, D], k and v [B, H, S, D], mask [B, T, S], out like q");
  }
  const int64_t B = qd[0], T = qd[1], H = qd[2], G = qd[3], D = qd[4], S = kd[2];
  if (B * T * H * G * D == 0) return ffi::Error::Success();
  const float* qs = q.typed_data();
  const float* ks = k.typed_data();
  const float* vs = v.typed_data();
  const bool* ms = mask.typed_data();
  float* os = out->typed_data();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  parallel_for(pool, B * H, [=](int64_t unit) {
    const int64_t row = unit / H, head = unit % H;
    const float* kb = ks + unit * S * D;
    const float* vb = vs + unit * S * D;
    const int64_t off = (row * T * H + head) * G * D;  // the unit's first query
    if (T > 1) return attend_block(qs + off, kb, vb, D, ms + row * T * S, os + off, nullptr, T, H, G, D, S, scale);
    attend_one(qs + off, kb, vb, ms + row * S, os + off, G, D, S, scale);
  });
  return ffi::Error::Success();
}

#ifdef SAMI_FMA_GEMM
namespace fma {

// attend_block and attend_block_grad on AVX2's 16 registers, where their register tiles spill (see kQueries): one
// (row, KV head)'s products on block_product. Its n = T G queries token-major as attend_block takes them, gathered
// into rows [n, D]; each block of 6 queries reads the slots from its first unmasked one (rounded down to 16) to its
// last (the block's Slots), of the slots [0, used) that any query reads. Buffers are the calling thread's. A SAMI
// window's attention (4 rows of 160 queries over 96 prompt and 160 own slots, 3 KV heads of 3, head dim 64; 2-core AMD
// EPYC, session 37): forward 2.6 ms, backward 5.7 ms (99 and 115 GFLOP/s of the causal products' useful FLOPs); with
// their softmax on f32x16 the forward took 7.1 ms.
struct TrainUnit {
  int64_t T, H, G, D, S, S16, n, used = 0;
  float scale;
  std::vector<int64_t>& first = buffer<int64_t, 0>();
  std::vector<int64_t>& last = buffer<int64_t, 1>();
  std::vector<uint8_t>& mask16 = buffer<uint8_t, 0>();  // [T, S16], zero past S
  struct Slots {
    int64_t lo, hi;  // lo a multiple of 16; lo >= hi: no query of the block reads a slot
  };
  std::vector<Slots>& blocks = buffer<Slots, 0>();

  template <class V, int I>
  static std::vector<V>& buffer() {
    thread_local std::vector<V> b;
    return b;
  }

  TrainUnit(const bool* mask, int64_t T, int64_t H, int64_t G, int64_t D, int64_t S, float scale)
      : T(T), H(H), G(G), D(D), S(S), S16((S + kWidth - 1) / kWidth * kWidth), n(T * G), scale(scale) {
    used = mask_ranges(mask, T, S, first, last);
    mask16.assign(T * S16, 0);
    for (int64_t t = 0; t < T; ++t) std::memcpy(mask16.data() + t * S16, mask + t * S, S);
    blocks.resize((n + MR - 1) / MR);
    for (int64_t b = 0; b < static_cast<int64_t>(blocks.size()); ++b) {
      int64_t lo = S, hi = 0;
      for (int64_t j = b * MR; j < std::min(n, b * MR + MR); ++j)
        if (!empty(j)) lo = std::min(lo, first[j / G]), hi = std::max(hi, last[j / G] + 1);
      blocks[b] = {lo / kWidth * kWidth, hi};
    }
  }
  typedef float f32x8 __attribute__((vector_size(32)));  // AVX2's register (f32x16 goes through the stack)
  typedef int32_t i32x8 __attribute__((vector_size(32)));
  typedef uint8_t u8x8 __attribute__((vector_size(8)));
  static f32x8 load8(const float* p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  auto keep8(int64_t j, int64_t s0) const {  // query j's mask over slots s0 .. s0 + 7, as all-ones lanes
    u8x8 bytes;
    std::memcpy(&bytes, mask16.data() + j / G * S16 + s0, sizeof bytes);
    return __builtin_convertvector(bytes, i32x8) != 0;
  }
  // p[lo, hi) of query j (lo, hi multiples of 8) as exp(scale p - m) over its unmasked slots, 0 at the others, with
  // m its largest scaled score; returns (m + the log of their sum, 1 / their sum).
  std::pair<float, float> exps(float* p, int64_t j, int64_t lo, int64_t hi) const {
    const f32x8 lowest = f32x8{} + std::numeric_limits<float>::lowest();
    f32x8 top = lowest;
    for (int64_t s0 = lo; s0 < hi; s0 += 8) {
      const f32x8 x = keep8(j, s0) ? load8(p + s0) : lowest;
      top = top > x ? top : x;
    }
    float mx = top[0];
    for (int i = 1; i < 8; ++i) mx = std::max(mx, top[i]);
    const f32x8 m = f32x8{} + mx * scale;
    f32x8 sum = {};
    for (int64_t s0 = lo; s0 < hi; s0 += 8) {
      f32x8 e = exp_lanes(load8(p + s0) * scale - m);
      e = keep8(j, s0) ? e : f32x8{};
      sum += e;
      std::memcpy(p + s0, &e, sizeof e);
    }
    float total = 0.0f;
    for (int i = 0; i < 8; ++i) total += sum[i];
    return {mx * scale + std::log(total), 1.0f / total};
  }
  bool empty(int64_t j) const { return first[j / G] > last[j / G]; }
  int64_t at(int64_t j) const { return j / G * H * G + j % G; }  // query j's index in [T, H, G]
  const Slots& of(int64_t j) const { return blocks[j / MR]; }
  int64_t hi16(int64_t j) const { return (of(j).hi + kWidth - 1) / kWidth * kWidth; }
  // x's queries (laid out as q) gathered into rows [n, D]
  const float* gather(const float* x, std::vector<float>& rows) const {
    rows.resize(n * D);
    for (int64_t j = 0; j < n; ++j) std::memcpy(rows.data() + j * D, x + at(j) * D, D * sizeof(float));
    return rows.data();
  }
  // rows [n, S16] = xs [n, D] times the slots' k^T over each block's slots
  void scores(const float* xs, const float* kp, std::vector<float>& out) const {
    out.resize(n * S16);
    block_product(Operand{xs, D, 1}, n, kp, D, used, out.data(), S16, false, [this](int64_t i0) {
      const Slots& b = of(i0);
      return Span{0, D, b.lo / kWidth, (b.hi + kWidth - 1) / kWidth};
    });
  }
  // out [n, D] = p [n, S16] times the slots' values (packed [used, D]) over each block's slots
  void weighted(const float* p, const float* vp, std::vector<float>& out) const {
    out.resize(n * D);
    block_product(Operand{p, S16, 1}, n, vp, used, D, out.data(), D, false, [this](int64_t i0) {
      const Slots& b = of(i0);
      return Span{b.lo, b.hi, 0, (D + NR - 1) / NR};
    });
  }
};

void attend_train(const float* q, const float* k, const float* v, int64_t kv_stride, const bool* mask, float* out,
                  float* lse, int64_t T, int64_t H, int64_t G, int64_t D, int64_t S, float scale) {
  const TrainUnit u(mask, T, H, G, D, S, scale);
  thread_local std::vector<float> qs, kp, vp, p, os, inv, mean;
  u.scores(u.gather(q, qs), pack_panels(Operand{k, kv_stride, 1}, D, u.used, kp), p);
  inv.resize(u.n);
  for (int64_t j = 0; j < u.n; ++j) {  // the softmax's exponentials, normalized below in the weighted sums
    float* pj = p.data() + j * u.S16;
    const int64_t lo = u.of(j).lo, hi = u.hi16(j);
    if (u.empty(j)) {
      if (lo < hi) std::fill(pj + lo, pj + hi, 0.0f);
      lse[u.at(j)] = 0.0f;
      continue;
    }
    std::tie(lse[u.at(j)], inv[j]) = u.exps(pj, j, lo, hi);
  }
  u.weighted(p.data(), pack_panels(Operand{v, 1, kv_stride}, u.used, D, vp), os);
  mean.clear();
  for (int64_t j = 0; j < u.n; ++j) {
    float* o = out + u.at(j) * D;
    if (!u.empty(j)) {
      for (int64_t c = 0; c < D; ++c) o[c] = os[j * D + c] * inv[j];
      continue;
    }
    value_mean(v, kv_stride, D, S, mean);  // (a query with no unmasked slot)
    std::memcpy(o, mean.data(), D * sizeof(float));
  }
}

// p = exp(scale q.k - lse) and ds = scale p (dout . v - dout . out) per query over its block's slots (zero over the
// rest of [0, used)), then dq = ds k, and dk = ds^T q, dv = p^T dout over the queries that read each block of 6 slots.
void attend_train_grad(const float* q, const float* k, const float* v, int64_t kv_stride, const bool* mask,
                       const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv,
                       int64_t T, int64_t H, int64_t G, int64_t D, int64_t S, float scale) {
  const TrainUnit u(mask, T, H, G, D, S, scale);
  thread_local std::vector<float> qs, gs, kp, p, ds, dqs, rows;
  thread_local std::vector<int64_t> reader_lo, reader_hi;  // the tokens [lo, hi) that read slot s
  const float* qrows = u.gather(q, qs);
  const float* grows = u.gather(dout, gs);
  u.scores(qrows, pack_panels(Operand{k, kv_stride, 1}, D, u.used, kp), p);
  u.scores(grows, pack_panels(Operand{v, kv_stride, 1}, D, u.used, kp), ds);
  const int64_t used16 = (u.used + kWidth - 1) / kWidth * kWidth;
  for (int64_t j = 0; j < u.n; ++j) {
    float *pj = p.data() + j * u.S16, *dj = ds.data() + j * u.S16;
    const int64_t lo = u.empty(j) ? 0 : u.of(j).lo, hi = u.empty(j) ? 0 : u.hi16(j);
    std::fill(pj, pj + lo, 0.0f), std::fill(dj, dj + lo, 0.0f);
    std::fill(pj + std::max(lo, hi), pj + used16, 0.0f), std::fill(dj + std::max(lo, hi), dj + used16, 0.0f);
    if (lo >= hi) continue;
    using f32x8 = TrainUnit::f32x8;
    const f32x8 l = f32x8{} + lse[u.at(j)], row = f32x8{} + dot(grows + j * D, out + u.at(j) * D, D);
    for (int64_t s0 = lo; s0 < hi; s0 += 8) {
      f32x8 e = exp_lanes(TrainUnit::load8(pj + s0) * scale - l);
      e = u.keep8(j, s0) ? e : f32x8{};
      const f32x8 d = e * (TrainUnit::load8(dj + s0) - row) * scale;
      std::memcpy(pj + s0, &e, sizeof e);
      std::memcpy(dj + s0, &d, sizeof d);
    }
  }
  u.weighted(ds.data(), pack_panels(Operand{k, 1, kv_stride}, u.used, D, kp), dqs);
  for (int64_t j = 0; j < u.n; ++j) {
    float* o = dq + u.at(j) * D;
    if (u.empty(j)) std::fill(o, o + D, 0.0f);  // (its scores are constants)
    else std::memcpy(o, dqs.data() + j * D, D * sizeof(float));
  }
  reader_lo.assign(u.used, T);
  reader_hi.assign(u.used, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = u.first[t]; s <= u.last[t]; ++s)
      if (mask[t * S + s]) reader_lo[s] = std::min(reader_lo[s], t), reader_hi[s] = t + 1;
  auto readers = [&](int64_t s0) {  // the queries that read slots s0 .. s0 + 5
    int64_t lo = T, hi = 0;
    for (int64_t s = s0; s < std::min(u.used, s0 + MR); ++s) lo = std::min(lo, reader_lo[s]), hi = std::max(hi, reader_hi[s]);
    return Span{lo * G, hi * G, 0, lo < hi ? (D + NR - 1) / NR : 0};
  };
  block_product(Operand{ds.data(), 1, u.S16}, u.used, pack_panels(Operand{qrows, 1, D}, u.n, D, rows), u.n, D, dk,
                kv_stride, false, readers);
  block_product(Operand{p.data(), 1, u.S16}, u.used, pack_panels(Operand{grows, 1, D}, u.n, D, rows), u.n, D, dv,
                kv_stride, false, readers);
  for (int64_t s = 0; s < S; ++s) {  // the slots that no query reads (and those past `used`) get none
    if (s < u.used && reader_lo[s] < reader_hi[s]) continue;
    std::fill(dk + s * kv_stride, dk + s * kv_stride + D, 0.0f);
    std::fill(dv + s * kv_stride, dv + s * kv_stride + D, 0.0f);
  }
  for (int64_t j = 0; j < u.n; ++j)  // a query with no unmasked slot took the mean of all values
    if (u.empty(j)) spread_to_values(grows + j * D, dv, kv_stride, D, S);
}

}  // namespace fma
#endif

// Training's attention: q [B, T, H, G, D] (H KV heads of G query heads), keys and values [B, S, H, D] as the
// projections give them, mask [B, T, S]; the forward pass (AttentionTrain) writes out like q and each query's
// log-sum-exp lse [B, T, H, G], the backward pass (AttentionGrad) dq like q and dk, dv like k. Same function as
// attention.py's masked softmax in float32 (see Attention). Work units: the B x H (row, KV head) pairs.
struct TrainShapes {
  int64_t B = 0, T = 0, H = 0, G = 0, D = 0, S = 0;
  float scale = 0.0f;
  // unit u's offsets in q (and out, dq), in k (and v, dk, dv), in mask, in lse
  int64_t q_at(int64_t u) const { return (u / H * T * H + u % H) * G * D; }
  int64_t kv_at(int64_t u) const { return (u / H * S * H + u % H) * D; }
  int64_t mask_at(int64_t u) const { return u / H * T * S; }
  int64_t lse_at(int64_t u) const { return (u / H * T * H + u % H) * G; }
};

template <class Q, class K, class M>
ffi::Error train_shapes(const char* name, const Q& q, const K& k, const K& v, const M& mask, TrainShapes* out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  const bool ok = qd.size() == 5 && kd.size() == 4 && md.size() == 3 && std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) &&
                  kd[0] == qd[0] && kd[2] == qd[2] && kd[3] == qd[4] && md[0] == qd[0] && md[1] == qd[1] &&
                  md[2] == kd[1];
  if (!ok)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string(name) + ": want q [B, T, H, G, D], k and v [B, S, H, D], mask [B, T, S]; got q " +
                          dims(qd) + ", k " + dims(kd) + ", v " + dims(vd) + ", mask " + dims(md));
  *out = {qd[0], qd[1], qd[2], qd[3], qd[4], kd[1], static_cast<float>(1.0 / std::sqrt(static_cast<double>(qd[4])))};
  return ffi::Error::Success();
}

ffi::Error AttentionTrain(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> lse) {
  TrainShapes z;
  if (auto e = train_shapes("sami_attention_train", q, k, v, mask, &z); e.failure()) return e;
  if (z.B * z.T * z.H * z.G * z.D == 0) return ffi::Error::Success();
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  const bool* ms = mask.typed_data();
  float *os = out->typed_data(), *ls = lse->typed_data();
#ifdef SAMI_FMA_GEMM
  using fma::attend_train;
#else
  const auto attend_train = attend_block;
#endif
  parallel_for(pool, z.B * z.H, [=](int64_t u) {
    attend_train(qs + z.q_at(u), ks + z.kv_at(u), vs + z.kv_at(u), z.H * z.D, ms + z.mask_at(u), os + z.q_at(u),
                 ls + z.lse_at(u), z.T, z.H, z.G, z.D, z.S, z.scale);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out,
                         ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                         ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  TrainShapes z;
  if (auto e = train_shapes("sami_attention_grad", q, k, v, mask, &z); e.failure()) return e;
  float *dqs = dq->typed_data(), *dks = dk->typed_data(), *dvs = dv->typed_data();
  if (z.B * z.T * z.H * z.G * z.D == 0) {  // (no queries: the keys' and values' gradients are zero)
    std::fill(dks, dks + z.B * z.S * z.H * z.D, 0.0f);
    std::fill(dvs, dvs + z.B * z.S * z.H * z.D, 0.0f);
    return ffi::Error::Success();
  }
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data(), *os = out.typed_data();
  const float *ls = lse.typed_data(), *gs = dout.typed_data();
  const bool* ms = mask.typed_data();
#ifdef SAMI_FMA_GEMM
  using fma::attend_train_grad;
#else
  const auto attend_train_grad = attend_block_grad;
#endif
  parallel_for(pool, z.B * z.H, [=](int64_t u) {
    attend_train_grad(qs + z.q_at(u), ks + z.kv_at(u), vs + z.kv_at(u), z.H * z.D, ms + z.mask_at(u), os + z.q_at(u),
                      ls + z.lse_at(u), gs + z.q_at(u), dqs + z.q_at(u), dks + z.kv_at(u), dvs + z.kv_at(u), z.T, z.H,
                      z.G, z.D, z.S, z.scale);
  });
  return ffi::Error::Success();
}

constexpr int kTopPShift = 19;                         // a bucket: 2^19 bit patterns, 1/16 of a factor of 2
constexpr int kTopPBuckets = 1 << (31 - kTopPShift);  // non-negative floats: 31 bits

// The float32 bit pattern of each row's nucleus threshold: for probabilities p [B, V] (a softmax, so
// 0 <= p <= 1), the smallest v with G(v) = (sum of the p_j > v) < top_p, which is the (m + 1)-th largest
// probability for the largest m whose m largest sum below top_p (0 if the whole row sums below it). The
// nucleus is then p >= v, ties included: sampling._top_p_keep's rule, which finds v in 31 passes over the
// row (12 ms a step at 16 x 49,152 on 2 cores). Here: one pass sums the mass in buckets of the bit
// patterns' top bits (16 a factor of two, 4,096 in all), a walk from the top finds the bucket where the
// running sum reaches top_p, and that bucket's few probabilities are sorted and summed in order. Sums in
// float64; XLA's search sums in float32, so the two can differ where a running sum lands within rounding
// of top_p. Work units: the rows.
ffi::Error TopPThreshold(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> probs, float top_p,
                         ffi::ResultBuffer<ffi::S32> out) {
  const auto pd = probs.dimensions(), od = out->dimensions();
  if (pd.size() != 2 || od.size() != 2 || od[0] != pd[0] || od[1] != 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "sami_top_p_threshold: want probs [B, V] and out [B, 1]");
  }
  const int64_t B = pd[0], V = pd[1];
  const float* ps = probs.typed_data();
  int32_t* os = out->typed_data();
  parallel_for(pool, B, [=](int64_t row) {
    const float* p = ps + row * V;
    thread_local std::vector<double> mass;
    thread_local std::vector<float> members;
    mass.assign(kTopPBuckets, 0.0);
    auto bucket = [](float x) {
      uint32_t bits;
      std::memcpy(&bits, &x, sizeof bits);
      return (bits >> kTopPShift) & (kTopPBuckets - 1);
    };
    for (int64_t i = 0; i < V; ++i)
      if (!std::isnan(p[i])) mass[bucket(p[i])] += p[i];  // (NaN: skipped, so that sums and sort stay sound)
    double above = 0.0;  // the mass of the buckets above the one looked at
    float threshold = 0.0f;
    for (int b = kTopPBuckets - 1; b >= 0; --b) {
      if (above + mass[b] < top_p) {
        above += mass[b];
        continue;
      }
      members.clear();
      for (int64_t i = 0; i < V; ++i)
        if (bucket(p[i]) == static_cast<uint32_t>(b) && !std::isnan(p[i])) members.push_back(p[i]);
      std::sort(members.begin(), members.end(), std::greater<float>());
      bool found = false;
      for (float x : members) {
        if ((above += x) >= top_p) {
          threshold = x;
          found = true;
          break;
        }
      }
      if (found) break;  // (else rounding put the crossing below this bucket: go on with the sum in order)
    }
    std::memcpy(os + row, &threshold, sizeof threshold);
  });
  return ffi::Error::Success();
}

// Each row's first index of its largest value, or of its first NaN if it has one (jnp.argmax's answer): 16 lanes
// of running maxima and their indices, then the lanes' largest value at its smallest index. (XLA's
// variadic-reduce argmax over SmolLM2's 16 x 49,152 logits took about 1 ms of a 36 ms decode step.)
ffi::Error Argmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || od.size() != 1 || od[0] != xd[0] || xd[1] == 0 ||
      xd[1] > std::numeric_limits<int32_t>::max()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "sami_argmax: want x [B, V] with V >= 1 and out [B]");
  }
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  const int64_t V = xd[1];
  const float* xs = x.typed_data();
  int32_t* os = out->typed_data();
  parallel_for(pool, xd[0], [=](int64_t row) {
    const float* v = xs + row * V;
    float top = v[0];
    int64_t at = 0, i = 0;
    bool nan = false;
    if (V >= kWidth) {
      f32x16 best = load(v);
      i32x16 idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      const i32x16 lane = idx;
      i32x16 has_nan = best != best;
      for (i = kWidth; i + kWidth <= V; i += kWidth) {
        const f32x16 y = load(v + i);
        const i32x16 more = y > best;  // (strict: a lane keeps its first index of its largest value)
        best = more ? y : best;
        idx = more ? lane + static_cast<int32_t>(i) : idx;
        has_nan |= y != y;
      }
      for (int j = 0; j < kWidth; ++j) nan |= has_nan[j] != 0;
      top = best[0];
      at = idx[0];
      for (int j = 1; j < kWidth; ++j)
        if (best[j] > top || (best[j] == top && idx[j] < at)) top = best[j], at = idx[j];
    }
    for (; i < V; ++i) {
      nan |= std::isnan(v[i]);
      if (v[i] > top) top = v[i], at = i;
    }
    if (nan || std::isnan(top))
      for (at = 0; !std::isnan(v[at]); ++at) {}
    os[row] = static_cast<int32_t>(at);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(sami_panel_matmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(sami_dense_matmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_x")
                                  .Attr<bool>("transpose_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(sami_block_matmul, BlockMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(sami_attention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(sami_attention_train, AttentionTrain,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(sami_attention_grad, AttentionGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(sami_argmax, Argmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(sami_top_p_threshold, TopPThreshold,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("top_p")
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Float32 panels [P, K, 16] stored as blocks (cpu_kernels.pack_blocks) into out [P, K / 32 * kBlockBytes]:
// returns 1, or 0 as soon as a column of a block matches no form (out is then partly written). K % 32 == 0.
extern "C" int sami_pack_blocks(const float* panels, int64_t P, int64_t K, uint8_t* out) {
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const float* v = panels + (p * K + b * kBlock) * kWidth;
      uint8_t* o = out + (p * (K / kBlock) + b) * kBlockBytes;
      float d[kWidth], m[kWidth];
      int8_t* q = reinterpret_cast<int8_t*>(o + 2 * kWidth * sizeof(float));
      for (int64_t j = 0; j < kWidth; ++j)
        if (!match_column(v + j, d + j, m + j, q + j)) return 0;
      std::memcpy(o, d, sizeof d);
      std::memcpy(o + sizeof d, m, sizeof m);
      const QBlock blk(o);  // the kernel's own rebuild, checked bit for bit (+0 and -0 alike)
      for (int64_t kk = 0; kk < kBlock; ++kk) {
        const f32x16 w = blk.row(kk);
        for (int64_t j = 0; j < kWidth; ++j)
          if (!(w[j] == v[kk * kWidth + j])) return 0;
      }
    }
  return 1;
}

// Turns the AMX path for products of many rows on (1) or off (0), where the CPU and the build have it; returns
// whether it is on. (mode < 0: only asks.)
extern "C" int sami_amx(int mode) {
#ifdef SAMI_AMX
  if (mode >= 0) amx_on.store(mode != 0);
#endif
  return amx_ready() ? 1 : 0;
}

// Whether this build runs sami_dense_matmul on the AVX2 GEMM (fma::product).
extern "C" int sami_fma_gemm() {
#ifdef SAMI_FMA_GEMM
  return 1;
#else
  return 0;
#endif
}
