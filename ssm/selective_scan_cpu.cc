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
#include <initializer_list>
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

// 2^v in float32 for v <= 127: v = k + r with integer k and |r| <= 1/2, then 2^r = exp(r ln 2)
// from its Taylor polynomial of degree 7 (truncation error below 6e-9) times 2^k built in the
// exponent bits. Inputs below -126 give 0, where float32 would turn subnormal. The decays are
// exp(dt * A) = 2^(dt * A log2(e)), so the kernels scale A by log2(e) once.
inline Vec Exp2(Vec v) {
  const Vec lowest = Splat(-126.f), highest = Splat(127.f);
  Vec clamped = v < lowest ? lowest : v;
  clamped = clamped > highest ? highest : clamped;
  // Adding 1.5 * 2^23 rounds a float of magnitude below 2^22 to an integer.
  const float round_to_integer = 12582912.0f;
  const Vec k = (clamped + round_to_integer) - round_to_integer;
  const Vec r = clamped - k;
  Vec p = Splat(1.525273380405984e-05f);  // ln(2)^7 / 7!
  p = p * r + 1.540353039338161e-04f;
  p = p * r + 1.333355814642844e-03f;
  p = p * r + 9.618129107628477e-03f;
  p = p * r + 5.550410866482158e-02f;
  p = p * r + 2.402265069591007e-01f;
  p = p * r + 6.931471805599453e-01f;
  p = p * r + 1.f;
  const IntVec exponent_bits = (__builtin_convertvector(k, IntVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent_bits, sizeof scale);
  return v < lowest ? Splat(0.f) : p * scale;
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
  for (int i = 0; i < 8; ++i)
    w[i] = SHUFFLE(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                   31);
  for (int i = 0; i < 4; ++i)
    u[i] = SHUFFLE(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           SHUFFLE(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30,
                   31);
  for (int i = 0; i < 2; ++i)
    q[i] = SHUFFLE(u[2 * i], u[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           SHUFFLE(u[2 * i], u[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
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

struct Sizes {
  int64_t batch, length, channels, states, intervals;
};

// Asks the cache for the rows [start, end) of the block of channels kPrefetchBlocks blocks after
// e0 in each (t, e) array: the blocks of an interval read 64 bytes of each row, 2 KiB apart at
// e = 512, a pattern the hardware prefetcher does not follow. Measured on a 2-core x86 CPU inside
// a training step: ...
constexpr int64_t kPrefetchBlocks = 2;

void PrefetchBlockAhead(const Sizes& s, int64_t start, int64_t end, int64_t e0,
                        std::initializer_list<const float*> arrays) {
  const int64_t ahead = e0 + kPrefetchBlocks * kLanes;
  if (ahead >= s.channels) return;
  for (const float* array : arrays)
    for (int64_t t = start; t < end; ++t) __builtin_prefetch(array + t * s.channels + ahead);
}

// One interval of steps [start, end) of one batch row, channels e0 .. e0 + kLanes - 1, forward.
// h_start and h_end are (n, e) states; pointers start at the batch row.
template <int kN>
void ForwardInterval(const Sizes& s, int64_t start, int64_t end, int64_t e0, const float* x,
                     const float* dt, const float* A2, const float* B, const float* C,
                     const float* h_start, float* h_end, float* y) {
  const int64_t E = s.channels;
  Vec h[kN], A2_n[kN];
  for (int n = 0; n < kN; ++n) {
    A2_n[n] = Load(A2 + n * E + e0);
    h[n] = Load(h_start + n * E + e0);
  }
  PrefetchBlockAhead(s, start, end, e0, {x, dt});
  for (int64_t t = start; t < end; ++t) {
    const Vec dt_t = Load(dt + t * E + e0);
    const Vec dt_x = dt_t * Load(x + t * E + e0);
    const float* B_t = B + t * kN;
    const float* C_t = C + t * kN;
    Vec y_t = Splat(0.f);
#pragma GCC unroll 64
    for (int n = 0; n < kN; ++n) {
      h[n] = Exp2(dt_t * A2_n[n]) * h[n] + dt_x * B_t[n];
      y_t += h[n] * C_t[n];
    }
    Store(y + t * E + e0, y_t);
  }
  for (int n = 0; n < kN; ++n) Store(h_end + n * E + e0, h[n]);
}

// The same interval and channels, backward. dh (n, e) holds the cotangent of the state after
// the interval and leaves with the one before it; dA2 (n, e) accumulates the gradient of A;
// dB and dC (t, n) accumulate over channel blocks.
template <int kN>
void BackwardInterval(const Sizes& s, int64_t start, int64_t end, int64_t e0, const float* x,
                      const float* dt, const float* A2, const float* B, const float* C,
                      const float* h_start, const float* dy, float* dh_ne, float* dA_ne,
                      float* dx, float* d_dt, float* dB, float* dC, Vec (*states)[kN],
                      Vec (*decays)[kN]) {
  // states[i] is the state before step start + i, states[end - start] the one after the
  // interval; decays[i] is the decay of step start + i. Both come from the caller, to keep them
  // off the stack.
  const int64_t E = s.channels;
  Vec A2_n[kN], dh[kN], dA_n[kN];
  for (int n = 0; n < kN; ++n) {
    A2_n[n] = Load(A2 + n * E + e0);
    dh[n] = Load(dh_ne + n * E + e0);
    dA_n[n] = Load(dA_ne + n * E + e0);
    states[0][n] = Load(h_start + n * E + e0);
  }
  PrefetchBlockAhead(s, start, end, e0, {x, dt, dy});
  PrefetchBlockAhead(s, 0, kN, e0, {h_start});
  for (int64_t t = start; t < end; ++t) {
    const int64_t i = t - start;
    const Vec dt_t = Load(dt + t * E + e0);
    const Vec dt_x = dt_t * Load(x + t * E + e0);
#pragma GCC unroll 64
    for (int n = 0; n < kN; ++n) {
      decays[i][n] = Exp2(dt_t * A2_n[n]);
      states[i + 1][n] = decays[i][n] * states[i][n] + dt_x * B[t * kN + n];
    }
  }
  for (int64_t t = end - 1; t >= start; --t) {
    const int64_t i = t - start;
    const Vec dt_t = Load(dt + t * E + e0);
    const Vec x_t = Load(x + t * E + e0);
    const Vec dt_x = dt_t * x_t;
    const Vec dy_t = Load(dy + t * E + e0);
    Vec d_dt_x = Splat(0.f), d_dt_A2 = Splat(0.f), dB_n[kN], dC_n[kN];
#pragma GCC unroll 64
    for (int n = 0; n < kN; ++n) {
      // Cotangent of h_t: from y_t, and from h_{t+1} through its decay (already in dh).
      const Vec g = dh[n] + dy_t * C[t * kN + n];
      dC_n[n] = states[i + 1][n] * dy_t;
      dB_n[n] = g * dt_x;
      d_dt_x += g * B[t * kN + n];
      // Cotangent of dt * A, through decay = exp(dt * A).
      const Vec d_dt_A = g * states[i][n] * decays[i][n];
      d_dt_A2 += d_dt_A * A2_n[n];
      dA_n[n] += d_dt_A * dt_t;
      dh[n] = decays[i][n] * g;
    }
    AddSumsOfLanes<kN>(dB_n, dB + t * kN);
    AddSumsOfLanes<kN>(dC_n, dC + t * kN);
    Store(dx + t * E + e0, d_dt_x * dt_t);
    // d_dt_A2 sums d_dt_A * A log2(e); times ln 2 it is the sum of d_dt_A * A.
    Store(d_dt + t * E + e0, d_dt_x * x_t + d_dt_A2 * kLn2);
  }
  for (int n = 0; n < kN; ++n) {
    Store(dh_ne + n * E + e0, dh[n]);
    Store(dA_ne + n * E + e0, dA_n[n]);
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

// Both passes go interval by interval and, within one, channel block by channel block, so that
// the rows of the interval stay in cache while all blocks read them.
template <int kN>
struct RunForward {
  static void Run(const Sizes& s, const float* x, const float* dt, const float* A,
                  const float* B, const float* C, const float* h0, float* y, float* h_last,
                  float* kept) {
    const int64_t T = s.length, E = s.channels, K = s.intervals;
    std::vector<float> A2(kN * E), h_end(kN * E);
    Transpose(A, E, kN, kLog2E, A2.data());
    for (int64_t b = 0; b < s.batch; ++b) {
      float* kept_b = kept + b * K * kN * E;
      Transpose(h0 + b * E * kN, E, kN, 1.f, kept_b);
      for (int64_t k = 0; k < K; ++k) {
        float* next = k + 1 < K ? kept_b + (k + 1) * kN * E : h_end.data();
        for (int64_t e0 = 0; e0 < E; e0 += kLanes)
          ForwardInterval<kN>(s, k * kInterval, std::min(T, (k + 1) * kInterval), e0,
                              x + b * T * E, dt + b * T * E, A2.data(), B + b * T * kN,
                              C + b * T * kN, kept_b + k * kN * E, next, y + b * T * E);
      }
      Transpose(h_end.data(), kN, E, 1.f, h_last + b * E * kN);
    }
  }
};

template <int kN>
struct RunBackward {
  static void Run(const Sizes& s, const float* x, const float* dt, const float* A,
                  const float* B, const float* C, const float* kept, const float* dy,
                  const float* dh_last, float* dx, float* d_dt, float* dA, float* dB, float* dC,
                  float* dh0) {
    const int64_t T = s.length, E = s.channels, K = s.intervals;
    std::vector<float> A2(kN * E), dh(kN * E), dA_ne(kN * E);
    Transpose(A, E, kN, kLog2E, A2.data());
    std::vector<Vec> states((kInterval + 1) * kN), decays(kInterval * kN);
    auto* states_by_step = reinterpret_cast<Vec(*)[kN]>(states.data());
    auto* decays_by_step = reinterpret_cast<Vec(*)[kN]>(decays.data());
    std::fill(dB, dB + s.batch * T * kN, 0.f);
    std::fill(dC, dC + s.batch * T * kN, 0.f);
    for (int64_t b = 0; b < s.batch; ++b) {
      Transpose(dh_last + b * E * kN, E, kN, 1.f, dh.data());
      std::fill(dA_ne.begin(), dA_ne.end(), 0.f);
      for (int64_t k = K - 1; k >= 0; --k)
        for (int64_t e0 = 0; e0 < E; e0 += kLanes)
          BackwardInterval<kN>(s, k * kInterval, std::min(T, (k + 1) * kInterval), e0,
                               x + b * T * E, dt + b * T * E, A2.data(), B + b * T * kN,
                               C + b * T * kN, kept + (b * K + k) * kN * E, dy + b * T * E,
                               dh.data(), dA_ne.data(), dx + b * T * E, d_dt + b * T * E,
                               dB + b * T * kN, dC + b * T * kN, states_by_step, decays_by_step);
      Transpose(dh.data(), kN, E, 1.f, dh0 + b * E * kN);
      Transpose(dA_ne.data(), kN, E, 1.f, dA + b * E * kN);
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
