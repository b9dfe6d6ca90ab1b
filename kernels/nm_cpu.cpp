// CPU kernels of the nm ops (MVUE / greedy N:M, LUQ, SAWB, SR), loaded with ctypes by kernels/cpu.py.
//
// Why hand-written: inlined into Inductor's generated code, the group math of MVUE was recomputed
// for every output element of every consumer, and every op instance became a kernel of its own to
// compile (about a second of g++ each on 2 cores). Here every group quantity (water-filling caps,
// free sum, prefix bounds) is computed once per group, every tensor quantity (LUQ amax, SAWB
// moments) once per tensor, and the library is compiled once per machine, whatever the model.
//
// The math is the same sequence of fp32 operations as the portable torch implementation
// (kernels/sparsity.py, luq.py, sr.py), so both give the same bits; the build uses -ffp-contract=off
// and no fast-math for that. Uniforms come from u (explicit, any strides, through offset tables) or
// from the counter-based hash of kernels/random.py evaluated on the uniform's index (u == nullptr).
//
// Layouts: x is dense and seen in memory order as [outer, k, inner] (k: the grouped dim, or 1),
// contiguous; out has the same layout. Uniform indices are u_outer[o] + g * u_group + i * u_inner.
//
// Vectorization is explicit (GCC vector extensions, W lanes): each lane is one group (MVUE, greedy)
// or one element (LUQ), so the group math is branch-free vector code whatever M and N are. GCC's
// loop vectorizer does not if-convert bodies this large: left to it, the same scalar code ran MVUE
// 2:4 on 8M elements in 120 ms against 26 ms here (a copy: 24 ms).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

#define NM_INLINE inline __attribute__((always_inline))

using bf16 = uint16_t;
using f16 = _Float16;

inline float to_float(float v) { return v; }
inline float to_float(f16 v) { return static_cast<float>(v); }
inline float to_float(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline f16 from_float<f16>(float v) { return static_cast<f16>(v); }
template <> inline bf16 from_float<bf16>(float v) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  return static_cast<bf16>(std::isnan(v) ? ((bits >> 16) | 0x40) : rounded);
}

template <typename T> inline float max_of() { return std::numeric_limits<float>::max(); }
template <> inline float max_of<f16>() { return 65504.0f; }
template <> inline float max_of<bf16>() { return 3.38953139e38f; }

// ---- lanes ----------------------------------------------------------------------------------

constexpr int W = 16;  // lanes per vector (split into native widths by the compiler)
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

NM_INLINE vf splat(float v) { return vf{} + v; }
NM_INLINE vf sel(vi mask, vf a, vf b) { return mask ? a : b; }
NM_INLINE vf ones(vi mask) { return sel(mask, splat(1.0f), splat(0.0f)); }
NM_INLINE vf vabs(vf v) { return reinterpret_cast<vf>(reinterpret_cast<vi>(v) & 0x7FFFFFFF); }
NM_INLINE vi finite(vf v) { return vabs(v) <= std::numeric_limits<float>::max(); }  // NaN: false
NM_INLINE vf sign_of(vf v) { return ones(v > 0.0f) - ones(v < 0.0f); }
// floor of non-negative values below 2^31 (MVUE's prefix bounds lie in [0, N]): truncation.
NM_INLINE vf floor_nonneg(vf v) { return __builtin_convertvector(__builtin_convertvector(v, vi), vf); }
// Round half to even (torch.round), exact for |v| < 2^22 (default rounding mode, no fast-math);
// larger values come back as they are: the caller clamps to a few levels, so they agree.
NM_INLINE vf round_even(vf v) {
  const vf magic = splat(0x1.8p23f);
  const vf r = (vabs(v) + magic) - magic;
  const vf sign = reinterpret_cast<vf>(reinterpret_cast<vi>(v) & static_cast<int32_t>(0x80000000u));
  return sel(vabs(v) < 0x1p22f, reinterpret_cast<vf>(reinterpret_cast<vi>(r) | reinterpret_cast<vi>(sign)), v);
}
constexpr vu kLanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
NM_INLINE vu lane_index() { return kLanes; }

// Whole vectors of W values, converted to and from fp32 in registers.
typedef uint16_t vh16 __attribute__((vector_size(2 * W)));
typedef _Float16 vf16 __attribute__((vector_size(2 * W)));

NM_INLINE vf load_full(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
NM_INLINE vf load_full(const bf16* p) {
  vh16 h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
}
NM_INLINE vf load_full(const f16* p) {
  vf16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vf);
}
NM_INLINE void store_full(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
NM_INLINE void store_full(bf16* p, vf v) {  // round to nearest even, NaN stays NaN (as from_float)
  const vu bits = reinterpret_cast<vu>(v);
  const vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vu quiet = (bits >> 16) | 0x40u;
  const vh16 h = __builtin_convertvector(v != v ? quiet : rounded, vh16);
  std::memcpy(p, &h, sizeof h);
}
NM_INLINE void store_full(f16* p, vf v) {
  const vf16 h = __builtin_convertvector(v, vf16);
  std::memcpy(p, &h, sizeof h);
}

// ``count`` lanes at p[0], p[stride], ...; the rest are zero.
template <typename T>
NM_INLINE vf load(const T* p, int64_t stride, int count) {
  if (stride == 1 && count == W) return load_full(p);
  vf v = {};
  for (int l = 0; l < count; ++l) v[l] = to_float(p[l * stride]);
  return v;
}

template <typename T>
NM_INLINE void store(T* p, int64_t stride, int count, vf v) {
  if (stride == 1 && count == W) return store_full(p, v);
  for (int l = 0; l < count; ++l) p[l * stride] = from_float<T>(v[l]);
}

// Integer codes (exact integers in fp32, |c| <= 127) as int8: the int8 forms of the quantizers.
typedef int8_t vc8 __attribute__((vector_size(W)));
NM_INLINE void store(int8_t* p, int64_t stride, int count, vf v) {
  const vc8 c = __builtin_convertvector(__builtin_convertvector(v, vi), vc8);
  if (stride == 1 && count == W) return (void)std::memcpy(p, &c, sizeof c);
  for (int l = 0; l < count; ++l) p[l * stride] = c[l];
}

// kernels/random.py: MurmurHash3's finalizer, twice, over the index and the 62-bit seed.
NM_INLINE vu fmix32(vu h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// Uniforms of ``count`` lanes with indices base + l * stride (only the low 32 bits matter).
NM_INLINE vf hash_uniforms(uint64_t seed, int64_t base, int64_t stride) {
  const vu index = static_cast<uint32_t>(base) + lane_index() * static_cast<uint32_t>(stride);
  vu h = fmix32(index ^ static_cast<uint32_t>(seed));
  h = fmix32(h + static_cast<uint32_t>(seed >> 32));
  return __builtin_convertvector(reinterpret_cast<vi>(h >> 8), vf) * 0x1p-24f;
}

NM_INLINE vf uniforms(const float* u, uint64_t seed, int64_t base, int64_t stride, int count) {
  if (u == nullptr) return hash_uniforms(seed, base, stride);
  vf v = {};
  for (int l = 0; l < count; ++l) v[l] = u[base + l * stride];
  return v;
}

// ---- N:M pruning ---------------------------------------------------------------------------

// One group per lane: element j of lane l at x[j * jstride + l * lstride]. MVUE with uniforms uu,
// the same fp32 operations as sparsity.mvue_math. M == 0: any M up to 256, known at run time.
template <int M, typename T>
NM_INLINE void mvue_lanes(const T* x, T* out, int64_t jstride, int64_t lstride, int count, int n, int m_rt, vf uu) {
  constexpr int kMax = M > 0 ? M : 256;
  const int m = M > 0 ? M : m_rt;
  vf xs[kMax], a[kMax];
  vi capped[kMax];
  vf finite_n = {}, nonzero = {};
  for (int j = 0; j < m; ++j) {
    xs[j] = load(x + j * jstride, lstride, count);
    a[j] = vabs(xs[j]);
    capped[j] = vi{};
    finite_n = finite_n + ones(finite(xs[j]));
    nonzero = nonzero + ones(a[j] > 0.0f);
  }
  const vf nf = splat(static_cast<float>(n));
  vf free_sum, free_n;
  auto free_sums = [&]() {
    free_sum = sel(capped[0], splat(0.0f), a[0]);
    vf ncap = ones(capped[0]);
    for (int j = 1; j < m; ++j) {
      free_sum = free_sum + sel(capped[j], splat(0.0f), a[j]);
      ncap = ncap + ones(capped[j]);
    }
    free_n = nf - ncap;
  };
  for (int round = 0; round < n - 1; ++round) {  // capped elements stay capped: N-1 rounds suffice
    free_sums();
    for (int j = 0; j < m; ++j) capped[j] = capped[j] | (a[j] * free_n > free_sum);
  }
  free_sums();
  const vf safe_sum = sel(free_sum > 0.0f, free_sum, splat(1.0f));
  const vf share = free_sum / free_n;
  const vi full = nonzero >= nf;
  const vi pass = finite_n != static_cast<float>(m);  // a NaN/Inf in the group: unchanged
  vf lo = {};
  for (int i = 0; i < m; ++i) {
    vf p = a[i] * free_n / safe_sum;
    p = sel(capped[i], splat(1.0f), sel(p > 1.0f, splat(1.0f), p));
    vf hi = lo + p;
    hi = i == m - 1 ? sel(full, nf, hi) : sel(hi > nf, nf, hi);
    const vf base = floor_nonneg(lo);
    const vf lo_frac = lo - base, hi_frac = hi - base;
    const vi keep = ((uu >= lo_frac) & (uu < hi_frac)) | (uu < hi_frac - 1.0f);
    const vf value = sel(capped[i], xs[i], sign_of(xs[i]) * share);
    store(out + i * jstride, lstride, count, sel(pass, xs[i], sel(keep, value, splat(0.0f))));
    lo = hi;
  }
}

// Greedy: keep the N largest |x| (ties: lower index first), unchanged; non-finite groups pass.
template <int M, typename T>
NM_INLINE void greedy_lanes(const T* x, T* out, int64_t jstride, int64_t lstride, int count, int n, int m_rt, vf) {
  constexpr int kMax = M > 0 ? M : 256;
  const int m = M > 0 ? M : m_rt;
  vf xs[kMax], a[kMax];
  vi all_finite = ~vi{};
  for (int j = 0; j < m; ++j) {
    xs[j] = load(x + j * jstride, lstride, count);
    a[j] = vabs(xs[j]);
    all_finite &= finite(xs[j]);
  }
  for (int i = 0; i < m; ++i) {
    vi ahead = {};  // masks are -1 where true
    for (int j = 0; j < m; ++j) {
      if (j != i) ahead -= j < i ? (a[j] >= a[i]) : (a[j] > a[i]);
    }
    store(out + i * jstride, lstride, count, sel((ahead < n) | ~all_finite, xs[i], splat(0.0f)));
  }
}

struct Uniforms {
  const float* u;  // explicit uniforms, or nullptr: hash of (seed, index)
  uint64_t seed;
  const int64_t* outer;  // per outer index
  int64_t group, inner;  // strides
};

// Groups of M along the middle dim of [outer, k, inner]; the remainder k % M is copied.
template <int M, typename T, bool Mvue>
void prune(const T* x, T* out, int64_t outer, int64_t k, int64_t inner, int n, int m_rt, Uniforms un, int threads) {
  const int m = M > 0 ? M : m_rt;
  const int64_t groups = k / m, rest = k - groups * m;
  // lanes: consecutive groups when groups are contiguous (inner == 1), else the inner dim
  const bool by_group = inner == 1;
  const int64_t lanes = by_group ? groups : inner, rows = by_group ? outer : outer * groups;
  const int64_t blocks = (lanes + W - 1) / W;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < rows * blocks; ++t) {
    const int64_t row = t / blocks, first = (t % blocks) * W;
    const int count = static_cast<int>(lanes - first < W ? lanes - first : W);
    const int64_t o = by_group ? row : row / groups, g = by_group ? first : row % groups;
    const int64_t offset = by_group ? o * k + first * m : (o * k + g * m) * inner + first;
    const int64_t jstride = by_group ? 1 : inner, lstride = by_group ? m : 1;
    if constexpr (Mvue) {
      const int64_t ubase = un.outer[o] + g * un.group + (by_group ? 0 : first * un.inner);
      const vf uu = uniforms(un.u, un.seed, ubase, by_group ? un.group : un.inner, count);
      mvue_lanes<M>(x + offset, out + offset, jstride, lstride, count, n, m_rt, uu);
    } else {
      greedy_lanes<M>(x + offset, out + offset, jstride, lstride, count, n, m_rt, vf{});
    }
  }
  if (rest) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < outer; ++o)
      std::memcpy(out + (o * k + groups * m) * inner, x + (o * k + groups * m) * inner, sizeof(T) * rest * inner);
  }
}

template <typename T, bool Mvue>
void prune_dispatch(const void* x, void* out, int64_t outer, int64_t k, int64_t inner, int n, int m,
                    Uniforms un, int threads) {
  auto xp = static_cast<const T*>(x);
  auto op = static_cast<T*>(out);
  switch (m) {
    case 2: prune<2, T, Mvue>(xp, op, outer, k, inner, n, m, un, threads); break;
    case 4: prune<4, T, Mvue>(xp, op, outer, k, inner, n, m, un, threads); break;
    case 8: prune<8, T, Mvue>(xp, op, outer, k, inner, n, m, un, threads); break;
    default: prune<0, T, Mvue>(xp, op, outer, k, inner, n, m, un, threads); break;
  }
}

// ---- per-tensor statistics -------------------------------------------------------------------

struct Stats {
  float amax = 0.0f, amin = std::numeric_limits<float>::infinity();
  bool nan = false;
  double sum_sq = 0.0, sum_abs = 0.0;
};

// max |x|, NaN if any element is NaN.
template <typename T>
float amax_of(const T* x, int64_t numel, int threads) {
  const int64_t blocks = (numel + W - 1) / W;
  float total = 0.0f;
  bool nan = false;
#pragma omp parallel num_threads(threads)
  {
    vf best = {};
    vi seen_nan = {};
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const int count = static_cast<int>(numel - b * W < W ? numel - b * W : W);
      const vf a = vabs(load(x + b * W, 1, count));
      seen_nan |= a != a;
      best = sel(a > best, a, best);
    }
    float local = 0.0f;
    bool local_nan = false;
    for (int l = 0; l < W; ++l) {
      local = best[l] > local ? best[l] : local;
      local_nan = local_nan || seen_nan[l];
    }
#pragma omp critical
    {
      total = local > total ? local : total;
      nan = nan || local_nan;
    }
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : total;
}

// max |x|, min x and the sums of x² and |x| in double (SAWB's moments), in parallel.
typedef double vd __attribute__((vector_size(8 * W)));

template <typename T>
Stats statistics(const T* x, int64_t numel, int threads) {
  const int64_t blocks = (numel + W - 1) / W;
  Stats total;
#pragma omp parallel num_threads(threads)
  {
    vf best = {}, least = splat(std::numeric_limits<float>::infinity());
    vi seen_nan = {};
    vd sum_sq = {}, sum_abs = {};
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const int count = static_cast<int>(numel - b * W < W ? numel - b * W : W);
      const vf v = load(x + b * W, 1, count);  // padding lanes are 0: neutral for all four
      const vf a = vabs(v);
      seen_nan |= v != v;
      best = sel(a > best, a, best);
      least = count == W ? sel(v < least, v, least) : sel((v < least) & (lane_index() < static_cast<uint32_t>(count)), v, least);
      const vd d = __builtin_convertvector(v, vd), da = __builtin_convertvector(a, vd);
      sum_sq += d * d;
      sum_abs += da;
    }
#pragma omp critical
    {
      for (int l = 0; l < W; ++l) {
        total.nan = total.nan || seen_nan[l];
        total.amax = best[l] > total.amax ? best[l] : total.amax;
        total.amin = least[l] < total.amin ? least[l] : total.amin;
        total.sum_sq += sum_sq[l];
        total.sum_abs += sum_abs[l];
      }
    }
  }
  if (total.nan) total.amax = total.amin = std::numeric_limits<float>::quiet_NaN();
  return total;
}

// ---- LUQ -------------------------------------------------------------------------------------

// The elementwise pass of a stochastic quantizer (LUQ, SR) over [outer, inner] in memory order, W
// elements a step: ``quantize(xf, draw)`` gives the values and their integer codes (Quantized), ``draw(s)``
// the uniforms of sample s (explicit, through the offset tables, or hashed from seeds[s]). O is T (the
// values) or int8_t (the codes: the int8 form, values = codes · the quantizer's scale). All-zero tensors
// stay zero; NaN/Inf anywhere (a non-finite amax) makes every value non-finite (codes 0, the scale NaN/Inf).
struct Quantized {
  vf value, code;
};

// A quantizer's max|x| and scale, one per tensor or one per slice along a GEMM's K (kernels/scales.py):
// element (o, i) of the [outer, inner] view reads slice outer[o] + i·inner (outer null: slice 0).
struct Slices {
  const float* amax;
  const float* scale;
  const int64_t* outer;
  int64_t inner;
  NM_INLINE vf at(const float* p, int64_t o, int64_t first, int count) const {
    const float* base = p + (outer != nullptr ? outer[o] : 0);
    return inner == 0 ? splat(*base) : load(base + first * inner, inner, count);
  }
};

// The fold's multiplier (kernels/ops.py, ``times``): element (o, i) of the [outer, inner] view is quantized as
// x · times[outer[o] + i·inner], the product rounded once in fp32 as torch's x.float() * times is (p null: x).
struct Times {
  const float* p;
  const int64_t* outer;
  int64_t inner;
  NM_INLINE vf apply(vf xf, int64_t o, int64_t first, int count) const {
    if (p == nullptr) return xf;
    const float* base = p + outer[o];
    return xf * (inner == 0 ? splat(*base) : load(base + first * inner, inner, count));
  }
};
constexpr Times kNoTimes{nullptr, nullptr, 0};

// max(m, a) lane by lane, NaN once either is NaN (torch.amax's rule): a NaN ``a`` is taken, a NaN ``m`` kept.
NM_INLINE vf max_nan(vf m, vf a) { return sel((a > m) | (a != a), a, m); }
NM_INLINE float max_nan(float m, float a) { return m != m || a != a ? std::numeric_limits<float>::quiet_NaN() : (a > m ? a : m); }

// The max|x| of every slice, NaN where a slice holds a NaN: one parallel pass over the [outer, inner] view,
// each thread into its own maxima, merged at the end (one slice: amax_of). Per row (s_inner = 0) every outer
// index is one row of one slice; per column (s_inner = 1) a block of lanes is a block of slices.
template <typename T>
std::vector<float> slice_amax(const T* x, int64_t outer, int64_t inner, int64_t slices, const int64_t* s_outer,
                              int64_t s_inner, const Times& times, int threads) {
  if (slices == 1 && times.p == nullptr) return std::vector<float>{amax_of(x, outer * inner, threads)};
  std::vector<float> total(slices, 0.0f);
  const int64_t blocks = (inner + W - 1) / W;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> best(slices, 0.0f);
    auto update = [&](int64_t at, int64_t stride, int count, vf a) {
      store(best.data() + at, stride, count, max_nan(load(best.data() + at, stride, count), a));
    };
#pragma omp for schedule(static) nowait
    for (int64_t o = 0; o < outer; ++o) {
      vf row = {};
      for (int64_t b = 0; b < blocks; ++b) {
        const int count = static_cast<int>(inner - b * W < W ? inner - b * W : W);
        const vf a = vabs(times.apply(load(x + o * inner + b * W, 1, count), o, b * W, count));  // padding: 0
        if (s_inner == 0) row = max_nan(row, a);
        else update(s_outer[o] + b * W * s_inner, s_inner, count, a);
      }
      if (s_inner == 0) {
        float& m = best[s_outer != nullptr ? s_outer[o] : 0];
        for (int l = 0; l < W; ++l) m = max_nan(m, row[l]);
      }
    }
#pragma omp critical
    for (int64_t i = 0; i < slices; i += W) {
      const int count = static_cast<int>(slices - i < W ? slices - i : W);
      store(total.data() + i, 1, count, max_nan(load(total.data() + i, 1, count), load(best.data() + i, 1, count)));
    }
  }
  return total;
}

template <typename T, typename O, typename F>
NM_INLINE void stochastic_pass(const T* x, O* out, int64_t outer, int64_t inner, const Slices& slices,
                               const float* u, const int64_t* seeds, const int64_t* u_outer, int64_t u_sample,
                               int64_t u_inner, const Times& times, int threads, F&& quantize) {
  constexpr bool codes = std::is_same_v<O, int8_t>;
  const int64_t blocks = (inner + W - 1) / W;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < outer * blocks; ++t) {
    const int64_t o = t / blocks, first = (t % blocks) * W;
    const int count = static_cast<int>(inner - first < W ? inner - first : W);
    const vf xf = times.apply(load(x + o * inner + first, 1, count), o, first, count);
    const int64_t ubase = u_outer[o] + first * u_inner;
    auto draw = [&](int s) {
      return uniforms(u ? u + s * u_sample : nullptr, u ? 0 : static_cast<uint64_t>(seeds[s]), ubase, u_inner, count);
    };
    const vf amax = slices.at(slices.amax, o, first, count), scale = slices.at(slices.scale, o, first, count);
    const Quantized qz = quantize(xf, draw, amax, scale);
    vf q = codes ? qz.code : qz.value;
    q = sel(amax > 0.0f, q, codes ? vf{} : xf);  // all zeros
    q = sel(finite(amax), q, codes ? vf{} : xf + amax);  // NaN/Inf anywhere: non-finite everywhere
    store(out + o * inner + first, 1, count, q);
  }
}

// The mean of ``samples`` per-sample sums, as the torch math divides (by a power of two: a multiply, same bits).
struct SampleMean {
  float samples, inverse;
  bool exact;
  explicit SampleMean(int n) : samples(static_cast<float>(n)), inverse(1.0f / n), exact((n & (n - 1)) == 0) {}
  NM_INLINE vf operator()(vf sum) const { return exact ? sum * inverse : sum / samples; }
};

// The math of luq.luq_math, with floor(log2 r) read from r's exponent bits (exact, where torch's log2
// needs a correction).
template <typename T, typename O>
void luq(const T* x, O* out, float* scale_out, int64_t outer, int64_t inner, int top, int samples, const float* u,
         const int64_t* seeds, const int64_t* u_outer, int64_t u_sample, int64_t u_inner, int64_t slices,
         const int64_t* s_outer, int64_t s_inner, const Times& times, int threads) {
  const std::vector<float> amax = slice_amax(x, outer, inner, slices, s_outer, s_inner, times, threads);
  const float scale_top = std::ldexp(1.0f, top), inv_top = std::ldexp(1.0f, -top);
  // codes sign·2^k (or 0, 1): values = codes · amax·2^-top, exact wherever that scale is normal
  if (scale_out != nullptr)
    for (size_t i = 0; i < amax.size(); ++i)
      scale_out[i] = amax[i] > 0.0f ? amax[i] * inv_top : (amax[i] == 0.0f ? 1.0f : amax[i]);
  const SampleMean mean(samples);
  const Slices sl{amax.data(), amax.data(), s_outer, s_inner};
  stochastic_pass(x, out, outer, inner, sl, u, seeds, u_outer, u_sample, u_inner, times, threads,
                  [&](vf xf, auto draw, vf amax, vf) {
    const vf r = vabs(xf) / amax * scale_top;  // |x| / α, in [0, 2^top]
    vi k = ((reinterpret_cast<vi>(r) >> 23) & 0xFF) - 127;  // floor(log2 r) for normal r
    k = k < 0 ? 0 : (k > top ? top : k);
    const vf low = reinterpret_cast<vf>((k + 127) << 23);
    // 1 / low, exactly (a power of two, 2^-127 being the one subnormal): dividing by a power of two
    // and multiplying by its inverse round alike, so p_up has torch's bits without a division
    const vf inv_low = sel(k == 127, splat(0x1p-127f), reinterpret_cast<vf>((127 - k) << 23));
    const vi under = r < 1.0f;
    const vf base = sel(under, splat(0.0f), low), width = sel(under, splat(1.0f), low);
    const vf p_up = (r - base) * sel(under, splat(1.0f), inv_low);
    vf ups = {};
    for (int s = 0; s < samples; ++s) ups = ups + ones(draw(s) < p_up);
    const vf units = base + width * mean(ups);
    return Quantized{sign_of(xf) * (units * inv_top) * amax, sign_of(xf) * units};
  });
}


// ---- SR (uniform stochastic rounding) --------------------------------------------------------

// Precision p and smallest-subnormal exponent s of the element type (sr.py: scale_bits,
// subnormal_exponent).
template <typename T> constexpr int precision_of() { return 24; }
template <> constexpr int precision_of<bf16>() { return 8; }
template <> constexpr int precision_of<f16>() { return 11; }
template <typename T> constexpr int subnormal_exponent_of() { return -149; }
template <> constexpr int subnormal_exponent_of<bf16>() { return -133; }
template <> constexpr int subnormal_exponent_of<f16>() { return -24; }

// SR's and absmax's int parameter: bits, plus this flag for power-of-two scales (sr.kernel_bits).
constexpr int kPow2Scale = 1 << 8;

// Whether ``bits`` carries the power-of-two flag; clears it.
inline bool take_pow2_flag(int& bits) {
  const bool pow2 = (bits & kPow2Scale) != 0;
  bits &= ~kPow2Scale;
  return pow2;
}

// sr.sr_scale: amax / L rounded up to keep = max(p - bits, 1) significant bits (1 with pow2: a power of
// two) and to a multiple of 2^s, capped at fp32's largest such value; in double, every step exact (sr.py).
template <typename T>
float sr_scale(float amax, int bits, bool pow2) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return amax;  // 0; NaN/Inf: the output is x + amax
  const int keep = !pow2 && precision_of<T>() - bits > 1 ? precision_of<T>() - bits : 1;  // at least one bit
  const double target = static_cast<double>(amax) / ((1 << (bits - 1)) - 1);
  int e = 0;
  std::frexp(target, &e);
  const int shift = e - keep > subnormal_exponent_of<T>() ? e - keep : subnormal_exponent_of<T>();
  const double scale = std::ldexp(std::ceil(std::ldexp(target, -shift)), shift);
  const double largest = std::ldexp(std::ldexp(1.0, keep) - 1.0, 128 - keep);
  return static_cast<float>(scale < largest ? scale : largest);
}

// The math of sr.sr_math: v = min(|x| / scale, L), lo = floor(v), codes summed over samples as
// lo + [u < v - lo].
template <typename T, typename O>
void sr(const T* x, O* out, float* scale_out, int64_t outer, int64_t inner, int bits, int samples, const float* u,
        const int64_t* seeds, const int64_t* u_outer, int64_t u_sample, int64_t u_inner, int64_t slices,
        const int64_t* s_outer, int64_t s_inner, const Times& times, int threads) {
  const bool pow2 = take_pow2_flag(bits);
  const std::vector<float> amax = slice_amax(x, outer, inner, slices, s_outer, s_inner, times, threads);
  std::vector<float> scale(amax.size());
  for (size_t i = 0; i < amax.size(); ++i) {
    // x · times is an fp32 tensor: its scale follows fp32's rules, as sr_math's on x.float() * times does
    scale[i] = times.p != nullptr ? sr_scale<float>(amax[i], bits, pow2) : sr_scale<T>(amax[i], bits, pow2);
    if (scale_out != nullptr) scale_out[i] = amax[i] == 0.0f ? 1.0f : scale[i];  // codes · scale: the values
  }
  const float levels = static_cast<float>((1 << (bits - 1)) - 1);
  const float big = max_of<T>();
  const SampleMean mean(samples);
  const Slices sl{amax.data(), scale.data(), s_outer, s_inner};
  stochastic_pass(x, out, outer, inner, sl, u, seeds, u_outer, u_sample, u_inner, times, threads,
                  [&](vf xf, auto draw, vf, vf scale) {
    const vf safe = sel(scale > 0.0f, scale, splat(1.0f));
    vf v = vabs(xf) / safe;
    v = sel(v > levels, splat(levels), v);  // a guard: v <= L already (NaN stays NaN)
    const vf lo = floor_nonneg(v);  // v in [0, L]: truncation is floor
    const vf frac = v - lo;
    vf codes = {};
    for (int s = 0; s < samples; ++s) {
      const vf c = lo + ones(draw(s) < frac);
      codes = s == 0 ? c : codes + c;
    }
    const vf q = sign_of(xf) * (mean(codes) * scale);
    // saturate at x's dtype range
    return Quantized{sel(q < -big, splat(-big), sel(q > big, splat(big), q)), sign_of(xf) * mean(codes)};
  });
}

// ---- SAWB ------------------------------------------------------------------------------------

// Round to nearest (half to even, like torch.round) onto {k · scale : lowest <= k <= highest} (SAWB, absmax):
// the values, saturated at T's range, or with O = int8_t the levels k. scale <= 0 (an all-zero x): the values
// stay x, codes 0; a non-finite scale (NaN/Inf in x): every value non-finite (x + scale), codes 0.
// The scales per tensor or per slice (``Slices``; their amax unused) over the [outer, inner] view.
template <typename T, typename O>
void round_to_grid(const T* x, O* out, int64_t outer, int64_t inner, const Slices& slices, float lowest,
                   float highest, int threads) {
  constexpr bool codes = std::is_same_v<O, int8_t>;
  const float top = max_of<T>();
  const int64_t blocks = (inner + W - 1) / W;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < outer * blocks; ++t) {
    const int64_t o = t / blocks, first = (t % blocks) * W;
    const int count = static_cast<int>(inner - first < W ? inner - first : W);
    const vf xf = load(x + o * inner + first, 1, count);
    const vf scale = slices.at(slices.scale, o, first, count);
    const vi positive = scale > 0.0f, is_finite = finite(scale);
    const vf safe = sel(positive, scale, splat(1.0f));
    vf level = round_even(xf / safe);
    level = sel(level < lowest, splat(lowest), sel(level > highest, splat(highest), level));
    vf q = level * safe;
    q = sel(q < -top, splat(-top), sel(q > top, splat(top), q));  // saturate at x's dtype range
    q = sel(positive, q, xf);  // all zeros
    q = sel(is_finite, q, xf + scale);  // NaN/Inf anywhere: non-finite everywhere
    store(out + o * inner + first, 1, count, codes ? sel(positive & is_finite, level, vf{}) : q);
  }
}

// Round-to-nearest on the SAWB grid (see sawb.py); moments in double, so no x² overflows. O: T for the
// values, int8_t for their integer codes (the int8 form: values = codes · scale).
template <typename T, typename O>
void sawb(const T* x, O* out, int64_t numel, double c1, double c2, int bits, int keep, float* scale_out,
          int threads) {
  const Stats st = statistics(x, numel, threads);
  const double half = std::ldexp(1.0, bits - 1);
  float scale = st.amax;  // NaN / Inf: propagated below
  bool is_unsigned = false;
  if (std::isfinite(st.amax)) {
    double clip = c1 * std::sqrt(st.sum_sq / numel) - c2 * (st.sum_abs / numel);
    if (!(clip > 0.0)) clip = st.amax;
    is_unsigned = st.amin >= 0.0f;
    scale = static_cast<float>(clip / (is_unsigned ? 2.0 * half - 1.0 : half));
    // keep significant bits only: every level·scale is then exact in T (see sawb.py)
    int e = 0;
    const float m = std::frexp(scale, &e);
    scale = std::ldexp(std::nearbyint(std::ldexp(m, keep)), e - keep);
  }
  if (scale_out != nullptr) *scale_out = scale;
  const float lowest = is_unsigned ? 0.0f : static_cast<float>(-half);
  const float highest = static_cast<float>(is_unsigned ? 2.0 * half - 1.0 : half - 1.0);
  round_to_grid(x, out, 1, numel, Slices{nullptr, &scale, nullptr, 0}, lowest, highest, threads);
}

// ---- absmax: round-to-nearest on SR's grid (the INT8 forward) --------------------------------------

// absmax.absmax_math: level = round(x / scale) clamped to [-L, L] (a guard: the scale is rounded up),
// q = level · scale, exact in T; the scale is SR's (sr_scale). Deterministic: no uniforms.
template <typename T, typename O>
void absmax(const T* x, O* out, int64_t outer, int64_t inner, int bits, float* scale_out, int64_t slices,
            const int64_t* s_outer, int64_t s_inner, int threads) {
  const bool pow2 = take_pow2_flag(bits);
  const std::vector<float> amax = slice_amax(x, outer, inner, slices, s_outer, s_inner, kNoTimes, threads);
  std::vector<float> scale(amax.size());
  for (size_t i = 0; i < amax.size(); ++i) {
    scale[i] = sr_scale<T>(amax[i], bits, pow2);  // 0 for amax 0; amax itself where it is not finite
    if (scale_out != nullptr) scale_out[i] = amax[i] == 0.0f ? 1.0f : scale[i];
  }
  const float levels = static_cast<float>((1 << (bits - 1)) - 1);
  round_to_grid(x, out, outer, inner, Slices{nullptr, scale.data(), s_outer, s_inner}, -levels, levels, threads);
}

// ---- the int8 GEMM's scaling, for eager calls of nm.int8_mm (in graphs Inductor fuses int8.scaled_sums) -----

typedef int64_t vl __attribute__((vector_size(8 * W)));

// fp32 rounded to odd from double: truncated toward zero, last bit set where inexact (int8.round_via_odd).
NM_INLINE vf to_float_odd(vd d) {
  const vf f = __builtin_convertvector(d, vf);
  const vd back = __builtin_convertvector(f, vd);
  const vl magnitude = vl{} + 0x7FFFFFFFFFFFFFFFll;
  const vi inexact = __builtin_convertvector(back != d, vi);
  const vi away = __builtin_convertvector((reinterpret_cast<vl>(back) & magnitude) > (reinterpret_cast<vl>(d) & magnitude), vi);
  vi bits = reinterpret_cast<vi>(f) + away;  // away is -1 where |f| > |d|: one ulp toward zero
  bits = inexact ? (bits | 1) : bits;
  return reinterpret_cast<vf>(bits);
}

// out = T(double(c) · scale + bias) (int8.scaled_sums): c the exact int32 sums (contiguous), scale =
// scale_a · scale_b (exact in double), bias (optional, T) at bias[r·bias_row + j·bias_col]; one pass.
template <typename T>
void int8_scale(const int32_t* c, T* out, int64_t rows, int64_t cols, double scale, const T* bias,
                int64_t bias_row, int64_t bias_col, int threads) {
  const int64_t blocks = (cols + W - 1) / W;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < rows * blocks; ++t) {
    const int64_t r = t / blocks, first = (t % blocks) * W;
    const int count = static_cast<int>(cols - first < W ? cols - first : W);
    vi sums = {};
    if (count == W) std::memcpy(&sums, c + r * cols + first, sizeof sums);
    else for (int l = 0; l < count; ++l) sums[l] = c[r * cols + first + l];
    vd d = __builtin_convertvector(sums, vd) * scale;
    if (bias != nullptr) d += __builtin_convertvector(load(bias + r * bias_row + first * bias_col, bias_col, count), vd);
    if constexpr (std::is_same_v<T, float>) store(out + r * cols + first, 1, count, __builtin_convertvector(d, vf));
    else store(out + r * cols + first, 1, count, to_float_odd(d));
  }
}

// One switch from the C entry points' dtype code (0 float32, 1 bfloat16, 2 float16) to the element
// type: f gets a null pointer of that type.
template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(static_cast<float*>(nullptr)); break;
    case 1: f(static_cast<bf16*>(nullptr)); break;
    default: f(static_cast<f16*>(nullptr)); break;
  }
}

}  // namespace

// ---- C entry points ---------------------------------------------------------------------------

#define NM_ELEMENT(tag) std::remove_pointer_t<decltype(tag)>

extern "C" {

void nm_mvue(int dtype, const void* x, void* out, int64_t outer, int64_t k, int64_t inner, int n, int m,
             const float* u, int64_t seed, const int64_t* u_outer, int64_t u_group, int64_t u_inner,
             int threads) {
  const Uniforms un{u, static_cast<uint64_t>(seed), u_outer, u_group, u_inner};
  with_dtype(dtype, [&](auto tag) { prune_dispatch<NM_ELEMENT(tag), true>(x, out, outer, k, inner, n, m, un, threads); });
}

void nm_greedy(int dtype, const void* x, void* out, int64_t outer, int64_t k, int64_t inner, int n, int m,
               int threads) {
  const Uniforms none{nullptr, 0, nullptr, 0, 0};
  with_dtype(dtype, [&](auto tag) { prune_dispatch<NM_ELEMENT(tag), false>(x, out, outer, k, inner, n, m, none, threads); });
}

// The elementwise stochastic quantizers share one entry-point signature (kernels/cpu.py): nm_<name>
// with the kernel's int parameter (LUQ: its top exponent, SR: its bits). With ``codes`` they write the
// int8 codes there (and the scale(s) to scale_out) instead of the values to ``out``. One scale per tensor
// (slices = 1, s_outer null), or one per slice: element (o, i) in slice s_outer[o] + i·s_inner. With
// ``times`` (codes only) element (o, i) is quantized as x · times[t_outer[o] + i·t_inner] (struct Times).
#define NM_STOCHASTIC_ENTRY(name)                                                                          \
  void nm_##name(int dtype, const void* x, void* out, int8_t* codes, float* scale_out, int64_t outer,        \
                 int64_t inner, int param, int samples, const float* u, const int64_t* seeds,                \
                 const int64_t* u_outer, int64_t u_sample, int64_t u_inner, int64_t slices,                  \
                 const int64_t* s_outer, int64_t s_inner, const float* times, const int64_t* t_outer,        \
                 int64_t t_inner, int threads) {                                                             \
    const Times by{times, t_outer, t_inner};                                                                 \
    with_dtype(dtype, [&](auto tag) {                                                                        \
      using T = NM_ELEMENT(tag);                                                                             \
      if (codes != nullptr)                                                                                  \
        name(static_cast<const T*>(x), codes, scale_out, outer, inner, param, samples, u, seeds, u_outer,    \
             u_sample, u_inner, slices, s_outer, s_inner, by, threads);                                      \
      else                                                                                                   \
        name(static_cast<const T*>(x), static_cast<T*>(out), scale_out, outer, inner, param, samples, u,     \
             seeds, u_outer, u_sample, u_inner, slices, s_outer, s_inner, kNoTimes, threads);                \
    });                                                                                                      \
  }

NM_STOCHASTIC_ENTRY(luq)
NM_STOCHASTIC_ENTRY(sr)

// SAWB and absmax: the values to ``out``, or with ``codes`` the int8 codes; the scale to scale_out.
void nm_sawb(int dtype, const void* x, void* out, int8_t* codes, int64_t numel, double c1, double c2, int bits,
             int keep, float* scale_out, int threads) {
  with_dtype(dtype, [&](auto tag) {
    using T = NM_ELEMENT(tag);
    if (codes != nullptr) sawb(static_cast<const T*>(x), codes, numel, c1, c2, bits, keep, scale_out, threads);
    else sawb(static_cast<const T*>(x), static_cast<T*>(out), numel, c1, c2, bits, keep, scale_out, threads);
  });
}

void nm_absmax(int dtype, const void* x, void* out, int8_t* codes, int64_t outer, int64_t inner, int bits,
               float* scale_out, int64_t slices, const int64_t* s_outer, int64_t s_inner, int threads) {
  with_dtype(dtype, [&](auto tag) {
    using T = NM_ELEMENT(tag);
    if (codes != nullptr)
      absmax(static_cast<const T*>(x), codes, outer, inner, bits, scale_out, slices, s_outer, s_inner, threads);
    else
      absmax(static_cast<const T*>(x), static_cast<T*>(out), outer, inner, bits, scale_out, slices, s_outer, s_inner,
             threads);
  });
}

void nm_int8_scale(int dtype, const int32_t* c, void* out, int64_t rows, int64_t cols, double scale,
                   const void* bias, int64_t bias_row, int64_t bias_col, int threads) {
  with_dtype(dtype, [&](auto tag) {
    using T = NM_ELEMENT(tag);
    int8_scale(c, static_cast<T*>(out), rows, cols, scale, static_cast<const T*>(bias), bias_row, bias_col, threads);
  });
}

}  // extern "C"
