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
#include <atomic>
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

// Block nb of a row-major [N, K] weight in the packed layout ([ceil(K/2), 16, 2], zero-padded) at `target`.
void pack_block(const uint16_t* W, int64_t N, int64_t K, int64_t nb, uint16_t* target) {
  const int64_t pairs = (K + 1) / 2;
  const uint16_t* rows[BLOCK];
  for (int64_t j = 0; j < BLOCK; ++j) rows[j] = nb * BLOCK + j < N ? W + (nb * BLOCK + j) * K : nullptr;
  for (int64_t k = 0; k < pairs * 2; k += 2)
    for (int64_t j = 0; j < BLOCK; ++j, target += 2) {
      target[0] = rows[j] ? rows[j][k] : 0;
      target[1] = rows[j] && k + 1 < K ? rows[j][k + 1] : 0;
    }
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
    for (int64_t nb = begin; nb < end; ++nb) pack_block(W, N, K, nb, P + nb * pairs * BLOCK * 2);
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
// How far ahead of the product the weights are asked for (in 64-byte lines, 4 KiB): with several rows the product
// is compute-bound, and the hardware's own prefetch then leaves the memory idle between bursts. Measured on Gemma 3's
// output layer for 8 rows (bench/generation_speed.py's machine): 14.9 -> 12.1 ms; one row (a pure stream) unchanged.
// A prefetch past the end of a weight is harmless (it never faults).
constexpr int64_t AHEAD = 64;

// One block of 16 outputs for MR rows of x. Two independent accumulators per row (over even and odd pairs) hide
// the instruction's latency when few rows share each load.
template <int MR, int C = (MR <= 4 ? 2 : 1)>
void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, const float* bias, uint16_t* out,
           int64_t ldo, int64_t valid) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + C <= pairs; p += C) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (p + AHEAD) * 2 * BLOCK), _MM_HINT_T2);
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
    _mm_prefetch(reinterpret_cast<const char*>(w + (p + AHEAD) * 2 * BLOCK), _MM_HINT_T2);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + (p + AHEAD) * 2 * BLOCK), _MM_HINT_T2);
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

// One product of a call: its packed weight, output width, float32 bias (or null) and [M, N] output.
struct Product {
  const uint16_t* weight;
  int64_t pairs, out_features;
  const float* bias;
  uint16_t* out;
};

// Several products of the same x in one parallel region (a layer's q, k and v; its gate and up): one fork and one
// wait instead of one each, and the threads' shares balanced over all of them. Work is split in pairs of blocks.
void products(const uint16_t* X, int64_t M, int64_t ldx, const std::vector<Product>& jobs) {
  std::vector<int64_t> first{0};  // first pair of blocks of each job, in one numbering
  for (const auto& job : jobs) first.push_back(first.back() + ((job.out_features + BLOCK - 1) / BLOCK + 1) / 2);
  // Each thread takes the next ~128 KiB of weights until none are left, rather than a fixed share: a thread that
  // the system parks for a while (a server's event loop on the same cores, a busy neighbour) then delays the step
  // by one piece, not by its whole share while the other threads wait for it.
  const int64_t total = first.back();
  const int64_t piece = std::max<int64_t>(1, 1024 / std::max<int64_t>(jobs.front().pairs, 1));
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (total + piece - 1) / piece);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    size_t j = 0;
    for (int64_t begin; (begin = next.fetch_add(piece)) < total;) {
      for (int64_t unit = begin; unit < std::min(begin + piece, total); ++unit) {
        while (unit >= first[j + 1]) ++j;
        while (unit < first[j]) --j;
        const Product& job = jobs[j];
        const int64_t blocks = (job.out_features + BLOCK - 1) / BLOCK;
        two_blocks(X, M, ldx, job.weight, job.pairs, job.bias, job.out, job.out_features, 2 * (unit - first[j]),
                   blocks);
      }
    }
  });
}

// x [..., K] times each packed weight (+ its bias): one output [..., N_i] each, computed in one parallel region.
std::vector<at::Tensor> linear_many(const at::Tensor& input, const std::vector<at::Tensor>& packed,
                                    const std::vector<int64_t>& out_features,
                                    const std::vector<c10::optional<at::Tensor>>& bias) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16, "linear: bf16 only");
  const int64_t K = input.size(-1);
  at::Tensor x = input.reshape({-1, K}).contiguous();
  if (K % 2) x = at::constant_pad_nd(x, {0, 1});  // the pad pairs with a zero weight
  const int64_t M = x.size(0), ldx = x.size(1);
  std::vector<at::Tensor> outputs, biases;
  std::vector<Product> jobs;
  for (size_t i = 0; i < packed.size(); ++i) {
    const at::Tensor& w = packed[i];
    const int64_t N = out_features[i];
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 4 && w.size(2) == BLOCK && w.is_contiguous(),
                "linear: weight not packed");
    TORCH_CHECK(w.size(1) == (K + 1) / 2 && w.size(0) * BLOCK >= N, "linear: input and packed weight disagree");
    outputs.push_back(at::empty({M, N}, x.options()));
    biases.push_back(bias[i].has_value() && bias[i]->defined() ? bias[i]->to(at::kFloat).contiguous() : at::Tensor());
    jobs.push_back({reinterpret_cast<const uint16_t*>(w.data_ptr()), w.size(1), N,
                    biases.back().defined() ? biases.back().data_ptr<float>() : nullptr,
                    reinterpret_cast<uint16_t*>(outputs.back().data_ptr())});
  }
  products(reinterpret_cast<const uint16_t*>(x.data_ptr()), M, ldx, jobs);
  for (size_t i = 0; i < outputs.size(); ++i) {
    auto shape = input.sizes().vec();
    shape.back() = out_features[i];
    outputs[i] = outputs[i].view(shape);
  }
  return outputs;
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, int64_t out_features,
                  const c10::optional<at::Tensor>& bias) {
  return linear_many(input, {packed}, {out_features}, {bias}).front();
}

// The index of each row's largest value (the first where several tie, a NaN's where there is one, as torch's
// argmax): greedy decoding's pick over a bf16 vocabulary without the float32 copy torch's argmax makes of it.
at::Tensor argmax_rows(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kBFloat16, "argmax: [rows, vocabulary] bf16");
  const at::Tensor x = input.contiguous();
  const int64_t R = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({R}, at::TensorOptions().dtype(at::kLong));
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* row = X + r * V;
      int64_t i = 0, best_index = 0;
      float best = -INFINITY;
#if defined(__AVX512F__)
      __m512 top = _mm512_set1_ps(-INFINITY);
      __m512i where = _mm512_setzero_si512();
      __mmask16 nan = 0;
      const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
      for (; i + 16 <= V && !nan; i += 16) {
        const __m512 v = load16(row + i);
        const __mmask16 higher = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
        top = _mm512_mask_mov_ps(top, higher, v);
        where = _mm512_mask_mov_epi32(where, higher, _mm512_add_epi32(lanes, _mm512_set1_epi32(int32_t(i))));
        nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      }
      if (nan) {
        i -= 16;  // the scalar loop below finds the NaN
      } else {
        alignas(64) float values[16];
        alignas(64) int32_t indices[16];
        _mm512_store_ps(values, top);
        _mm512_store_si512(indices, where);
        for (int lane = 0; lane < 16; ++lane)
          if (values[lane] > best || (values[lane] == best && indices[lane] < best_index))
            best = values[lane], best_index = indices[lane];
      }
#endif
      for (; i < V; ++i) {
        const float v = to_float(row[i]);
        if (std::isnan(v)) {
          best_index = i;
          break;
        }
        if (v > best) best = v, best_index = i;
      }
      O[r] = best_index;
    }
  });
  return out;
}

// --- Greedy picks over a large vocabulary: screened in int8, decided in bf16 -------------------------------------
//
// A greedy step needs only the index of the largest logit, but computing every logit reads the whole output layer
// (Gemma 3: 262k x 640 bf16, 335 MB, half of a decode step's reads). The screen reads an int8 copy instead (half the
// bytes): for each row x and vocabulary entry j it computes an estimate A_j = x~ . w~_j (x and w_j rounded to int8
// with one scale each) and a bound B_j >= |x . w_j - A_j| (Cauchy-Schwarz: |x|·|w_j - w~_j| + |x - x~|·|w~_j|, plus
// a margin for float32 sums and a bf16 spacing, so that every entry outside [lb, ...] provably rounds lower than the
// best, lb = max_j (A_j - B_j)). Only the entries whose A_j + B_j reaches lb are then computed exactly, in bf16 with
// the product's own arithmetic for one row, and the first largest of them is the pick: the one torch.argmax gives
// over that row's logits. On a tuned Gemma 3 a row leaves 1 to 40 such candidates.

// A bf16 row rounded to int8 with one scale (max |v| / 127; 0 for a zero row): take(k, v, q) for each value v and
// its q in [-127, 127]. False, with nothing taken, where a value is not finite.
template <typename Take>
bool round_int8(const uint16_t* row, int64_t K, float& scale, Take take) {
  float top = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = to_float(row[k]);
    if (!std::isfinite(v)) return false;  // checked on each value: a NaN would slip through std::max
    top = std::max(top, std::fabs(v));
  }
  scale = top / 127.f;
  const float inverse = scale > 0.f ? 1.f / scale : 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = to_float(row[k]);
    take(k, v, int(std::max(-127.f, std::min(127.f, std::nearbyint(v * inverse)))));
  }
  return true;
}

// [V, K] bf16 -> q int8 [V/16, K/4, 16, 4] (zero-padded), scale, error bound, norm (float32 [V]), and sum of q
// (int32 [V]; the product's unsigned x is x + 128).
std::vector<at::Tensor> screen_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "screen: a 2-d bf16 weight");
  const at::Tensor source = weight.contiguous();
  const int64_t V = source.size(0), K = source.size(1);
  const int64_t blocks = (V + BLOCK - 1) / BLOCK, quads = (K + 3) / 4;
  at::Tensor q = at::zeros({blocks, quads, BLOCK, 4}, at::TensorOptions().dtype(at::kChar));
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor scale = at::zeros({V}, options), error = at::zeros({V}, options), norm = at::zeros({V}, options);
  at::Tensor sums = at::zeros({V}, at::TensorOptions().dtype(at::kInt));
  const auto* W = reinterpret_cast<const uint16_t*>(source.data_ptr());
  auto* Q = q.data_ptr<int8_t>();
  float *S = scale.data_ptr<float>(), *E = error.data_ptr<float>(), *N = norm.data_ptr<float>();
  int32_t* Z = sums.data_ptr<int32_t>();
  at::parallel_for(0, V, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float s = 0.f;
      double wrong = 0., length = 0.;
      int32_t total = 0;
      int8_t* target = Q + (j / BLOCK) * quads * BLOCK * 4 + (j % BLOCK) * 4;
      const bool finite = round_int8(W + j * K, K, s, [&](int64_t k, float w, int value) {
        target[(k / 4) * BLOCK * 4 + k % 4] = int8_t(value);
        total += value;
        const double rounded = double(s) * value;
        wrong += (w - rounded) * (w - rounded);
        length += rounded * rounded;
      });
      TORCH_CHECK(finite, "screen: a weight that is not finite");
      S[j] = s;
      Z[j] = total;
      // rounded up past float32's own rounding; the 1e-4 |w| covers the float32 sums of the bf16 product (K
      // additions of relative error 2^-24 each, K <= 1600 here) and of the estimate
      const double e = std::sqrt(wrong), n = std::sqrt(length);
      E[j] = float((e + 1e-4 * (n + e)) * (1 + 1e-6)) + 1e-30f;
      N[j] = float(n * (1 + 1e-6));
    }
  });
  return {q, scale, error, norm, sums};
}

#if defined(__AVX512BF16__)
// r[k] = column k of the 16 x 16 matrix of 32-bit values whose rows are r[0..15] (lane i: row i's element k).
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int g = 0; g < 16; g += 8)
    for (int k = 0; k < 4; ++k) {
      t[g + k] = _mm512_shuffle_i32x4(u[g + k], u[g + 4 + k], 0x88);
      t[g + 4 + k] = _mm512_shuffle_i32x4(u[g + k], u[g + 4 + k], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xdd);
  }
}
#endif

#if defined(__AVX512BF16__)
// exact_block's AVX512 path for MR rows (the accumulators in registers)
template <int MR>
void exact_rows(const uint16_t* const* xs, int64_t K, const uint16_t* W, int64_t valid, int64_t first, uint16_t* out) {
  const int64_t pairs = K / 2;
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    const int64_t width = std::min<int64_t>(16, pairs - p0);
    const __mmask16 mask = width == 16 ? __mmask16(0xffff) : __mmask16((1u << width) - 1);
    __m512i r[16];
    for (int64_t j = 0; j < 16; ++j)
      r[j] = j < valid ? _mm512_maskz_loadu_epi32(mask, W + (first + j) * K + 2 * p0) : _mm512_setzero_si512();
    transpose16(r);
    for (int64_t k = 0; k < width; ++k)
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
        acc[m][(p0 + k) % 2] = _mm512_dpbf16_ps(
            acc[m][(p0 + k) % 2], (__m512bh)_mm512_set1_epi32(reinterpret_cast<const int32_t*>(xs[m])[p0 + k]),
            (__m512bh)r[k]);
  }
  const __mmask16 lanes = valid >= BLOCK ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
  for (int m = 0; m < MR; ++m) {  // as block<1> sums them, with no bias
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_setzero_ps());
    _mm256_mask_storeu_epi16(out + m * BLOCK, lanes, (__m256i)_mm512_cvtneps_pbh(sum));
  }
}
using ExactFn = void (*)(const uint16_t* const*, int64_t, const uint16_t*, int64_t, int64_t, uint16_t*);
constexpr ExactFn EXACT_BY_ROWS[ROWS + 1] = {nullptr,        exact_rows<1>, exact_rows<2>, exact_rows<3>, exact_rows<4>,
                                             exact_rows<5>, exact_rows<6>, exact_rows<7>, exact_rows<8>};
#endif

// The bf16 logits of entries [first, first + 16) for each of `rows` rows xs[m] alone (out: [rows, 16]), as
// linear_bf16 computes them for one row (block<1>: even and odd pairs in two sums), from the row-major weight: 16
// pairs of the 16 entries at a time turned into the lanes the packed layout gives them, once for all the rows.
void exact_block(const uint16_t* const* xs, int64_t rows, int64_t K, const uint16_t* W, int64_t V, int64_t first,
                 uint16_t* out) {
  const int64_t pairs = (K + 1) / 2, valid = std::min<int64_t>(BLOCK, V - first);
#if defined(__AVX512BF16__)
  if (K % 2 == 0) {
    for (int64_t m0 = 0; m0 < rows; m0 += ROWS)
      EXACT_BY_ROWS[std::min<int64_t>(ROWS, rows - m0)](xs + m0, K, W, valid, first, out + m0 * BLOCK);
    return;
  }
#endif
  thread_local std::vector<uint16_t> packed, row;
  packed.resize(size_t(pairs) * BLOCK * 2);
  pack_block(W, V, K, first / BLOCK, packed.data());
  row.assign(size_t(pairs) * 2, 0);
  for (int64_t m = 0; m < rows; ++m) {
    std::memcpy(row.data(), xs[m], size_t(K) * 2);
    BY_ROWS[1](row.data(), pairs * 2, packed.data(), pairs, nullptr, out + m * BLOCK, BLOCK, valid);
  }
}

// int32 sums of 16 entries for MR rows of unsigned x against one block of q.
template <int MR>
void screen_block(const uint8_t* x, int64_t ldx, const int8_t* q, int64_t quads, int32_t* out) {
#if defined(__AVX512VNNI__)
  __m512i acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_si512();
  for (int64_t p = 0; p < quads; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(q + (p + 128) * BLOCK * 4), _MM_HINT_T2);
    const __m512i w = _mm512_loadu_si512(q + p * BLOCK * 4);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(reinterpret_cast<const int32_t*>(x + m * ldx)[p]), w);
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_si512(out + m * BLOCK, acc[m]);
#else
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < BLOCK; ++j) {
      int32_t total = 0;
      for (int64_t k = 0; k < quads * 4; ++k) total += int32_t(x[m * ldx + k]) * int32_t(q[(k / 4) * BLOCK * 4 + j * 4 + k % 4]);
      out[m * BLOCK + j] = total;
    }
#endif
}
using ScreenFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*);
constexpr ScreenFn SCREEN_BY_ROWS[ROWS + 1] = {nullptr,          screen_block<1>, screen_block<2>,
                                               screen_block<3>,  screen_block<4>, screen_block<5>,
                                               screen_block<6>,  screen_block<7>, screen_block<8>};

// A row whose screen leaves more candidates than this (a flat distribution: a model that has not learned to
// answer such a prompt) is computed whole, from the row-major weight as the candidates are.
constexpr int64_t MOST_CANDIDATES = 2048;

// Twice the bf16 spacing just above |value|: two values this far apart round to different bf16 numbers.
inline float spacing(float value) {
  int exponent = 0;
  std::frexp(std::fabs(value), &exponent);  // |value| in [2^(e-1), 2^e)
  return std::ldexp(1.f, exponent - 6);
}

// Each row's greedy pick among x [R, K] . weight [V, K]^T (bf16), as torch.argmax over the bf16 logits that
// linear_bf16 gives for that row alone, -1 for a row of x with a value that is not finite (the caller computes its
// logits instead); and how many entries of each row were computed exactly (V: the whole row). q, scale, error,
// norm, sums: screen_pack of the weight.
std::tuple<at::Tensor, at::Tensor> greedy(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& q,
                                          const at::Tensor& scale, const at::Tensor& error, const at::Tensor& norm,
                                          const at::Tensor& sums) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kBFloat16, "greedy: x is [rows, width] bf16");
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const int64_t R = x.size(0), K = x.size(1), V = w.size(0);
  const int64_t blocks = (V + BLOCK - 1) / BLOCK, quads = (K + 3) / 4;
  TORCH_CHECK(w.size(1) == K && q.size(0) == blocks && q.size(1) == quads && scale.numel() == V,
              "greedy: x, weight and screen disagree");
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* Wt = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const auto* Q = q.data_ptr<int8_t>();
  const float *S = scale.data_ptr<float>(), *E = error.data_ptr<float>(), *N = norm.data_ptr<float>();
  const int32_t* Z = sums.data_ptr<int32_t>();
  at::Tensor out = at::full({R}, -1, at::TensorOptions().dtype(at::kLong));
  at::Tensor computed = at::zeros({R}, at::TensorOptions().dtype(at::kLong));  // entries computed exactly, per row
  int64_t* O = out.data_ptr<int64_t>();
  int64_t* C = computed.data_ptr<int64_t>();

  // the rows with finite values (live), each in unsigned int8 (x~ = step * (u - 128); the live rows contiguous in
  // packed_rows, zero-padded to whole quads), its length and the length of its rounding error
  const int64_t ldx = quads * 4;
  std::vector<uint8_t> packed_rows;
  std::vector<float> step(R), length(R), wrong(R);
  std::vector<int64_t> live;
  for (int64_t r = 0; r < R; ++r) {
    std::vector<uint8_t> u(size_t(ldx), 128);
    double e = 0., n = 0.;
    const bool finite = round_int8(X + r * K, K, step[r], [&](int64_t k, float v, int value) {
      u[k] = uint8_t(value + 128);
      e += (v - double(step[r]) * value) * (v - double(step[r]) * value);
      n += double(v) * v;
    });
    if (!finite) continue;
    length[r] = float(std::sqrt(n) * (1 + 1e-6)), wrong[r] = float(std::sqrt(e) * (1 + 1e-6));
    packed_rows.insert(packed_rows.end(), u.begin(), u.end());
    live.push_back(r);
  }
  if (live.empty()) return {out, computed};
  const int64_t L = int64_t(live.size());

  // pass over the screen: each thread its own lower bounds and candidates (entry, upper bound) per row
  struct Found {
    std::vector<float> lower;
    std::vector<std::vector<std::pair<int64_t, float>>> candidates;
    std::vector<char> crowded;  // rows given up on
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  std::vector<Found> found(threads);
  const int64_t piece = 64;  // blocks a thread takes at a time (~40 KiB of Gemma's screen)
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Found& mine = found[t];
      mine.lower.assign(L, -INFINITY);
      mine.candidates.assign(L, {});
      mine.crowded.assign(L, false);
      alignas(64) int32_t dots[ROWS * BLOCK];
      // lower - 2 spacing(lower), kept with it: never above the final cut, whatever the other threads' bounds
      std::vector<float> cut(L, -INFINITY);
      std::vector<int64_t> limit(L, 2 * MOST_CANDIDATES);  // list length that prompts the next pruning
      // estimates and bounds of entries [first, first + valid) for live row i (row r of x): its lower bound
      // raised, and those whose upper bound reaches it kept
      const auto bounds = [&](const int32_t* sums, int64_t first, int64_t valid, int64_t r, int64_t i) {
        float estimate[BLOCK], bound[BLOCK];
        int64_t j = 0;
#if defined(__AVX512F__)
        if (valid == BLOCK) {
          const __m512i dot = _mm512_sub_epi32(_mm512_loadu_si512(sums), _mm512_slli_epi32(_mm512_loadu_si512(Z + first), 7));
          const __m512 e = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(step[r]), _mm512_loadu_ps(S + first)));
          const __m512 b = _mm512_fmadd_ps(_mm512_set1_ps(length[r]), _mm512_loadu_ps(E + first),
                                           _mm512_mul_ps(_mm512_set1_ps(wrong[r]), _mm512_loadu_ps(N + first)));
          const float low = _mm512_reduce_max_ps(_mm512_sub_ps(e, b));
          if (low > mine.lower[i]) mine.lower[i] = low, cut[i] = low - 2 * spacing(low);
          if (!_mm512_cmp_ps_mask(_mm512_add_ps(e, b), _mm512_set1_ps(cut[i]), _CMP_GE_OQ)) return;
          _mm512_storeu_ps(estimate, e);
          _mm512_storeu_ps(bound, b);
          j = BLOCK;
        }
#endif
        for (; j < valid; ++j) {
          estimate[j] = float(sums[j] - 128 * Z[first + j]) * (step[r] * S[first + j]);
          bound[j] = length[r] * E[first + j] + wrong[r] * N[first + j];
          if (estimate[j] - bound[j] > mine.lower[i])
            mine.lower[i] = estimate[j] - bound[j], cut[i] = mine.lower[i] - 2 * spacing(mine.lower[i]);
        }
        auto& list = mine.candidates[i];
        if (mine.crowded[i]) return;
        for (j = 0; j < valid; ++j)
          if (estimate[j] + bound[j] >= cut[i]) list.push_back({first + j, estimate[j] + bound[j]});
        if (int64_t(list.size()) > limit[i]) {  // the bound rose after entries were taken: keep the list short
          list.erase(std::remove_if(list.begin(), list.end(), [&](const auto& c) { return c.second < cut[i]; }),
                     list.end());
          limit[i] = std::max<int64_t>(limit[i], 2 * int64_t(list.size()));
          // past any hope of a few: the row is left to the caller (the final cut is never below this one)
          mine.crowded[i] = int64_t(list.size()) > 8 * MOST_CANDIDATES;
        }
      };
      for (int64_t first; (first = next.fetch_add(piece)) < blocks;) {
        for (int64_t nb = first; nb < std::min(first + piece, blocks); ++nb) {
          for (int64_t m0 = 0; m0 < L; m0 += ROWS) {
            const int64_t count = std::min<int64_t>(ROWS, L - m0);
            SCREEN_BY_ROWS[count](packed_rows.data() + m0 * ldx, ldx, Q + nb * quads * BLOCK * 4, quads, dots);
            for (int64_t m = 0; m < count; ++m)
              bounds(dots + m * BLOCK, nb * BLOCK, std::min<int64_t>(BLOCK, V - nb * BLOCK), live[m0 + m], m0 + m);
          }
        }
      }
    }
  });

  // the entries that reach the best lower bound of all threads (every entry of a row the screen could not narrow),
  // computed exactly: each block once, for all the rows that need it, in one parallel pass
  std::vector<std::vector<int64_t>> entries(L);
  std::vector<std::vector<int64_t>> needing(blocks);  // block -> the live rows that need it, ascending
  for (int64_t i = 0; i < L; ++i) {
    float lower = -INFINITY;
    bool crowded = false;
    for (const Found& f : found) lower = std::max(lower, f.lower[i]), crowded = crowded || f.crowded[i];
    const float cut = lower - spacing(lower);
    for (const Found& f : found)
      for (const auto& c : f.candidates[i])
        if (c.second >= cut) entries[i].push_back(c.first);
    if (crowded || int64_t(entries[i].size()) > MOST_CANDIDATES) {  // cheaper to compute the whole row
      entries[i].resize(V);
      for (int64_t j = 0; j < V; ++j) entries[i][j] = j;
    } else {
      std::sort(entries[i].begin(), entries[i].end());
    }
    for (const int64_t entry : entries[i])
      if (needing[entry / BLOCK].empty() || needing[entry / BLOCK].back() != i) needing[entry / BLOCK].push_back(i);
  }
  std::vector<int64_t> tasks, offset(blocks, 0);  // blocks to compute; where each block's [rows, 16] logits start
  int64_t size = 0;
  for (int64_t nb = 0; nb < blocks; ++nb)
    if (!needing[nb].empty()) tasks.push_back(nb), offset[nb] = size, size += int64_t(needing[nb].size()) * BLOCK;
  std::vector<uint16_t> logits(size_t(std::max<int64_t>(size, 1)));
  at::parallel_for(0, int64_t(tasks.size()), 16, [&](int64_t begin, int64_t end) {
    std::vector<const uint16_t*> xs;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = tasks[t];
      xs.clear();
      for (const int64_t i : needing[nb]) xs.push_back(X + live[i] * K);
      exact_block(xs.data(), int64_t(xs.size()), K, Wt, V, nb * BLOCK, logits.data() + offset[nb]);
    }
  });
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float best = -INFINITY;
      int64_t best_index = -1;
      for (const int64_t entry : entries[i]) {
        const auto& rows = needing[entry / BLOCK];
        const int64_t slot = std::lower_bound(rows.begin(), rows.end(), i) - rows.begin();
        const float value = to_float(logits[offset[entry / BLOCK] + slot * BLOCK + entry % BLOCK]);
        if (std::isnan(value)) {  // as torch's argmax: a NaN wins
          best_index = entry;
          break;
        }
        if (best_index < 0 || value > best) best = value, best_index = entry;
      }
      O[live[i]] = best_index;
      C[live[i]] = int64_t(entries[i].size());
    }
  });
  return {out, computed};
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


// --- One decoder layer over a step's tokens ----------------------------------------------------------------------
//
// A decode step of a small model is ~20 small operations per layer; called one by one from Python they cost as
// much as reading the weights. Here one call computes a whole layer of the Llama/Gemma family for a step's tokens:
// one token of each decoding row and the chunk of a prompt being read, so the weights are read once for both. It
// rounds to bf16 where the model's own forward rounds (after every product, norm, RoPE product and residual add),
// so the answers equal the layer-by-layer ones up to the order of the attention's sums.


// sum_i q[i] * k[i], q in float32, k in bf16
inline float dot(const float* q, const uint16_t* k, int64_t n) {
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += q[i] * to_float(k[i]);
  return total;
}

// The scores of N query heads that share one key (a group of grouped-query attention), the key read once:
// scores[h * stride] = scaling * q_h . k, q_h = q + h * D in float32.
template <int N>
void dots(const float* q, int64_t D, const uint16_t* k, float scaling, float* scores, int64_t stride) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    __m512 acc[N];
    for (int h = 0; h < N; ++h) acc[h] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      const __m512 key = load16(k + i);
      for (int h = 0; h < N; ++h) acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + i), key, acc[h]);
    }
    for (int h = 0; h < N; ++h) scores[h * stride] = _mm512_reduce_add_ps(acc[h]) * scaling;
    return;
  }
#endif
  for (int h = 0; h < N; ++h) scores[h * stride] = dot(q + h * D, k, D) * scaling;
}

// sums[h * D + i] += p[h * stride] * v[i] for N heads, the value read once.
template <int N>
void accumulate(float* sums, int64_t D, const uint16_t* v, const float* p, int64_t stride) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 weight[N];
  for (int h = 0; h < N; ++h) weight[h] = _mm512_set1_ps(p[h * stride]);
  for (; i + 16 <= D; i += 16) {
    const __m512 value = load16(v + i);
    for (int h = 0; h < N; ++h)
      _mm512_storeu_ps(sums + h * D + i, _mm512_fmadd_ps(weight[h], value, _mm512_loadu_ps(sums + h * D + i)));
  }
#endif
  for (; i < D; ++i)
    for (int h = 0; h < N; ++h) sums[h * D + i] += p[h * stride] * to_float(v[i]);
}

using DotsFn = void (*)(const float*, int64_t, const uint16_t*, float, float*, int64_t);
using AccumulateFn = void (*)(float*, int64_t, const uint16_t*, const float*, int64_t);
constexpr int GROUP = 8;  // query heads computed together; larger groups in parts of 8
constexpr DotsFn DOTS[GROUP + 1] = {nullptr, dots<1>, dots<2>, dots<3>, dots<4>, dots<5>, dots<6>, dots<7>, dots<8>};
constexpr AccumulateFn ACCUMULATE[GROUP + 1] = {nullptr,         accumulate<1>, accumulate<2>,
                                                accumulate<3>,   accumulate<4>, accumulate<5>,
                                                accumulate<6>,   accumulate<7>, accumulate<8>};

#if defined(__AVX512F__)
// e^x of 16 floats to float32's precision within a few units in the last place (0 below -87.3, infinity above 88.7):
// x = k ln2 + r, e^r by its Taylor polynomial (Cephes' expf), times 2^k.
inline __m512 exp16(__m512 x) {
  const __m512 v0 = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 k =
      _mm512_roundscale_ps(_mm512_mul_ps(v0, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 v = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v0));
  constexpr float C[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                          4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  __m512 poly = _mm512_set1_ps(C[0]);
  for (int c = 1; c < 6; ++c) poly = _mm512_fmadd_ps(poly, v, _mm512_set1_ps(C[c]));
  poly = _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(v, v), v), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(poly, k);
}
#endif

// e^x in place (a softmax's scores less their maximum)
void exp_in_place(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// The gated MLP's input to its down projection, as the families compute it in bf16: bf16(bf16(act(gate)) * up),
// act GELU (tanh form) or SiLU, each in float32 from the bf16 gate. One pass instead of two ops and a tensor.
at::Tensor gated(const at::Tensor& gate_, const at::Tensor& up_, bool gelu) {
  TORCH_CHECK(gate_.scalar_type() == at::kBFloat16 && up_.sizes() == gate_.sizes(), "gated: bf16 gate and up alike");
  const at::Tensor gate = gate_.contiguous(), up = up_.to(at::kBFloat16).contiguous();
  at::Tensor out = at::empty_like(gate);
  const int64_t n = gate.numel();
  const auto* G = reinterpret_cast<const uint16_t*>(gate.data_ptr());
  const auto* U = reinterpret_cast<const uint16_t*>(up.data_ptr());
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  constexpr float ROOT_2_OVER_PI = 0.7978845608028654f, CUBIC = 0.044715f;
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#if defined(__AVX512BF16__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= end; i += 16) {
      const __m512 x = load16(G + i);
      __m512 activated;
      if (gelu) {  // 0.5 x (1 + tanh(u)) = x / (1 + e^-2u): no cancellation where tanh(u) is near -1
        const __m512 u = _mm512_mul_ps(_mm512_set1_ps(ROOT_2_OVER_PI),
                                       _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(CUBIC), x), _mm512_mul_ps(x, x), x));
        activated = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_mul_ps(_mm512_set1_ps(-2.f), u))));
      } else {  // x / (1 + e^-x)
        activated = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
      }
      const __m512 rounded = widen((__m256i)_mm512_cvtneps_pbh(activated));
      _mm256_storeu_si256((__m256i*)(O + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(rounded, load16(U + i))));
    }
#endif
    for (; i < end; ++i) {
      const float x = to_float(G[i]);
      const float activated = gelu ? x / (1.f + std::exp(-2.f * ROOT_2_OVER_PI * (x + CUBIC * x * x * x)))
                                   : x / (1.f + std::exp(-x));
      O[i] = to_bf16(to_float(to_bf16(activated)) * to_float(U[i]));
    }
  });
  return out;
}

// float32 -> bf16 (round to nearest even) over n values
void round_to_bf16(const float* x, uint16_t* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) out[i] = to_bf16(x[i]);
}

// RoPE as the families apply it in bf16: x * cos + rotate_half(x) * sin, each product and the sum rounded.
void rotate(uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  uint16_t rotated[1024];
  int64_t i = 0;
#if defined(__AVX512BF16__)
  const auto rounded = [](__m512 v) { return widen((__m256i)_mm512_cvtneps_pbh(v)); };
  if (half % 16 == 0)
    for (; i < head_dim; i += 16) {
      const __m512 partner = i < half ? _mm512_sub_ps(_mm512_setzero_ps(), load16(x + i + half)) : load16(x + i - half);
      const __m512 first = rounded(_mm512_mul_ps(load16(x + i), load16(cos + i)));
      const __m512 second = rounded(_mm512_mul_ps(partner, load16(sin + i)));
      _mm256_storeu_si256((__m256i*)(rotated + i), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(first, second)));
    }
#endif
  for (; i < head_dim; ++i) {
    const float partner = i < half ? -to_float(x[i + half]) : to_float(x[i - half]);
    const float first = to_float(to_bf16(to_float(x[i]) * to_float(cos[i])));
    const float second = to_float(to_bf16(partner * to_float(sin[i])));
    rotated[i] = to_bf16(first + second);
  }
  std::memcpy(x, rotated, size_t(head_dim) * 2);
}

std::vector<at::Tensor> project(const at::Tensor& x, at::TensorList weights, at::IntArrayRef features,
                                const c10::List<c10::optional<at::Tensor>>& biases, std::vector<int64_t> which) {
  std::vector<at::Tensor> chosen;
  std::vector<int64_t> widths;
  std::vector<c10::optional<at::Tensor>> chosen_biases;
  for (const int64_t i : which) {
    chosen.push_back(weights[i]);
    widths.push_back(features[i]);
    chosen_biases.push_back(biases.get(i));
  }
  return linear_many(x, chosen, widths, chosen_biases);
}

at::Tensor normed(const at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& norms, int64_t which, double eps,
                  bool weight_after) {
  const c10::optional<at::Tensor> scale = norms.get(which);
  return scale.has_value() ? rms_norm(x, *scale, eps, weight_after) : x;
}

// hidden [R, D] bf16: R tokens, token r of the row in slot slots[r] of the cache at positions[r] (several tokens of
// one row: a chunk of its prompt, which attend to each other causally); cos/sin [R, head_dim] bf16;
// keys/values [slots, kv_heads, length, head_dim] bf16, written at each token's slot and position. weights: q, k,
// v, o, gate, up, down packed; norms (float32 scales, None where the family has none): input, after attention
// (Gemma), before the MLP, after the MLP (Gemma), q, k. window > 0: a token sees its row's last `window` positions.
at::Tensor decode_layer(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& slots,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor keys, at::Tensor values,
                        at::TensorList weights, at::IntArrayRef features, const c10::List<c10::optional<at::Tensor>>& biases,
                        const c10::List<c10::optional<at::Tensor>>& norms, double eps, bool weight_after,
                        int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling, int64_t window, bool gelu) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kBFloat16, "decode_layer: hidden is [rows, width] bf16");
  TORCH_CHECK(weights.size() == 7 && features.size() == 7 && biases.size() == 7 && norms.size() == 6,
              "decode_layer: 7 weights and biases, 6 norms");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == at::kBFloat16,
              "decode_layer: a contiguous bf16 cache");
  TORCH_CHECK(head_dim <= 1024 && heads % kv_heads == 0,
              "decode_layer: head_dim <= 1024, heads a multiple of kv heads");
  const int64_t R = hidden.size(0), length = keys.size(2), group = heads / kv_heads;
  TORCH_CHECK(keys.size(1) == kv_heads && keys.size(3) == head_dim, "decode_layer: cache shape");
  const at::Tensor x = hidden.contiguous();
  const at::Tensor where = positions.to(at::kLong).contiguous();
  const int64_t* pos = where.data_ptr<int64_t>();
  const at::Tensor owners = slots.to(at::kLong).contiguous();
  const int64_t* slot = owners.data_ptr<int64_t>();
  TORCH_CHECK(positions.numel() == R && slots.numel() == R, "decode_layer: a position and a slot for each token");
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < length && slot[r] >= 0 && slot[r] < keys.size(0),
                "decode_layer: position or slot outside the cache");

  const at::Tensor in = normed(x, norms, 0, eps, weight_after);
  std::vector<at::Tensor> qkv = project(in, weights, features, biases, {0, 1, 2});
  at::Tensor q = qkv[0], k = qkv[1];
  const at::Tensor v = qkv[2];
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
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t h = 0; h < heads; ++h)
        rotate(Q + (r * heads + h) * head_dim, C + r * head_dim, S + r * head_dim, head_dim);
      for (int64_t g = 0; g < kv_heads; ++g) {
        uint16_t* key = Kn + (r * kv_heads + g) * head_dim;
        rotate(key, C + r * head_dim, S + r * head_dim, head_dim);
        const int64_t at_ = ((slot[r] * kv_heads + g) * length + pos[r]) * head_dim;
        std::memcpy(KC + at_, key, size_t(head_dim) * 2);
        std::memcpy(VC + at_, Vn + (r * kv_heads + g) * head_dim, size_t(head_dim) * 2);
      }
    }
  });

  // Attention: a task is one token's query heads of one key-value group (each key and value read once for them
  // all), or a part of them where tokens x groups are too few to keep every thread busy (one row of a one-group
  // model).
  const int64_t threads = at::get_num_threads(), units = R * kv_heads;
  const int64_t wanted = units >= 2 * threads ? 1 : std::min(group, (2 * threads + units - 1) / units);
  const int64_t per = (group + wanted - 1) / wanted, parts = (group + per - 1) / per;
  at::Tensor attended = at::empty({R, heads * head_dim}, x.options());
  auto* A = reinterpret_cast<uint16_t*>(attended.data_ptr());
  at::parallel_for(0, units * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(per * head_dim), sums(per * head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / (kv_heads * parts), g = task / parts % kv_heads;
      const int64_t h0 = g * group + task % parts * per, n = std::min(per, (g + 1) * group - h0);
      const int64_t last = pos[r], first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t span = last - first + 1;
      const uint16_t* q_rows = Q + (r * heads + h0) * head_dim;
      for (int64_t i = 0; i < n * head_dim; ++i) query[i] = to_float(q_rows[i]);
      const uint16_t* key_base = KC + ((slot[r] * kv_heads + g) * length + first) * head_dim;
      const uint16_t* value_base = VC + ((slot[r] * kv_heads + g) * length + first) * head_dim;
      scores.resize(size_t(n * span));
      for (int64_t t = 0; t < span; ++t)
        for (int64_t h = 0; h < n; h += GROUP)
          DOTS[std::min<int64_t>(GROUP, n - h)](query.data() + h * head_dim, head_dim, key_base + t * head_dim,
                                                float(scaling), scores.data() + h * span + t, span);
      for (int64_t h = 0; h < n; ++h) {  // softmax of each head's scores
        float* row = scores.data() + h * span;
        const float best = *std::max_element(row, row + span);
        for (int64_t t = 0; t < span; ++t) row[t] -= best;
        exp_in_place(row, span);
        float total = 0.f;
        for (int64_t t = 0; t < span; ++t) total += row[t];
        for (int64_t t = 0; t < span; ++t) row[t] /= total;
      }
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t t = 0; t < span; ++t)
        for (int64_t h = 0; h < n; h += GROUP)
          ACCUMULATE[std::min<int64_t>(GROUP, n - h)](sums.data() + h * head_dim, head_dim, value_base + t * head_dim,
                                                      scores.data() + h * span + t, span);
      round_to_bf16(sums.data(), A + (r * heads + h0) * head_dim, n * head_dim);
    }
  });

  const at::Tensor attention =
      normed(project(attended, weights, features, biases, {3}).front(), norms, 1, eps, weight_after);
  const at::Tensor middle = at::add(x, attention);
  const at::Tensor inner = normed(middle, norms, 2, eps, weight_after);
  const std::vector<at::Tensor> gate_up = project(inner, weights, features, biases, {4, 5});
  const at::Tensor down = project(gated(gate_up[0], gate_up[1], gelu), weights, features, biases, {6}).front();
  return at::add(middle, normed(down, norms, 3, eps, weight_after));
}

}  // namespace

TORCH_LIBRARY(tunesmith_kernels, library) {
  library.def("pack_bf16(Tensor weight) -> Tensor");
  library.def("linear_bf16(Tensor input, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  library.def("rms_norm_bf16(Tensor input, Tensor scale, float eps, bool weight_after) -> Tensor");
  library.def("argmax_bf16(Tensor input) -> Tensor");
  library.def("gated_bf16(Tensor gate, Tensor up, bool gelu) -> Tensor");
  library.def("screen_pack(Tensor weight) -> Tensor[]");
  library.def("greedy_bf16(Tensor x, Tensor weight, Tensor q, Tensor scale, Tensor error, Tensor norm, Tensor sums) -> (Tensor, Tensor)");
  library.def(
      "decode_layer(Tensor hidden, Tensor positions, Tensor slots, Tensor cos, Tensor sin, Tensor(a!) keys, "
      "Tensor(b!) values, Tensor[] weights, int[] features, Tensor?[] biases, Tensor?[] norms, float eps, "
      "bool weight_after, int heads, int kv_heads, int head_dim, float scaling, int window, bool gelu) -> Tensor");
}

TORCH_LIBRARY_IMPL(tunesmith_kernels, CPU, library) {
  library.impl("pack_bf16", &pack);
  library.impl("linear_bf16", &linear);
  library.impl("rms_norm_bf16", &rms_norm);
  library.impl("argmax_bf16", &argmax_rows);
  library.impl("gated_bf16", &gated);
  library.impl("screen_pack", &screen_pack);
  library.impl("greedy_bf16", &greedy);
  library.impl("decode_layer", &decode_layer);
}
