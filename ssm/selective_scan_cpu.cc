// The selective scan of the Mamba mixer for the CPU, as XLA FFI handlers. There are forward and
// backward passes of three operations: the plain scan, the gated scan (the mixer's step size,
// scan, D skip and gate), and the causal convolution with SiLU that comes before it.
//
// The recurrence, for batch row b, channel e and state index n (see ssm/scan.py):
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t,     y_t = sum_n C_t[n] * h_t[:, n]
//
// Channels are independent, so the scan works on blocks of kLanes channels, with a block's
// state (kN vectors of kLanes floats) held in registers. The forward pass keeps the state every
// kInterval steps. The backward pass recomputes the states and decays of one interval from
// there and runs that interval in reverse. ssm/cpu_kernel.py builds this file with the machine's
// C++ compiler and pads the channels to a multiple of kLanes and the state size to one of the
// sizes that `WithStateSize` instantiates. Its tests hold every handler equal to JAX code.
//
// Shapes (all float32, row-major): x, dt, y and their gradients (b, t, e); A (e, n); B, C and
// their gradients (b, t, n); h0, h_last and their gradients (b, e, n); the kept states
// (b, ceil(t / kInterval), n, e); the gradient of A per batch row (b, e, n).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// 2^v in float32: v = k + r with integer k and |r| <= 1/2, then 2^r from a polynomial of degree 6
// times 2^k. The polynomial is fitted to 2^r on [-1/2, 1/2] for the least maximum relative error
// (2.1e-9 with exact coefficients, about 8e-8 evaluated in float32). The decays are
// exp(dt * A) = 2^(dt * A log2(e)), so the kernels scale A by log2(e) once.
//
// With AVX-512, one instruction each rounds v and multiplies by 2^k (vrndscaleps, vscalefps).
// Results below 2^-126 are then subnormal, or 0 where flush-to-zero is on, as in XLA's CPU
// runtime, and inputs of 128 and above give +inf. Elsewhere 2^k is built in the exponent bits,
// inputs below -126 give 0, and inputs from 127.5 up give +inf, although float32 could still
// hold 2^v up to v = 128.
inline Vec Exp2Polynomial(Vec r) {
  Vec p = Splat(1.5349588618278034e-04f);
  p = p * r + 1.3401420163671495e-03f;
  p = p * r + 9.618487015754865e-03f;
  p = p * r + 5.550324598571846e-02f;
  p = p * r + 2.4022646756606683e-01f;
  p = p * r + 6.931472079722174e-01f;
  return p * r + 1.0000000006027463f;
}

#if defined(__AVX512F__)
inline Vec Exp2(Vec v) {
  // Every input below -150 gives 0, and the bound keeps k finite. NaN stays NaN, because vmaxps
  // returns its second operand when one is NaN.
  const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-150.f), (__m512)v);
  const __m512 k = _mm512_roundscale_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec r = (Vec)clamped - (Vec)k;
  return (Vec)_mm512_scalef_ps((__m512)Exp2Polynomial(r), k);
}
#else
inline Vec Exp2(Vec v) {
  // k = 128 gives the exponent bits of +inf.
  const Vec lowest = Splat(-126.f), highest = Splat(128.f);
  Vec clamped = v < lowest ? lowest : v;
  clamped = clamped > highest ? highest : clamped;
  // Adding 1.5 * 2^23 rounds a float of magnitude below 2^22 to an integer.
  const float round_to_integer = 12582912.0f;
  const Vec k = (clamped + round_to_integer) - round_to_integer;
  const IntVec exponent_bits = (__builtin_convertvector(k, IntVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent_bits, sizeof scale);
  return v < lowest ? Splat(0.f) : Exp2Polynomial(clamped - k) * scale;
}
#endif

// Sums over the state index run in kSums partial sums, so that kSums additions can be in flight
// at once rather than one at a time.
constexpr int kSums = 4;

inline Vec Total(const Vec (&partial)[kSums]) {
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

constexpr float kLog2E = 1.44269504088896341f;
constexpr float kLn2 = 0.69314718055994531f;

#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, IntVec{__VA_ARGS__})
#endif

// Sums of lanes of 16 vectors: lane j of the result is the sum of the lanes of v[j]. Four rounds
// each add two halves of every vector, pairing vectors so that no lane is wasted, then one
// shuffle undoes the bit-reversed order the rounds leave.
inline Vec SumLanesOf16(Vec (&v)[16]) {
  Vec w[8], u[4], q[2];
  for (int i = 0; i < 8; ++i) {
    const Vec a = v[2 * i], b = v[2 * i + 1];
    w[i] = SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const Vec a = w[2 * i], b = w[2 * i + 1];
    u[i] = SHUFFLE(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           SHUFFLE(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const Vec a = u[2 * i], b = u[2 * i + 1];
    q[i] = SHUFFLE(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           SHUFFLE(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  const Vec r = SHUFFLE(q[0], q[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                SHUFFLE(q[0], q[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return SHUFFLE(r, r, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// Adds the lane sums of kN vectors to out[0 .. kN - 1], 16 at a time.
template <int kN>
inline void AddSumsOfLanes(const Vec (&v)[kN], float* out) {
  for (int first = 0; first < kN; first += 16) {
    Vec group[16];
    for (int j = 0; j < 16; ++j) group[j] = first + j < kN ? v[first + j] : Splat(0.f);
    const Vec sums = SumLanesOf16(group);
    if constexpr (kN >= 16) {
      Store(out + first, Load(out + first) + sums);
    } else {
      float lanes[kLanes];
      Store(lanes, sums);
      for (int j = 0; j < kN; ++j) out[j] += lanes[j];
    }
  }
}

// Writes the (e, n) array `en` as (n, e), times `scale`.
void Transpose(const float* en, int64_t channels, int64_t states, float scale, float* ne) {
  for (int64_t e = 0; e < channels; ++e)
    for (int64_t n = 0; n < states; ++n) ne[n * channels + e] = en[e * states + n] * scale;
}

// log(1 + u) for u in [0, 1], as 2 atanh(s) with s = u / (2 + u) <= 1/3: the series in s to
// s^15 (truncation error below 2e-9 relative). No 1 + u is formed, so small u keep their bits.
inline Vec Log1pOfUnit(Vec u) {
  const Vec s = u / (u + 2.f);
  const Vec s2 = s * s;
  Vec p = Splat(1.f / 15);
  p = p * s2 + 1.f / 13;
  p = p * s2 + 1.f / 11;
  p = p * s2 + 1.f / 9;
  p = p * s2 + 1.f / 7;
  p = p * s2 + 1.f / 5;
  p = p * s2 + 1.f / 3;
  p = p * s2 + 1.f;
  return 2.f * s * p;
}

inline Vec Abs(Vec v) { return v < 0.f ? -v : v; }

// softplus(v) = log(1 + e^v) = max(v, 0) + log(1 + e^-|v|).
inline Vec Softplus(Vec v) {
  return (v > 0.f ? v : Splat(0.f)) + Log1pOfUnit(Exp2(-Abs(v) * kLog2E));
}

// 1 / (1 + e^-v), from e^-|v| so that nothing overflows.
inline Vec Sigmoid(Vec v) {
  const Vec e = Exp2(-Abs(v) * kLog2E);
  const Vec r = 1.f / (1.f + e);
  return v >= 0.f ? r : e * r;
}

struct Sizes {
  int64_t batch, length, channels, states, intervals;
};

// Asks the cache for the rows [start, end) of the block of channels kPrefetchBlocks blocks after
// e0 in each (t, e) array: the blocks of an interval read 64 bytes of each row, 2 KiB apart at
// e = 512, a pattern the hardware prefetcher does not follow.
constexpr int64_t kPrefetchBlocks = 2;

void PrefetchBlockAhead(const Sizes& s, int64_t start, int64_t end, int64_t e0,
                        std::initializer_list<const float*> arrays) {
  const int64_t ahead = e0 + kPrefetchBlocks * kLanes;
  if (ahead >= s.channels) return;
  for (const float* array : arrays)
    if (array != nullptr)
      for (int64_t t = start; t < end; ++t) __builtin_prefetch(array + t * s.channels + ahead);
}

// Operands shared by all batch rows. The gated form (kGated) reads dt as the raw step size,
// before dt_bias and the softplus, and gates the output as the Mamba mixer does:
//   dt = softplus(dt_raw + dt_bias),   out = (y + D x) * silu(z).
struct Shared {
  const float* A2;       // (n, e): A log2(e), transposed
  const float* dt_bias;  // (e), gated form only
  const float* D;        // (e), gated form only
};

// Operands of one batch row; pointers start at the row.
struct Row {
  const float *x, *dt, *B, *C;
  const float* z;  // gated form only
  float* y;        // the output: y, or the gated output
};

// The step sizes of one step of a block of channels, and for the backward pass sigmoid of the
// raw step size (the derivative of the softplus).
template <bool kGated>
inline Vec StepSize(const Shared& shared, const Row& row, int64_t t, int64_t e0, int64_t E,
                    Vec* softplus_slope = nullptr) {
  const Vec dt_t = Load(row.dt + t * E + e0);
  if constexpr (!kGated) {
    return dt_t;
  } else {
    const Vec raw = dt_t + Load(shared.dt_bias + e0);
    if (softplus_slope != nullptr) *softplus_slope = Sigmoid(raw);
    return Softplus(raw);
  }
}

// One interval of steps [start, end) of one batch row, channels e0 .. e0 + kLanes - 1, forward.
// h_start and h_end are (n, e) states. The step sizes and the gate are computed in loops of
// their own, whose steps do not depend on each other: inside the recurrence their long chains of
// dependent instructions would stall it (measured: 1.6x slower).
template <int kN, bool kGated>
void ForwardInterval(const Sizes& s, int64_t start, int64_t end, int64_t e0,
                     const Shared& shared, const Row& row, const float* h_start, float* h_end) {
  const int64_t E = s.channels;
  Vec h[kN], A2_n[kN], step_sizes[kInterval];
  for (int n = 0; n < kN; ++n) {
    A2_n[n] = Load(shared.A2 + n * E + e0);
    h[n] = Load(h_start + n * E + e0);
  }
  PrefetchBlockAhead(s, start, end, e0, {row.x, row.dt, row.z});
  for (int64_t t = start; t < end; ++t)
    step_sizes[t - start] = StepSize<kGated>(shared, row, t, e0, E);
  for (int64_t t = start; t < end; ++t) {
    const Vec dt_t = step_sizes[t - start];
    const Vec dt_x = dt_t * Load(row.x + t * E + e0);
    const float* B_t = row.B + t * kN;
    const float* C_t = row.C + t * kN;
    Vec y_t[kSums] = {};
#pragma GCC unroll 64
    for (int n = 0; n < kN; ++n) {
      h[n] = Exp2(dt_t * A2_n[n]) * h[n] + dt_x * B_t[n];
      y_t[n % kSums] += h[n] * C_t[n];
    }
    Store(row.y + t * E + e0, Total(y_t));
  }
  if constexpr (kGated) {
    const Vec D = Load(shared.D + e0);
    for (int64_t t = start; t < end; ++t) {
      float* y_t = row.y + t * E + e0;
      const Vec z_t = Load(row.z + t * E + e0);
      Store(y_t, (Load(y_t) + D * Load(row.x + t * E + e0)) * z_t * Sigmoid(z_t));
    }
  }
  for (int n = 0; n < kN; ++n) Store(h_end + n * E + e0, h[n]);
}

// Cotangents of one batch row; pointers start at the row. dB and dC (t, n) accumulate over
// channel blocks.
struct RowGradients {
  const float* dy;  // cotangent of the output (of the gated output in the gated form)
  float *dx, *d_dt, *dB, *dC;
  float* dz;  // gated form only
};

// Gradients that one batch row carries from interval to interval, per channel: the cotangent of
// the state dh (n, e), and the sums over steps dA (n, e), dD (e) and d_dt_bias (e).
struct Carried {
  float *dh, *dA, *dD, *d_dt_bias;
};

// What the backward pass of one interval recomputes for one block of channels.
template <int kN>
struct IntervalScratch {
  Vec states[kInterval + 1][kN];  // before each step, and after the last
  Vec decays[kInterval][kN];
  Vec step_sizes[kInterval], softplus_slopes[kInterval], outputs[kInterval], dy[kInterval];
  Vec dz[kInterval];  // gated form: the cotangent of z, stored after the inputs are read
};

// The same interval and channels, backward, from the state kept at its start. As in the
// forward pass, the per-step work outside the recurrence runs in loops of its own.
template <int kN, bool kGated>
void BackwardInterval(const Sizes& s, int64_t start, int64_t end, int64_t e0,
                      const Shared& shared, const Row& row, const float* h_start,
                      const RowGradients& grad, const Carried& carried,
                      IntervalScratch<kN>& scratch) {
  const int64_t E = s.channels;
  Vec A2_n[kN], dh[kN], dA_n[kN];
  for (int n = 0; n < kN; ++n) {
    A2_n[n] = Load(shared.A2 + n * E + e0);
    dh[n] = Load(carried.dh + n * E + e0);
    dA_n[n] = Load(carried.dA + n * E + e0);
    scratch.states[0][n] = Load(h_start + n * E + e0);
  }
  PrefetchBlockAhead(s, start, end, e0, {row.x, row.dt, row.z, grad.dy});
  PrefetchBlockAhead(s, 0, kN, e0, {h_start});

  for (int64_t t = start; t < end; ++t)
    scratch.step_sizes[t - start] =
        StepSize<kGated>(shared, row, t, e0, E, &scratch.softplus_slopes[t - start]);
  for (int64_t t = start; t < end; ++t) {
    const int64_t i = t - start;
    const Vec dt_t = scratch.step_sizes[i];
    const Vec dt_x = dt_t * Load(row.x + t * E + e0);
    Vec y_t[kSums] = {};
#pragma GCC unroll 64
    for (int n = 0; n < kN; ++n) {
      scratch.decays[i][n] = Exp2(dt_t * A2_n[n]);
      scratch.states[i + 1][n] =
          scratch.decays[i][n] * scratch.states[i][n] + dt_x * row.B[t * kN + n];
      if constexpr (kGated) y_t[n % kSums] += scratch.states[i + 1][n] * row.C[t * kN + n];
    }
    scratch.outputs[i] = Total(y_t);
  }

  // Cotangent of y_t; in the gated form, through the gate, with the gradients of z and D.
  Vec dD = Splat(0.f);
  for (int64_t t = start; t < end; ++t) {
    const int64_t i = t - start;
    const Vec d_out = Load(grad.dy + t * E + e0);
    if constexpr (kGated) {
      const Vec z_t = Load(row.z + t * E + e0);
      const Vec sigmoid_z = Sigmoid(z_t);
      const Vec ungated = scratch.outputs[i] + Load(shared.D + e0) * Load(row.x + t * E + e0);
      // d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z))).
      scratch.dz[i] = d_out * ungated * sigmoid_z * (1.f + z_t * (1.f - sigmoid_z));
      scratch.dy[i] = d_out * z_t * sigmoid_z;
      dD += scratch.dy[i] * Load(row.x + t * E + e0);
    } else {
      scratch.dy[i] = d_out;
    }
  }

  // In the training step XLA passed every buffer at the same offset modulo 4 KiB (observed with
  // jax 0.10.2, not documented). With rows of 2 KiB (e = 512), dz at step t and the inputs at
  // step t + 2 then share their low 12 address bits, and a load waits for a matching store still
  // in flight (4K aliasing). With dz stored inside the loop above, the backward pass took about
  // 9% longer (b=2, t=512, e=512, n=16, buffers placed as XLA places them).
  if constexpr (kGated)
    for (int64_t t = start; t < end; ++t) Store(grad.dz + t * E + e0, scratch.dz[t - start]);

  Vec d_dt_bias = Splat(0.f);
  for (int64_t t = end - 1; t >= start; --t) {
    const int64_t i = t - start;
    const Vec dt_t = scratch.step_sizes[i];
    const Vec x_t = Load(row.x + t * E + e0);
    const Vec dt_x = dt_t * x_t;
    const Vec dy_t = scratch.dy[i];
    Vec d_dt_x[kSums] = {}, d_dt_A2[kSums] = {}, dB_n[kN], dC_n[kN];
#pragma GCC unroll 64
    for (int n = 0; n < kN; ++n) {
      // Cotangent of h_t: from y_t, and from h_{t+1} through its decay (already in dh).
      const Vec g = dh[n] + dy_t * row.C[t * kN + n];
      dC_n[n] = scratch.states[i + 1][n] * dy_t;
      dB_n[n] = g * dt_x;
      d_dt_x[n % kSums] += g * row.B[t * kN + n];
      dh[n] = scratch.decays[i][n] * g;
      // Cotangent of dt * A, through decay = exp(dt * A): g * h_{t-1} * decay, the new dh
      // times h_{t-1}.
      const Vec d_dt_A = dh[n] * scratch.states[i][n];
      d_dt_A2[n % kSums] += d_dt_A * A2_n[n];
      dA_n[n] += d_dt_A * dt_t;
    }
    AddSumsOfLanes<kN>(dB_n, grad.dB + t * kN);
    AddSumsOfLanes<kN>(dC_n, grad.dC + t * kN);
    const Vec d_dt_x_sum = Total(d_dt_x);
    Vec dx = d_dt_x_sum * dt_t;
    // d_dt_A2 sums d_dt_A * A log2(e); times ln 2 it is the sum of d_dt_A * A.
    Vec d_dt = d_dt_x_sum * x_t + Total(d_dt_A2) * kLn2;
    if constexpr (kGated) {
      dx += dy_t * Load(shared.D + e0);
      d_dt = d_dt * scratch.softplus_slopes[i];  // now the cotangent of the raw step size
      d_dt_bias += d_dt;
    }
    Store(grad.dx + t * E + e0, dx);
    Store(grad.d_dt + t * E + e0, d_dt);
  }
  for (int n = 0; n < kN; ++n) {
    Store(carried.dh + n * E + e0, dh[n]);
    Store(carried.dA + n * E + e0, dA_n[n]);
  }
  if constexpr (kGated) {
    Store(carried.dD + e0, Load(carried.dD + e0) + dD);
    Store(carried.d_dt_bias + e0, Load(carried.d_dt_bias + e0) + d_dt_bias);
  }
}

// Calls Body<kN, kGated>::Run(args...) for the state size n, or returns false if no kernel is
// instantiated for it.
template <template <int, bool> class Body, bool kGated, typename... Args>
bool WithStateSize(int64_t n, Args&&... args) {
  switch (n) {
    case 1: Body<1, kGated>::Run(args...); return true;
    case 2: Body<2, kGated>::Run(args...); return true;
    case 4: Body<4, kGated>::Run(args...); return true;
    case 8: Body<8, kGated>::Run(args...); return true;
    case 16: Body<16, kGated>::Run(args...); return true;
    case 32: Body<32, kGated>::Run(args...); return true;
    case 64: Body<64, kGated>::Run(args...); return true;
    default: return false;
  }
}

// Whole-batch operands, as the handlers receive them.
struct Operands {
  const float *x, *dt, *A, *B, *C, *h0;
  const float *dt_bias, *D, *z;  // gated form only
  const float* kept;              // backward only: (b, intervals, n, e)
  const float *dy, *dh_last;      // backward only
};

struct Results {
  float *y, *h_last, *kept;                  // forward
  float *dx, *d_dt, *dA, *dB, *dC, *dh0;     // backward; dA is per batch row (b, e, n)
  float *dD, *dz, *d_dt_bias;                // backward, gated form; dD and d_dt_bias (b, e)
};

Row RowOf(const Sizes& s, const Operands& in, float* y, int64_t b) {
  const int64_t T = s.length, E = s.channels, N = s.states;
  return Row{in.x + b * T * E, in.dt + b * T * E, in.B + b * T * N, in.C + b * T * N,
             in.z != nullptr ? in.z + b * T * E : nullptr,
             y != nullptr ? y + b * T * E : nullptr};
}

// Both passes go interval by interval and, within one, channel block by channel block, so that
// the rows of the interval stay in cache while all blocks read them.
template <int kN, bool kGated>
struct RunForward {
  static void Run(const Sizes& s, const Operands& in, const Results& out) {
    const int64_t T = s.length, E = s.channels, K = s.intervals;
    std::vector<float> A2(kN * E), h_end(kN * E);
    Transpose(in.A, E, kN, kLog2E, A2.data());
    const Shared shared{A2.data(), in.dt_bias, in.D};
    for (int64_t b = 0; b < s.batch; ++b) {
      const Row row = RowOf(s, in, out.y, b);
      float* kept = out.kept + b * K * kN * E;
      Transpose(in.h0 + b * E * kN, E, kN, 1.f, kept);
      for (int64_t k = 0; k < K; ++k) {
        float* next = k + 1 < K ? kept + (k + 1) * kN * E : h_end.data();
        for (int64_t e0 = 0; e0 < E; e0 += kLanes)
          ForwardInterval<kN, kGated>(s, k * kInterval, std::min(T, (k + 1) * kInterval), e0,
                                      shared, row, kept + k * kN * E, next);
      }
      Transpose(h_end.data(), kN, E, 1.f, out.h_last + b * E * kN);
    }
  }
};

template <int kN, bool kGated>
struct RunBackward {
  static void Run(const Sizes& s, const Operands& in, const Results& out) {
    const int64_t T = s.length, E = s.channels, K = s.intervals;
    std::vector<float> A2(kN * E), dh(kN * E), dA(kN * E);
    Transpose(in.A, E, kN, kLog2E, A2.data());
    const Shared shared{A2.data(), in.dt_bias, in.D};
    // Off the stack: 33 KiB at 16 states, 133 KiB at 64.
    auto scratch = std::make_unique<IntervalScratch<kN>>();
    std::fill(out.dB, out.dB + s.batch * T * kN, 0.f);
    std::fill(out.dC, out.dC + s.batch * T * kN, 0.f);
    if constexpr (kGated) {
      std::fill(out.dD, out.dD + s.batch * E, 0.f);
      std::fill(out.d_dt_bias, out.d_dt_bias + s.batch * E, 0.f);
    }
    for (int64_t b = 0; b < s.batch; ++b) {
      const Row row = RowOf(s, in, nullptr, b);
      const RowGradients grad{in.dy + b * T * E, out.dx + b * T * E, out.d_dt + b * T * E,
                              out.dB + b * T * kN, out.dC + b * T * kN,
                              kGated ? out.dz + b * T * E : nullptr};
      const Carried carried{dh.data(), dA.data(), kGated ? out.dD + b * E : nullptr,
                            kGated ? out.d_dt_bias + b * E : nullptr};
      Transpose(in.dh_last + b * E * kN, E, kN, 1.f, dh.data());
      std::fill(dA.begin(), dA.end(), 0.f);
      for (int64_t k = K - 1; k >= 0; --k)
        for (int64_t e0 = 0; e0 < E; e0 += kLanes)
          BackwardInterval<kN, kGated>(s, k * kInterval, std::min(T, (k + 1) * kInterval), e0,
                                       shared, row, in.kept + (b * K + k) * kN * E, grad,
                                       carried, *scratch);
      Transpose(dh.data(), kN, E, 1.f, out.dh0 + b * E * kN);
      Transpose(dA.data(), kN, E, 1.f, out.dA + b * E * kN);
    }
  }
};

using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;
using Shape = std::vector<int64_t>;

// Reads the sizes from x (b, t, e) and A (e, n), checks every other operand's shape against
// them and runs Body for the state size.
template <template <int, bool> class Body, bool kGated>
ffi::Error Dispatch(F32 x, F32 A, std::initializer_list<std::pair<F32*, char>> operands,
                    const Operands& in, const Results& out) {
  auto x_dims = x.dimensions();
  auto A_dims = A.dimensions();
  if (x_dims.size() != 3 || A_dims.size() != 2 || A_dims[0] != x_dims[2])
    return ffi::Error::InvalidArgument("selective scan: x must be (b, t, e) and A (e, n)");
  const Sizes s{x_dims[0], x_dims[1], x_dims[2], A_dims[1],
                (x_dims[1] + kInterval - 1) / kInterval};
  if (s.channels % kLanes != 0)
    return ffi::Error::InvalidArgument("selective scan: channels must be a multiple of 16");
  if (s.length < 1) return ffi::Error::InvalidArgument("selective scan: no time steps");
  // Shapes by letter: 'x' (b, t, e), 'n' (b, t, n), 'h' (b, e, n), 'k' the kept states, 'e' (e).
  for (const auto& [buffer, kind] : operands) {
    const Shape expected =
        kind == 'x'   ? Shape{s.batch, s.length, s.channels}
        : kind == 'n' ? Shape{s.batch, s.length, s.states}
        : kind == 'h' ? Shape{s.batch, s.channels, s.states}
        : kind == 'k' ? Shape{s.batch, s.intervals, s.states, s.channels}
                      : Shape{s.channels};
    auto dims = buffer->dimensions();
    if (!std::equal(dims.begin(), dims.end(), expected.begin(), expected.end()))
      return ffi::Error::InvalidArgument("selective scan: an operand has the wrong shape");
  }
  if (!WithStateSize<Body, kGated>(s.states, s, in, out))
    return ffi::Error::InvalidArgument("selective scan: unsupported state size");
  return ffi::Error::Success();
}

ffi::Error Forward(F32 x, F32 dt, F32 A, F32 B, F32 C, F32 h0, F32Result y, F32Result h_last,
                   F32Result kept) {
  const Operands in{x.typed_data(), dt.typed_data(), A.typed_data(), B.typed_data(),
                    C.typed_data(), h0.typed_data()};
  const Results out{y->typed_data(), h_last->typed_data(), kept->typed_data()};
  return Dispatch<RunForward, false>(x, A, {{&dt, 'x'}, {&B, 'n'}, {&C, 'n'}, {&h0, 'h'}}, in,
                                     out);
}

ffi::Error Backward(F32 x, F32 dt, F32 A, F32 B, F32 C, F32 kept, F32 dy, F32 dh_last,
                    F32Result dx, F32Result d_dt, F32Result dA, F32Result dB, F32Result dC,
                    F32Result dh0) {
  Operands in{x.typed_data(), dt.typed_data(), A.typed_data(), B.typed_data(), C.typed_data()};
  in.kept = kept.typed_data();
  in.dy = dy.typed_data();
  in.dh_last = dh_last.typed_data();
  Results out{};
  out.dx = dx->typed_data();
  out.d_dt = d_dt->typed_data();
  out.dA = dA->typed_data();
  out.dB = dB->typed_data();
  out.dC = dC->typed_data();
  out.dh0 = dh0->typed_data();
  return Dispatch<RunBackward, false>(
      x, A, {{&dt, 'x'}, {&B, 'n'}, {&C, 'n'}, {&kept, 'k'}, {&dy, 'x'}, {&dh_last, 'h'}}, in,
      out);
}

ffi::Error GatedForward(F32 x, F32 dt_raw, F32 dt_bias, F32 A, F32 B, F32 C, F32 D, F32 z,
                        F32 h0, F32Result out_gated, F32Result h_last, F32Result kept) {
  Operands in{x.typed_data(), dt_raw.typed_data(), A.typed_data(), B.typed_data(),
              C.typed_data(), h0.typed_data()};
  in.dt_bias = dt_bias.typed_data();
  in.D = D.typed_data();
  in.z = z.typed_data();
  const Results out{out_gated->typed_data(), h_last->typed_data(), kept->typed_data()};
  return Dispatch<RunForward, true>(
      x, A,
      {{&dt_raw, 'x'}, {&dt_bias, 'e'}, {&B, 'n'}, {&C, 'n'}, {&D, 'e'}, {&z, 'x'}, {&h0, 'h'}},
      in, out);
}

ffi::Error GatedBackward(F32 x, F32 dt_raw, F32 dt_bias, F32 A, F32 B, F32 C, F32 D, F32 z,
                         F32 kept, F32 d_out, F32 dh_last, F32Result dx, F32Result d_dt_raw,
                         F32Result dA, F32Result dB, F32Result dC, F32Result dh0, F32Result dD,
                         F32Result dz, F32Result d_dt_bias) {
  Operands in{x.typed_data(), dt_raw.typed_data(), A.typed_data(), B.typed_data(),
              C.typed_data()};
  in.dt_bias = dt_bias.typed_data();
  in.D = D.typed_data();
  in.z = z.typed_data();
  in.kept = kept.typed_data();
  in.dy = d_out.typed_data();
  in.dh_last = dh_last.typed_data();
  const Results out{nullptr, nullptr, nullptr, dx->typed_data(), d_dt_raw->typed_data(),
                    dA->typed_data(), dB->typed_data(), dC->typed_data(), dh0->typed_data(),
                    dD->typed_data(), dz->typed_data(), d_dt_bias->typed_data()};
  return Dispatch<RunBackward, true>(
      x, A,
      {{&dt_raw, 'x'}, {&dt_bias, 'e'}, {&B, 'n'}, {&C, 'n'}, {&D, 'e'}, {&z, 'x'},
       {&kept, 'k'}, {&d_out, 'x'}, {&dh_last, 'h'}},
      in, out);
}

// The causal depthwise convolution and SiLU that come before the scan in the Mamba mixer, and
// the split of in_proj's output xz (b, t, 2e) into its two halves (ssm/mamba.py):
//   x_t = silu(bias + sum_j kernel[j] * u_{t - (w - 1) + j}),   z_t = xz_t[e:]
// where u_t = xz_t[:e] for t >= 0 and the history (b, w - 1, e) of earlier inputs before that.
// The backward pass writes the cotangent of xz whole, so that no concatenation follows it.
struct ConvSizes {
  int64_t batch, length, channels, width;
};

// Input s of the convolution for one block of channels of one batch row: xz[s, :e] for s >= 0,
// else the history at w - 1 + s.
inline Vec ConvInput(const ConvSizes& c, const float* xz, const float* history, int64_t s,
                     int64_t e0) {
  return s >= 0 ? Load(xz + s * 2 * c.channels + e0)
                : Load(history + (c.width - 1 + s) * c.channels + e0);
}

inline Vec ConvPreactivation(const ConvSizes& c, const float* xz, const float* history,
                             const float* kernel, const float* bias, int64_t t, int64_t e0) {
  Vec acc = Load(bias + e0);
  for (int64_t j = 0; j < c.width; ++j)
    acc += Load(kernel + j * c.channels + e0) *
           ConvInput(c, xz, history, t - (c.width - 1) + j, e0);
  return acc;
}

// Both passes run along the rows of xz, which are contiguous, with all blocks of channels of
// one row at a time. This order is possible because the convolution carries nothing from step
// to step.
void ConvForwardRow(const ConvSizes& c, const float* xz, const float* history,
                    const float* kernel, const float* bias, float* x, float* z) {
  const int64_t T = c.length, E = c.channels;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e0 = 0; e0 < E; e0 += kLanes) {
      const Vec pre = ConvPreactivation(c, xz, history, kernel, bias, t, e0);
      Store(x + t * E + e0, pre * Sigmoid(pre));
      Store(z + t * E + e0, Load(xz + t * 2 * E + E + e0));
    }
  }
}

// dxz (t, 2e) receives the cotangents of both halves; its first half first contains the
// cotangent of the preactivation. dkernel (w, e) and dbias (e) start at zero.
void ConvBackwardRow(const ConvSizes& c, const float* xz, const float* history,
                     const float* kernel, const float* bias, const float* dx, const float* dz,
                     float* dxz, float* dkernel, float* dbias, float* dhistory) {
  const int64_t T = c.length, E = c.channels, W = c.width;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e0 = 0; e0 < E; e0 += kLanes) {
      const Vec pre = ConvPreactivation(c, xz, history, kernel, bias, t, e0);
      const Vec sigmoid = Sigmoid(pre);
      // d silu(p) / dp = sigmoid(p) (1 + p (1 - sigmoid(p))).
      const Vec d_pre = Load(dx + t * E + e0) * sigmoid * (1.f + pre * (1.f - sigmoid));
      Store(dxz + t * 2 * E + e0, d_pre);
      Store(dxz + t * 2 * E + E + e0, Load(dz + t * E + e0));
      Store(dbias + e0, Load(dbias + e0) + d_pre);
      for (int64_t j = 0; j < W; ++j) {
        float* dk = dkernel + j * E + e0;
        Store(dk, Load(dk) + d_pre * ConvInput(c, xz, history, t - (W - 1) + j, e0));
      }
    }
  }
  // Input s feeds the preactivations s .. s + w - 1, through kernel[w - 1] .. kernel[0]. In
  // increasing s, d_pre[s] is read for the last time just before it is overwritten.
  for (int64_t s = -(W - 1); s < T; ++s) {
    for (int64_t e0 = 0; e0 < E; e0 += kLanes) {
      Vec d_input = Splat(0.f);
      for (int64_t j = 0; j < W; ++j) {
        const int64_t t = s + (W - 1) - j;
        if (t >= 0 && t < T)
          d_input += Load(kernel + j * E + e0) * Load(dxz + t * 2 * E + e0);
      }
      if (s >= 0)
        Store(dxz + s * 2 * E + e0, d_input);
      else
        Store(dhistory + (W - 1 + s) * E + e0, d_input);
    }
  }
}

ffi::Error CheckConvShapes(F32 xz, F32 kernel,
                           std::initializer_list<std::pair<F32*, char>> rest, ConvSizes* c) {
  auto xz_dims = xz.dimensions();
  auto k_dims = kernel.dimensions();
  if (xz_dims.size() != 3 || k_dims.size() != 2 || xz_dims[2] != 2 * k_dims[1])
    return ffi::Error::InvalidArgument("causal conv: xz must be (b, t, 2e) and kernel (w, e)");
  *c = ConvSizes{xz_dims[0], xz_dims[1], k_dims[1], k_dims[0]};
  if (c->channels % kLanes != 0 || c->width < 1)
    return ffi::Error::InvalidArgument("causal conv: channels must be a multiple of 16");
  if (c->length < 1) return ffi::Error::InvalidArgument("causal conv: no time steps");
  // Shapes by letter: 'x' (b, t, e), 'h' (b, w - 1, e), 'e' (e).
  for (const auto& [buffer, kind] : rest) {
    const Shape expected = kind == 'x'   ? Shape{c->batch, c->length, c->channels}
                           : kind == 'h' ? Shape{c->batch, c->width - 1, c->channels}
                                         : Shape{c->channels};
    auto dims = buffer->dimensions();
    if (!std::equal(dims.begin(), dims.end(), expected.begin(), expected.end()))
      return ffi::Error::InvalidArgument("causal conv: an operand has the wrong shape");
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(F32 xz, F32 kernel, F32 bias, F32 history, F32Result x, F32Result z) {
  ConvSizes c;
  ffi::Error error = CheckConvShapes(xz, kernel, {{&bias, 'e'}, {&history, 'h'}}, &c);
  if (error.failure()) return error;
  const int64_t T = c.length, E = c.channels, H = (c.width - 1) * E;
  for (int64_t b = 0; b < c.batch; ++b)
    ConvForwardRow(c, xz.typed_data() + b * T * 2 * E, history.typed_data() + b * H,
                   kernel.typed_data(), bias.typed_data(), x->typed_data() + b * T * E,
                   z->typed_data() + b * T * E);
  return ffi::Error::Success();
}

ffi::Error ConvBackward(F32 xz, F32 kernel, F32 bias, F32 history, F32 dx, F32 dz,
                        F32Result dxz, F32Result dkernel, F32Result dbias, F32Result dhistory) {
  ConvSizes c;
  ffi::Error error = CheckConvShapes(
      xz, kernel, {{&bias, 'e'}, {&history, 'h'}, {&dx, 'x'}, {&dz, 'x'}}, &c);
  if (error.failure()) return error;
  const int64_t T = c.length, E = c.channels, W = c.width, H = (W - 1) * E;
  std::fill(dkernel->typed_data(), dkernel->typed_data() + c.batch * W * E, 0.f);
  std::fill(dbias->typed_data(), dbias->typed_data() + c.batch * E, 0.f);
  for (int64_t b = 0; b < c.batch; ++b)
    ConvBackwardRow(c, xz.typed_data() + b * T * 2 * E, history.typed_data() + b * H,
                    kernel.typed_data(), bias.typed_data(), dx.typed_data() + b * T * E,
                    dz.typed_data() + b * T * E, dxz->typed_data() + b * T * 2 * E,
                    dkernel->typed_data() + b * W * E, dbias->typed_data() + b * E,
                    dhistory->typed_data() + b * H);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatedSelectiveScanForward, GatedForward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // x
                                  .Arg<F32>()  // dt_raw
                                  .Arg<F32>()  // dt_bias
                                  .Arg<F32>()  // A
                                  .Arg<F32>()  // B
                                  .Arg<F32>()  // C
                                  .Arg<F32>()  // D
                                  .Arg<F32>()  // z
                                  .Arg<F32>()  // h0
                                  .Ret<F32>()  // gated output
                                  .Ret<F32>()  // h_last
                                  .Ret<F32>()  // kept states
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatedSelectiveScanBackward, GatedBackward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // x
                                  .Arg<F32>()  // dt_raw
                                  .Arg<F32>()  // dt_bias
                                  .Arg<F32>()  // A
                                  .Arg<F32>()  // B
                                  .Arg<F32>()  // C
                                  .Arg<F32>()  // D
                                  .Arg<F32>()  // z
                                  .Arg<F32>()  // kept states
                                  .Arg<F32>()  // cotangent of the gated output
                                  .Arg<F32>()  // dh_last
                                  .Ret<F32>()  // dx
                                  .Ret<F32>()  // d_dt_raw
                                  .Ret<F32>()  // dA per batch row
                                  .Ret<F32>()  // dB
                                  .Ret<F32>()  // dC
                                  .Ret<F32>()  // dh0
                                  .Ret<F32>()  // dD per batch row
                                  .Ret<F32>()  // dz
                                  .Ret<F32>()  // d_dt_bias per batch row
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalConvSiluForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // xz
                                  .Arg<F32>()  // kernel
                                  .Arg<F32>()  // bias
                                  .Arg<F32>()  // history
                                  .Ret<F32>()  // x
                                  .Ret<F32>()  // z
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalConvSiluBackward, ConvBackward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // xz
                                  .Arg<F32>()  // kernel
                                  .Arg<F32>()  // bias
                                  .Arg<F32>()  // history
                                  .Arg<F32>()  // dx
                                  .Arg<F32>()  // dz
                                  .Ret<F32>()  // dxz
                                  .Ret<F32>()  // dkernel per batch row
                                  .Ret<F32>()  // dbias per batch row
                                  .Ret<F32>()  // dhistory
);
