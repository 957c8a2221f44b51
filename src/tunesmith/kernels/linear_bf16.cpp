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

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 16;  // outputs per packed block: one register of float32
constexpr int64_t ROWS = 8;    // rows of x computed per pass over a block

// [N, K] -> [ceil(N/16), ceil(K/2), 16, 2], zero-padded.
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack: a 2-d bf16 weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t blocks = (N + BLOCK - 1) / BLOCK, pairs = (K + 1) / 2;
  auto padded = at::zeros({blocks * BLOCK, pairs * 2}, weight.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(weight);
  return padded.view({blocks, BLOCK, pairs, 2}).permute({0, 2, 1, 3}).contiguous();
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
      for (int64_t i = 0; i < D; ++i) squares += to_float(row[i]) * to_float(row[i]);
      const float inverse = 1.f / std::sqrt(squares / float(D) + float(eps));
      uint16_t* target = O + r * D;
      for (int64_t i = 0; i < D; ++i) {
        const float normed = to_float(row[i]) * inverse;
        target[i] = weight_after ? to_bf16(S[i] * to_float(to_bf16(normed))) : to_bf16(normed * S[i]);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tunesmith_kernels, library) {
  library.def("pack_bf16(Tensor weight) -> Tensor");
  library.def("linear_bf16(Tensor input, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  library.def("rms_norm_bf16(Tensor input, Tensor scale, float eps, bool weight_after) -> Tensor");
}

TORCH_LIBRARY_IMPL(tunesmith_kernels, CPU, library) {
  library.impl("pack_bf16", &pack);
  library.impl("linear_bf16", &linear);
  library.impl("rms_norm_bf16", &rms_norm);
}
