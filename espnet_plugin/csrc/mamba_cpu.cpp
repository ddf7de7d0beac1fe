// Mamba's two sequence operations as fused CPU kernels: the causal depthwise convolution with its
// SiLU, and the selective scan with its discretisation, skip connection and gate; the depthwise
// convolution also serves the Conformer convolution module, where PyTorch's runs at 1 GFLOP/s.
//
// The PyTorch selective scan materialises the decays exp(dt A) and drives dt u B of every state,
// tensors of (batch, length, channels, states), and reads them back several times: it is
// memory-bound. Here a block of kLanes channels of one utterance walks through time once; at
// every frame each of its n states is decayed and driven in registers, so memory traffic is that
// of the (batch, channels, length) inputs and outputs. The block's channels are the vector lanes,
// so the per-channel work (softplus of the step size, skip connection, gate) is vectorised too;
// they are contiguous in time-major tensors, the encoder's layout (other layouts are copied to
// it first). Blocks run in parallel on torch's intra-op threads.
//
// The backward pass needs every state again, in reverse order. Like mamba_ssm's CUDA kernels it
// recomputes them instead of storing them: the forward keeps the state entering every
// kInterval-th frame, and the backward recomputes one interval at a time, last one first, into
// buffers that stay in the core's cache.
//
// Both kernels can visit the frames backwards within each utterance's length (TimeOrder): the
// backward direction of a bidirectional Mamba then needs no reversed copies of its tensors.

// ATen and torch's pybind11 casters only: half the compile time of <torch/extension.h>.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// Channels per block: two AVX2 vectors of floats, so each state update has two independent
// chains in flight. Channels past the last full block run one at a time.
constexpr int kLanes = 16;
// Frames between two saved states: the saved states are 1/kInterval of all states.
constexpr int64_t kInterval = 64;

// The arguments exp2_approx accepts, the exponents of float's normal numbers; 2^-126 stands for
// anything smaller, as a decay of 2^-126 instead of a subnormal cannot move a state of ordinary
// size. A runtime value on purpose: with constant bounds GCC turns the clamp into compares and
// blends around the constant 2^bound instead of one min and one max instruction.
struct ExpRange {
  float lowest = -126.0f, highest = 127.0f;
};

constexpr double kLog2e = 1.4426950408889634;

// 2^y = 2^k 2^f with k = round(y), |f| <= 1/2, 2^f from its degree-6 Chebyshev interpolant on
// [-1/2, 1/2] (relative error 3e-9, below float's rounding). Plain arithmetic that the compiler
// vectorises over the lanes (given -fno-trapping-math). The scan works in base 2 (A log2(e) is
// precomputed), which saves a multiplication per state over exp(x) = 2^(x log2(e)).
inline float exp2_approx(float y, const ExpRange& range) {
  y = std::min(std::max(y, range.lowest), range.highest);
  // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low bits of `shifted`.
  const float shifted = y + 12582912.0f;
  const float f = y - (shifted - 12582912.0f);
  float p = 1.5461445e-4f;
  p = p * f + 1.3400428e-3f;
  p = p * f + 9.618057e-3f;
  p = p * f + 5.550327e-2f;
  p = p * f + 0.2402265f;
  p = p * f + 0.6931472f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits << 23) + (127 << 23);  // 2^k: k + 127 in the exponent field
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float exp_approx(float x, const ExpRange& range) {
  return exp2_approx(x * static_cast<float>(kLog2e), range);
}

// log(1 + e) for e in [0, 1] as 2 atanh(s), s = e / (2 + e) <= 1/3, to s^13 (error below 1e-7).
inline float log1p_approx(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// Double precision serves the tests against float64 references: libm is exact there.
inline double exp2_approx(double y, const ExpRange&) { return std::exp2(y); }
inline double exp_approx(double x, const ExpRange&) { return std::exp(x); }
inline double log1p_approx(double e) { return std::log1p(e); }

template <typename T>
inline T softplus(T v, const ExpRange& range) {  // log(1 + exp(v)) = max(v, 0) + log(1 + exp(-|v|))
  return std::max(v, T(0)) + log1p_approx(exp_approx(-std::abs(v), range));
}

template <typename T>
inline T sigmoid(T v, const ExpRange& range) {
  return T(1) / (T(1) + exp_approx(-v, range));
}

// The order in which a kernel visits the frames of utterance b: forwards, or backwards within the
// utterance's length and then forwards through its padding, the order of the encoder's
// reverse_within_lengths.
struct TimeOrder {
  bool reverse = false;
  const int64_t* lengths = nullptr;  // (batch,), or nullptr: every utterance fills the length
  int64_t length = 0;

  int64_t frame(int64_t b, int64_t step) const {
    if (!reverse) return step;
    const int64_t valid = lengths ? lengths[b] : length;
    return step < valid ? valid - 1 - step : step;
  }
};

// A (batch, channels, length) tensor read or written through its strides: B and C (with states
// for channels) in any layout, the others time-major.
template <typename P>
struct Series {
  P* data = nullptr;
  int64_t batch = 0, channel = 0, time = 0;

  Series() = default;
  explicit Series(const at::Tensor& x)
      : data(static_cast<P*>(x.data_ptr())),
        batch(x.stride(0)),
        channel(x.stride(1)),
        time(x.stride(2)) {}

  // Channel c of utterance b at frame t; in a time-major tensor (channel == 1) the channels
  // that follow are the next elements, which the kernels read and write as vector lanes.
  P* at(int64_t b, int64_t c, int64_t t) const { return data + b * batch + c * channel + t * time; }
};

// Runs fn(b, c, std::integral_constant<int, W>) on every block of W = kLanes channels and then
// on each remaining channel alone (W = 1), spread over torch's threads.
template <typename F>
void for_each_block(int64_t batch, int64_t channels, const F& fn) {
  const int64_t full = channels / kLanes, per_utterance = full + channels % kLanes;
  at::parallel_for(0, batch * per_utterance, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / per_utterance, k = i % per_utterance;
      if (k < full) {
        fn(b, k * kLanes, std::integral_constant<int, kLanes>());
      } else {
        fn(b, full * kLanes + (k - full), std::integral_constant<int, 1>());
      }
    }
  });
}

// W channels' values of a (channels, k) parameter, k-major for vector access; zeros without one.
template <typename T, int W>
std::vector<T> lanes(const T* parameter, int64_t c, int64_t k) {
  std::vector<T> out(k * W, T(0));
  if (parameter) {
    for (int64_t j = 0; j < k; ++j) {
#pragma omp simd
      for (int w = 0; w < W; ++w) out[j * W + w] = parameter[(c + w) * k + j];
    }
  }
  return out;
}

// ---- Depthwise convolution (+ SiLU) -----------------------------------------------------------

// Mamba's causal convolution with its SiLU, and the Conformer convolution module's centred one.
// Frames do not depend on each other here, so threads split time, and the channels of a frame,
// contiguous in time-major tensors, are the vector lanes.

// Runs fn(b, first, end) on spans of steps [first, end) covering every utterance, spread over
// torch's threads.
template <typename F>
void for_each_span(int64_t batch, int64_t length, const F& fn) {
  constexpr int64_t kStepsPerTask = 16;
  at::parallel_for(0, batch * length, kStepsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / length, first = i % length, last = std::min(length, first + end - i);
      fn(b, first, last);
      i += last - first;
    }
  });
}

// out_t = act(bias + sum_k weight_k x_{t - padding + k}), x zero outside the utterance's frames
// (counted in visiting order), act = SiLU or the identity. x is time-major: its channels are
// contiguous. padding = width - 1 is causal, width / 2 centred.
template <typename T>
struct Conv {
  Series<const T> x;
  std::vector<T> weight;  // (width, channels): tap-major, for vector access
  std::vector<T> bias;    // (channels,), zeros without a bias
  int64_t batch, channels, length, width, padding;
  bool silu;
  TimeOrder order;
  ExpRange exp_range;

  const T* frame(int64_t b, int64_t step) const {
    return x.at(b, 0, order.frame(b, step));
  }

  // The taps k of output `step` that read a frame: those with 0 <= step - padding + k < length.
  int64_t first_tap(int64_t step) const { return std::max<int64_t>(0, padding - step); }
  int64_t end_tap(int64_t step) const {
    return std::min<int64_t>(width, length + padding - step);
  }

  // The pre-activation of all channels of utterance b at `step`.
  void pre_activation(int64_t b, int64_t step, T* acc) const {
    std::copy(bias.begin(), bias.end(), acc);
    for (int64_t k = first_tap(step); k < end_tap(step); ++k) {
      const T* in = frame(b, step - padding + k);
      const T* weight_k = &weight[k * channels];
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) acc[c] += weight_k[c] * in[c];
    }
  }
};

template <typename T>
void conv_forward_kernel(const Conv<T>& conv, Series<T> out) {
  for_each_span(conv.batch, conv.length, [&](int64_t b, int64_t first, int64_t last) {
    std::vector<T> acc(conv.channels);
    for (int64_t step = first; step < last; ++step) {
      conv.pre_activation(b, step, acc.data());
      T* y = out.at(b, 0, conv.order.frame(b, step));
      if (conv.silu) {
#pragma omp simd
        for (int64_t c = 0; c < conv.channels; ++c) {
          y[c] = acc[c] * sigmoid(acc[c], conv.exp_range);
        }
      } else {
        std::copy(acc.begin(), acc.end(), y);
      }
    }
  });
}

// Two passes: the gradient of every pre-activation (and from it those of weight and bias, summed
// per thread into grad_weight (threads, width, channels) and grad_bias (threads, channels): in T
// over kInterval frames, then in double, as they add up every frame of the batch), then that of
// each frame of x, which feeds the outputs whose taps reach it.
template <typename T>
void conv_backward_kernel(const Conv<T>& conv, Series<const T> grad_out, Series<T> grad_x,
                          double* grad_weight, double* grad_bias) {
  const int64_t L = conv.length, K = conv.width, d = conv.channels;
  std::vector<T> grad_acc(conv.batch * L * d);
  for_each_span(conv.batch, L, [&](int64_t b, int64_t first, int64_t last) {
    double* total_w = grad_weight + at::get_thread_num() * K * d;
    double* total_b = grad_bias + at::get_thread_num() * d;
    std::vector<T> acc(d), grad_w(K * d), grad_b(d);
    for (int64_t step = first; step < last; ++step) {
      if ((step - first) % kInterval == 0) {
        std::fill(grad_w.begin(), grad_w.end(), T(0));
        std::fill(grad_b.begin(), grad_b.end(), T(0));
      }
      const T* g_out = grad_out.at(b, 0, conv.order.frame(b, step));
      T* g = &grad_acc[(b * L + step) * d];
      if (conv.silu) {  // silu'(a) = s (1 + a (1 - s))
        conv.pre_activation(b, step, acc.data());
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const T s = sigmoid(acc[c], conv.exp_range);
          g[c] = g_out[c] * s * (T(1) + acc[c] * (T(1) - s));
        }
      } else {
        std::copy_n(g_out, d, g);
      }
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) grad_b[c] += g[c];
      for (int64_t k = conv.first_tap(step); k < conv.end_tap(step); ++k) {
        const T* in = conv.frame(b, step - conv.padding + k);
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) grad_w[k * d + c] += g[c] * in[c];
      }
      if ((step - first) % kInterval == kInterval - 1 || step == last - 1) {
        for (int64_t i = 0; i < K * d; ++i) total_w[i] += grad_w[i];
        for (int64_t c = 0; c < d; ++c) total_b[c] += grad_b[c];
      }
    }
  });
  for_each_span(conv.batch, L, [&](int64_t b, int64_t first, int64_t last) {
    for (int64_t step = first; step < last; ++step) {  // outputs step + padding - k read `step`
      T* g_x = grad_x.at(b, 0, conv.order.frame(b, step));
      std::fill_n(g_x, d, T(0));
      const int64_t first_k = std::max<int64_t>(0, step + conv.padding - L + 1);
      const int64_t end_k = std::min<int64_t>(K, step + conv.padding + 1);
      for (int64_t k = first_k; k < end_k; ++k) {
        const T* g = &grad_acc[(b * L + step + conv.padding - k) * d];
        const T* weight_k = &conv.weight[k * d];
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) g_x[c] += weight_k[c] * g[c];
      }
    }
  });
}

// ---- Selective scan ---------------------------------------------------------------------------

// Everything a scan reads. B and C are (batch, states, length) series too (states as channels).
template <typename T>
struct Scan {
  Series<const T> u, delta, B, C, z;  // z.data == nullptr: no gate
  const T* A;                         // (channels, states), contiguous
  const T* D;                         // (channels,), or nullptr: no skip connection
  const T* delta_bias;                // (channels,), or nullptr
  bool delta_softplus;
  int64_t batch, channels, length, states;
  TimeOrder order;
  ExpRange exp_range;

  int64_t intervals() const { return (length + kInterval - 1) / kInterval; }

  // Checkpoints (batch, intervals, states, channels): the state entering each interval.
  int64_t checkpoint(int64_t b, int64_t c, int64_t interval) const {
    return ((b * intervals() + interval) * states) * channels + c;
  }
};

// The per-channel constants of a block of W channels.
template <typename T, int W>
struct Block {
  int64_t b, c;
  std::vector<T> A, A_log2e, D, bias;  // A and A log2(e) (states, W), D and bias (W)

  Block(const Scan<T>& scan, int64_t b_, int64_t c_)
      : b(b_),
        c(c_),
        A(lanes<T, W>(scan.A, c_, scan.states)),
        A_log2e(A),
        D(lanes<T, W>(scan.D, c_, 1)),
        bias(lanes<T, W>(scan.delta_bias, c_, 1)) {
    for (T& a : A_log2e) a *= T(kLog2e);
  }

  // Step sizes dt = softplus(delta + bias) (or without softplus) of the block's channels.
  void steps(const Scan<T>& scan, int64_t t, T (&dt)[W]) const {
    const T* delta = scan.delta.at(b, c, t);
    if (scan.delta_softplus) {
#pragma omp simd
      for (int w = 0; w < W; ++w) dt[w] = softplus(delta[w] + bias[w], scan.exp_range);
    } else {
#pragma omp simd
      for (int w = 0; w < W; ++w) dt[w] = delta[w] + bias[w];
    }
  }
};

// out_t = (C_t h_t + D u_t) silu(z_t), h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, for one block.
template <typename T, int W>
void scan_forward_block(const Scan<T>& scan, const Block<T, W>& block, Series<T> out,
                        T* checkpoints) {
  const int64_t N = scan.states;
  std::vector<T> h(N * W, T(0));
  for (int64_t step = 0; step < scan.length; ++step) {
    if (checkpoints && step % kInterval == 0) {
      T* saved = checkpoints + scan.checkpoint(block.b, block.c, step / kInterval);
      for (int64_t n = 0; n < N; ++n) std::copy_n(&h[n * W], W, saved + n * scan.channels);
    }
    const int64_t t = scan.order.frame(block.b, step);
    T dt[W], drive[W], y[W];
    block.steps(scan, t, dt);
    const T* x = scan.u.at(block.b, block.c, t);
#pragma omp simd
    for (int w = 0; w < W; ++w) {
      drive[w] = dt[w] * x[w];
      y[w] = block.D[w] * x[w];
    }
    const T* B_t = scan.B.data + block.b * scan.B.batch + t * scan.B.time;
    const T* C_t = scan.C.data + block.b * scan.C.batch + t * scan.C.time;
    for (int64_t n = 0; n < N; ++n) {
      const T B_n = B_t[n * scan.B.channel], C_n = C_t[n * scan.C.channel];
      T* h_n = &h[n * W];
      const T* A_n = &block.A_log2e[n * W];
#pragma omp simd
      for (int w = 0; w < W; ++w) {
        h_n[w] = exp2_approx(dt[w] * A_n[w], scan.exp_range) * h_n[w] + drive[w] * B_n;
        y[w] += h_n[w] * C_n;
      }
    }
    if (scan.z.data) {
      const T* z = scan.z.at(block.b, block.c, t);
#pragma omp simd
      for (int w = 0; w < W; ++w) y[w] *= z[w] * sigmoid(z[w], scan.exp_range);
    }
    std::copy_n(y, W, out.at(block.b, block.c, t));
  }
}

// Where scan_backward_block writes. grad_B and grad_C (threads, batch, length, states) are
// summed over channels: each thread adds into its own slice. grad_A (batch, channels, states),
// grad_D and grad_delta_bias (batch, channels) sum every frame: in T over an interval, then in
// double; they are summed over the batch afterwards.
template <typename T>
struct ScanGradients {
  Series<T> u, delta, z;
  double *A, *D, *delta_bias;
};

// Gradients of scan_forward_block's out for one block, from the last interval to the first:
// recompute the interval's step sizes, decays and states from its checkpoint, then run the
// adjoint recurrence g_t = C_t grad_y_t + exp(dt_{t+1} A) g_{t+1} backwards through it.
template <typename T, int W>
void scan_backward_block(const Scan<T>& scan, const Block<T, W>& block, Series<const T> grad_out,
                         const T* checkpoints, const ScanGradients<T>& grad, T* grad_B,
                         T* grad_C) {
  const int64_t N = scan.states, L = scan.length;
  std::vector<T> dts(kInterval * W), decays(kInterval * N * W), states(kInterval * N * W);
  std::vector<T> carry(N * W, T(0)), grad_A(N * W), h(N * W), h_entering(N * W);
  std::vector<double> total_A(N * W, 0.0), total_D(W, 0.0), total_bias(W, 0.0);
  T grad_D[W], grad_bias[W];
  grad_B += block.b * L * N;
  grad_C += block.b * L * N;
  for (int64_t j = scan.intervals() - 1; j >= 0; --j) {
    const int64_t first = j * kInterval, last = std::min(L, first + kInterval);
    const T* entering = checkpoints + scan.checkpoint(block.b, block.c, j);
    for (int64_t n = 0; n < N; ++n) {
      std::copy_n(entering + n * scan.channels, W, &h_entering[n * W]);
    }
    h = h_entering;
    std::fill(grad_A.begin(), grad_A.end(), T(0));
    std::fill_n(grad_D, W, T(0));
    std::fill_n(grad_bias, W, T(0));
    for (int64_t step = first; step < last; ++step) {
      const int64_t t = scan.order.frame(block.b, step);
      T* dt = &dts[(step - first) * W];
      T step_size[W];
      block.steps(scan, t, step_size);
      const T* x = scan.u.at(block.b, block.c, t);
      std::copy_n(step_size, W, dt);
      const T* B_t = scan.B.data + block.b * scan.B.batch + t * scan.B.time;
      for (int64_t n = 0; n < N; ++n) {
        const T B_n = B_t[n * scan.B.channel];
        T* a = &decays[((step - first) * N + n) * W];
        T* s = &states[((step - first) * N + n) * W];
        T* h_n = &h[n * W];
        const T* A_n = &block.A_log2e[n * W];
#pragma omp simd
        for (int w = 0; w < W; ++w) {
          a[w] = exp2_approx(dt[w] * A_n[w], scan.exp_range);
          h_n[w] = a[w] * h_n[w] + dt[w] * x[w] * B_n;
          s[w] = h_n[w];
        }
      }
    }
    for (int64_t step = last - 1; step >= first; --step) {
      const int64_t t = scan.order.frame(block.b, step);
      const T* dt = &dts[(step - first) * W];
      T slope[W];
      T g_y[W], gate[W], y[W], through_B[W] = {}, through_decay[W] = {};
      const T* x = scan.u.at(block.b, block.c, t);
      const T* g_out = grad_out.at(block.b, block.c, t);
      const T* z = scan.z.data ? scan.z.at(block.b, block.c, t) : nullptr;
      if (z) {
#pragma omp simd
        for (int w = 0; w < W; ++w) {
          gate[w] = sigmoid(z[w], scan.exp_range);
          g_y[w] = g_out[w] * z[w] * gate[w];
        }
      } else {
        std::copy_n(g_out, W, g_y);
      }
#pragma omp simd
      for (int w = 0; w < W; ++w) y[w] = block.D[w] * x[w];
      const T* B_t = scan.B.data + block.b * scan.B.batch + t * scan.B.time;
      const T* C_t = scan.C.data + block.b * scan.C.batch + t * scan.C.time;
      for (int64_t n = 0; n < N; ++n) {
        const T B_n = B_t[n * scan.B.channel], C_n = C_t[n * scan.C.channel];
        const T* a = &decays[((step - first) * N + n) * W];
        const T* h_t = &states[((step - first) * N + n) * W];
        const T* h_prev = step > first ? h_t - N * W : &h_entering[n * W];
        const T* A_n = &block.A[n * W];
        T* carry_n = &carry[n * W];
        T* grad_A_n = &grad_A[n * W];
        T sum_B = 0, sum_C = 0;
#pragma omp simd reduction(+ : sum_B, sum_C)
        for (int w = 0; w < W; ++w) {
          const T g = carry_n[w] + g_y[w] * C_n;  // dL/dh_t
          y[w] += h_t[w] * C_n;
          sum_C += g_y[w] * h_t[w];
          sum_B += g * dt[w] * x[w];
          through_B[w] += g * B_n;
          const T g_log_decay = g * h_prev[w] * a[w];  // dL/d(dt_t A)
          grad_A_n[w] += g_log_decay * dt[w];
          through_decay[w] += g_log_decay * A_n[w];
          carry_n[w] = a[w] * g;
        }
        grad_B[t * N + n] += sum_B;
        grad_C[t * N + n] += sum_C;
      }
      T g_u[W], g_delta[W];
      if (scan.delta_softplus) {  // d dt / d delta = softplus'(delta + bias) = sigmoid(...)
        const T* delta = scan.delta.at(block.b, block.c, t);
#pragma omp simd
        for (int w = 0; w < W; ++w) slope[w] = sigmoid(delta[w] + block.bias[w], scan.exp_range);
      } else {
        std::fill_n(slope, W, T(1));
      }
#pragma omp simd
      for (int w = 0; w < W; ++w) {
        g_u[w] = through_B[w] * dt[w] + g_y[w] * block.D[w];
        g_delta[w] = (through_B[w] * x[w] + through_decay[w]) * slope[w];
        grad_D[w] += g_y[w] * x[w];
        grad_bias[w] += g_delta[w];
      }
      std::copy_n(g_u, W, grad.u.at(block.b, block.c, t));
      std::copy_n(g_delta, W, grad.delta.at(block.b, block.c, t));
      if (z) {  // silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
        T g_z[W];
#pragma omp simd
        for (int w = 0; w < W; ++w) {
          g_z[w] = g_out[w] * y[w] * gate[w] * (T(1) + z[w] * (T(1) - gate[w]));
        }
        std::copy_n(g_z, W, grad.z.at(block.b, block.c, t));
      }
    }
    for (int64_t i = 0; i < N * W; ++i) total_A[i] += grad_A[i];
    for (int w = 0; w < W; ++w) {
      total_D[w] += grad_D[w];
      total_bias[w] += grad_bias[w];
    }
  }
  const int64_t row = block.b * scan.channels + block.c;
  for (int64_t n = 0; n < N; ++n) {
    for (int w = 0; w < W; ++w) grad.A[(row + w) * N + n] = total_A[n * W + w];
  }
  std::copy_n(total_D.data(), W, grad.D + row);
  std::copy_n(total_bias.data(), W, grad.delta_bias + row);
}

// ---- Tensors in and out -----------------------------------------------------------------------

at::Tensor value_or_undefined(const std::optional<at::Tensor>& x) { return x ? *x : at::Tensor(); }

template <typename T>
const T* data_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

// An uninitialised (batch, channels, length) tensor stored time-major, as the encoder uses it.
at::Tensor empty_time_major(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1)}, like.options()).transpose(1, 2);
}

TimeOrder time_order(bool reverse, const at::Tensor& lengths, int64_t batch, int64_t length) {
  TORCH_CHECK(!lengths.defined() || (lengths.scalar_type() == at::kLong && lengths.dim() == 1 &&
                                     lengths.size(0) == batch && lengths.is_contiguous()),
              "mamba_cpu: lengths must be a contiguous int64 tensor of shape (batch,)");
  TimeOrder order{reverse, data_or_null<int64_t>(lengths), length};
  return order;
}

void check_series(const at::Tensor& x, const char* name, at::IntArrayRef shape,
                  const at::Tensor& like) {
  TORCH_CHECK(x.device().is_cpu() && x.sizes() == shape && x.scalar_type() == like.scalar_type(),
              "mamba_cpu: ", name, " must be a CPU tensor of shape ", shape, " and dtype ",
              like.scalar_type(), ", got ", x.sizes(), " ", x.scalar_type());
}

void check_parameter(const at::Tensor& p, const char* name, std::vector<int64_t> shape,
                     const at::Tensor& like) {
  TORCH_CHECK(!p.defined() || (p.sizes() == shape && p.is_contiguous() &&
                               p.scalar_type() == like.scalar_type()),
              "mamba_cpu: ", name, " must be contiguous, of shape ", shape, " and dtype ",
              like.scalar_type());
}

// x, or a copy of it stored time-major (channels contiguous), as the kernels read it.
at::Tensor time_major(const at::Tensor& x) {
  return x.stride(1) == 1 ? x : x.transpose(1, 2).contiguous().transpose(1, 2);
}

template <typename T>
Conv<T> make_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  int64_t padding, bool silu, bool reverse, const at::Tensor& lengths) {
  const int64_t batch = x.size(0), channels = x.size(1), length = x.size(2);
  const at::Tensor weight_t = weight.t().contiguous();
  const at::Tensor bias_ = bias.defined() ? bias : at::zeros({channels}, x.options());
  return Conv<T>{Series<const T>(x),
                 std::vector<T>(weight_t.data_ptr<T>(), weight_t.data_ptr<T>() + weight.numel()),
                 std::vector<T>(bias_.data_ptr<T>(), bias_.data_ptr<T>() + channels),
                 batch, channels, length, weight.size(1), padding, silu,
                 time_order(reverse, lengths, batch, length), ExpRange()};
}

}  // namespace

// Depthwise conv1d of x (b, d, l) with weight (d, width), bias (d,), `padding` zero frames before
// the first and width - 1 - padding after the last, l outputs, then SiLU if `silu`:
// mamba_simple.py's silu(conv1d(x)[..., :l]) with padding = width - 1, a Conformer convolution
// module's with padding = width / 2. The output is stored time-major.
at::Tensor conv_forward(const at::Tensor& x_, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias_, int64_t padding, bool silu,
                        bool reverse, const std::optional<at::Tensor>& lengths_) {
  const at::Tensor bias = value_or_undefined(bias_), lengths = value_or_undefined(lengths_);
  TORCH_CHECK(x_.dim() == 3 && x_.device().is_cpu(), "mamba_cpu: x must be (b, d, l) on the CPU");
  check_parameter(weight, "weight", {x_.size(1), weight.size(-1)}, x_);
  check_parameter(bias, "bias", {x_.size(1)}, x_);
  TORCH_CHECK(0 <= padding && padding < weight.size(1),
              "mamba_cpu: padding must lie in [0, width), got ", padding);
  const at::Tensor x = time_major(x_);
  at::Tensor out = empty_time_major(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mamba_cpu_conv_forward", [&] {
    conv_forward_kernel(make_conv<scalar_t>(x, weight, bias, padding, silu, reverse, lengths),
                        Series<scalar_t>(out));
  });
  return out;
}

// Gradients of conv_forward's output w.r.t. x, weight and bias (undefined without a bias).
std::vector<at::Tensor> conv_backward(const at::Tensor& x_, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias_, int64_t padding,
                                      bool silu, bool reverse,
                                      const std::optional<at::Tensor>& lengths_,
                                      const at::Tensor& grad_out_) {
  const at::Tensor bias = value_or_undefined(bias_), lengths = value_or_undefined(lengths_);
  check_series(grad_out_, "grad_out", x_.sizes(), x_);
  const at::Tensor x = time_major(x_), grad_out = time_major(grad_out_);
  const int64_t threads = at::get_num_threads(), channels = x.size(1), width = weight.size(1);
  at::Tensor grad_x = empty_time_major(x);
  const auto sums = x.options().dtype(at::kDouble);
  at::Tensor grad_weight = at::zeros({threads, width, channels}, sums);
  at::Tensor grad_bias = at::zeros({threads, channels}, sums);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mamba_cpu_conv_backward", [&] {
    conv_backward_kernel(make_conv<scalar_t>(x, weight, bias, padding, silu, reverse, lengths),
                         Series<const scalar_t>(grad_out), Series<scalar_t>(grad_x),
                         grad_weight.data_ptr<double>(), grad_bias.data_ptr<double>());
  });
  return {grad_x, grad_weight.sum(0).t().to(x.scalar_type()),
          bias.defined() ? grad_bias.sum(0).to(x.scalar_type()) : at::Tensor()};
}

namespace {

template <typename T>
Scan<T> make_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                  const at::Tensor& z, const at::Tensor& delta_bias, bool delta_softplus,
                  const TimeOrder& order) {
  Scan<T> scan{Series<const T>(u),   Series<const T>(delta),  Series<const T>(B),
               Series<const T>(C),   Series<const T>(),       A.data_ptr<T>(),
               data_or_null<T>(D),   data_or_null<T>(delta_bias), delta_softplus,
               u.size(0),            u.size(1),               u.size(2),
               A.size(1),            order,                   ExpRange()};
  if (z.defined()) scan.z = Series<const T>(z);
  return scan;
}

void check_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                const at::Tensor& z, const at::Tensor& delta_bias) {
  TORCH_CHECK(u.dim() == 3 && u.device().is_cpu(), "mamba_cpu: u must be (b, d, l) on the CPU");
  check_series(delta, "delta", u.sizes(), u);
  if (z.defined()) check_series(z, "z", u.sizes(), u);
  check_parameter(A, "A", {u.size(1), A.size(-1)}, u);
  const std::vector<int64_t> bc{u.size(0), A.size(1), u.size(2)};
  check_series(B, "B", bc, u);
  check_series(C, "C", bc, u);
  check_parameter(D, "D", {u.size(1)}, u);
  check_parameter(delta_bias, "delta_bias", {u.size(1)}, u);
}

}  // namespace

// mamba_ssm's selective_scan_fn (real A; B and C of shape (b, n, l)): the output (b, d, l),
// stored time-major, and the checkpoints backward needs (empty unless save_checkpoints).
std::vector<at::Tensor> scan_forward(const at::Tensor& u_, const at::Tensor& delta_,
                                     const at::Tensor& A, const at::Tensor& B,
                                     const at::Tensor& C, const std::optional<at::Tensor>& D_,
                                     const std::optional<at::Tensor>& z_,
                                     const std::optional<at::Tensor>& delta_bias_,
                                     bool delta_softplus, bool reverse,
                                     const std::optional<at::Tensor>& lengths_,
                                     bool save_checkpoints) {
  const at::Tensor D = value_or_undefined(D_), delta_bias = value_or_undefined(delta_bias_);
  const at::Tensor lengths = value_or_undefined(lengths_);
  check_scan(u_, delta_, A, B, C, D, value_or_undefined(z_), delta_bias);
  const at::Tensor u = time_major(u_), delta = time_major(delta_);
  const at::Tensor z = z_ ? time_major(*z_) : at::Tensor();
  const int64_t batch = u.size(0), channels = u.size(1), length = u.size(2);
  const int64_t intervals = (length + kInterval - 1) / kInterval;
  at::Tensor out = empty_time_major(u);
  at::Tensor checkpoints =
      at::empty({save_checkpoints ? batch : 0, intervals, A.size(1), channels}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mamba_cpu_scan_forward", [&] {
    const auto scan = make_scan<scalar_t>(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          time_order(reverse, lengths, batch, length));
    scalar_t* saved = save_checkpoints ? checkpoints.data_ptr<scalar_t>() : nullptr;
    for_each_block(batch, channels, [&](int64_t b, int64_t c, auto lanes) {
      const Block<scalar_t, decltype(lanes)::value> block(scan, b, c);
      scan_forward_block(scan, block, Series<scalar_t>(out), saved);
    });
  });
  return {out, checkpoints};
}

// Gradients of scan_forward's output w.r.t. u, delta, A, B, C, D, z and delta_bias (undefined
// where that input was not given).
std::vector<at::Tensor> scan_backward(const at::Tensor& u_, const at::Tensor& delta_,
                                      const at::Tensor& A, const at::Tensor& B,
                                      const at::Tensor& C, const std::optional<at::Tensor>& D_,
                                      const std::optional<at::Tensor>& z_,
                                      const std::optional<at::Tensor>& delta_bias_,
                                      bool delta_softplus, bool reverse,
                                      const std::optional<at::Tensor>& lengths_,
                                      const at::Tensor& grad_out_, const at::Tensor& checkpoints) {
  const at::Tensor D = value_or_undefined(D_), delta_bias = value_or_undefined(delta_bias_);
  const at::Tensor lengths = value_or_undefined(lengths_);
  check_scan(u_, delta_, A, B, C, D, value_or_undefined(z_), delta_bias);
  check_series(grad_out_, "grad_out", u_.sizes(), u_);
  const at::Tensor u = time_major(u_), delta = time_major(delta_), grad_out = time_major(grad_out_);
  const at::Tensor z = z_ ? time_major(*z_) : at::Tensor();
  const int64_t batch = u.size(0), channels = u.size(1), length = u.size(2), n = A.size(1);
  TORCH_CHECK(checkpoints.dim() == 4 && checkpoints.size(0) == batch,
              "mamba_cpu: scan_backward needs the checkpoints of scan_forward(save_checkpoints)");
  at::Tensor grad_u = empty_time_major(u), grad_delta = empty_time_major(u);
  at::Tensor grad_z = z.defined() ? empty_time_major(u) : at::Tensor();
  const auto sums = u.options().dtype(at::kDouble);
  at::Tensor grad_A = at::empty({batch, channels, n}, sums);
  at::Tensor grad_D = at::empty({batch, channels}, sums);
  at::Tensor grad_bias = at::empty({batch, channels}, sums);
  const int64_t threads = at::get_num_threads();
  at::Tensor grad_B = at::zeros({threads, batch, length, n}, u.options());
  at::Tensor grad_C = at::zeros({threads, batch, length, n}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mamba_cpu_scan_backward", [&] {
    const auto scan = make_scan<scalar_t>(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          time_order(reverse, lengths, batch, length));
    ScanGradients<scalar_t> grad{Series<scalar_t>(grad_u), Series<scalar_t>(grad_delta),
                                 Series<scalar_t>(),       grad_A.data_ptr<double>(),
                                 grad_D.data_ptr<double>(), grad_bias.data_ptr<double>()};
    if (z.defined()) grad.z = Series<scalar_t>(grad_z);
    const int64_t per_thread = batch * length * n;
    for_each_block(batch, channels, [&](int64_t b, int64_t c, auto lanes) {
      const Block<scalar_t, decltype(lanes)::value> block(scan, b, c);
      const int64_t thread = at::get_thread_num();
      scan_backward_block(scan, block, Series<const scalar_t>(grad_out),
                          checkpoints.data_ptr<scalar_t>(), grad,
                          grad_B.data_ptr<scalar_t>() + thread * per_thread,
                          grad_C.data_ptr<scalar_t>() + thread * per_thread);
    });
  });
  const auto states_major = [](const at::Tensor& g) { return g.sum(0).transpose(1, 2); };
  return {grad_u,
          grad_delta,
          grad_A.sum(0).to(u.scalar_type()),
          states_major(grad_B),
          states_major(grad_C),
          D.defined() ? grad_D.sum(0).to(u.scalar_type()) : at::Tensor(),
          grad_z,
          delta_bias.defined() ? grad_bias.sum(0).to(u.scalar_type()) : at::Tensor()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_forward", &conv_forward, "depthwise conv1d, then SiLU if asked");
  m.def("conv_backward", &conv_backward, "gradients of conv_forward's output");
  m.def("scan_forward", &scan_forward, "selective scan: output, checkpoints for backward");
  m.def("scan_backward", &scan_backward, "gradients of scan_forward's output");
}
