// CPU kernels. Memory-bound ones for decoding (few rows per weight): a linear, the routed experts of one MoE layer, a
// SwiGLU MLP (the shared expert) and grouped-query attention of a few queries over a KV cache; the steps of a decoder
// layer around attention, which past a few rows (prefill) run GEMMs; and the routed experts as a grouped GEMM with its
// backward, for training.
//
// At one to a few tokens, a linear is a matrix-vector product whose time is streaming the weight from DRAM. PyTorch
// runs it through its BLAS, which on the 2-core machines this package is benchmarked on reads weights at a third to a
// half of the measured read bandwidth. These kernels read each weight row once, accumulating in fp32, with one of three
// instruction sets picked at run time (`instruction_set`): AVX2 + FMA (8 lanes, bf16 weights widened to fp32 in
// registers), AVX-512 (16 fp32 lanes) and AVX-512 BF16, whose `vdpbf16ps` multiplies bf16 weights by bf16
// activations 32 at a time, as PyTorch's bf16 linear does, with fp32 accumulation. A fourth level, AMX-BF16, adds
// tiles for the routed experts' bf16 grouped GEMM at prefill. Attention runs on AVX2 + FMA, decode attention on
// AVX-512 where the CPU has it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <cpuid.h>
#include <immintrin.h>
#include <torch/library.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace {

// ---- Instruction sets -----------------------------------------------------------------------------------------------

enum Isa : int64_t { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2, kAmxBf16 = 3 };
const char* const kIsaNames[] = {"avx2", "avx512", "avx512_bf16", "amx_bf16"};

// AMX-BF16 tiles (CPUID leaf 7: AMX-BF16 and AMX-TILE), which Linux lets a process use once it asks for their state.
bool amx_usable() {
#if defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !((edx >> 22) & 1) || !((edx >> 24) & 1)) return false;
  constexpr long kArchRequestComponentPermission = 0x1023, kTileDataComponent = 18;
  return syscall(SYS_arch_prctl, kArchRequestComponentPermission, kTileDataComponent) == 0;
#else
  return false;
#endif
}

int64_t detected_isa() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl")) {
    return kAvx2;
  }
  if (!__builtin_cpu_supports("avx512bf16")) return kAvx512;
  return amx_usable() ? kAmxBf16 : kAvx512Bf16;
}

const int64_t kDetectedIsa = detected_isa();
std::atomic<int64_t> active_isa{kDetectedIsa};

// The position of `name` among `names`, `native` where it is "native"; anything else is an error of operator `op`
// that names the choices (`what` they are).
template <size_t N>
int64_t choice_index(const char* const (&names)[N], const std::string& name, int64_t native, const char* op,
                     const char* what) {
  if (name == "native") return native;
  const auto* found = std::find(std::begin(names), std::end(names), name);
  std::string expected = "native";
  for (size_t i = 0; i < N; ++i) expected += (i + 1 < N ? ", " : " or ") + std::string(names[i]);
  TORCH_CHECK(found != std::end(names), "mobilemoe_cpu.", op, ": unknown ", what, " '", name, "'; expected ", expected);
  return found - std::begin(names);
}

// The instruction set the kernels use; `limit` (one of kIsaNames) caps it at that level (tests and benchmarks run
// every path a machine supports), "native" lifts the cap.
std::string instruction_set(c10::optional<std::string> limit) {
  if (limit.has_value()) {
    active_isa = std::min(choice_index(kIsaNames, *limit, kDetectedIsa, "instruction_set", "instruction set"),
                          kDetectedIsa);
  }
  return kIsaNames[active_isa.load()];
}

// ---- AVX2 + FMA: 8 fp32 lanes, bf16 weights widened in registers -----------------------------------------------------

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the upper half of an fp32: widen and shift
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// Rounds 8 fp32 lanes to T and back (identity for float; bf16: to nearest, ties to even, NaN to a quiet NaN), as
// `rounded<T>` does one value: where an eager operator would store a T result.
template <typename T>
inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256 kept = _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return _mm256_blendv_ps(kept, _mm256_set1_ps(NAN), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
}

// Stores 8 lanes already rounded to T (`round8<T>`).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline void store8(c10::BFloat16* p, __m256 v) {  // the upper halves, packed (packus keeps lanes in 128-bit halves)
  const __m256i upper = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(upper, upper), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// exp of 8 fp32 lanes (Cephes' polynomial, ~1 ulp on the softmax range), inputs below -87 give ~0.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n * ln 2, in two parts
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  }
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_to_n));
}

// out[r] = dot(w + r * K, x) for rows r in [begin, end); K is a multiple of 8, x is fp32 and cache-resident. Four rows
// side by side, one from each quarter of the range: x is loaded once for four rows, and the quarters are four DRAM
// streams (see `avx512::dot_rows`).
template <typename T>
void dot_rows(const T* w, const float* x, float* out, int64_t begin, int64_t end, int64_t K) {
  const int64_t quarter = (end - begin) / 4;
  for (int64_t i = 0; i < quarter; ++i) {
    const int64_t r = begin + i;
    const T* w0 = w + r * K;
    const T* w1 = w0 + quarter * K;
    const T* w2 = w1 + quarter * K;
    const T* w3 = w2 + quarter * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(load8(w0 + k), xv, a0);
      a1 = _mm256_fmadd_ps(load8(w1 + k), xv, a1);
      a2 = _mm256_fmadd_ps(load8(w2 + k), xv, a2);
      a3 = _mm256_fmadd_ps(load8(w3 + k), xv, a3);
    }
    out[r] = horizontal_sum(a0);
    out[r + quarter] = horizontal_sum(a1);
    out[r + 2 * quarter] = horizontal_sum(a2);
    out[r + 3 * quarter] = horizontal_sum(a3);
  }
  for (int64_t r = begin + 4 * quarter; r < end; ++r) {
    const T* w0 = w + r * K;
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) a0 = _mm256_fmadd_ps(load8(w0 + k), _mm256_loadu_ps(x + k), a0);
    out[r] = horizontal_sum(a0);
  }
}

// ---- AVX-512: 16 fp32 lanes, or 32 bf16 products per vdpbf16ps (AVX-512 BF16) -----------------------------------------
// Compiled for these targets only here; called only where the CPU reports them (`active_isa`).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace avx512 {

inline __m512 dot_step(__m512 acc, const float* w, const float* x) {
  return _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_loadu_ps(x), acc);
}

inline __m512 dot_step(__m512 acc, const float* w, const float* x, int64_t n) {  // the first n < 16 lanes
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  return _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w), _mm512_maskz_loadu_ps(mask, x), acc);
}

inline __m512 dot_step(__m512 acc, const c10::BFloat16* w, const c10::BFloat16* x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}

inline __m512 dot_step(__m512 acc, const c10::BFloat16* w, const c10::BFloat16* x, int64_t n) {  // n < 32
  const __mmask32 mask = (1u << n) - 1;
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(mask, w), (__m512bh)_mm512_maskz_loadu_epi16(mask, x));
}

// A row is read with four independent accumulators and a software prefetch 4 KiB ahead, rows one after another
// within a stream (`dot_rows`): measured 13-20% faster than four rows side by side on bf16 weights of 1.5 MB to
// 200 MB (2 threads, Zen 5; a standalone C++ harness, variants interleaved in one process).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int kAccumulators = 4;

template <typename T>
inline float dot_row(const T* w, const T* x, int64_t K) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  __m512 acc[kAccumulators];
  for (int i = 0; i < kAccumulators; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kAccumulators * kLanes <= K; k += kAccumulators * kLanes) {
    for (int i = 0; i < kAccumulators; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + i * kLanes) + kPrefetchBytes, _MM_HINT_T0);
      acc[i] = dot_step(acc[i], w + k + i * kLanes, x + k + i * kLanes);
    }
  }
  for (; k + kLanes <= K; k += kLanes) acc[0] = dot_step(acc[0], w + k, x + k);
  if (k < K) acc[1] = dot_step(acc[1], w + k, x + k, K - k);
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// A thread's rows are read as up to kStreams interleaved streams (the range cut in kStreams parts, one row of each in
// turn): a core keeps several DRAM streams in flight where one stream leaves it waiting. Measured on the Xeon (2
// threads, bf16 rows of 768, cold weights, a standalone harness, variants interleaved in one process): one stream
// 13-20 GB/s, four 19-27 GB/s, from 384 rows to the 128256-row LM head; more than four gained nothing. Full S decode
// steps: bf16 40.3 -> 33.6 ms, fp32 63 -> 55 ms.
constexpr int64_t kStreams = 4;
constexpr int64_t kMinStreamRows = 8;

template <typename T>
void dot_rows(const T* w, const T* x, float* out, int64_t begin, int64_t end, int64_t K) {
  const int64_t streams = std::clamp<int64_t>((end - begin) / kMinStreamRows, 1, kStreams);
  const int64_t rows_per_stream = (end - begin) / streams;
  for (int64_t i = 0; i < rows_per_stream; ++i) {
    for (int64_t s = 0; s < streams; ++s) {
      const int64_t r = begin + s * rows_per_stream + i;
      out[r] = dot_row(w + r * K, x, K);
    }
  }
  for (int64_t r = begin + streams * rows_per_stream; r < end; ++r) out[r] = dot_row(w + r * K, x, K);
}

}  // namespace avx512
#pragma GCC pop_options

// ---- Operators ---------------------------------------------------------------------------------------------------

// Runs the lambda with scalar_t = float or c10::BFloat16, the activation dtypes the operators take.
#define DISPATCH_FLOAT_OR_BF16(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename W, typename X>
using DotRows = void (*)(const W*, const X*, float*, int64_t, int64_t, int64_t);

// Which row kernel runs for a weight dtype, and the dtype it wants its activations in.
struct Path {
  at::ScalarType activations;
  int64_t isa;
};

Path path_for(at::ScalarType weight) {
  const int64_t isa = active_isa.load();
  if (weight == at::kBFloat16 && isa >= kAvx512Bf16) return {at::kBFloat16, kAvx512Bf16};
  if (weight == at::kFloat && isa >= kAvx512) return {at::kFloat, kAvx512};
  return {at::kFloat, kAvx2};
}

// Calls `fn(w, x, dot)` with the weight and activation pointers typed and the row kernel of `path`.
template <typename Fn>
void dispatch(const Path& path, const at::Tensor& weight, const at::Tensor& x, Fn fn) {
  if (weight.scalar_type() == at::kFloat) {
    DotRows<float, float> dot = path.isa == kAvx512 ? avx512::dot_rows<float> : dot_rows<float>;
    fn(weight.data_ptr<float>(), x.data_ptr<float>(), dot);
  } else if (path.isa == kAvx512Bf16) {
    fn(weight.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>(), avx512::dot_rows<c10::BFloat16>);
  } else {
    fn(weight.data_ptr<c10::BFloat16>(), x.data_ptr<float>(), dot_rows<c10::BFloat16>);
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// Rounds v to T and back (identity for float): where an eager operator would store a T result.
template <typename T>
inline float rounded(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Rows of a weight handed to one thread at a time: 64 rows of 768 fp32 values are 192 KiB, enough to amortise the
// scheduling, small enough that a 768-row weight still splits across both cores.
constexpr int64_t kGrainRows = 64;

void check_weight(const at::Tensor& weight, int64_t dims, const char* name) {
  TORCH_CHECK(weight.dim() == dims, "mobilemoe_cpu: ", name, " must have ", dims, " dimensions, got ", weight.dim());
  TORCH_CHECK(weight.is_contiguous(), "mobilemoe_cpu: ", name, " must be contiguous");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "mobilemoe_cpu: ", name, " must be float32 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(weight.size(-1) % 8 == 0, "mobilemoe_cpu: the last dimension of ", name, " must be a multiple of 8");
}

// Weight rows a thread applies to every input row before the next ones, while they are in its L2: 768 KiB of bf16
// rows of 768. One input row streams the thread's whole range instead, so its streams stay long.
constexpr int64_t kCachedRows = 512;

template <typename W, typename X>
void linear_rows(const W* w, const X* x, float* y, int64_t M, int64_t N, int64_t K, DotRows<W, X> dot) {
  at::parallel_for(0, N, kGrainRows, [&](int64_t begin, int64_t end) {
    const int64_t block = M == 1 ? end - begin : kCachedRows;
    for (int64_t first = begin; first < end; first += block) {
      const int64_t last = std::min(first + block, end);
      for (int64_t m = 0; m < M; ++m) dot(w, x + m * K, y + m * N, first, last, K);
    }
  });
}

at::Tensor streamed_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_weight(weight, 2, "weight");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(input.size(-1) == K, "mobilemoe_cpu.linear: input has ", input.size(-1), " features, weight ", K);
  const Path path = path_for(weight.scalar_type());
  const at::Tensor x = input.reshape({-1, K}).to(path.activations).contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  dispatch(path, weight, x, [&](const auto* w, const auto* xs, auto dot) {
    linear_rows(w, xs, y.data_ptr<float>(), M, N, K, dot);
  });
  if (bias.has_value()) y.add_(*bias);
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = N;
  return y.to(input.scalar_type()).view(shape);
}

// Where the SwiGLU weights of expert e are: gate rows at gate + e * stride, up rows at up + e * stride (each [I, H]),
// down rows at down + e * H * I ([H, I]). The routed experts' gate_up [E, 2I, H] is gate = gate_up, up = gate_up + I * H,
// stride 2I * H; a single MLP has stride 0.
template <typename W>
struct SwiGluWeights {
  const W* gate;
  const W* up;
  int64_t stride;
  const W* down;
};

// For every (token, slot): the slot's expert's down(silu(gate x) * up x) weighted by the slot's weight, summed per
// token into out [tokens, H]. Only the selected experts' rows are read.
template <typename W, typename X>
void swiglu_experts(const SwiGluWeights<W>& weights, const X* x, const int64_t* expert_of_slot,
                    const float* weight_of_slot, X* hidden, float* out, int64_t tokens, int64_t top_k, int64_t H,
                    int64_t I, DotRows<W, X> dot) {
  const int64_t slots = tokens * top_k;
  // gate and up rows of every slot's expert in one parallel region over all slots, so 2 cores split k experts' rows
  // rather than synchronising per expert.
  std::vector<float> gate_up_out(slots * 2 * I);
  at::parallel_for(0, slots * 2 * I, kGrainRows, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t slot = begin / (2 * I), row = begin % (2 * I);
      const bool up = row >= I;
      const int64_t first = up ? row - I : row, count = std::min(end - begin, I - first);
      const W* w = (up ? weights.up : weights.gate) + expert_of_slot[slot] * weights.stride;
      float* y = gate_up_out.data() + slot * 2 * I + (up ? I : 0);
      dot(w, x + (slot / top_k) * H, y, first, first + count, H);
      begin += count;
    }
  });
  // SwiGLU in fp32, stored in the activation dtype of the row kernel (bf16 where it multiplies bf16 pairs).
  for (int64_t slot = 0; slot < slots; ++slot) {
    const float* g = gate_up_out.data() + slot * 2 * I;
    for (int64_t j = 0; j < I; ++j) hidden[slot * I + j] = static_cast<X>(silu(g[j]) * g[I + j]);
  }
  // down rows: each output feature of a token sums its k experts' rows, so threads own disjoint outputs.
  at::parallel_for(0, tokens * H, kGrainRows, [&](int64_t begin, int64_t end) {
    float partial[kGrainRows * 2];
    while (begin < end) {
      const int64_t token = begin / H, row = begin % H;
      const int64_t count = std::min({end - begin, H - row, static_cast<int64_t>(kGrainRows * 2)});
      for (int64_t r = 0; r < count; ++r) out[token * H + row + r] = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t slot = token * top_k + j;
        const W* w = weights.down + expert_of_slot[slot] * H * I + row * I;
        dot(w, hidden + slot * I, partial, 0, count, I);
        for (int64_t r = 0; r < count; ++r) out[token * H + row + r] += weight_of_slot[slot] * partial[r];
      }
      begin += count;
    }
  });
}

// Runs `swiglu_experts` on a [tokens, H] input with the row kernel for the weights' dtype; returns [tokens, H] in
// the input's dtype.
at::Tensor run_swiglu_experts(const at::Tensor& hidden_states, const at::Tensor& gate, const at::Tensor& up,
                              int64_t stride, const at::Tensor& down, const at::Tensor& expert_of_slot,
                              const at::Tensor& weight_of_slot, int64_t I) {
  const Path path = path_for(gate.scalar_type());
  const at::Tensor x = hidden_states.to(path.activations).contiguous();
  const int64_t tokens = x.size(0), H = x.size(1), top_k = expert_of_slot.size(1);
  at::Tensor hidden = at::empty({tokens * top_k, I}, x.options());
  at::Tensor out = at::empty({tokens, H}, x.options().dtype(at::kFloat));
  dispatch(path, gate, x, [&](const auto* gate_ptr, const auto* xs, auto dot) {
    using W = std::remove_cv_t<std::remove_pointer_t<decltype(gate_ptr)>>;
    using X = std::remove_cv_t<std::remove_pointer_t<decltype(xs)>>;
    const SwiGluWeights<W> weights{gate_ptr, up.data_ptr<W>(), stride, down.data_ptr<W>()};
    swiglu_experts(weights, xs, expert_of_slot.data_ptr<int64_t>(), weight_of_slot.data_ptr<float>(),
                   hidden.data_ptr<X>(), out.data_ptr<float>(), tokens, top_k, H, I, dot);
  });
  return out.to(hidden_states.scalar_type());
}

// ---- Many rows (prefill) --------------------------------------------------------------------------------------------
// Beyond a few rows a linear is compute-bound: it runs GEMMs (`gemm`), and the operators save what is around
// them: the eager layer's elementwise passes and, for the routed experts, a Python iteration and five operator calls
// per expert.

// oneDNN's fp32 linear as PyTorch registers it (inductor's frozen CPU graphs call it), where this build has it.
using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                   c10::string_view, c10::List<c10::optional<at::Scalar>>,
                                   c10::optional<c10::string_view>);

c10::optional<c10::TypedOperatorHandle<LinearPointwise>> onednn_linear_op() {
  const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!op.has_value()) return c10::nullopt;
  return op->typed<LinearPointwise>();
}

const c10::optional<c10::TypedOperatorHandle<LinearPointwise>>& onednn_linear() {
  static const auto op = onednn_linear_op();
  return op;
}

// Which library runs the operators' fp32 inference GEMMs: at::linear (MKL's sgemm in PyTorch's x86 builds) or oneDNN's
// fp32 linear. MKL takes its AVX2 code on AMD CPUs (its own dispatch): on the Zen 5, with AVX-512, oneDNN's linear
// measured 1.7-2.8x faster at this package's shapes (one core, an expert's 68 rows: 116-122 against 59-71 GFLOP/s; two
// cores, 1024 rows: 383-391 against 171-188). Where MKL's code is as wide as the CPU's, MKL measured the faster one: on
// an AVX2-only AMD EPYC (one core, an expert's gate-up and down: 50 and 47 against 45 and 39 GFLOP/s; a whole fp32 S
// prefill 219.8-234.0 against 203.7-203.8 tok/s in two runs) and on an Intel Xeon with AVX-512 (505 against 492
// tok/s). "native" picks that way; tests and benchmarks may name either.
const char* const kFloat32GemmNames[] = {"aten", "onednn"};
enum Float32Gemms : int64_t { kAtenGemms = 0, kOneDnnGemms = 1 };

int64_t native_float32_gemms() {
  const bool onednn = kDetectedIsa >= kAvx512 && !__builtin_cpu_is("intel") && onednn_linear().has_value();
  return onednn ? kOneDnnGemms : kAtenGemms;
}

std::atomic<int64_t> float32_gemms_library{native_float32_gemms()};

// The library of the fp32 inference GEMMs; `library` (aten, onednn or native) chooses it.
std::string float32_gemms(c10::optional<std::string> library) {
  if (library.has_value()) {
    float32_gemms_library = choice_index(kFloat32GemmNames, *library, native_float32_gemms(), "float32_gemms", "library");
  }
  return kFloat32GemmNames[float32_gemms_library.load()];
}

// x runs an fp32 GEMM on oneDNN's linear: chosen (`float32_gemms`), there, on (PyTorch's oneDNN switch,
// `torch.backends.mkldnn.enabled`) and not kept on at::linear by the caller (`aten_float32`, training).
bool onednn_float32(const at::Tensor& x, bool aten_float32) {
  return x.scalar_type() == at::kFloat && !aten_float32 && float32_gemms_library.load() == kOneDnnGemms &&
         onednn_linear().has_value() && at::globalContext().userEnabledMkldnn();
}

at::Tensor onednn_gemm(const at::Tensor& x, const at::Tensor& weight) {
  return onednn_linear()->call(x, weight, c10::nullopt, "none", c10::List<c10::optional<at::Scalar>>(), c10::nullopt);
}

// x [..., K] times weight [N, K] transposed, as at::linear computes it (either may be a strided view): bf16 on
// oneDNN's matmul (at::linear's), fp32 on the library `float32_gemms` chose. Like PyTorch's bf16 matmuls, oneDNN keeps
// a primitive for every new shape in its cache.
at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, bool aten_float32 = false) {
  return onednn_float32(x, aten_float32) ? onednn_gemm(x, weight) : at::linear(x, weight);
}

// `gemm` of x [rows, K] written into out [rows, N], a view into a larger buffer.
void gemm_into(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, bool aten_float32 = false) {
  if (onednn_float32(x, aten_float32)) {
    out.copy_(onednn_gemm(x, weight));
  } else {
    at::mm_out(out, x, weight.t());
  }
}

// Up to this many rows a projection streams its weight (`streamed_linear`), more run `gemm` (MAX_LINEAR_ROWS in
// kernels/__init__.py). Up to this many (token, expert) slots the routed experts stream their rows, more run as a
// grouped GEMM (MAX_FUSED_SLOTS there).
constexpr int64_t kMaxStreamedRows = 4;
constexpr int64_t kMaxStreamedSlots = 16;

at::Tensor project(const at::Tensor& x, const at::Tensor& weight, bool aten_float32 = false) {
  if (x.numel() <= kMaxStreamedRows * x.size(-1)) return streamed_linear(x, weight, c10::nullopt);
  return gemm(x, weight, aten_float32);
}

// silu(gate) * up of 8 lanes holding T values, with silu rounded to T before the product and the product rounded to
// T, as eager `act_fn(gate) * up` stores them.
template <typename T>
inline __m256 swiglu8(__m256 gate, __m256 up) {
  const __m256 denominator = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate)));
  return round8<T>(_mm256_mul_ps(round8<T>(_mm256_div_ps(gate, denominator)), up));
}

// hidden[r] = silu(gate[r]) * up[r] over rows of I values (a multiple of 8; gate and up rows `stride` apart), rounded
// as `swiglu8` rounds.
template <typename T>
void swiglu_rows(const T* gate, const T* up, int64_t stride, T* hidden, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate + r * stride;
      const T* u = up + r * stride;
      for (int64_t j = 0; j < I; j += 8) store8(hidden + r * I + j, swiglu8<T>(load8(g + j), load8(u + j)));
    }
  });
}

at::Tensor gemm_swiglu_mlp(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down) {
  const at::Tensor g = gemm(x, gate), u = gemm(x, up);
  at::Tensor hidden = at::empty_like(g);
  DISPATCH_FLOAT_OR_BF16(x.scalar_type(), "mobilemoe_cpu.swiglu_mlp", [&] {
    swiglu_rows(g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), g.size(1), hidden.data_ptr<scalar_t>(), g.size(0),
                g.size(1));
  });
  return gemm(hidden, down);
}

// The (token, expert) slots of a layer sorted by expert with a stable counting sort: expert e's rows are
// [first_row[e], first_row[e + 1]) of the sorted order, slot s (token s / k) is row row_of_slot[s], and row r is a
// row of token token_of_row[r].
struct SortedSlots {
  std::vector<int64_t> first_row, row_of_slot;
  at::Tensor token_of_row;
};

SortedSlots sort_slots(const at::Tensor& experts, int64_t E) {
  const int64_t slots = experts.numel(), k = experts.size(1);
  const int64_t* expert_of_slot = experts.data_ptr<int64_t>();
  SortedSlots sorted{std::vector<int64_t>(E + 1, 0), std::vector<int64_t>(slots), at::empty({slots}, experts.options())};
  for (int64_t s = 0; s < slots; ++s) ++sorted.first_row[expert_of_slot[s] + 1];
  std::partial_sum(sorted.first_row.begin(), sorted.first_row.end(), sorted.first_row.begin());
  std::vector<int64_t> next_row(sorted.first_row.begin(), sorted.first_row.end() - 1);
  int64_t* token_of_row = sorted.token_of_row.data_ptr<int64_t>();
  for (int64_t s = 0; s < slots; ++s) {
    sorted.row_of_slot[s] = next_row[expert_of_slot[s]]++;
    token_of_row[sorted.row_of_slot[s]] = s / k;
  }
  return sorted;
}

// Runs fn(e, first row, rows) for every expert with rows. Each thread takes whole experts (those whose middle row
// falls in its share of the rows) and runs their GEMMs on one core: at tens of rows an expert's GEMM splits badly
// across cores (a 1k-token S layer's experts measured 1.3x faster this way than expert after expert on both cores,
// bf16 and fp32).
template <typename Fn>
void for_each_expert_split(const std::vector<int64_t>& first_row, Fn fn) {
  const int64_t threads = at::get_num_threads(), E = static_cast<int64_t>(first_row.size()) - 1, rows = first_row[E];
  if (rows == 0) return;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    // Workers do not inherit the caller's thread-local state (grad mode, inference mode): the GEMMs below write into
    // this operator's own buffers, so they dispatch straight to the CPU kernels, past autograd and version counters.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t row = first_row[e], count = first_row[e + 1] - row, share = (row + count / 2) * threads / rows;
      if (count > 0 && share >= begin && share < end) fn(e, row, count);
    }
  });
}

// ---- AMX-BF16 tiles: one expert's rows without repacking its weights ------------------------------------------------
// oneDNN's bf16 GEMM on AMX first copies the weight into the tiles' pair-interleaved (VNNI) layout, on every call: at an
// expert's ~70 rows of a 1k-token S prefill that copy costs about as much as the products (one core: 0.16 ms for
// 68 x 768 x 768, 500 GFLOP/s, against 1.0-1.2 TFLOP/s at 1024 rows). Computing the transposed products instead,
// out^T = W x^T, makes the weight the tiles' left operand, which they read in place (rows of 32 bf16 values), and
// the activations the right one, packed here: ~70 rows, not 768. The SwiGLU writes its output packed for the down
// projection; the result is transposed back into rows. Rounded where `grouped_experts` rounds. The tiles' loads bound
// this kernel at about oneDNN's rate for such GEMMs (0.52-0.56 TFLOP/s a core at 64-256 rows in a standalone harness,
// 2.4 without the loads); what it saves is the copy and oneDNN's per-call work: one S layer's experts at 1024 tokens
// took 10.8-11.0 against 18.5-20.7 ms on 2 cores of a Xeon (rows gathered while packing).

// Eight rows of eight 32-bit values, transposed in registers.
inline void transpose8x8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      u[i + j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + j + 2] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  const int order[4] = {0, 2, 1, 3};  // u holds rows 0, 2, 1, 3 of each 4-row half, in 128-bit lanes
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[order[i]], u[order[i] + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[order[i]], u[order[i] + 4], 0x31);
  }
}

// A tile of at most 16 rows of 64 bytes; palette 1 configures eight.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// c[n][m] (fp32, rows of M) = sum over k of w[n][k] x[m][k], for n < N (a multiple of 32), m < M (a multiple of 16)
// and k < K (a multiple of 32); w is bf16 rows of K, read in place; x comes packed in pairs: packed[j][m] holds
// x[m][2j] and x[m][2j + 1]. Blocks of 32 n by 32 m (16 where M is not a multiple of 32) in tiles 0-3, w in 4-5, x in
// 6-7.
template <int MBlocks>
__attribute__((target("amx-tile,amx-bf16"))) void tile_block(const c10::BFloat16* w, int64_t K, const uint32_t* packed,
                                                              int64_t M, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (MBlocks == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, w + k, K * 2);
    _tile_loadd(5, w + 16 * K + k, K * 2);
    _tile_loadd(6, packed + k / 2 * M, M * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if constexpr (MBlocks == 2) {
      _tile_loadd(7, packed + k / 2 * M + 16, M * 4);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, M * 4);
  _tile_stored(1, c + 16 * M, M * 4);
  if constexpr (MBlocks == 2) {
    _tile_stored(2, c + 16, M * 4);
    _tile_stored(3, c + 16 * M + 16, M * 4);
  }
}

__attribute__((target("amx-tile,amx-bf16"))) void tile_gemm(const c10::BFloat16* w, int64_t N, int64_t K,
                                                             const uint32_t* packed, int64_t M, float* c) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
  for (int64_t n = 0; n < N; n += 32) {
    int64_t m = 0;
    for (; m + 32 <= M; m += 32) tile_block<2>(w + n * K, K, packed + m, M, c + n * M + m);
    if (m < M) tile_block<1>(w + n * K, K, packed + m, M, c + n * M + m);
  }
  _tile_release();
}

// packed[j][m] = the bf16 pair x[t][2j], x[t][2j + 1] of token t = token_of_row[m] for m < rows, zeros for
// rows <= m < M (a multiple of 8): the rows are gathered here, not copied into sorted order first.
void pack_pairs(const c10::BFloat16* x, const int64_t* token_of_row, int64_t rows, int64_t H, uint32_t* packed,
                int64_t M) {
  const float* pairs = reinterpret_cast<const float*>(x);  // 32-bit lanes, moved, never computed on
  for (int64_t m = 0; m < M; m += 8) {
    for (int64_t j = 0; j < H / 2; j += 8) {
      __m256 block[8];
      for (int i = 0; i < 8; ++i) {
        block[i] = m + i < rows ? _mm256_loadu_ps(pairs + token_of_row[m + i] * (H / 2) + j) : _mm256_setzero_ps();
      }
      transpose8x8(block);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(reinterpret_cast<float*>(packed + (j + i) * M + m), block[i]);
    }
  }
}

// From the gate-up products gate_up[i][m] (fp32, gate rows i < I, up rows I + i), rounded to bf16 as a GEMM's output
// is: SwiGLU (`swiglu8`), packed in pairs for the down projection: packed[j][m] holds h[2j][m] (low half) and
// h[2j + 1][m].
void swiglu_pairs(const float* gate_up, int64_t I, int64_t M, uint32_t* packed) {
  const auto swiglu = [&](int64_t i, int64_t m) {
    const auto product = [&](int64_t row) { return round8<c10::BFloat16>(_mm256_loadu_ps(gate_up + row * M + m)); };
    return _mm256_castps_si256(swiglu8<c10::BFloat16>(product(i), product(I + i)));
  };
  for (int64_t j = 0; j < I / 2; ++j) {
    for (int64_t m = 0; m < M; m += 8) {
      const __m256i low = _mm256_srli_epi32(swiglu(2 * j, m), 16);
      const __m256i high = _mm256_and_si256(swiglu(2 * j + 1, m), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + j * M + m), _mm256_or_si256(low, high));
    }
  }
}

// Rows of an expert's activations per tile pass: the scratch below stays within ~2 MB a thread.
constexpr int64_t kTileRows = 256;

// One expert on the rows of tokens token_of_row[0, rows) of x [tokens, H] with AMX tiles: out [rows, H] =
// down(SwiGLU(gate_up x)), each step rounded to bf16 as `grouped_experts` rounds it. H and I multiples of 32
// (`tiles_apply`).
void tile_expert(const c10::BFloat16* x, const int64_t* token_of_row, int64_t rows, const c10::BFloat16* gate_up_proj,
                 const c10::BFloat16* down_proj, int64_t H, int64_t I, c10::BFloat16* out) {
  thread_local std::vector<uint32_t> packed_x, packed_h;  // reused across calls: no page faults per expert
  thread_local std::vector<float> gate_up, down;
  for (int64_t first = 0; first < rows; first += kTileRows) {
    const int64_t count = std::min(kTileRows, rows - first), M = (count + 15) / 16 * 16;
    packed_x.resize(H / 2 * M), packed_h.resize(I / 2 * M), gate_up.resize(2 * I * M), down.resize(H * M);
    pack_pairs(x, token_of_row + first, count, H, packed_x.data(), M);
    tile_gemm(gate_up_proj, 2 * I, H, packed_x.data(), M, gate_up.data());
    swiglu_pairs(gate_up.data(), I, M, packed_h.data());
    tile_gemm(down_proj, H, I, packed_h.data(), M, down.data());
    for (int64_t h = 0; h < H; h += 8) {  // down[h][m] -> out rows, rounded to bf16
      for (int64_t m = 0; m < count; m += 8) {
        __m256 block[8];
        for (int i = 0; i < 8; ++i) block[i] = _mm256_loadu_ps(down.data() + (h + i) * M + m);
        transpose8x8(block);
        for (int i = 0; i < 8 && m + i < count; ++i) {
          store8(out + (first + m + i) * H + h, round8<c10::BFloat16>(block[i]));
        }
      }
    }
  }
}

// The tile path takes bf16 inference where the kernels may use AMX (`instruction_set`) and the shapes fit its tiles.
bool tiles_apply(const at::Tensor& x, int64_t H, int64_t I, bool training) {
  return !training && x.scalar_type() == at::kBFloat16 && active_isa.load() >= kAmxBf16 && H % 32 == 0 && I % 32 == 0;
}

// The routed experts of many tokens as a grouped GEMM, computed as `sorted_experts` in the modeling file does: the
// slots sorted by expert, each expert's rows through gate-up, SwiGLU and down (GEMMs on contiguous rows;
// experts without slots are never read), every slot's output times its routing weight, summed per token in expert
// order, rounded to the activations' dtype after every step. Returns the output [tokens, H] and, for the backward,
// the sorted rows' gate-up [slots, 2I], SwiGLU [slots, I] and expert outputs [slots, H].
//
// Training keeps fp32 on MKL's sgemm (`training`, and the backward's at::mm): with oneDNN the experts' forward and
// backward measured 1.48x faster (4 S layers, new routing every step), but a full S training step was no faster
// beyond the machine's noise (50.7 against 51.0 tok/s) and its peak RSS grew from 12.8 to 14.4 GiB, as every step's
// routing brings new row counts and oneDNN keeps a primitive for each GEMM shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_experts(
    const at::Tensor& hidden_states, const at::Tensor& experts, const at::Tensor& weights,
    const at::Tensor& gate_up_proj, const at::Tensor& down_proj, bool training) {
  const at::Tensor x = hidden_states.contiguous();
  const int64_t tokens = x.size(0), H = x.size(1), k = experts.size(1), slots = tokens * k, I = down_proj.size(2);
  const SortedSlots sorted = sort_slots(experts, gate_up_proj.size(0));
  // The tiles gather their rows while packing them, and keep no gate-up or SwiGLU rows (inference needs none).
  const bool tiles = tiles_apply(x, H, I, training);
  const at::Tensor rows = tiles ? at::Tensor() : x.index_select(0, sorted.token_of_row);
  at::Tensor gate_up = tiles ? at::Tensor() : at::empty({slots, 2 * I}, x.options());
  at::Tensor hidden = tiles ? at::Tensor() : at::empty({slots, I}, x.options());
  at::Tensor out = at::empty({slots, H}, x.options()), result = at::empty({tokens, H}, x.options());
  DISPATCH_FLOAT_OR_BF16(x.scalar_type(), "mobilemoe_cpu.moe_experts", [&] {
    for_each_expert_split(sorted.first_row, [&](int64_t e, int64_t row, int64_t count) {
      if (tiles) {
        const auto bf16 = [](const at::Tensor& t) { return t.data_ptr<c10::BFloat16>(); };
        tile_expert(bf16(x), sorted.token_of_row.data_ptr<int64_t>() + row, count, bf16(gate_up_proj) + e * 2 * I * H,
                    bf16(down_proj) + e * H * I, H, I, bf16(out) + row * H);
        return;
      }
      at::Tensor expert_gate_up = gate_up.narrow(0, row, count), expert_out = out.narrow(0, row, count);
      gemm_into(expert_gate_up, rows.narrow(0, row, count), gate_up_proj[e], training);
      const scalar_t* gate = expert_gate_up.data_ptr<scalar_t>();
      swiglu_rows(gate, gate + I, 2 * I, hidden.data_ptr<scalar_t>() + row * I, count, I);
      gemm_into(expert_out, hidden.narrow(0, row, count), down_proj[e], training);
    });
    const int64_t* expert_of_slot = experts.data_ptr<int64_t>();
    const scalar_t* expert_rows = out.data_ptr<scalar_t>();
    const float* weight_of_slot = weights.data_ptr<float>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(k);
      std::vector<float> sum(H);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t* ids = expert_of_slot + t * k;
        std::iota(order.begin(), order.end(), 0);  // the token's slots in expert order, as the sorted rows hold them
        std::sort(order.begin(), order.end(), [ids](int64_t a, int64_t b) { return ids[a] < ids[b]; });
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (const int64_t j : order) {
          const __m256 weight = _mm256_set1_ps(rounded<scalar_t>(weight_of_slot[t * k + j]));
          const scalar_t* expert_row = expert_rows + sorted.row_of_slot[t * k + j] * H;
          for (int64_t h = 0; h < H; h += 8) {
            const __m256 weighted = round8<scalar_t>(_mm256_mul_ps(load8(expert_row + h), weight));
            _mm256_storeu_ps(sum.data() + h, round8<scalar_t>(_mm256_add_ps(_mm256_loadu_ps(sum.data() + h), weighted)));
          }
        }
        for (int64_t h = 0; h < H; h += 8) store8(result.data_ptr<scalar_t>() + t * H + h, _mm256_loadu_ps(sum.data() + h));
      }
    });
  });
  return {result, gate_up, hidden, out};
}

// d gate and d up of rows of SwiGLU(gate, up) = silu(gate) * up from d SwiGLU, in fp32, each rounded to T once.
// gate_up rows are [gate (I), up (I)], as d_gate_up's.
template <typename T>
void swiglu_backward_rows(const T* gate_up, const T* d_swiglu, T* d_gate_up, int64_t rows, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = 0; r < rows; ++r, gate_up += 2 * I, d_swiglu += I, d_gate_up += 2 * I) {
    for (int64_t j = 0; j < I; j += 8) {
      const __m256 g = load8(gate_up + j), u = load8(gate_up + I + j), d = load8(d_swiglu + j);
      const __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      const __m256 silu = _mm256_mul_ps(g, sigmoid);
      // silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
      const __m256 d_silu = _mm256_mul_ps(sigmoid, _mm256_fmadd_ps(g, _mm256_sub_ps(one, sigmoid), one));
      store8(d_gate_up + j, round8<T>(_mm256_mul_ps(_mm256_mul_ps(d, u), d_silu)));
      store8(d_gate_up + I + j, round8<T>(_mm256_mul_ps(d, silu)));
    }
  }
}

// The backward of `grouped_experts`: from grad_output [tokens, H] and what the forward returned, the gradients of
// hidden_states, the routing weights (fp32) and, if weight_grads, of gate_up_proj and down_proj (zeros for experts
// without slots). Per expert four GEMMs, split between the cores as in the forward; each weight gradient is written
// by one GEMM, so the result does not depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_experts_backward(
    const at::Tensor& grad_output, const at::Tensor& hidden_states, const at::Tensor& experts,
    const at::Tensor& weights, const at::Tensor& gate_up_proj, const at::Tensor& down_proj, const at::Tensor& gate_up,
    const at::Tensor& swiglu, const at::Tensor& expert_out, bool weight_grads) {
  const at::Tensor x = hidden_states.contiguous(), dy = grad_output.contiguous().to(x.scalar_type());
  const int64_t tokens = x.size(0), H = x.size(1), k = experts.size(1), slots = tokens * k;
  const int64_t E = gate_up_proj.size(0), I = down_proj.size(2);
  // The sort and the gathered rows are recomputed (a counting sort and one gather) rather than saved by the forward,
  // which would keep another [slots, H] per MoE layer alive until the backward.
  const SortedSlots sorted = sort_slots(experts, E);
  const at::Tensor rows = x.index_select(0, sorted.token_of_row);
  at::Tensor d_out = at::empty({slots, H}, x.options()), d_swiglu = at::empty({slots, I}, x.options());
  at::Tensor d_gate_up = at::empty({slots, 2 * I}, x.options()), d_rows = at::empty({slots, H}, x.options());
  at::Tensor grad_hidden = at::empty({tokens, H}, x.options()), grad_weights = at::empty({tokens, k}, weights.options());
  at::Tensor grad_gate_up_proj, grad_down_proj;
  if (weight_grads) {
    grad_gate_up_proj = at::empty_like(gate_up_proj);
    grad_down_proj = at::empty_like(down_proj);
    for (int64_t e = 0; e < E; ++e) {
      if (sorted.first_row[e + 1] == sorted.first_row[e]) {
        grad_gate_up_proj[e].zero_();
        grad_down_proj[e].zero_();
      }
    }
  }
  DISPATCH_FLOAT_OR_BF16(x.scalar_type(), "mobilemoe_cpu.moe_experts_backward", [&] {
    // d routing weight = <dy, expert output>, d expert output = weight * dy (the weight rounded as the forward's).
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* dy_row = dy.data_ptr<scalar_t>() + t * H;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t row = sorted.row_of_slot[t * k + j];
          const scalar_t* out_row = expert_out.data_ptr<scalar_t>() + row * H;
          const __m256 weight = _mm256_set1_ps(rounded<scalar_t>(weights.data_ptr<float>()[t * k + j]));
          __m256 dot = _mm256_setzero_ps();
          for (int64_t h = 0; h < H; h += 8) {
            const __m256 g = load8(dy_row + h);
            dot = _mm256_fmadd_ps(g, load8(out_row + h), dot);
            store8(d_out.data_ptr<scalar_t>() + row * H + h, round8<scalar_t>(_mm256_mul_ps(g, weight)));
          }
          grad_weights.data_ptr<float>()[t * k + j] = horizontal_sum(dot);
        }
      }
    });
    for_each_expert_split(sorted.first_row, [&](int64_t e, int64_t row, int64_t count) {
      const at::Tensor expert_d_out = d_out.narrow(0, row, count);
      at::Tensor expert_d_swiglu = d_swiglu.narrow(0, row, count), expert_d_rows = d_rows.narrow(0, row, count);
      at::Tensor expert_d_gate_up = d_gate_up.narrow(0, row, count);
      if (weight_grads) {
        at::Tensor grad_down = grad_down_proj[e];
        at::mm_out(grad_down, expert_d_out.t(), swiglu.narrow(0, row, count));
      }
      at::mm_out(expert_d_swiglu, expert_d_out, down_proj[e]);
      swiglu_backward_rows(gate_up.data_ptr<scalar_t>() + row * 2 * I, expert_d_swiglu.data_ptr<scalar_t>(),
                           expert_d_gate_up.data_ptr<scalar_t>(), count, I);
      if (weight_grads) {
        at::Tensor grad_gate_up = grad_gate_up_proj[e];
        at::mm_out(grad_gate_up, expert_d_gate_up.t(), rows.narrow(0, row, count));
      }
      at::mm_out(expert_d_rows, expert_d_gate_up, gate_up_proj[e]);
    });
    // d hidden_states of a token: the sum of its slots' rows, in fp32.
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < H; h += 8) {
          __m256 sum = _mm256_setzero_ps();
          for (int64_t j = 0; j < k; ++j) {
            sum = _mm256_add_ps(sum, load8(d_rows.data_ptr<scalar_t>() + sorted.row_of_slot[t * k + j] * H + h));
          }
          store8(grad_hidden.data_ptr<scalar_t>() + t * H + h, round8<scalar_t>(sum));
        }
      }
    });
  });
  return {grad_hidden, grad_weights, grad_gate_up_proj, grad_down_proj};
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* names) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mobilemoe_cpu.", op, ": ", names, " must have one dtype");
}

void check_input(const at::Tensor& hidden_states, int64_t H, const char* op) {
  TORCH_CHECK(hidden_states.dim() == 2 && hidden_states.size(1) == H, "mobilemoe_cpu.", op, ": hidden_states ",
              "must be [tokens, ", H, "], got ", hidden_states.sizes());
}

// Checks the routed experts' weights and routing of one MoE layer; returns the expert ids [tokens, k] (long) and
// routing weights [tokens, k] (float), both contiguous.
std::tuple<at::Tensor, at::Tensor> checked_routing(const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                                                   const at::Tensor& top_k_weights, const at::Tensor& gate_up_proj,
                                                   const at::Tensor& down_proj, const char* op) {
  check_weight(gate_up_proj, 3, "gate_up_proj");
  check_weight(down_proj, 3, "down_proj");
  check_same_dtype(gate_up_proj, down_proj, op, "gate_up_proj and down_proj");
  const int64_t E = gate_up_proj.size(0), H = gate_up_proj.size(2), I = down_proj.size(2);
  TORCH_CHECK(gate_up_proj.size(1) == 2 * I && down_proj.size(0) == E && down_proj.size(1) == H, "mobilemoe_cpu.", op,
              ": expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], got ", gate_up_proj.sizes(), " and ",
              down_proj.sizes());
  check_input(hidden_states, H, op);
  TORCH_CHECK(top_k_index.dim() == 2 && top_k_index.size(0) == hidden_states.size(0) &&
                  top_k_weights.sizes() == top_k_index.sizes(),
              "mobilemoe_cpu.", op, ": top_k_index and top_k_weights must both be [tokens, k] for ",
              hidden_states.size(0), " tokens, got ", top_k_index.sizes(), " and ", top_k_weights.sizes());
  const at::Tensor experts = top_k_index.to(at::kLong).contiguous();
  const int64_t* expert_ids = experts.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(expert_ids, expert_ids + experts.numel(), [E](int64_t e) { return e >= 0 && e < E; }),
              "mobilemoe_cpu.", op, ": expert index out of range [0, ", E, ")");
  return {experts, top_k_weights.to(at::kFloat).contiguous()};
}

// The routed experts of a few tokens: for every (token, slot) the selected expert's down(silu(gate) * up) weighted by
// its routing weight, summed per token, streaming only the selected experts' rows.
at::Tensor streamed_experts(const at::Tensor& hidden_states, const at::Tensor& experts, const at::Tensor& weights,
                            const at::Tensor& gate_up_proj, const at::Tensor& down_proj) {
  const int64_t I = down_proj.size(2), H = gate_up_proj.size(2);
  const at::Tensor up = gate_up_proj.narrow(1, I, I);  // a view: its data pointer is where expert 0's up rows start
  return run_swiglu_experts(hidden_states, gate_up_proj, up, 2 * I * H, down_proj, experts, weights, I);
}

// A SwiGLU MLP (the shared expert, a dense layer's FFN): down(silu(gate x) * up x) in one operator; a few tokens
// stream the weights, more run GEMMs.
at::Tensor swiglu_mlp(const at::Tensor& hidden_states, const at::Tensor& gate, const at::Tensor& up,
                      const at::Tensor& down) {
  check_weight(gate, 2, "gate");
  check_weight(up, 2, "up");
  check_weight(down, 2, "down");
  check_same_dtype(gate, up, "swiglu_mlp", "gate and up");
  check_same_dtype(gate, down, "swiglu_mlp", "gate and down");
  const int64_t I = gate.size(0), H = gate.size(1);
  TORCH_CHECK(up.sizes() == gate.sizes() && down.size(0) == H && down.size(1) == I,
              "mobilemoe_cpu.swiglu_mlp: expected gate and up [I, H] and down [H, I], got ", gate.sizes(), ", ",
              up.sizes(), " and ", down.sizes());
  check_input(hidden_states, H, "swiglu_mlp");
  const int64_t tokens = hidden_states.size(0);
  if (tokens > kMaxStreamedRows) {
    check_same_dtype(hidden_states, gate, "swiglu_mlp", "hidden_states and the weights");
    return gemm_swiglu_mlp(hidden_states, gate, up, down);
  }
  const at::Tensor experts = at::zeros({tokens, 1}, hidden_states.options().dtype(at::kLong));
  const at::Tensor weights = at::ones({tokens, 1}, hidden_states.options().dtype(at::kFloat));
  return run_swiglu_experts(hidden_states, gate, up, 0, down, experts, weights, I);
}

// The routed experts of one MoE layer: for every (token, slot) the selected expert's down(silu(gate) * up) weighted by
// its routing weight, summed per token. Only the selected experts' weights are read: streamed for a few slots, a
// grouped GEMM for more.
at::Tensor moe_experts(const at::Tensor& hidden_states, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                       const at::Tensor& gate_up_proj, const at::Tensor& down_proj) {
  const auto [experts, weights] =
      checked_routing(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, "moe_experts");
  if (experts.numel() <= kMaxStreamedSlots) return streamed_experts(hidden_states, experts, weights, gate_up_proj, down_proj);
  check_same_dtype(hidden_states, gate_up_proj, "moe_experts", "hidden_states and the experts");
  return std::get<0>(grouped_experts(hidden_states, experts, weights, gate_up_proj, down_proj, /*training=*/false));
}

// For training: the routed experts as a grouped GEMM at any number of slots, with what the backward takes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_forward(
    const at::Tensor& hidden_states, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
    const at::Tensor& gate_up_proj, const at::Tensor& down_proj) {
  const auto [experts, weights] =
      checked_routing(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, "moe_experts_forward");
  check_same_dtype(hidden_states, gate_up_proj, "moe_experts_forward", "hidden_states and the experts");
  return grouped_experts(hidden_states, experts, weights, gate_up_proj, down_proj, /*training=*/true);
}

using ExpertGrads = std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>>;

ExpertGrads moe_experts_backward(
    const at::Tensor& grad_output, const at::Tensor& hidden_states, const at::Tensor& top_k_index,
    const at::Tensor& top_k_weights, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& gate_up, const at::Tensor& swiglu, const at::Tensor& expert_out, bool weight_grads) {
  const auto [experts, weights] =
      checked_routing(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, "moe_experts_backward");
  check_same_dtype(hidden_states, gate_up_proj, "moe_experts_backward", "hidden_states and the experts");
  const int64_t slots = experts.numel(), H = gate_up_proj.size(2), I = down_proj.size(2);
  TORCH_CHECK(grad_output.sizes() == hidden_states.sizes() && gate_up.sizes() == at::IntArrayRef({slots, 2 * I}) &&
                  swiglu.sizes() == at::IntArrayRef({slots, I}) && expert_out.sizes() == at::IntArrayRef({slots, H}),
              "mobilemoe_cpu.moe_experts_backward: grad_output and the saved activations do not fit the routing of ",
              hidden_states.size(0), " tokens");
  auto [grad_hidden, grad_weights, grad_gate_up, grad_down] = grouped_experts_backward(
      grad_output, hidden_states, experts, weights, gate_up_proj, down_proj, gate_up.contiguous(), swiglu.contiguous(),
      expert_out.contiguous(), weight_grads);
  if (!weight_grads) return {grad_hidden, grad_weights, c10::nullopt, c10::nullopt};
  return {grad_hidden, grad_weights, grad_gate_up, grad_down};
}

// ---- Attention of a few queries over a KV cache ------------------------------------------------------------------

// scores[l] = exp(scores[l] - top) in place over n scores, exactly 0 where a score is -inf (a key left out); returns
// their sum. `top` is the largest score, finite.
inline float exponentiate(float* scores, int64_t n, float top) {
  const __m256 top_lanes = _mm256_set1_ps(top), minus_infinity = _mm256_set1_ps(-INFINITY);
  __m256 total = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 8 <= n; l += 8) {
    const __m256 score = _mm256_loadu_ps(scores + l);
    const __m256 kept = _mm256_cmp_ps(score, minus_infinity, _CMP_NEQ_OQ);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(score, top_lanes)), kept);
    _mm256_storeu_ps(scores + l, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = horizontal_sum(total);
  for (; l < n; ++l) {
    scores[l] = scores[l] == -INFINITY ? 0.0f : std::exp(scores[l] - top);
    sum += scores[l];
  }
  return sum;
}

// A query row's L scores in place as its unnormalised softmax weights: exp(score - top) for the keys `allowed` (strided,
// may be null) lets it see, exactly 0 for the others; returns their sum, 0 (all weights 0) where it may see none.
inline float softmax_weights(float* scores, const bool* allowed, int64_t allowed_stride, int64_t L) {
  float top = -INFINITY;
  for (int64_t l = 0; l < L; ++l) {
    if (allowed != nullptr && !allowed[l * allowed_stride]) scores[l] = -INFINITY;
    top = std::max(top, scores[l]);
  }
  if (top == -INFINITY) {
    std::fill(scores, scores + L, 0.0f);
    return 0.0f;
  }
  return exponentiate(scores, L, top);
}

// softmax(q k^T) v of one query row over L keys and values of head dimension D (a multiple of 8), positions where
// `allowed` (strided, may be null) is false left out; `out` gets zeros if none is allowed. Four keys at a time and
// eight value lanes-blocks at a time, so the FMAs are independent chains.
template <typename T>
void attend_row(const float* q, const T* k, const T* v, const bool* allowed, int64_t allowed_stride, int64_t L,
                int64_t D, float* scores, float* out) {
  int64_t l = 0;
  for (; l + 4 <= L; l += 4) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(load8(k + (l + i) * D + d), qv, acc[i]);
    }
    for (int i = 0; i < 4; ++i) scores[l + i] = horizontal_sum(acc[i]);
  }
  for (; l < L; ++l) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(load8(k + l * D + d), _mm256_loadu_ps(q + d), acc);
    scores[l] = horizontal_sum(acc);
  }
  const float sum = softmax_weights(scores, allowed, allowed_stride, L);
  std::fill(out, out + D, 0.0f);
  if (sum == 0.0f) return;
  for (int64_t d0 = 0; d0 < D; d0 += 64) {  // up to 64 dimensions (8 accumulators) per pass over the values
    const int64_t blocks = std::min<int64_t>(64, D - d0) / 8;
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      if (scores[j] == 0.0f) continue;
      const __m256 p = _mm256_set1_ps(scores[j]);
      for (int c = 0; c < 8; ++c) {
        if (c < blocks) acc[c] = _mm256_fmadd_ps(p, load8(v + j * D + d0 + c * 8), acc[c]);
      }
    }
    for (int64_t c = 0; c < blocks; ++c) _mm256_storeu_ps(out + d0 + c * 8, _mm256_mul_ps(acc[c], _mm256_set1_ps(1.0f / sum)));
  }
}

// The same for up to kRows query rows that read one key/value head (a group of query heads at decode), on AVX-512:
// each key and value row is loaded and widened once for all of them, 16 lanes at a time. D = 16 * DB. Measured on the
// Xeon (an S layer's 12 query heads over 4 key/value heads of 1025 positions, 2 threads, one process per version):
// bf16 85 -> 58-72 us, fp32 98-104 -> 77-85 us a layer.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
namespace avx512 {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the upper half of an fp32: widen and shift
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Query rows of one key/value head: their scaled queries (fp32), the keys each may see (`allowed`, strided, null for
// all) and where their outputs go.
constexpr int kMaxQueryRows = 4;
struct QueryRows {
  const float* query[kMaxQueryRows];
  const bool* allowed[kMaxQueryRows];
  float* out[kMaxQueryRows];
  int count;
};

// Query rows a pass takes: their queries and accumulators fill 16 of the 32 registers.
constexpr int query_rows_per_pass(int DB) { return std::min(kMaxQueryRows, 16 / DB); }

template <int DB, typename T>
void attend_rows(const QueryRows& rows, const T* k, const T* v, int64_t allowed_stride, int64_t L, float* scores) {
  constexpr int64_t D = 16 * DB;
  constexpr int kRows = query_rows_per_pass(DB);
  const int n = rows.count;
  __m512 query[kRows][DB];
  for (int i = 0; i < kRows; ++i) {
    for (int b = 0; b < DB; ++b) query[i][b] = i < n ? _mm512_loadu_ps(rows.query[i] + 16 * b) : _mm512_setzero_ps();
  }
  for (int64_t l = 0; l < L; ++l) {
    __m512 key[DB];
    for (int b = 0; b < DB; ++b) key[b] = load16(k + l * D + 16 * b);
    for (int i = 0; i < kRows; ++i) {
      if (i >= n) break;
      __m512 acc = _mm512_mul_ps(key[0], query[i][0]);
      for (int b = 1; b < DB; ++b) acc = _mm512_fmadd_ps(key[b], query[i][b], acc);
      scores[i * L + l] = _mm512_reduce_add_ps(acc);
    }
  }
  float inverse_sum[kRows];
  for (int i = 0; i < n; ++i) {
    const float sum = softmax_weights(scores + i * L, rows.allowed[i], allowed_stride, L);
    inverse_sum[i] = sum == 0.0f ? 0.0f : 1.0f / sum;  // sees no key: zeros out
  }
  __m512 acc[kRows][DB];
  for (int i = 0; i < kRows; ++i) {
    for (int b = 0; b < DB; ++b) acc[i][b] = _mm512_setzero_ps();
  }
  for (int64_t l = 0; l < L; ++l) {
    bool seen = false;  // by any row: a key left out of every row is never loaded
    for (int i = 0; i < n; ++i) seen |= scores[i * L + l] != 0.0f;
    if (!seen) continue;
    __m512 value[DB];
    for (int b = 0; b < DB; ++b) value[b] = load16(v + l * D + 16 * b);
    for (int i = 0; i < kRows; ++i) {
      if (i >= n) break;
      const __m512 p = _mm512_set1_ps(scores[i * L + l]);
      for (int b = 0; b < DB; ++b) acc[i][b] = _mm512_fmadd_ps(p, value[b], acc[i][b]);
    }
  }
  for (int i = 0; i < n; ++i) {
    for (int b = 0; b < DB; ++b) {
      _mm512_storeu_ps(rows.out[i] + 16 * b, _mm512_mul_ps(acc[i][b], _mm512_set1_ps(inverse_sum[i])));
    }
  }
}

}  // namespace avx512
#pragma GCC pop_options

// `avx512::attend_rows` for head dimension D where the CPU has AVX-512 (D of 16, 32, 64 or 128), with the query rows
// it takes at a time; no function elsewhere (`attend_row` then takes the rows one by one).
template <typename T>
struct RowsKernel {
  void (*fn)(const avx512::QueryRows&, const T*, const T*, int64_t, int64_t, float*);
  int rows;
};

template <typename T>
RowsKernel<T> rows_kernel_for(int64_t D) {
  if (active_isa.load() < kAvx512) return {nullptr, 0};
  switch (D) {
    case 16: return {avx512::attend_rows<1, T>, avx512::query_rows_per_pass(1)};
    case 32: return {avx512::attend_rows<2, T>, avx512::query_rows_per_pass(2)};
    case 64: return {avx512::attend_rows<4, T>, avx512::query_rows_per_pass(4)};
    case 128: return {avx512::attend_rows<8, T>, avx512::query_rows_per_pass(8)};
    default: return {nullptr, 0};
  }
}

// Checks query [B, Hq, Tq, D], key and value [B, Hkv, L, D] (grouped-query: Hq a multiple of Hkv; all float32 or all
// bfloat16) and the optional bool mask, broadcastable to [B, 1, Tq, L]; returns the mask expanded to that shape
// (undefined without a mask).
at::Tensor checked_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const c10::optional<at::Tensor>& mask, const char* op) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.sizes() == key.sizes(), "mobilemoe_cpu.", op,
              ": expected query [B, Hq, Tq, D] and key, value [B, Hkv, L, D], got ", query.sizes(), ", ", key.sizes(),
              " and ", value.sizes());
  const int64_t B = query.size(0), Hq = query.size(1), Tq = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), L = key.size(2);
  TORCH_CHECK(key.size(0) == B && key.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "mobilemoe_cpu.", op, ": query ",
              query.sizes(), " does not fit key ", key.sizes());
  TORCH_CHECK(D % 8 == 0, "mobilemoe_cpu.", op, ": the head dimension must be a multiple of 8, got ", D);
  TORCH_CHECK(key.scalar_type() == value.scalar_type() && query.scalar_type() == key.scalar_type() &&
                  (key.scalar_type() == at::kFloat || key.scalar_type() == at::kBFloat16),
              "mobilemoe_cpu.", op, ": query, key and value must be all float32 or all bfloat16");
  if (!mask.has_value()) return at::Tensor();
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(1) == 1, "mobilemoe_cpu.", op,
              ": the mask must be bool [B or 1, 1, Tq, L], got ", mask->scalar_type(), " ", mask->sizes());
  return mask->expand({B, 1, Tq, L});
}

// Grouped-query attention of a few query positions: query [B, Hq, Tq, D], key and value [B, Hkv, L, D] (query head
// h reads key/value head h / (Hq / Hkv)), mask: bool, broadcastable to [B, 1, Tq, L], True where a query may attend.
// Returns [B, Tq, Hq, D] (the layout transformers' attention functions return) in the query's dtype. Each key/value
// head is one task: its rows are read from memory once, for all the group's query rows together on AVX-512
// (`avx512::attend_rows`), else row by row from cache (`attend_row`).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale) {
  const at::Tensor allowed = checked_attention(query, key, value, mask, "decode_attention");
  const int64_t B = query.size(0), Hq = query.size(1), Tq = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), L = key.size(2), group = Hq / Hkv;
  const at::Tensor q = (query.to(at::kFloat) * scale).contiguous();
  const at::Tensor k = key.contiguous(), v = value.contiguous();
  at::Tensor out = at::empty({B, Tq, Hq, D}, q.options());
  const int64_t mask_stride = allowed.defined() ? allowed.stride(3) : 0;
  DISPATCH_FLOAT_OR_BF16(k.scalar_type(), "mobilemoe_cpu.decode_attention", [&] {
    const RowsKernel<scalar_t> rows_kernel = rows_kernel_for<scalar_t>(D);
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(L * std::max(1, rows_kernel.rows));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Hkv, h = task % Hkv;
        const scalar_t* k_head = k.data_ptr<scalar_t>() + task * L * D;
        const scalar_t* v_head = v.data_ptr<scalar_t>() + task * L * D;
        // Row g of the group: query head h * group + g / Tq at position g % Tq.
        const auto query_row = [&](int64_t g) {
          return q.data_ptr<float>() + ((b * Hq + h * group + g / Tq) * Tq + g % Tq) * D;
        };
        const auto out_row = [&](int64_t g) {
          return out.data_ptr<float>() + ((b * Tq + g % Tq) * Hq + h * group + g / Tq) * D;
        };
        const auto row_mask = [&](int64_t g) -> const bool* {
          if (!allowed.defined()) return nullptr;
          return allowed.data_ptr<bool>() + b * allowed.stride(0) + g % Tq * allowed.stride(2);
        };
        if (rows_kernel.fn == nullptr) {
          for (int64_t g = 0; g < group * Tq; ++g) {
            attend_row(query_row(g), k_head, v_head, row_mask(g), mask_stride, L, D, scores.data(), out_row(g));
          }
          continue;
        }
        for (int64_t first = 0; first < group * Tq; first += rows_kernel.rows) {
          avx512::QueryRows rows{};
          rows.count = static_cast<int>(std::min<int64_t>(rows_kernel.rows, group * Tq - first));
          for (int i = 0; i < rows.count; ++i) {
            rows.query[i] = query_row(first + i);
            rows.allowed[i] = row_mask(first + i);
            rows.out[i] = out_row(first + i);
          }
          rows_kernel.fn(rows, k_head, v_head, mask_stride, L, scores.data());
        }
      }
    });
  });
  return out.to(query.scalar_type());
}

// ---- Attention of many queries (prefill) ---------------------------------------------------------------------------
// PyTorch's CPU SDPA (flash attention) runs bf16 GEMMs through a path that, on CPUs without AMX, computes at its fp32
// speed: a 1k-token S layer's attention takes 19 ms in bf16 (benchmarks/bench_attention.py), where oneDNN's bf16 GEMMs
// on the same products took about 3 (fp32: 16 ms, 14 here). Where it packs a dtype's GEMMs for AMX tiles
// (`sdpa_packs`) SDPA is the faster one: 4.6 against 8.7 ms in bf16 on a 2-core Xeon with AMX, padded 14.0 against
// 17.7, so the Python side sends that dtype to SDPA. This runs the attention as transformers' eager attention
// computes it in the activations' dtype T: scores = q k^T (a GEMM, rounded to T), times the scale (rounded),
// masked, softmax in fp32, probabilities rounded to T, then probabilities @ v (a GEMM). Per key/value head and
// block of query positions, the block's rows of every query head of the group are stacked into one GEMM, and keys
// past the last one any row of the block may see are never multiplied (causal attention: about half the products).

// Whether PyTorch's CPU flash attention multiplies `dtype` on packed operands (AMX tiles): it asks the same question.
bool sdpa_packs(c10::ScalarType dtype) { return at::native::cpublas::could_pack(dtype); }

// Query positions per block: a GEMM of (group x 64) rows; the causal diagonal block wastes half of at most 64 keys.
constexpr int64_t kQueryBlock = 64;

// Which keys query row t may see: keys [0, limit), and of those only where `allowed` (strided by 1, may be null) is
// true.
struct RowKeys {
  int64_t limit;
  const bool* allowed;
};

// probabilities[l] = softmax over the row's keys of rounded(scores[l] * scale), in fp32, rounded to T; 0
// for keys the row may not see and for l in [limit, n) (a row that may see nothing gets all zeros, as SDPA gives).
template <typename T>
void softmax_row(const T* scores, T* probabilities, int64_t n, RowKeys keys, float scale, float* buffer) {
  const __m256 scale8 = _mm256_set1_ps(scale), minus_infinity = _mm256_set1_ps(-INFINITY);
  const int64_t limit = std::min(keys.limit, n), vectorized = limit / 8 * 8;
  __m256 top8 = minus_infinity;
  for (int64_t l = 0; l < vectorized; l += 8) {
    __m256 score = round8<T>(_mm256_mul_ps(load8(scores + l), scale8));
    if (keys.allowed != nullptr) {
      const __m256i flags = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keys.allowed + l)));
      const __m256 hidden = _mm256_castsi256_ps(_mm256_cmpeq_epi32(flags, _mm256_setzero_si256()));
      score = _mm256_blendv_ps(score, minus_infinity, hidden);
    }
    _mm256_storeu_ps(buffer + l, score);
    top8 = _mm256_max_ps(top8, score);
  }
  float top = -INFINITY;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  for (float lane : lanes) top = std::max(top, lane);
  for (int64_t l = vectorized; l < limit; ++l) {
    const bool visible = keys.allowed == nullptr || keys.allowed[l];
    buffer[l] = visible ? rounded<T>(static_cast<float>(scores[l]) * scale) : -INFINITY;
    top = std::max(top, buffer[l]);
  }
  std::fill(probabilities + limit, probabilities + n, T(0.0f));
  if (top == -INFINITY) {
    std::fill(probabilities, probabilities + limit, T(0.0f));
    return;
  }
  const float total = exponentiate(buffer, limit, top);
  const __m256 inverse = _mm256_set1_ps(1.0f / total);
  for (int64_t l = 0; l < vectorized; l += 8) {
    store8(probabilities + l, round8<T>(_mm256_mul_ps(_mm256_loadu_ps(buffer + l), inverse)));
  }
  for (int64_t l = vectorized; l < limit; ++l) probabilities[l] = static_cast<T>(buffer[l] / total);
}

// Grouped-query attention of many query positions, fp32 or bf16 (see above): query [B, Hq, Tq, D], key and value
// [B, Hkv, L, D]; mask bool, broadcastable to [B, 1, Tq, L], True where a query may attend; without a mask, causal
// (query t sees keys 0..t, as SDPA's is_causal) or, if not `causal`, every key. Returns [B, Tq, Hq, D].
at::Tensor prefill_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const c10::optional<at::Tensor>& mask, double scale, bool causal) {
  const at::Tensor allowed_mask = checked_attention(query, key, value, mask, "prefill_attention");
  const int64_t B = query.size(0), Hq = query.size(1), Tq = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), L = key.size(2), group = Hq / Hkv;
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor allowed = allowed_mask.defined() ? allowed_mask.contiguous() : allowed_mask;
  const bool* allowed_data = allowed.defined() ? allowed.data_ptr<bool>() : nullptr;
  at::Tensor out = at::empty({B, Tq, Hq, D}, q.options());
  // The keys query t of batch row b may see (visible[b * Tq + t]): without a mask [0, t] (causal) or all; with one,
  // up to its last true. The same for every head.
  std::vector<RowKeys> visible(B * Tq);
  for (int64_t row = 0; row < B * Tq; ++row) {
    if (allowed_data == nullptr) {
      visible[row] = {causal ? std::min(row % Tq + 1, L) : L, nullptr};
      continue;
    }
    const bool* keys = allowed_data + row * L;
    const void* last = memrchr(keys, 1, L);  // bools are bytes 0 or 1
    visible[row] = {last == nullptr ? 0 : static_cast<const bool*>(last) - keys + 1, keys};
  }
  // One block of query positions of one key/value head: the rows of its `group` query heads stacked into one GEMM
  // over the keys any of them sees.
  auto attend_block = [&](int64_t b, int64_t h, int64_t block, float* buffer) {
    const int64_t t0 = block * kQueryBlock, rows = std::min(kQueryBlock, Tq - t0);
    const RowKeys* block_keys = visible.data() + b * Tq + t0;
    int64_t seen = 0;
    for (int64_t r = 0; r < rows; ++r) seen = std::max(seen, block_keys[r].limit);
    at::Tensor target = out.select(0, b).narrow(0, t0, rows).narrow(1, h * group, group);  // [rows, group, D]
    if (seen == 0) {  // every row masked out: zeros, as SDPA gives
      target.zero_();
      return;
    }
    const at::Tensor stacked = q.select(0, b).narrow(0, h * group, group).narrow(1, t0, rows).reshape({group * rows, D});
    const at::Tensor scores = gemm(stacked, k.select(0, b).select(0, h).narrow(0, 0, seen));
    at::Tensor probabilities = at::empty_like(scores);
    DISPATCH_FLOAT_OR_BF16(q.scalar_type(), "mobilemoe_cpu.prefill_attention", [&] {
      for (int64_t row = 0; row < group * rows; ++row) {  // stacked row j * rows + r: head h * group + j, position t0 + r
        softmax_row(scores.data_ptr<scalar_t>() + row * seen, probabilities.data_ptr<scalar_t>() + row * seen, seen,
                    block_keys[row % rows], static_cast<float>(scale), buffer);
      }
    });
    const at::Tensor attended = gemm(probabilities, v.select(0, b).select(0, h).narrow(0, 0, seen).t());
    target.copy_(attended.view({group, rows, D}).transpose(0, 1));
  };
  // Tasks: (batch, key/value head, blocks i and blocks - 1 - i), so causal tasks cost about the same and the cores'
  // static halves of the tasks balance.
  const int64_t blocks = (Tq + kQueryBlock - 1) / kQueryBlock, pairs = (blocks + 1) / 2;
  at::parallel_for(0, B * Hkv * pairs, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // workers: see for_each_expert_split
    std::vector<float> buffer(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hkv * pairs), h = task / pairs % Hkv, pair = task % pairs;
      attend_block(b, h, pair, buffer.data());
      if (blocks - 1 - pair != pair) attend_block(b, h, blocks - 1 - pair, buffer.data());
    }
  });
  return out;
}

// ---- A decoder layer's steps around attention ------------------------------------------------------------------
// Eager PyTorch runs a decode step of one layer as ~350 operator calls (norms, projections, RoPE, QK-norm, routing,
// residuals). These two operators run the steps before and after attention in one call each (full S decode steps
// measured 1.16-1.25x faster, fp32 and bf16, on 2 cores), at decode and at prefill. They round to the activation dtype
// wherever the eager layer does (every bf16 operator's result is bf16), so they agree with it to the dtype's precision.

// y = weight * T(x / rms(x)) over rows of H values, normalised in fp32 (MobileMoERMSNorm); no weight: T(x / rms(x))
// (the weightless QK-norm).
// H is a multiple of 8.
template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* y, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; ++r, x += H, y += H) {
    __m256 squares = _mm256_setzero_ps();
    for (int64_t h = 0; h < H; h += 8) squares = _mm256_fmadd_ps(load8(x + h), load8(x + h), squares);
    const __m256 inverse_rms = _mm256_set1_ps(1.0f / std::sqrt(horizontal_sum(squares) / static_cast<float>(H) + eps));
    for (int64_t h = 0; h < H; h += 8) {
      const __m256 normalized = round8<T>(_mm256_mul_ps(load8(x + h), inverse_rms));
      store8(y + h, weight == nullptr ? normalized : round8<T>(_mm256_mul_ps(load8(weight + h), normalized)));
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t H = x.size(-1);
  TORCH_CHECK(H % 8 == 0, "mobilemoe_cpu: normalised rows must have a multiple of 8 values, got ", H);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.scalar_type() == x.scalar_type(),
              "mobilemoe_cpu: the norm weight must be [", H, "] in the activations' dtype, got ", weight.scalar_type(),
              " ", weight.sizes());
  const at::Tensor input = x.contiguous(), scale = weight.contiguous();
  at::Tensor out = at::empty_like(input);
  DISPATCH_FLOAT_OR_BF16(x.scalar_type(), "mobilemoe_cpu.rms_norm", [&] {
    at::parallel_for(0, input.numel() / H, 16, [&](int64_t begin, int64_t end) {
      rms_norm_rows(input.data_ptr<scalar_t>() + begin * H, scale.data_ptr<scalar_t>(),
                    out.data_ptr<scalar_t>() + begin * H, end - begin, H, static_cast<float>(eps));
    });
  });
  return out;
}

// One head's row of D values (a multiple of 16), in place: rotate-half RoPE, (x * cos) + (rotate_half(x) * sin) with
// each product rounded to T, then, if qk_norm_eps is set, the weightless QK-norm.
template <typename T>
void position_head(T* x, const T* cos, const T* sin, c10::optional<double> qk_norm_eps, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; d += 8) {  // rotate_half pairs dimension d with d + D / 2: (x1, x2) -> (-x2, x1)
    const __m256 x1 = load8(x + d), x2 = load8(x + d + half);
    const __m256 minus_x2 = _mm256_sub_ps(_mm256_setzero_ps(), x2);
    const __m256 first = _mm256_add_ps(round8<T>(_mm256_mul_ps(x1, load8(cos + d))),
                                       round8<T>(_mm256_mul_ps(minus_x2, load8(sin + d))));
    const __m256 second = _mm256_add_ps(round8<T>(_mm256_mul_ps(x2, load8(cos + d + half))),
                                        round8<T>(_mm256_mul_ps(x1, load8(sin + d + half))));
    store8(x + d, round8<T>(first));
    store8(x + d + half, round8<T>(second));
  }
  if (qk_norm_eps.has_value()) rms_norm_rows<T>(x, nullptr, x, 1, D, static_cast<float>(*qk_norm_eps));
}

// Rows [B * T, heads * D] of a projection as [B, heads, T, D], with RoPE and QK-norm applied where cos is given.
at::Tensor to_heads(const at::Tensor& projected, int64_t B, int64_t T, int64_t D, const at::Tensor& cos,
                    const at::Tensor& sin, c10::optional<double> qk_norm_eps) {
  const int64_t heads = projected.size(-1) / D;
  at::Tensor out = projected.view({B, T, heads, D}).transpose(1, 2).contiguous();
  if (!cos.defined()) return out;
  DISPATCH_FLOAT_OR_BF16(out.scalar_type(), "mobilemoe_cpu.attention_input", [&] {
    scalar_t* rows = out.data_ptr<scalar_t>();  // row (b * heads + h) * T + t
    at::parallel_for(0, B * heads * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / (heads * T), t = row % T;
        const int64_t angles = b * cos.stride(0) + t * cos.stride(1);
        position_head(rows + row * D, cos.data_ptr<scalar_t>() + angles, sin.data_ptr<scalar_t>() + angles,
                      qk_norm_eps, D);
      }
    });
  });
  return out;
}

// The steps of a decoder layer before the KV cache: input RMSNorm, q/k/v projections, and on RoPE layers RoPE then the
// weightless QK-norm (if qk_norm_eps is set). hidden_states [B, T, H]; cos and sin [B or 1, T, D] in its dtype.
// Returns query [B, Hq, T, D], key and value [B, Hkv, T, D], the layout transformers' caches and attention take.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_input(
    const at::Tensor& hidden_states, const at::Tensor& norm_weight, double eps, const at::Tensor& q_proj,
    const at::Tensor& k_proj, const at::Tensor& v_proj, int64_t head_dim, const c10::optional<at::Tensor>& cos,
    const c10::optional<at::Tensor>& sin, c10::optional<double> qk_norm_eps) {
  TORCH_CHECK(hidden_states.dim() == 3, "mobilemoe_cpu.attention_input: hidden_states must be [B, T, H], got ",
              hidden_states.sizes());
  const int64_t B = hidden_states.size(0), T = hidden_states.size(1), D = head_dim;
  TORCH_CHECK(D > 0 && D % 16 == 0 && q_proj.size(0) % D == 0 && k_proj.size(0) % D == 0 && v_proj.sizes() == k_proj.sizes(),
              "mobilemoe_cpu.attention_input: q_proj ", q_proj.sizes(), ", k_proj ", k_proj.sizes(), " and v_proj ",
              v_proj.sizes(), " do not split into heads of ", D, " (a multiple of 16)");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "mobilemoe_cpu.attention_input: give both cos and sin or neither");
  at::Tensor cos_bt, sin_bt;
  if (cos.has_value()) {
    TORCH_CHECK(cos->dim() == 3 && (cos->size(0) == B || cos->size(0) == 1) && cos->size(1) == T &&
                    cos->size(2) == D && cos->sizes() == sin->sizes() && cos->scalar_type() == hidden_states.scalar_type(),
                "mobilemoe_cpu.attention_input: cos and sin must be [B or 1, T, ", D, "] in the activations' dtype, got ",
                cos->sizes(), " and ", sin->sizes());
    cos_bt = cos->contiguous().expand({B, T, D});  // [1, T, D]: one row of angles for the whole batch
    sin_bt = sin->contiguous().expand({B, T, D});
  }
  const at::Tensor normed = rms_norm(hidden_states, norm_weight, eps);
  const at::Tensor query = project(normed, q_proj), key = project(normed, k_proj), value = project(normed, v_proj);
  return {to_heads(query, B, T, D, cos_bt, sin_bt, qk_norm_eps), to_heads(key, B, T, D, cos_bt, sin_bt, qk_norm_eps),
          to_heads(value, B, T, D, at::Tensor(), at::Tensor(), c10::nullopt)};
}

// The steps of a decoder layer after attention: o_proj, residual, post-attention RMSNorm, the feed-forward and the
// second residual. attention [B, T, Hq, D] (what attention functions return), residual [B, T, H]. The feed-forward is
// the SwiGLU MLP gate/up/down (a dense layer's FFN, or an MoE layer's shared expert) plus, where router is given, the
// routed experts: FP32 sigmoid router, top-k of scores + expert_bias (torch.topk, so ties break as in the eager
// layer), weights from the raw scores (normalised if norm_topk_prob) times routed_scaling_factor.
at::Tensor layer_output(const at::Tensor& attention, const at::Tensor& residual, const at::Tensor& o_proj,
                        const at::Tensor& norm_weight, double eps, const at::Tensor& gate, const at::Tensor& up,
                        const at::Tensor& down, const c10::optional<at::Tensor>& router,
                        const c10::optional<at::Tensor>& expert_bias, const c10::optional<at::Tensor>& gate_up_proj,
                        const c10::optional<at::Tensor>& down_proj, int64_t top_k, bool norm_topk_prob,
                        double routed_scaling_factor) {
  TORCH_CHECK(residual.dim() == 3 && attention.numel() == residual.size(0) * residual.size(1) * o_proj.size(-1),
              "mobilemoe_cpu.layer_output: residual must be [B, T, H] and attention [B, T, ...], got ",
              residual.sizes(), " and ", attention.sizes());
  const int64_t H = residual.size(2);
  const at::Tensor attended = project(attention.reshape({residual.size(0), residual.size(1), -1}), o_proj);
  const at::Tensor hidden = residual + attended;
  const at::Tensor normed = rms_norm(hidden, norm_weight, eps).view({-1, H});
  at::Tensor ffn = swiglu_mlp(normed, gate, up, down);
  if (router.has_value()) {
    TORCH_CHECK(expert_bias.has_value() && gate_up_proj.has_value() && down_proj.has_value(),
                "mobilemoe_cpu.layer_output: a router needs expert_bias, gate_up_proj and down_proj");
    TORCH_CHECK(router->scalar_type() == at::kFloat && expert_bias->scalar_type() == at::kFloat,
                "mobilemoe_cpu.layer_output: the router and expert_bias must be float32 (routing is FP32)");
    // Past a few rows the router's GEMM is at::linear, as `MobileMoETopkRouter`'s F.linear: the same scores on every
    // path, so near ties pick the same experts.
    const at::Tensor scores = project(normed.to(at::kFloat), *router, /*aten_float32=*/true).sigmoid();
    const at::Tensor top_k_index = std::get<1>(at::topk(scores + *expert_bias, top_k, -1));
    at::Tensor top_k_weights = scores.gather(-1, top_k_index);
    if (norm_topk_prob) top_k_weights = top_k_weights / (top_k_weights.sum(-1, true) + 1e-20);
    top_k_weights = top_k_weights * routed_scaling_factor;
    ffn = moe_experts(normed, top_k_index, top_k_weights, *gate_up_proj, *down_proj) + ffn;
  }
  return hidden + ffn.view(hidden.sizes());
}

}  // namespace

TORCH_LIBRARY(mobilemoe_cpu, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("moe_experts(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up_proj, "
        "Tensor down_proj) -> Tensor");
  m.def("moe_experts_forward(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up_proj, "
        "Tensor down_proj) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_experts_backward(Tensor grad_output, Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, "
        "Tensor gate_up_proj, Tensor down_proj, Tensor gate_up, Tensor swiglu, Tensor expert_out, bool weight_grads) "
        "-> (Tensor, Tensor, Tensor?, Tensor?)");
  m.def("swiglu_mlp(Tensor hidden_states, Tensor gate, Tensor up, Tensor down) -> Tensor");
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
  m.def("prefill_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale, bool causal) -> Tensor");
  m.def("attention_input(Tensor hidden_states, Tensor norm_weight, float eps, Tensor q_proj, Tensor k_proj, "
        "Tensor v_proj, int head_dim, Tensor? cos, Tensor? sin, float? qk_norm_eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_output(Tensor attention, Tensor residual, Tensor o_proj, Tensor norm_weight, float eps, Tensor gate, "
        "Tensor up, Tensor down, Tensor? router, Tensor? expert_bias, Tensor? gate_up_proj, Tensor? down_proj, "
        "int top_k, bool norm_topk_prob, float routed_scaling_factor) -> Tensor");
  m.def("instruction_set(str? limit=None) -> str", &instruction_set);
  m.def("sdpa_packs(ScalarType dtype) -> bool", &sdpa_packs);
  m.def("float32_gemms(str? library=None) -> str", &float32_gemms);
}

TORCH_LIBRARY_IMPL(mobilemoe_cpu, CPU, m) {
  m.impl("linear", &streamed_linear);
  m.impl("moe_experts", &moe_experts);
  m.impl("moe_experts_forward", &moe_experts_forward);
  m.impl("moe_experts_backward", &moe_experts_backward);
  m.impl("swiglu_mlp", &swiglu_mlp);
  m.impl("decode_attention", &decode_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("attention_input", &attention_input);
  m.impl("layer_output", &layer_output);
}
