// A bf16 matrix product for generation on CPUs: y[m, n] = x[m, :] . w[n, :] (+ bias[n]), accumulated in float32
// and rounded once to bf16, over weights packed once in the order the product reads them.
//
// Why: a decode step multiplies a few rows by every weight of the model once, so it is a read of the weights, and
// its speed is how close that read comes to the memory's. Weights packed as [N/16][K/2][16][2] are one sequential
// stream per 16 outputs; each 64-byte line feeds one AVX512-BF16 dot-product instruction per row of x (vdpbf16ps:
// 16 outputs x 2 inputs), the 16 outputs stay in one register, and no horizontal sum is needed. Without
// AVX512-BF16 the same layout is computed by a plain loop (correct everywhere, fast only where the instructions are;
// tunesmith/kernels/__init__.py uses it only there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512BF16__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 16;  // outputs per packed block: one register of float32
constexpr int64_t ROWS = 8;    // rows of x computed per pass over a block

// An empty bf16 tensor on memory the kernel asks to be backed by 2 MiB pages (Linux's transparent huge pages in
// `madvise` mode, the common default): a stream of weights then misses the TLB 512 times less often. Measured on
// Gemma 3's 262k x 640 output layer: 10.8 ms on 4 KiB pages, 9.9 ms on 2 MiB pages. Small weights and systems
// without madvise get an ordinary tensor.
at::Tensor huge_pages(at::IntArrayRef shape) {
  int64_t count = 1;
  for (const auto size : shape) count *= size;
  const size_t bytes = size_t(count) * 2;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t PAGE = size_t(2) << 20;
  if (bytes >= PAGE) {
    const size_t rounded = (bytes + PAGE - 1) / PAGE * PAGE;
    void* memory = std::aligned_alloc(PAGE, rounded);
    if (memory != nullptr) {
      madvise(memory, rounded, MADV_HUGEPAGE);  // advice only: where refused, the pages are ordinary
      return at::from_blob(memory, shape, [](void* data) { std::free(data); }, at::TensorOptions().dtype(at::kBFloat16));
    }
  }
#endif
  return at::empty(shape, at::TensorOptions().dtype(at::kBFloat16));
}

// [N, K] -> [ceil(N/16), ceil(K/2), 16, 2], zero-padded.
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack: a 2-d bf16 weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t blocks = (N + BLOCK - 1) / BLOCK, pairs = (K + 1) / 2;
  const at::Tensor source = weight.contiguous();
  const auto* W = reinterpret_cast<const uint16_t*>(source.data_ptr());
  at::Tensor packed = huge_pages({blocks, pairs, BLOCK, 2});
  auto* P = reinterpret_cast<uint16_t*>(packed.data_ptr());
  // one pass, a block of 16 rows per task: read 16 rows, write their block (a copy through torch's permute and
  // zero padding took 0.4 s for Gemma's output layer, longer than the generation it serves)
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      uint16_t* target = P + nb * pairs * BLOCK * 2;
      const uint16_t* rows[BLOCK];
      for (int64_t j = 0; j < BLOCK; ++j) rows[j] = nb * BLOCK + j < N ? W + (nb * BLOCK + j) * K : nullptr;
      for (int64_t k = 0; k < pairs * 2; k += 2)
        for (int64_t j = 0; j < BLOCK; ++j, target += 2) {
          target[0] = rows[j] ? rows[j][k] : 0;
          target[1] = rows[j] && k + 1 < K ? rows[j][k + 1] : 0;
        }
    }
  });
  return packed;
}

inline float to_float(uint16_t value) {
  uint32_t bits = uint32_t(value) << 16;
  float result;
  std::memcpy(&result, &bits, 4);
  return result;
}

inline uint16_t to_bf16(float value) {  // round to nearest even, as torch does; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__)
inline __m512 widen(__m256i bf16) {  // 16 bf16 values to float32, exactly (a shift of each 16-bit pattern)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}
inline __m512 load16(const uint16_t* bf16) { return widen(_mm256_loadu_si256((const __m256i*)bf16)); }
#endif

#if defined(__AVX512BF16__)
// One block of 16 outputs for MR rows of x. Two independent accumulators per row (over even and odd pairs) hide
// the instruction's latency when few rows share each load.
template <int MR, int C = (MR <= 4 ? 2 : 1)>
void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, const float* bias, uint16_t* out,
           int64_t ldo, int64_t valid) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + C <= pairs; p += C) {
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) {
      const __m512bh wc = (__m512bh)_mm512_loadu_si512(w + (p + c) * 2 * BLOCK);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const uint32_t* row = reinterpret_cast<const uint32_t*>(x + m * ldx);
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], (__m512bh)_mm512_set1_epi32(int(row[p + c])), wc);
      }
    }
  }
  for (; p < pairs; ++p) {
    const __m512bh wc = (__m512bh)_mm512_loadu_si512(w + p * 2 * BLOCK);
    for (int m = 0; m < MR; ++m) {
      const uint32_t* row = reinterpret_cast<const uint32_t*>(x + m * ldx);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_set1_epi32(int(row[p])), wc);
    }
  }
  const __mmask16 mask = valid >= BLOCK ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int m = 0; m < MR; ++m) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), b);
    _mm256_mask_storeu_epi16(out + m * ldo, mask, (__m256i)_mm512_cvtneps_pbh(sum));
  }
}
// Two blocks at once for many rows: each broadcast of x feeds two instructions, halving the loads per product.
template <int MR>
void block_pair(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, const float* bias, uint16_t* out,
                int64_t ldo) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const uint16_t* w1 = w + pairs * 2 * BLOCK;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh a = (__m512bh)_mm512_loadu_si512(w + p * 2 * BLOCK);
    const __m512bh b = (__m512bh)_mm512_loadu_si512(w1 + p * 2 * BLOCK);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(reinterpret_cast<const uint32_t*>(x + m * ldx)[p]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, a);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xv, b);
    }
  }
  for (int half = 0; half < 2; ++half) {
    const __m512 bv = bias ? _mm512_loadu_ps(bias + half * BLOCK) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m)
      _mm256_storeu_si256((__m256i*)(out + m * ldo + half * BLOCK),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][half], bv)));
  }
}
#else
template <int MR>
void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, const float* bias, uint16_t* out,
           int64_t ldo, int64_t valid) {
  for (int m = 0; m < MR; ++m) {
    float acc[BLOCK] = {0};
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t j = 0; j < BLOCK; ++j)
        acc[j] += to_float(x[m * ldx + 2 * p]) * to_float(w[(p * BLOCK + j) * 2]) +
                  to_float(x[m * ldx + 2 * p + 1]) * to_float(w[(p * BLOCK + j) * 2 + 1]);
    for (int64_t j = 0; j < valid; ++j) out[m * ldo + j] = to_bf16(acc[j] + (bias ? bias[j] : 0.f));
  }
}
#endif

using BlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*, uint16_t*, int64_t, int64_t);
constexpr BlockFn BY_ROWS[ROWS + 1] = {nullptr,   block<1>, block<2>, block<3>, block<4>,
                                       block<5>, block<6>, block<7>, block<8>};
#if defined(__AVX512BF16__)
using PairFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*, uint16_t*, int64_t);
constexpr PairFn PAIR_BY_ROWS[ROWS + 1] = {nullptr,        nullptr,        nullptr,        nullptr,       nullptr,
                                           block_pair<5>, block_pair<6>, block_pair<7>, block_pair<8>};
#endif

// Blocks `first` and `first + 1` (where there is one) of the output, for every row of x.
void two_blocks(const uint16_t* X, int64_t M, int64_t ldx, const uint16_t* W, int64_t pairs, const float* B,
                uint16_t* O, int64_t N, int64_t first, int64_t blocks) {
  const int64_t stride = pairs * 2 * BLOCK;
  for (int64_t m = 0; m < M; m += ROWS) {
    const int64_t count = std::min<int64_t>(ROWS, M - m);
#if defined(__AVX512BF16__)
    const int64_t n = first * BLOCK;
    if (count > 4 && first + 1 < blocks && n + 2 * BLOCK <= N) {
      PAIR_BY_ROWS[count](X + m * ldx, ldx, W + first * stride, pairs, B ? B + n : nullptr, O + m * N + n, N);
      continue;
    }
#endif
    for (int64_t nb = first; nb < std::min(first + 2, blocks); ++nb) {
      const int64_t n = nb * BLOCK, valid = std::min<int64_t>(BLOCK, N - n);
      BY_ROWS[count](X + m * ldx, ldx, W + nb * stride, pairs, B ? B + n : nullptr, O + m * N + n, N, valid);
    }
  }
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, int64_t out_features,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "linear: bf16 only");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == BLOCK && packed.is_contiguous(), "linear: weight not packed");
  const int64_t K = input.size(-1), pairs = packed.size(1), N = out_features;
  TORCH_CHECK(pairs == (K + 1) / 2 && packed.size(0) * BLOCK >= N, "linear: input and packed weight disagree");
  at::Tensor x = input.reshape({-1, K}).contiguous();
  if (K % 2) x = at::constant_pad_nd(x, {0, 1});  // the pad pairs with a zero weight
  const int64_t M = x.size(0), ldx = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) bias32 = bias->to(at::kFloat).contiguous();
  const float* B = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* W = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  // tasks of at least ~64 KiB of weights: small layers still split across threads, large ones stream in long runs
  const int64_t grain = std::max<int64_t>(1, 512 / std::max<int64_t>(pairs, 1));
  at::parallel_for(0, (blocks + 1) / 2, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) two_blocks(X, M, ldx, W, pairs, B, O, N, 2 * pair, blocks);
  });
  auto shape = input.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

// RMSNorm of bf16 rows in float32, as the model families compute it, in one pass instead of eight small ops:
// Gemma (`weight_after` false): bf16(x * r * scale), scale = 1 + weight in float32; Llama and its kin (true):
// bf16(weight * bf16(x * r)), the weight applied in bf16 after rounding. r = 1 / sqrt(mean(x^2) + eps).
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& scale, double eps, bool weight_after) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && scale.scalar_type() == at::kFloat, "rms_norm: bf16 input");
  const int64_t D = input.size(-1);
  TORCH_CHECK(scale.numel() == D, "rms_norm: one scale per feature");
  at::Tensor x = input.contiguous(), s = scale.contiguous(), out = at::empty_like(x);
  const int64_t rows = x.numel() / std::max<int64_t>(D, 1);
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const float* S = s.data_ptr<float>();
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* row = X + r * D;
      float squares = 0.f;
      int64_t i = 0;
#if defined(__AVX512BF16__)
      __m512 sum = _mm512_setzero_ps();
      for (; i + 16 <= D; i += 16) {
        const __m512 v = load16(row + i);
        sum = _mm512_fmadd_ps(v, v, sum);
      }
      squares = _mm512_reduce_add_ps(sum);
#endif
      for (; i < D; ++i) squares += to_float(row[i]) * to_float(row[i]);
      const float inverse = 1.f / std::sqrt(squares / float(D) + float(eps));
      uint16_t* target = O + r * D;
      i = 0;
#if defined(__AVX512BF16__)
      const __m512 r_ = _mm512_set1_ps(inverse);
      for (; i + 16 <= D; i += 16) {
        const __m512 normed = _mm512_mul_ps(load16(row + i), r_);
        const __m512 scale = _mm512_loadu_ps(S + i);
        const __m512 result = weight_after ? _mm512_mul_ps(scale, widen((__m256i)_mm512_cvtneps_pbh(normed)))
                                           : _mm512_mul_ps(normed, scale);
        _mm256_storeu_si256((__m256i*)(target + i), (__m256i)_mm512_cvtneps_pbh(result));
      }
#endif
      for (; i < D; ++i) {
        const float normed = to_float(row[i]) * inverse;
        target[i] = weight_after ? to_bf16(S[i] * to_float(to_bf16(normed))) : to_bf16(normed * S[i]);
      }
    }
  });
  return out;
}


// --- One decoder layer's decode step ----------------------------------------------------------------------------
//
// A decode step of a small model is ~20 small operations per layer; called one by one from Python they cost as
// much as reading the weights. Here one call computes a whole layer of the Llama/Gemma family for R rows of one
// token each, rounding to bf16 where the model's own forward rounds (after every product, norm, RoPE product and
// residual add), so the answers equal the layer-by-layer ones up to the order of the attention's sums.


// sum_i q[i] * k[i], q in float32, k in bf16
inline float dot(const float* q, const uint16_t* k, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; i + 64 <= n; i += 64)  // four independent sums: the adds' latency hidden
    for (int a = 0; a < 4; ++a) acc[a] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16 * a), load16(k + i + 16 * a), acc[a]);
  for (; i + 16 <= n; i += 16) acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc[0]);
  total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#endif
  for (; i < n; ++i) total += q[i] * to_float(k[i]);
  return total;
}

// out[i] += p * v[i], v in bf16
inline void add_scaled(float* out, float p, const uint16_t* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 scale = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(scale, load16(v + i), _mm512_loadu_ps(out + i)));
#endif
  for (; i < n; ++i) out[i] += p * to_float(v[i]);
}

// RoPE as the families apply it in bf16: x * cos + rotate_half(x) * sin, each product and the sum rounded.
void rotate(uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  uint16_t rotated[1024];
  for (int64_t i = 0; i < head_dim; ++i) {
    const float partner = i < half ? -to_float(x[i + half]) : to_float(x[i - half]);
    const float first = to_float(to_bf16(to_float(x[i]) * to_float(cos[i])));
    const float second = to_float(to_bf16(partner * to_float(sin[i])));
    rotated[i] = to_bf16(first + second);
  }
  std::memcpy(x, rotated, size_t(head_dim) * 2);
}

at::Tensor project(const at::Tensor& x, at::TensorList weights, at::IntArrayRef features,
                   const c10::List<c10::optional<at::Tensor>>& biases, int64_t which) {
  const c10::optional<at::Tensor> bias = biases.get(which);
  return linear(x, weights[which], features[which], bias);
}

at::Tensor normed(const at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& norms, int64_t which, double eps,
                  bool weight_after) {
  const c10::optional<at::Tensor> scale = norms.get(which);
  return scale.has_value() ? rms_norm(x, *scale, eps, weight_after) : x;
}

// hidden [R, D] bf16, each row one token at positions[r] (its slot r of the cache); cos/sin [R, head_dim] bf16;
// keys/values [slots, kv_heads, length, head_dim] bf16, written at each row's position. weights: q, k, v, o, gate,
// up, down packed; norms (float32 scales, None where the family has none): input, after attention (Gemma), before
// the MLP, after the MLP (Gemma), q, k. window > 0: a row sees its last `window` positions only.
at::Tensor decode_layer(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& cos,
                        const at::Tensor& sin, at::Tensor keys, at::Tensor values, at::TensorList weights,
                        at::IntArrayRef features, const c10::List<c10::optional<at::Tensor>>& biases,
                        const c10::List<c10::optional<at::Tensor>>& norms, double eps, bool weight_after,
                        int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling, int64_t window, bool gelu) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kBFloat16, "decode_layer: hidden is [rows, width] bf16");
  TORCH_CHECK(weights.size() == 7 && features.size() == 7 && biases.size() == 7 && norms.size() == 6,
              "decode_layer: 7 weights and biases, 6 norms");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == at::kBFloat16,
              "decode_layer: a contiguous bf16 cache");
  TORCH_CHECK(head_dim <= 1024 && heads % kv_heads == 0, "decode_layer: head_dim <= 1024, heads a multiple of kv heads");
  const int64_t R = hidden.size(0), length = keys.size(2), group = heads / kv_heads;
  TORCH_CHECK(keys.size(0) >= R && keys.size(1) == kv_heads && keys.size(3) == head_dim, "decode_layer: cache shape");
  const at::Tensor x = hidden.contiguous();
  const at::Tensor where = positions.to(at::kLong).contiguous();
  const int64_t* pos = where.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(pos[r] >= 0 && pos[r] < length, "decode_layer: position outside cache");

  const at::Tensor in = normed(x, norms, 0, eps, weight_after);
  at::Tensor q = project(in, weights, features, biases, 0).contiguous();
  at::Tensor k = project(in, weights, features, biases, 1).contiguous();
  const at::Tensor v = project(in, weights, features, biases, 2).contiguous();
  if (norms.get(4).has_value()) q = normed(q.view({R * heads, head_dim}), norms, 4, eps, weight_after).view({R, -1});
  if (norms.get(5).has_value()) k = normed(k.view({R * kv_heads, head_dim}), norms, 5, eps, weight_after).view({R, -1});
  auto* Q = reinterpret_cast<uint16_t*>(q.data_ptr());
  auto* Kn = reinterpret_cast<uint16_t*>(k.data_ptr());
  const auto* Vn = reinterpret_cast<const uint16_t*>(v.data_ptr());
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const auto* C = reinterpret_cast<const uint16_t*>(c.data_ptr());
  const auto* S = reinterpret_cast<const uint16_t*>(s.data_ptr());
  auto* KC = reinterpret_cast<uint16_t*>(keys.data_ptr());
  auto* VC = reinterpret_cast<uint16_t*>(values.data_ptr());
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t h = 0; h < heads; ++h) rotate(Q + (r * heads + h) * head_dim, C + r * head_dim, S + r * head_dim, head_dim);
    for (int64_t g = 0; g < kv_heads; ++g) {
      uint16_t* key = Kn + (r * kv_heads + g) * head_dim;
      rotate(key, C + r * head_dim, S + r * head_dim, head_dim);
      const int64_t at_ = ((r * kv_heads + g) * length + pos[r]) * head_dim;
      std::memcpy(KC + at_, key, size_t(head_dim) * 2);
      std::memcpy(VC + at_, Vn + (r * kv_heads + g) * head_dim, size_t(head_dim) * 2);
    }
  }

  at::Tensor attended = at::empty({R, heads * head_dim}, x.options());
  auto* A = reinterpret_cast<uint16_t*>(attended.data_ptr());
  at::parallel_for(0, R * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(head_dim), sum(head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / heads, h = task % heads, g = h / group;
      const int64_t last = pos[r], first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const uint16_t* q_row = Q + (r * heads + h) * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) query[i] = to_float(q_row[i]);
      const uint16_t* key_base = KC + (r * kv_heads + g) * length * head_dim;
      const uint16_t* value_base = VC + (r * kv_heads + g) * length * head_dim;
      scores.resize(size_t(last - first + 1));
      float best = -INFINITY;
      for (int64_t t = first; t <= last; ++t) {
        const float score = dot(query.data(), key_base + t * head_dim, head_dim) * float(scaling);
        scores[t - first] = score;
        best = std::max(best, score);
      }
      float total = 0.f;
      for (auto& score : scores) total += (score = std::exp(score - best));
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t t = first; t <= last; ++t) add_scaled(sum.data(), scores[t - first] / total, value_base + t * head_dim, head_dim);
      uint16_t* out = A + (r * heads + h) * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) out[i] = to_bf16(sum[i]);
    }
  });

  const at::Tensor attention = normed(project(attended, weights, features, biases, 3), norms, 1, eps, weight_after);
  const at::Tensor middle = at::add(x, attention);
  const at::Tensor inner = normed(middle, norms, 2, eps, weight_after);
  const at::Tensor gate = project(inner, weights, features, biases, 4);
  const at::Tensor up = project(inner, weights, features, biases, 5);
  const at::Tensor activated = gelu ? at::gelu(gate, "tanh") : at::silu(gate);
  const at::Tensor down = project(at::mul(activated, up), weights, features, biases, 6);
  return at::add(middle, normed(down, norms, 3, eps, weight_after));
}

}  // namespace

TORCH_LIBRARY(tunesmith_kernels, library) {
  library.def("pack_bf16(Tensor weight) -> Tensor");
  library.def("linear_bf16(Tensor input, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  library.def("rms_norm_bf16(Tensor input, Tensor scale, float eps, bool weight_after) -> Tensor");
  library.def(
      "decode_layer(Tensor hidden, Tensor positions, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
      "Tensor[] weights, int[] features, Tensor?[] biases, Tensor?[] norms, float eps, bool weight_after, int heads, "
      "int kv_heads, int head_dim, float scaling, int window, bool gelu) -> Tensor");
}

TORCH_LIBRARY_IMPL(tunesmith_kernels, CPU, library) {
  library.impl("pack_bf16", &pack);
  library.impl("linear_bf16", &linear);
  library.impl("rms_norm_bf16", &rms_norm);
  library.impl("decode_layer", &decode_layer);
}
