// Selective scan for the CPU as two XLA FFI handlers: the forward pass and its backward pass.
//
// The recurrence, for batch row b, channel e and state index n (see ssm/scan.py):
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t,     y_t = sum_n C_t[n] * h_t[:, n]
//
// Channels are independent, so the kernel runs one block of kLanes channels at a time through
// all time steps, with the block's state (kN vectors of kLanes floats) held in registers. The
// forward pass keeps the state every kInterval steps; the backward pass recomputes the states
// and decays of one interval at a time from there and runs it in reverse. ssm/cpu_kernel.py
// builds this file with the machine's C++ compiler, pads the channels to a multiple of kLanes
// and the state size to one of the sizes that `WithStateSize` instantiates, and checks the
// kernel against the JAX implementations in tests.
//
// Shapes (all float32, row-major): x, dt, y and their gradients (b, t, e); A (e, n); B, C and
// their gradients (b, t, n); h0, h_last and their gradients (b, e, n); the kept states
// (b, ceil(t / kInterval), n, e); the gradient of A per batch row (b, e, n).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kInterval = 16;

// GCC and Clang vector extensions: one vector of kLanes floats, compiled to the widest SIMD
// registers the target has (AVX-512, AVX2 or NEON).
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Splat(float value) { return Vec{} + value; }

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// exp(x) in float32 for x <= 88.7: x = k ln 2 + r with |r| <= ln 2 / 2, then exp(r) from its
// Taylor polynomial of degree 7 (truncation error below 6e-9) times 2^k built in the exponent
// bits. Inputs below -87.3 give 0, where float32 would turn subnormal.
inline Vec Exp(Vec x) {
  const Vec lowest = Splat(-87.33654f), highest = Splat(88.72283f);
  Vec clamped = x < lowest ? lowest : x;
  clamped = clamped > highest ? highest : clamped;
  // Adding 1.5 * 2^23 rounds a float of magnitude below 2^22 to an integer.
  const float round_to_integer = 12582912.0f;
  const Vec k = (clamped * 1.44269504088896341f + round_to_integer) - round_to_integer;
  // ln 2 in two parts, the first exact in float32, so r keeps its low bits.
  Vec r = clamped - k * 0.693145751953125f;
  r = r - k * 1.428606765330187e-06f;
  Vec p = Splat(1.f / 5040);
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const IntVec exponent_bits = (__builtin_convertvector(k, IntVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent_bits, sizeof scale);
  return x < lowest ? Splat(0.f) : p * scale;
}

// Element (e, n) of a (e, n) array for the kLanes channels from e0, as one vector.
inline Vec LoadChannelsOf(const float* en, int64_t num_states, int64_t e0, int64_t n) {
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = en[(e0 + l) * num_states + n];
  return Load(lanes);
}

inline void StoreChannelsOf(float* en, int64_t num_states, int64_t e0, int64_t n, Vec v) {
  float lanes[kLanes];
  Store(lanes, v);
  for (int64_t l = 0; l < kLanes; ++l) en[(e0 + l) * num_states + n] = lanes[l];
}

struct Sizes {
  int64_t batch, length, channels, states, intervals;
};

// Forward pass of one batch row over channels e0 .. e0 + kLanes - 1. Pointers start at the row.
template <int kN>
void ForwardBlock(const Sizes& s, int64_t e0, const float* x, const float* dt, const float* A,
                  const float* B, const float* C, const float* h0, float* y, float* h_last,
                  float* kept) {
  const int64_t E = s.channels;
  Vec h[kN], A_n[kN];
  for (int n = 0; n < kN; ++n) {
    A_n[n] = LoadChannelsOf(A, kN, e0, n);
    h[n] = LoadChannelsOf(h0, kN, e0, n);
  }
  for (int64_t t = 0; t < s.length; ++t) {
    if (t % kInterval == 0) {
      float* kept_interval = kept + (t / kInterval) * kN * E + e0;
      for (int n = 0; n < kN; ++n) Store(kept_interval + n * E, h[n]);
    }
    const Vec dt_t = Load(dt + t * E + e0);
    const Vec dt_x = dt_t * Load(x + t * E + e0);
    const float* B_t = B + t * kN;
    const float* C_t = C + t * kN;
    Vec y_t = Splat(0.f);
#pragma GCC unroll 64
    for (int n = 0; n < kN; ++n) {
      h[n] = Exp(dt_t * A_n[n]) * h[n] + dt_x * B_t[n];
      y_t += h[n] * C_t[n];
    }
    Store(y + t * E + e0, y_t);
  }
  for (int n = 0; n < kN; ++n) StoreChannelsOf(h_last, kN, e0, n, h[n]);
}

// Backward pass of one batch row over channels e0 .. e0 + kLanes - 1. dA (e, n) accumulates;
// dB_lanes and dC_lanes (t, n, kLanes) accumulate per-lane partial sums over channel blocks.
template <int kN>
void BackwardBlock(const Sizes& s, int64_t e0, const float* x, const float* dt, const float* A,
                   const float* B, const float* C, const float* kept, const float* dy,
                   const float* dh_last, float* dx, float* d_dt, float* dA, float* dB_lanes,
                   float* dC_lanes, float* dh0, Vec (*states)[kN], Vec (*decays)[kN]) {
  // states[i] is the state before step i of the interval, states[kInterval] the one after it;
  // decays[i] is the decay of step i. Both come from the caller, to keep them off the stack.
  const int64_t E = s.channels;
  Vec A_n[kN], dh[kN], dA_n[kN];
  for (int n = 0; n < kN; ++n) {
    A_n[n] = LoadChannelsOf(A, kN, e0, n);
    dh[n] = LoadChannelsOf(dh_last, kN, e0, n);
    dA_n[n] = Splat(0.f);
  }
  for (int64_t k = s.intervals - 1; k >= 0; --k) {
    const int64_t start = k * kInterval, end = std::min(s.length, start + kInterval);
    for (int n = 0; n < kN; ++n) states[0][n] = Load(kept + k * kN * E + n * E + e0);
    for (int64_t t = start; t < end; ++t) {
      const int64_t i = t - start;
      const Vec dt_t = Load(dt + t * E + e0);
      const Vec dt_x = dt_t * Load(x + t * E + e0);
#pragma GCC unroll 64
      for (int n = 0; n < kN; ++n) {
        decays[i][n] = Exp(dt_t * A_n[n]);
        states[i + 1][n] = decays[i][n] * states[i][n] + dt_x * B[t * kN + n];
      }
    }
    for (int64_t t = end - 1; t >= start; --t) {
      const int64_t i = t - start;
      const Vec dt_t = Load(dt + t * E + e0);
      const Vec x_t = Load(x + t * E + e0);
      const Vec dt_x = dt_t * x_t;
      const Vec dy_t = Load(dy + t * E + e0);
      Vec d_dt_x = Splat(0.f), d_dt_from_decay = Splat(0.f);
#pragma GCC unroll 64
      for (int n = 0; n < kN; ++n) {
        // Cotangent of h_t: from y_t, and from h_{t+1} through its decay (already in dh).
        const Vec g = dh[n] + dy_t * C[t * kN + n];
        float* dC_tn = dC_lanes + (t * kN + n) * kLanes;
        float* dB_tn = dB_lanes + (t * kN + n) * kLanes;
        Store(dC_tn, Load(dC_tn) + states[i + 1][n] * dy_t);
        Store(dB_tn, Load(dB_tn) + g * dt_x);
        d_dt_x += g * B[t * kN + n];
        // Cotangent of dt * A, through decay = exp(dt * A).
        const Vec d_dt_A = g * states[i][n] * decays[i][n];
        d_dt_from_decay += d_dt_A * A_n[n];
        dA_n[n] += d_dt_A * dt_t;
        dh[n] = decays[i][n] * g;
      }
      Store(dx + t * E + e0, d_dt_x * dt_t);
      Store(d_dt + t * E + e0, d_dt_x * x_t + d_dt_from_decay);
    }
  }
  for (int n = 0; n < kN; ++n) {
    StoreChannelsOf(dA, kN, e0, n, dA_n[n]);
    StoreChannelsOf(dh0, kN, e0, n, dh[n]);
  }
}

// Runs Body<kN>::Run(args...) for the state size n, or returns false if none is instantiated.
template <template <int> class Body, typename... Args>
bool WithStateSize(int64_t n, Args&&... args) {
  switch (n) {
    case 1: Body<1>::Run(args...); return true;
    case 2: Body<2>::Run(args...); return true;
    case 4: Body<4>::Run(args...); return true;
    case 8: Body<8>::Run(args...); return true;
    case 16: Body<16>::Run(args...); return true;
    case 32: Body<32>::Run(args...); return true;
    case 64: Body<64>::Run(args...); return true;
    default: return false;
  }
}

template <int kN>
struct RunForward {
  static void Run(const Sizes& s, const float* x, const float* dt, const float* A,
                  const float* B, const float* C, const float* h0, float* y, float* h_last,
                  float* kept) {
    const int64_t T = s.length, E = s.channels;
    for (int64_t b = 0; b < s.batch; ++b)
      for (int64_t e0 = 0; e0 < E; e0 += kLanes)
        ForwardBlock<kN>(s, e0, x + b * T * E, dt + b * T * E, A, B + b * T * kN,
                         C + b * T * kN, h0 + b * E * kN, y + b * T * E, h_last + b * E * kN,
                         kept + b * s.intervals * kN * E);
  }
};

template <int kN>
struct RunBackward {
  static void Run(const Sizes& s, const float* x, const float* dt, const float* A,
                  const float* B, const float* C, const float* kept, const float* dy,
                  const float* dh_last, float* dx, float* d_dt, float* dA, float* dB, float* dC,
                  float* dh0) {
    const int64_t T = s.length, E = s.channels;
    std::vector<float> dB_lanes(T * kN * kLanes), dC_lanes(T * kN * kLanes);
    std::vector<Vec> states((kInterval + 1) * kN), decays(kInterval * kN);
    auto* states_by_step = reinterpret_cast<Vec(*)[kN]>(states.data());
    auto* decays_by_step = reinterpret_cast<Vec(*)[kN]>(decays.data());
    for (int64_t b = 0; b < s.batch; ++b) {
      std::fill(dB_lanes.begin(), dB_lanes.end(), 0.f);
      std::fill(dC_lanes.begin(), dC_lanes.end(), 0.f);
      for (int64_t e0 = 0; e0 < E; e0 += kLanes)
        BackwardBlock<kN>(s, e0, x + b * T * E, dt + b * T * E, A, B + b * T * kN,
                          C + b * T * kN, kept + b * s.intervals * kN * E, dy + b * T * E,
                          dh_last + b * E * kN, dx + b * T * E, d_dt + b * T * E,
                          dA + b * E * kN, dB_lanes.data(), dC_lanes.data(), dh0 + b * E * kN,
                          states_by_step, decays_by_step);
      for (int64_t i = 0; i < T * kN; ++i) {
        float sum_B = 0.f, sum_C = 0.f;
        for (int64_t l = 0; l < kLanes; ++l) {
          sum_B += dB_lanes[i * kLanes + l];
          sum_C += dC_lanes[i * kLanes + l];
        }
        dB[b * T * kN + i] = sum_B;
        dC[b * T * kN + i] = sum_C;
      }
    }
  }
};

using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

// Reads the sizes from x (b, t, e) and A (e, n) and checks every other shape against them.
ffi::Error CheckSizes(F32 x, F32 A, const std::vector<std::pair<F32*, std::vector<int64_t>>>& rest,
                      Sizes* sizes) {
  auto x_dims = x.dimensions();
  auto A_dims = A.dimensions();
  if (x_dims.size() != 3 || A_dims.size() != 2 || A_dims[0] != x_dims[2])
    return ffi::Error::InvalidArgument("selective scan: x must be (b, t, e) and A (e, n)");
  *sizes = Sizes{x_dims[0], x_dims[1], x_dims[2], A_dims[1],
                 (x_dims[1] + kInterval - 1) / kInterval};
  if (sizes->channels % kLanes != 0)
    return ffi::Error::InvalidArgument("selective scan: channels must be a multiple of 16");
  for (const auto& [buffer, expected] : rest) {
    auto dims = buffer->dimensions();
    if (!std::equal(dims.begin(), dims.end(), expected.begin(), expected.end()))
      return ffi::Error::InvalidArgument("selective scan: an operand has the wrong shape");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(F32 x, F32 dt, F32 A, F32 B, F32 C, F32 h0, F32Result y, F32Result h_last,
                   F32Result kept) {
  Sizes s;
  auto x_dims = x.dimensions();
  const int64_t b = x_dims.size() > 0 ? x_dims[0] : 0, t = x_dims.size() > 1 ? x_dims[1] : 0;
  const int64_t e = x_dims.size() > 2 ? x_dims[2] : 0;
  const int64_t n = A.dimensions().size() == 2 ? A.dimensions()[1] : 0;
  ffi::Error error = CheckSizes(x, A, {{&dt, {b, t, e}}, {&B, {b, t, n}}, {&C, {b, t, n}},
                                       {&h0, {b, e, n}}}, &s);
  if (error.failure()) return error;
  if (!WithStateSize<RunForward>(s.states, s, x.typed_data(), dt.typed_data(), A.typed_data(),
                                 B.typed_data(), C.typed_data(), h0.typed_data(),
                                 y->typed_data(), h_last->typed_data(), kept->typed_data()))
    return ffi::Error::InvalidArgument("selective scan: unsupported state size");
  return ffi::Error::Success();
}

ffi::Error Backward(F32 x, F32 dt, F32 A, F32 B, F32 C, F32 kept, F32 dy, F32 dh_last,
                    F32Result dx, F32Result d_dt, F32Result dA, F32Result dB, F32Result dC,
                    F32Result dh0) {
  Sizes s;
  auto x_dims = x.dimensions();
  const int64_t b = x_dims.size() > 0 ? x_dims[0] : 0, t = x_dims.size() > 1 ? x_dims[1] : 0;
  const int64_t e = x_dims.size() > 2 ? x_dims[2] : 0;
  const int64_t n = A.dimensions().size() == 2 ? A.dimensions()[1] : 0;
  const int64_t intervals = (t + kInterval - 1) / kInterval;
  ffi::Error error = CheckSizes(
      x, A, {{&dt, {b, t, e}}, {&B, {b, t, n}}, {&C, {b, t, n}}, {&kept, {b, intervals, n, e}},
             {&dy, {b, t, e}}, {&dh_last, {b, e, n}}}, &s);
  if (error.failure()) return error;
  if (!WithStateSize<RunBackward>(s.states, s, x.typed_data(), dt.typed_data(), A.typed_data(),
                                  B.typed_data(), C.typed_data(), kept.typed_data(),
                                  dy.typed_data(), dh_last.typed_data(), dx->typed_data(),
                                  d_dt->typed_data(), dA->typed_data(), dB->typed_data(),
                                  dC->typed_data(), dh0->typed_data()))
    return ffi::Error::InvalidArgument("selective scan: unsupported state size");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SelectiveScanForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // x
                                  .Arg<F32>()  // dt
                                  .Arg<F32>()  // A
                                  .Arg<F32>()  // B
                                  .Arg<F32>()  // C
                                  .Arg<F32>()  // h0
                                  .Ret<F32>()  // y
                                  .Ret<F32>()  // h_last
                                  .Ret<F32>()  // kept states
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SelectiveScanBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // x
                                  .Arg<F32>()  // dt
                                  .Arg<F32>()  // A
                                  .Arg<F32>()  // B
                                  .Arg<F32>()  // C
                                  .Arg<F32>()  // kept states
                                  .Arg<F32>()  // dy
                                  .Arg<F32>()  // dh_last
                                  .Ret<F32>()  // dx
                                  .Ret<F32>()  // d_dt
                                  .Ret<F32>()  // dA per batch row
                                  .Ret<F32>()  // dB
                                  .Ret<F32>()  // dC
                                  .Ret<F32>()  // dh0
);
