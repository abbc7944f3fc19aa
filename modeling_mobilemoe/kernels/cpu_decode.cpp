// Memory-bound CPU kernels for decoding (few rows per weight): a linear and the routed experts of one MoE layer.
//
// At one to a few tokens, a linear is a matrix-vector product whose time is streaming the weight from DRAM. PyTorch
// runs it through its BLAS, which on the 2-core AVX2 machine this package is benchmarked on reads fp32 weights at
// about half of the measured read bandwidth. These kernels read each weight row once, eight lanes at a time with four
// rows in flight (bf16 widened to fp32 in registers), accumulating in fp32. AVX2 + FMA; the Python side only calls
// them where `torch.backends.cpu.get_cpu_capability()` reports at least AVX2, and the linear for fp32 only (bf16
// measured no faster than PyTorch's bf16 gemv there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

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

// out[r] = dot(w + r * K, x) for rows r in [begin, end); K is a multiple of 8, x is fp32 and cache-resident.
template <typename T>
void dot_rows(const T* w, const float* x, float* out, int64_t begin, int64_t end, int64_t K) {
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) {
    const T* w0 = w + r * K;
    const T* w1 = w0 + K;
    const T* w2 = w1 + K;
    const T* w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(load8(w0 + k), xv, a0);
      a1 = _mm256_fmadd_ps(load8(w1 + k), xv, a1);
      a2 = _mm256_fmadd_ps(load8(w2 + k), xv, a2);
      a3 = _mm256_fmadd_ps(load8(w3 + k), xv, a3);
    }
    out[r] = horizontal_sum(a0);
    out[r + 1] = horizontal_sum(a1);
    out[r + 2] = horizontal_sum(a2);
    out[r + 3] = horizontal_sum(a3);
  }
  for (; r < end; ++r) {
    const T* w0 = w + r * K;
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) a0 = _mm256_fmadd_ps(load8(w0 + k), _mm256_loadu_ps(x + k), a0);
    out[r] = horizontal_sum(a0);
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

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

template <typename T>
void linear_rows(const T* w, const float* x, float* y, int64_t M, int64_t N, int64_t K) {
  // Each thread takes a block of weight rows and applies it to every input row while the block is in cache.
  at::parallel_for(0, N, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; ++m) dot_rows(w, x + m * K, y + m * N, begin, end, K);
  });
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_weight(weight, 2, "weight");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(input.size(-1) == K, "mobilemoe_cpu.linear: input has ", input.size(-1), " features, weight ", K);
  const at::Tensor x = input.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (weight.scalar_type() == at::kFloat) {
    linear_rows(weight.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
  } else {
    linear_rows(weight.data_ptr<c10::BFloat16>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
  }
  if (bias.has_value()) y.add_(*bias);
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = N;
  return y.to(input.scalar_type()).view(shape);
}

template <typename T>
void routed_experts(const T* gate_up, const T* down, const float* x, const int64_t* expert_of_slot,
                    const float* weight_of_slot, float* hidden, float* out, int64_t tokens, int64_t top_k,
                    int64_t H, int64_t I) {
  const int64_t slots = tokens * top_k;
  // gate_up rows of each slot's expert: rows [0, I) are the gate, [I, 2I) the up projection (one parallel region
  // over all slots, so 2 cores split k experts' rows rather than synchronising per expert).
  std::vector<float> gate_up_out(slots * 2 * I);
  at::parallel_for(0, slots * 2 * I, kGrainRows, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t slot = begin / (2 * I), row = begin % (2 * I);
      const int64_t stop = std::min(end - begin, 2 * I - row) + row;
      const T* w = gate_up + expert_of_slot[slot] * 2 * I * H;
      dot_rows(w, x + (slot / top_k) * H, gate_up_out.data() + slot * 2 * I, row, stop, H);
      begin += stop - row;
    }
  });
  for (int64_t slot = 0; slot < slots; ++slot) {
    const float* g = gate_up_out.data() + slot * 2 * I;
    for (int64_t j = 0; j < I; ++j) hidden[slot * I + j] = silu(g[j]) * g[I + j];
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
        const T* w = down + expert_of_slot[slot] * H * I + row * I;
        dot_rows(w, hidden + slot * I, partial, 0, count, I);
        for (int64_t r = 0; r < count; ++r) out[token * H + row + r] += weight_of_slot[slot] * partial[r];
      }
      begin += count;
    }
  });
}

// The routed experts of one MoE layer for a few tokens: for every (token, slot) the selected expert's
// down(silu(gate) * up) weighted by its routing weight, summed per token. Only the selected experts' rows are read.
at::Tensor moe_experts(const at::Tensor& hidden_states, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                       const at::Tensor& gate_up_proj, const at::Tensor& down_proj) {
  check_weight(gate_up_proj, 3, "gate_up_proj");
  check_weight(down_proj, 3, "down_proj");
  TORCH_CHECK(gate_up_proj.scalar_type() == down_proj.scalar_type(), "mobilemoe_cpu.moe_experts: gate_up_proj and ",
              "down_proj must have one dtype");
  const int64_t E = gate_up_proj.size(0), H = gate_up_proj.size(2), I = down_proj.size(2);
  TORCH_CHECK(gate_up_proj.size(1) == 2 * I && down_proj.size(0) == E && down_proj.size(1) == H,
              "mobilemoe_cpu.moe_experts: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], got ",
              gate_up_proj.sizes(), " and ", down_proj.sizes());
  TORCH_CHECK(hidden_states.dim() == 2 && hidden_states.size(1) == H, "mobilemoe_cpu.moe_experts: hidden_states ",
              "must be [tokens, ", H, "], got ", hidden_states.sizes());
  const at::Tensor x = hidden_states.to(at::kFloat).contiguous();
  const at::Tensor experts = top_k_index.to(at::kLong).contiguous();
  const at::Tensor weights = top_k_weights.to(at::kFloat).contiguous();
  TORCH_CHECK(experts.min().item<int64_t>() >= 0 && experts.max().item<int64_t>() < E,
              "mobilemoe_cpu.moe_experts: expert index out of range [0, ", E, ")");
  const int64_t tokens = x.size(0), top_k = experts.size(1);
  at::Tensor hidden = at::empty({tokens * top_k, I}, x.options());
  at::Tensor out = at::empty({tokens, H}, x.options());
  if (gate_up_proj.scalar_type() == at::kFloat) {
    routed_experts(gate_up_proj.data_ptr<float>(), down_proj.data_ptr<float>(), x.data_ptr<float>(),
                   experts.data_ptr<int64_t>(), weights.data_ptr<float>(), hidden.data_ptr<float>(),
                   out.data_ptr<float>(), tokens, top_k, H, I);
  } else {
    routed_experts(gate_up_proj.data_ptr<c10::BFloat16>(), down_proj.data_ptr<c10::BFloat16>(), x.data_ptr<float>(),
                   experts.data_ptr<int64_t>(), weights.data_ptr<float>(), hidden.data_ptr<float>(),
                   out.data_ptr<float>(), tokens, top_k, H, I);
  }
  return out.to(hidden_states.scalar_type());
}

}  // namespace

TORCH_LIBRARY(mobilemoe_cpu, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("moe_experts(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up_proj, "
        "Tensor down_proj) -> Tensor");
}

TORCH_LIBRARY_IMPL(mobilemoe_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe_experts", &moe_experts);
}
