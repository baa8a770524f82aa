// The portable kernel: decodes the canonical layout to int8 once, then plain loops. It is the
// C++ twin of sherry_export.formats.reference_matmul(activations="int8") and the fallback for
// every CPU and geometry.
#include <stdexcept>
#include <vector>

#include "kernel.h"

namespace sherry {
namespace {

inline size_t round_up_64(size_t bytes) { return (bytes + 63) / 64 * 64; }

class ScalarKernel final : public MatMulKernel {
 public:
  explicit ScalarKernel(const PackedWeights& w)
      : g_(w.geometry), values_(static_cast<size_t>(g_.n * g_.k)), alpha_(static_cast<size_t>(g_.n * g_.groups())) {
    const int64_t stride = row_bytes(w.format, g_.k, g_.group_size);
    for (int64_t n = 0; n < g_.n; ++n) {
      if (!decode_row(w.format, w.data + n * stride, g_.k, g_.group_size, values_.data() + n * g_.k))
        throw std::runtime_error(std::string("corrupt ") + format_name(w.format) + " weights: row " +
                                 std::to_string(n) + " holds an invalid code");
    }
    for (size_t i = 0; i < alpha_.size(); ++i) alpha_[i] = half_to_float(w.scales[i]);
  }

  KernelPath path() const override { return KernelPath::kScalar; }
  int64_t row_tile() const override { return 16; }

  // Row layout: K int8 values, padded to 64 bytes, then `groups` float scales.
  size_t activation_row_bytes() const override {
    return round_up_64(static_cast<size_t>(g_.k)) + round_up_64(sizeof(float) * static_cast<size_t>(g_.groups()));
  }

  void prepare_row(const float* a_row, uint8_t* ws) const override {
    auto* xq = reinterpret_cast<int8_t*>(ws);
    auto* scale = reinterpret_cast<float*>(ws + round_up_64(static_cast<size_t>(g_.k)));
    for (int64_t g = 0; g < g_.groups(); ++g)
      scale[g] = quantize_group(a_row + g_.group_begin(g), g_.group_length(g), xq + g_.group_begin(g));
  }

  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override {
    const size_t stride = activation_row_bytes();
    for (int64_t r = 0; r < m; ++r) {
      const auto* xq = reinterpret_cast<const int8_t*>(ws + r * stride);
      const auto* scale = reinterpret_cast<const float*>(ws + r * stride + round_up_64(static_cast<size_t>(g_.k)));
      for (int64_t n = n_begin; n < n_end; ++n) {
        const int8_t* w = values_.data() + n * g_.k;
        float acc = 0.f;
        for (int64_t g = 0; g < g_.groups(); ++g) {
          int32_t dot = 0;
          for (int64_t i = g_.group_begin(g), e = i + g_.group_length(g); i < e; ++i) dot += w[i] * xq[i];
          acc += (alpha_[n * g_.groups() + g] * scale[g]) * static_cast<float>(dot);
        }
        y[r * g_.n + n] = acc + (bias ? bias[n] : 0.f);
      }
    }
  }

 private:
  Geometry g_;
  std::vector<int8_t> values_;
  std::vector<float> alpha_;
};

}  // namespace

std::unique_ptr<MatMulKernel> make_scalar_kernel(const PackedWeights& w) { return std::make_unique<ScalarKernel>(w); }

}  // namespace sherry
