// Metal Shading Language, emulated in C++17 on the CPU (see README.md in this folder).
//
// Part 1: the types and functions a kernel body names (uint3, half, bfloat16_t,
// metal::exp, simd_sum, atomics, ...). Part 2: the execution model (namespace
// mlxemu): one threadgroup at a time, its threads as cooperative fibers that
// switch only at threadgroup_barrier and SIMD-group functions, threadgroup
// memory in a per-group arena, 32-lane SIMD groups that exchange values through
// a per-group buffer. The driver (__init__.py) wraps the source MLX generates in
// `namespace mlxemu_k { ... }` after this header; the address-space macros at
// the end make `device`, `constant`, `threadgroup` and `thread` vanish.
#pragma once
#include <cfloat>
#include <cstdarg>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <sys/mman.h>
#include <ctime>
#include <ucontext.h>
#include <unistd.h>

typedef unsigned int uint;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned long ulong;
typedef _Float16 half;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wliteral-suffix"
constexpr half operator"" h(long double v) { return (half)v; }  // Metal's 1.0h
constexpr half operator"" h(unsigned long long v) { return (half)v; }
#pragma GCC diagnostic pop

namespace metal {

// bfloat16: stored as bits, computes in float (round-to-nearest-even on store).
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40) : uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  template <class U> bfloat16_t& operator+=(U v) { return *this = bfloat16_t(float(*this) + float(v)); }
  template <class U> bfloat16_t& operator-=(U v) { return *this = bfloat16_t(float(*this) - float(v)); }
  template <class U> bfloat16_t& operator*=(U v) { return *this = bfloat16_t(float(*this) * float(v)); }
  template <class U> bfloat16_t& operator/=(U v) { return *this = bfloat16_t(float(*this) / float(v)); }
};
typedef bfloat16_t bfloat;
typedef half float16_t;

// Vectors: .x .y .z .w and [i]; Metal's sizes (a 3-vector takes 4 slots). No swizzles.
template <class T, int N> struct vec_storage;
template <class T> struct alignas(2 * sizeof(T)) vec_storage<T, 2> { T x, y; };
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 3> { T x, y, z; };
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 4> { T x, y, z, w; };
#define MLXEMU_VOP(op)                                                                           \
  friend vec operator op(vec a, const vec& b) { for (int i = 0; i < N; i++) a[i] = a[i] op b[i]; return a; } \
  vec& operator op##=(const vec& b) { return *this = *this op b; }
template <class T, int N> struct vec : vec_storage<T, N> {
  vec() = default;
  vec(T s) { for (int i = 0; i < N; i++) (*this)[i] = s; }
  template <class... A, class = std::enable_if_t<sizeof...(A) == N>>
  vec(A... a) { T t[N] = {T(a)...}; for (int i = 0; i < N; i++) (*this)[i] = t[i]; }
  template <class U> explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; i++) (*this)[i] = T(o[i]); }
  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }
  friend vec operator-(vec a) { for (int i = 0; i < N; i++) a[i] = -a[i]; return a; }
  MLXEMU_VOP(+) MLXEMU_VOP(-) MLXEMU_VOP(*) MLXEMU_VOP(/) MLXEMU_VOP(%)
  MLXEMU_VOP(&) MLXEMU_VOP(|) MLXEMU_VOP(^) MLXEMU_VOP(<<) MLXEMU_VOP(>>)
};
#define MLXEMU_VEC(T, name) typedef vec<T, 2> name##2; typedef vec<T, 3> name##3; typedef vec<T, 4> name##4;
MLXEMU_VEC(float, float) MLXEMU_VEC(half, half) MLXEMU_VEC(bfloat16_t, bfloat) MLXEMU_VEC(int, int)
MLXEMU_VEC(uint, uint) MLXEMU_VEC(short, short) MLXEMU_VEC(ushort, ushort) MLXEMU_VEC(char, char)
MLXEMU_VEC(uchar, uchar) MLXEMU_VEC(bool, bool) MLXEMU_VEC(long, long) MLXEMU_VEC(ulong, ulong)

template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool has_infinity = true;
  static half max() { return half(65504.0f); }
  static half lowest() { return half(-65504.0f); }
  static half min() { return half(6.103515625e-05f); }
  static half epsilon() { return half(0.0009765625f); }
  static half infinity() { return half(INFINITY); }
  static half quiet_NaN() { return half(NAN); }
};
template <> struct numeric_limits<bfloat16_t> {
  static constexpr bool has_infinity = true;
  static bfloat16_t bits(uint16_t b) { bfloat16_t r; r.bits = b; return r; }
  static bfloat16_t max() { return bits(0x7f7f); }
  static bfloat16_t lowest() { return bits(0xff7f); }
  static bfloat16_t min() { return bits(0x0080); }
  static bfloat16_t epsilon() { return bits(0x3c00); }
  static bfloat16_t infinity() { return bits(0x7f80); }
  static bfloat16_t quiet_NaN() { return bits(0x7fc0); }
};

// Math: float, half, bfloat16 and vectors of them; computed in float with libm.
inline int abs(int x) { return x < 0 ? -x : x; }
inline long abs(long x) { return x < 0 ? -x : x; }
inline int8_t abs(int8_t x) { return x < 0 ? -x : x; }
inline short abs(short x) { return x < 0 ? -x : x; }
template <class T> T max(T a, T b) { return a < b ? b : a; }
template <class T> T min(T a, T b) { return b < a ? b : a; }
#define MLXEMU_MATH1(name, expr)                                                              \
  inline float name(float x) { return expr; }                                                 \
  inline half name(half h) { float x = h; return half(expr); }                                \
  inline bfloat16_t name(bfloat16_t b) { float x = b; return bfloat16_t(expr); }              \
  template <class T, int N> vec<T, N> name(vec<T, N> v) { for (int i = 0; i < N; i++) v[i] = name(v[i]); return v; }
MLXEMU_MATH1(exp, std::exp(x)) MLXEMU_MATH1(exp2, std::exp2(x)) MLXEMU_MATH1(exp10, std::pow(10.0f, x))
MLXEMU_MATH1(log, std::log(x)) MLXEMU_MATH1(log2, std::log2(x)) MLXEMU_MATH1(log10, std::log10(x))
MLXEMU_MATH1(log1p, std::log1p(x)) MLXEMU_MATH1(sqrt, std::sqrt(x)) MLXEMU_MATH1(rsqrt, 1.0f / std::sqrt(x))
MLXEMU_MATH1(sin, std::sin(x)) MLXEMU_MATH1(cos, std::cos(x)) MLXEMU_MATH1(tan, std::tan(x))
MLXEMU_MATH1(asin, std::asin(x)) MLXEMU_MATH1(acos, std::acos(x)) MLXEMU_MATH1(atan, std::atan(x))
MLXEMU_MATH1(sinh, std::sinh(x)) MLXEMU_MATH1(cosh, std::cosh(x)) MLXEMU_MATH1(tanh, std::tanh(x))
MLXEMU_MATH1(floor, std::floor(x)) MLXEMU_MATH1(ceil, std::ceil(x)) MLXEMU_MATH1(round, std::round(x))
MLXEMU_MATH1(trunc, std::trunc(x)) MLXEMU_MATH1(rint, std::rint(x)) MLXEMU_MATH1(fabs, std::fabs(x))
MLXEMU_MATH1(abs, std::fabs(x)) MLXEMU_MATH1(fract, x - std::floor(x)) MLXEMU_MATH1(erf, std::erf(x))
MLXEMU_MATH1(saturate, std::fmin(std::fmax(x, 0.0f), 1.0f))
MLXEMU_MATH1(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f))
#define MLXEMU_MATH2(name, expr)                                                                          \
  inline float name(float x, float y) { return expr; }                                                    \
  inline half name(half a, half b) { float x = a, y = b; return half(expr); }                             \
  inline bfloat16_t name(bfloat16_t a, bfloat16_t b) { float x = a, y = b; return bfloat16_t(expr); }     \
  template <class T, int N> vec<T, N> name(vec<T, N> a, vec<T, N> b) { for (int i = 0; i < N; i++) a[i] = name(a[i], b[i]); return a; }
MLXEMU_MATH2(pow, std::pow(x, y)) MLXEMU_MATH2(powr, std::pow(x, y)) MLXEMU_MATH2(fmod, std::fmod(x, y))
MLXEMU_MATH2(atan2, std::atan2(x, y)) MLXEMU_MATH2(copysign, std::copysign(x, y)) MLXEMU_MATH2(divide, x / y)
MLXEMU_MATH2(fmax, std::fmax(x, y)) MLXEMU_MATH2(fmin, std::fmin(x, y))
MLXEMU_MATH2(max, std::fmax(x, y)) MLXEMU_MATH2(min, std::fmin(x, y))  // Metal: a NaN operand yields the other
template <class T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> T fma(T a, T b, T c) { return T(std::fma(float(a), float(b), float(c))); }
template <class T, class U> T mix(T a, T b, U t) { return a + (b - a) * t; }
template <class T> T select(T a, T b, bool c) { return c ? b : a; }
template <class T> bool isnan(T x) { return std::isnan(float(x)); }
template <class T> bool isinf(T x) { return std::isinf(float(x)); }
template <class T> bool isfinite(T x) { return std::isfinite(float(x)); }
template <class T> bool signbit(T x) { return std::signbit(float(x)); }
template <class T, int N> T dot(vec<T, N> a, vec<T, N> b) { T s = T(0); for (int i = 0; i < N; i++) s += a[i] * b[i]; return s; }
template <class T> T popcount(T x) { return T(__builtin_popcountll((unsigned long long)x & (~0ull >> (64 - 8 * sizeof(T))))); }
template <class T> T clz(T x) { return x ? T(__builtin_clzll((unsigned long long)x) - (64 - 8 * sizeof(T))) : T(8 * sizeof(T)); }
template <class T> T ctz(T x) { return x ? T(__builtin_ctzll((unsigned long long)x)) : T(8 * sizeof(T)); }
template <class T> T extract_bits(T x, uint offset, uint bits) {
  return bits >= 8 * sizeof(T) ? x : T((x >> offset) & ((T(1) << bits) - 1));
}
template <class T, class U> T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}
namespace fast {
using metal::abs; using metal::cos; using metal::divide; using metal::exp; using metal::exp2; using metal::fmax;
using metal::fmin; using metal::log; using metal::log2; using metal::max; using metal::min; using metal::pow;
using metal::powr; using metal::rsqrt; using metal::sin; using metal::sqrt; using metal::tanh;
}  // namespace fast
namespace precise {
using metal::abs; using metal::cos; using metal::divide; using metal::exp; using metal::exp2; using metal::fmax;
using metal::fmin; using metal::log; using metal::log2; using metal::max; using metal::min; using metal::pow;
using metal::powr; using metal::rsqrt; using metal::sin; using metal::sqrt; using metal::tanh;
}  // namespace precise

// Atomics: fibers switch only at barriers, so a plain read-modify-write is atomic.
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
template <class T> struct atomic { T v; typedef T value_type; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
#define MLXEMU_ATOMIC(name, expr)                                                       \
  template <class A, class U> typename std::remove_cv_t<A>::value_type name(A* a, U x, memory_order = memory_order_relaxed) { \
    typedef typename std::remove_cv_t<A>::value_type T;                                  \
    T old = a->v; a->v = T(expr); return old;                                            \
  }
MLXEMU_ATOMIC(atomic_fetch_add_explicit, old + x) MLXEMU_ATOMIC(atomic_fetch_sub_explicit, old - x)
MLXEMU_ATOMIC(atomic_fetch_max_explicit, old < T(x) ? T(x) : old) MLXEMU_ATOMIC(atomic_fetch_min_explicit, T(x) < old ? T(x) : old)
MLXEMU_ATOMIC(atomic_fetch_and_explicit, old & x) MLXEMU_ATOMIC(atomic_fetch_or_explicit, old | x)
MLXEMU_ATOMIC(atomic_fetch_xor_explicit, old ^ x) MLXEMU_ATOMIC(atomic_exchange_explicit, x)
template <class A> typename std::remove_cv_t<A>::value_type atomic_load_explicit(A* a, memory_order = memory_order_relaxed) { return a->v; }
template <class A, class U> void atomic_store_explicit(A* a, U x, memory_order = memory_order_relaxed) { a->v = x; }
template <class A, class T, class U>
bool atomic_compare_exchange_weak_explicit(A* a, T* expected, U desired, memory_order = memory_order_relaxed,
                                           memory_order = memory_order_relaxed) {
  if (a->v == *expected) { a->v = desired; return true; }
  *expected = a->v;
  return false;
}

enum mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
}  // namespace metal

// ---------------------------------------------------------------- part 2: execution model
namespace mlxemu {
enum { READY, RUNNING, WAIT_TG, WAIT_SIMD, DONE };
const int SIMD = 32, MAX_THREADS = 1024, TG_BYTES = 32768, STACK = 256 << 10, MAX_TG_VARS = 64;
struct Attr {  // a position attribute; MLX declares each as uint or uint3
  uint x, y, z;
  operator uint() const { return x; }
  operator metal::uint2() const { return metal::uint2(x, y); }
  operator metal::uint3() const { return metal::uint3(x, y, z); }
};
struct Thread {
  ucontext_t uc;  // to start the fiber on its own stack
  jmp_buf jb;     // where it is suspended (_setjmp/_longjmp: no signal-mask system calls)
  int started, state, sg, lane, line;
  unsigned seq;  // SIMD-group operations done so far
  Attr thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid, threads_per_threadgroup,
      dispatch_threads_per_threadgroup, threadgroups_per_grid, threads_per_grid, grid_size, grid_origin,
      thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup, threads_per_simdgroup,
      thread_execution_width, simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup,
      quadgroup_index_in_threadgroup, thread_index_in_quadgroup, quadgroups_per_threadgroup,
      dispatch_quadgroups_per_threadgroup;
};
struct Simd {
  alignas(16) unsigned char slot[2][SIMD][16];  // double-buffered: op k uses slot[k & 1]
  unsigned mask[2];
  int first, count, alive, waiting;
};
struct Region { char* lo; char* hi; int buffer; };  // guard pages: buffer >= 0, -1 threadgroup memory, -2 a stack
struct Run {
  Thread* th;
  int n, alive, tg_wait, exited_at_barrier;
  Simd sg[MAX_THREADS / SIMD];
  char* arena;
  size_t tg_used;
  void* tg_var[MAX_TG_VARS];
  jmp_buf sched;
  ucontext_t starter;
  Thread* cur;
  void (*entry)(void**);
  void** bufs;
  sigjmp_buf jb;
  int sig;
  void* addr;
  char err[1024];
  Region guards[80];
  int nguards;
};
static Run R;

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(R.err, sizeof R.err, fmt, ap);
  va_end(ap);
  siglongjmp(R.jb, 1);
}
inline void yield(Thread* t) {
  if (!_setjmp(t->jb)) _longjmp(R.sched, 1);
}

template <class T> T* tg_alloc(int id) {  // `threadgroup T name;` -> one object per threadgroup
  if (!R.tg_var[id]) {
    size_t size = (sizeof(T) + 15) & ~size_t(15);
    if (R.tg_used + size > size_t(TG_BYTES))
      fail("threadgroup memory: %zu bytes declared, more than Metal's %d", R.tg_used + size, TG_BYTES);
    R.tg_used += size;
    R.tg_var[id] = R.arena + TG_BYTES - R.tg_used;  // top down: the first variable ends at a guard page
  }
  return static_cast<T*>(R.tg_var[id]);
}

inline void release_simd(Simd& s) {
  Thread* first = nullptr;
  unsigned mask = 0;
  for (int i = s.first; i < s.first + s.count; i++) {
    Thread& t = R.th[i];
    if (t.state != WAIT_SIMD) continue;
    if (!first) first = &t;
    else if (t.seq != first->seq || t.line != first->line)
      fail("SIMD-group function in divergent control flow: lane %d is at its op %u (line %d), lane %d at op %u "
           "(line %d); the emulator needs all active lanes to call the same SIMD-group functions in the same order",
           first->lane, first->seq, first->line, t.lane, t.seq, t.line);
    mask |= 1u << t.lane;
    t.state = READY;
  }
  s.mask[first->seq & 1] = mask;
  s.waiting = 0;
}
inline void release_tg() {
  Thread* first = nullptr;
  for (int i = 0; i < R.n; i++) {
    Thread& t = R.th[i];
    if (t.state != WAIT_TG) continue;
    if (!first) first = &t;
    else if (t.line != first->line)
      fail("threadgroup_barrier in divergent control flow: threads wait at lines %d and %d", first->line, t.line);
    t.state = READY;
  }
  if (R.alive < R.n) R.exited_at_barrier = 1;
  R.tg_wait = 0;
}
inline void simd_wait(Thread* t, int line) {
  Simd& s = R.sg[t->sg];
  t->line = line;
  t->state = WAIT_SIMD;
  if (++s.waiting == s.alive) release_simd(s);
  else yield(t);
  t->state = RUNNING;
}
// Every active lane of t's SIMD group contributes v; vals[l] gets lane l's value. Returns the active-lane mask.
template <class T> unsigned gather(T v, T* vals, int line) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value, "SIMD-group value too large");
  Thread* t = R.cur;
  Simd& s = R.sg[t->sg];
  int b = t->seq & 1;
  std::memcpy(s.slot[b][t->lane], &v, sizeof(T));
  simd_wait(t, line);
  t->seq++;
  unsigned m = s.mask[b];
  for (int l = 0; l < SIMD; l++)
    if (m >> l & 1) std::memcpy(&vals[l], s.slot[b][l], sizeof(T));
  return m;
}
inline void barrier(int line) {
  Thread* t = R.cur;
  t->line = line;
  t->state = WAIT_TG;
  if (++R.tg_wait == R.alive) release_tg();
  else yield(t);
  t->state = RUNNING;
}
inline void thread_main() {
  Thread* t = R.cur;
  R.entry(R.bufs);
  t->state = DONE;
  R.alive--;
  Simd& s = R.sg[t->sg];
  s.alive--;
  if (s.waiting && s.waiting == s.alive) release_simd(s);
  if (R.tg_wait && R.tg_wait == R.alive) release_tg();
  _longjmp(R.sched, 1);  // back to the scheduler, never to return
}
}  // namespace mlxemu

namespace metal {
#define MLXEMU_LINE int line_ = __builtin_LINE()
#define MLXEMU_GATHER(v) T vals[32]{}; unsigned m = ::mlxemu::gather(v, vals, line_); int me = ::mlxemu::R.cur->lane; (void)me;
inline void threadgroup_barrier(mem_flags = mem_none, MLXEMU_LINE) { ::mlxemu::barrier(line_); }
inline void simdgroup_barrier(mem_flags = mem_none, MLXEMU_LINE) { int vals[32]; ::mlxemu::gather(0, vals, line_); }
#define MLXEMU_REDUCE(name, expr)                                                                         \
  template <class T> T name(T v, MLXEMU_LINE) {                                                           \
    MLXEMU_GATHER(v) T a = vals[__builtin_ctz(m)];                                                        \
    for (int l = __builtin_ctz(m) + 1; l < 32; l++) if (m >> l & 1) { T b = vals[l]; a = T(expr); }      \
    return a;                                                                                             \
  }
MLXEMU_REDUCE(simd_sum, a + b) MLXEMU_REDUCE(simd_product, a * b) MLXEMU_REDUCE(simd_max, max(a, b))
MLXEMU_REDUCE(simd_min, min(a, b)) MLXEMU_REDUCE(simd_and, a & b) MLXEMU_REDUCE(simd_or, a | b)
MLXEMU_REDUCE(simd_xor, a ^ b)
#define MLXEMU_SCAN(name, op, identity, inclusive)                                                        \
  template <class T> T name(T v, MLXEMU_LINE) {                                                           \
    MLXEMU_GATHER(v) T a = T(identity);                                                                   \
    for (int l = 0; l < me + inclusive; l++) if (m >> l & 1) a = T(a op vals[l]);                         \
    return a;                                                                                             \
  }
MLXEMU_SCAN(simd_prefix_exclusive_sum, +, 0, 0) MLXEMU_SCAN(simd_prefix_inclusive_sum, +, 0, 1)
MLXEMU_SCAN(simd_prefix_exclusive_product, *, 1, 0) MLXEMU_SCAN(simd_prefix_inclusive_product, *, 1, 1)
template <class T, class I> T simd_shuffle(T v, I lane, MLXEMU_LINE) { MLXEMU_GATHER(v) return vals[uint(lane) % 32]; }
template <class T, class I> T simd_broadcast(T v, I lane, MLXEMU_LINE) { MLXEMU_GATHER(v) return vals[uint(lane) % 32]; }
template <class T> T simd_broadcast_first(T v, MLXEMU_LINE) { MLXEMU_GATHER(v) return vals[__builtin_ctz(m)]; }
template <class T, class I> T simd_shuffle_down(T v, I d, MLXEMU_LINE) { MLXEMU_GATHER(v) return me + uint(d) < 32 ? vals[me + d] : v; }
template <class T, class I> T simd_shuffle_up(T v, I d, MLXEMU_LINE) { MLXEMU_GATHER(v) return uint(me) >= uint(d) ? vals[me - d] : v; }
template <class T, class I> T simd_shuffle_xor(T v, I x, MLXEMU_LINE) { MLXEMU_GATHER(v) return vals[(me ^ uint(x)) % 32]; }
template <class T, class I> T simd_shuffle_rotate_down(T v, I d, MLXEMU_LINE) { MLXEMU_GATHER(v) return vals[(me + d) % 32]; }
template <class T, class I> T simd_shuffle_rotate_up(T v, I d, MLXEMU_LINE) { MLXEMU_GATHER(v) return vals[(me + 32 - d % 32) % 32]; }
struct simd_vote {
  uint64_t v;
  explicit operator uint64_t() const { return v; }
  bool all() const { return v == 0xffffffffull; }
  bool any() const { return v != 0; }
};
inline simd_vote simd_ballot(bool c, MLXEMU_LINE) { typedef int T; MLXEMU_GATHER(int(c)) uint64_t r = 0; for (int l = 0; l < 32; l++) if ((m >> l & 1) && vals[l]) r |= 1ull << l; return simd_vote{r}; }
inline bool simd_all(bool c, MLXEMU_LINE) { typedef int T; MLXEMU_GATHER(int(c)) for (int l = 0; l < 32; l++) if ((m >> l & 1) && !vals[l]) return false; return true; }
inline bool simd_any(bool c, MLXEMU_LINE) { typedef int T; MLXEMU_GATHER(int(c)) for (int l = 0; l < 32; l++) if ((m >> l & 1) && vals[l]) return true; return false; }
inline bool simd_is_first(MLXEMU_LINE) { typedef int T; MLXEMU_GATHER(0) return me == __builtin_ctz(m); }

// What MLX's metal::utils() preamble offers that kernels commonly use.
template <class T> struct Limits {
  static T max() { return numeric_limits<T>::has_infinity ? numeric_limits<T>::infinity() : numeric_limits<T>::max(); }
  static T min() { return numeric_limits<T>::has_infinity ? T(-numeric_limits<T>::infinity()) : numeric_limits<T>::lowest(); }
  static T finite_max() { return numeric_limits<T>::max(); }
  static T finite_min() { return numeric_limits<T>::lowest(); }
};
template <class I> inline int64_t elem_to_loc(I elem, const int* shape, const int64_t* strides, int ndim) {
  int64_t loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) { loc += int64_t(elem % shape[i]) * strides[i]; elem /= shape[i]; }
  return loc;
}
inline size_t ceildiv(size_t n, size_t m) { return (n + m - 1) / m; }
}  // namespace metal
typedef metal::bfloat16_t bfloat16_t;
typedef half float16_t;

// Kernel code lives in namespace mlxemu_k, where metal's names hide the C library's (::exp, ::abs, ...).
namespace mlxemu_k {
using namespace metal;
using metal::abs; using metal::acos; using metal::asin; using metal::atan; using metal::atan2; using metal::ceil;
using metal::clamp; using metal::copysign; using metal::cos; using metal::cosh; using metal::erf; using metal::exp;
using metal::exp2; using metal::fabs; using metal::floor; using metal::fma; using metal::fmax; using metal::fmin;
using metal::fmod; using metal::isfinite; using metal::isinf; using metal::isnan; using metal::log; using metal::log10;
using metal::log1p; using metal::log2; using metal::max; using metal::min; using metal::pow; using metal::rint;
using metal::round; using metal::signbit; using metal::sin; using metal::sinh; using metal::sqrt; using metal::tan;
using metal::tanh; using metal::trunc; using metal::bfloat16_t; using metal::float16_t;
}  // namespace mlxemu_k

// ------------------------------------------------------------- the launch (called once per dispatch)
namespace mlxemu {
inline void on_signal(int sig, siginfo_t* si, void*) {
  R.sig = sig;
  R.addr = si->si_addr;
  siglongjmp(R.jb, 2);
}
inline char* guarded(size_t bytes, size_t* map_len, int buffer, char** map_base) {  // `bytes` end exactly at a PROT_NONE page
  size_t page = sysconf(_SC_PAGESIZE), body = (((bytes + 15) & ~size_t(15)) + page - 1) / page * page;
  *map_len = body + page;
  char* base = (char*)mmap(nullptr, *map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  *map_base = base;
  mprotect(base + body, page, PROT_NONE);
  if (R.nguards < 80) R.guards[R.nguards++] = {base + body, base + body + page, buffer};
  return base + body - ((bytes + 15) & ~size_t(15));
}
inline void set(Attr& a, uint x, uint y = 0, uint z = 0) { a = Attr{x, y, z}; }

inline void run_group(const uint* grid, const uint* tg, const uint* ngroups, const uint* g, int reverse,
                      char* stacks, size_t stack_stride) {
  uint a[3], nmax = tg[0] * tg[1] * tg[2];
  for (int d = 0; d < 3; d++) a[d] = grid[d] - g[d] * tg[d] < tg[d] ? grid[d] - g[d] * tg[d] : tg[d];
  int n = R.n = R.alive = a[0] * a[1] * a[2];
  R.tg_wait = 0;
  std::memset(R.arena, 0xff, TG_BYTES);  // uninitialized threadgroup memory reads as NaN / all ones
  std::memset(R.tg_var, 0, sizeof R.tg_var);
  R.tg_used = 0;
  for (int s = 0; s * SIMD < n; s++) {
    Simd& sg = R.sg[s];
    sg.first = s * SIMD;
    sg.count = sg.alive = n - s * SIMD < SIMD ? n - s * SIMD : SIMD;
    sg.waiting = 0;
  }
  for (int i = 0; i < n; i++) {
    Thread& t = R.th[i];
    uint lx = i % a[0], ly = i / a[0] % a[1], lz = i / (a[0] * a[1]);
    t.state = READY, t.sg = i / SIMD, t.lane = i % SIMD, t.seq = 0, t.line = 0;
    set(t.thread_position_in_grid, g[0] * tg[0] + lx, g[1] * tg[1] + ly, g[2] * tg[2] + lz);
    set(t.thread_position_in_threadgroup, lx, ly, lz);
    set(t.threadgroup_position_in_grid, g[0], g[1], g[2]);
    set(t.threads_per_threadgroup, a[0], a[1], a[2]);
    set(t.dispatch_threads_per_threadgroup, tg[0], tg[1], tg[2]);
    set(t.threadgroups_per_grid, ngroups[0], ngroups[1], ngroups[2]);
    set(t.threads_per_grid, grid[0], grid[1], grid[2]);
    set(t.grid_size, grid[0], grid[1], grid[2]);
    set(t.grid_origin, 0);
    set(t.thread_index_in_threadgroup, i);
    set(t.simdgroup_index_in_threadgroup, i / SIMD);
    set(t.thread_index_in_simdgroup, i % SIMD);
    set(t.threads_per_simdgroup, SIMD);
    set(t.thread_execution_width, SIMD);
    set(t.simdgroups_per_threadgroup, (n + SIMD - 1) / SIMD);
    set(t.dispatch_simdgroups_per_threadgroup, (nmax + SIMD - 1) / SIMD);
    set(t.quadgroup_index_in_threadgroup, i / 4);
    set(t.thread_index_in_quadgroup, i % 4);
    set(t.quadgroups_per_threadgroup, (n + 3) / 4);
    set(t.dispatch_quadgroups_per_threadgroup, (nmax + 3) / 4);
    getcontext(&t.uc);
    t.uc.uc_stack.ss_sp = stacks + i * stack_stride + (stack_stride - STACK);
    t.uc.uc_stack.ss_size = STACK;
    t.uc.uc_link = nullptr;
    t.started = 0;
    makecontext(&t.uc, thread_main, 0);
  }
  while (R.alive > 0) {  // passes: run every ready thread until it blocks or ends
    bool ran = false;
    for (int k = 0; k < n; k++) {
      Thread& t = R.th[reverse ? n - 1 - k : k];
      if (t.state != READY) continue;
      t.state = RUNNING;
      R.cur = &t;
      if (!_setjmp(R.sched)) {
        if (t.started) _longjmp(t.jb, 1);
        t.started = 1;
        swapcontext(&R.starter, &t.uc);
      }
      ran = true;
    }
    if (!ran) {
      int at_tg = 0, at_simd = 0, line_tg = 0, line_simd = 0;
      for (int i = 0; i < n; i++) {
        if (R.th[i].state == WAIT_TG) at_tg++, line_tg = R.th[i].line;
        if (R.th[i].state == WAIT_SIMD) at_simd++, line_simd = R.th[i].line;
      }
      R.cur = nullptr;
      fail("deadlock: %d threads wait at threadgroup_barrier (line %d) while %d wait in SIMD-group functions "
           "(line %d): a barrier or SIMD-group function in divergent control flow", at_tg, line_tg, at_simd, line_simd);
    }
  }
}

// Runs one dispatch: `grid` threads in threadgroups of `tg` (MLX's dispatch_threads: edge groups are partial).
// Buffers are copied into guarded allocations, and the writable ones copied back on success.
inline int launch(void (*entry)(void**), void** host, const size_t* nbytes, const int* writable, int nbuf,
                  const uint* grid_in, const uint* tg_in, int reverse, int cpu_seconds, char* err, int errlen) {
  uint grid[3], tg[3], ng[3];
  for (int d = 0; d < 3; d++) {
    grid[d] = grid_in[d], tg[d] = tg_in[d] < grid_in[d] ? tg_in[d] : grid_in[d];
    if (grid[d] == 0) return 0;
    ng[d] = (grid[d] + tg[d] - 1) / tg[d];
  }
  uint nmax = tg[0] * tg[1] * tg[2];
  if (nmax > uint(MAX_THREADS)) {
    snprintf(err, errlen, "threadgroup of %u threads: more than Metal's %d", nmax, MAX_THREADS);
    return 1;
  }
  static void* dev[64];
  static size_t maplen[64];
  static char* mapbase[64];
  if (nbuf > 64) { snprintf(err, errlen, "more than 64 buffers"); return 1; }
  R.nguards = 0;
  R.err[0] = 0;
  R.exited_at_barrier = 0;
  R.entry = entry;
  R.bufs = dev;
  for (int i = 0; i < nbuf; i++) {
    dev[i] = guarded(nbytes[i], &maplen[i], i, &mapbase[i]);
    if (!dev[i]) { snprintf(err, errlen, "out of memory"); return 1; }
    if (nbytes[i]) std::memcpy(dev[i], host[i], nbytes[i]);
  }
  char* arena_base;
  size_t arena_len, page = sysconf(_SC_PAGESIZE), stride = STACK + page, stacks_len = nmax * stride;
  R.arena = guarded(TG_BYTES, &arena_len, -1, &arena_base);
  char* stacks = (char*)mmap(nullptr, stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  for (uint i = 0; i < nmax; i++) mprotect(stacks + i * stride, page, PROT_NONE);
  static Thread threads[MAX_THREADS];
  R.th = threads;
  static char altstack[1 << 16];
  stack_t ss = {}, old_ss;
  ss.ss_sp = altstack, ss.ss_size = sizeof altstack;
  sigaltstack(&ss, &old_ss);
  struct sigaction sa = {}, old[4];
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  const int sigs[4] = {SIGSEGV, SIGBUS, SIGFPE, SIGVTALRM};
  for (int k = 0; k < 4; k++) sigaction(sigs[k], &sa, &old[k]);
  struct sigevent sev = {};  // a CPU-time limit on this thread only (MLX's own threads keep running)
  sev.sigev_notify = SIGEV_THREAD_ID, sev.sigev_signo = SIGVTALRM, sev._sigev_un._tid = gettid();
  timer_t timer;
  bool timed = timer_create(CLOCK_THREAD_CPUTIME_ID, &sev, &timer) == 0;
  struct itimerspec limit = {};
  limit.it_value.tv_sec = cpu_seconds;
  if (timed) timer_settime(timer, 0, &limit, nullptr);
  int rc = sigsetjmp(R.jb, 1);
  if (rc == 0) {
    uint g[3];
    for (uint k = 0; k < ng[0] * ng[1] * ng[2]; k++) {
      uint q = reverse ? ng[0] * ng[1] * ng[2] - 1 - k : k;
      g[0] = q % ng[0], g[1] = q / ng[0] % ng[1], g[2] = q / (ng[0] * ng[1]);
      run_group(grid, tg, ng, g, reverse, stacks, stride);
    }
  }
  if (timed) timer_delete(timer);
  for (int k = 0; k < 4; k++) sigaction(sigs[k], &old[k], nullptr);
  sigaltstack(&old_ss, nullptr);
  if (rc == 2) {
    const char* what = "an invalid address";
    int buffer = -3;
    for (uint i = 0; i < nmax; i++)
      if ((char*)R.addr >= stacks + i * stride && (char*)R.addr < stacks + i * stride + page) buffer = -2;
    for (int i = 0; i < R.nguards; i++)
      if ((char*)R.addr >= R.guards[i].lo && (char*)R.addr < R.guards[i].hi) buffer = R.guards[i].buffer;
    char where[64];
    if (buffer >= 0) snprintf(where, sizeof where, "past the end of buffer(%d)", buffer), what = where;
    if (buffer == -1) what = "past the end of threadgroup memory";
    if (buffer == -2) what = "beyond a thread's stack (a kernel-local array too big for the emulator's stack?)";
    if (R.sig == SIGFPE) what = "an arithmetic fault (integer division by zero?)";
    if (R.sig == SIGVTALRM) snprintf(R.err, sizeof R.err, "timed out after %d s of CPU (an endless loop?)", cpu_seconds);
    else snprintf(R.err, sizeof R.err, "%s: %s", R.sig == SIGFPE ? "SIGFPE" : "invalid memory access", what);
  }
  if (rc && R.cur) {
    size_t len = strlen(R.err);
    const Thread& t = *R.cur;
    snprintf(R.err + len, sizeof R.err - len, " [thread_position_in_grid (%u,%u,%u), threadgroup (%u,%u,%u)]",
             t.thread_position_in_grid.x, t.thread_position_in_grid.y, t.thread_position_in_grid.z,
             t.threadgroup_position_in_grid.x, t.threadgroup_position_in_grid.y, t.threadgroup_position_in_grid.z);
  }
  if (rc == 0) {
    for (int i = 0; i < nbuf; i++)
      if (writable[i] && nbytes[i]) std::memcpy(host[i], dev[i], nbytes[i]);
    if (R.exited_at_barrier)
      snprintf(R.err, sizeof R.err, "warning: some threads had returned when the others passed a threadgroup_barrier");
  }
  snprintf(err, errlen, "%s", R.err);
  for (int i = 0; i < nbuf; i++) munmap(mapbase[i], maplen[i]);
  munmap(arena_base, arena_len);
  munmap(stacks, stacks_len);
  R.cur = nullptr;
  return rc;
}
}  // namespace mlxemu

// Metal's address spaces: no meaning on a CPU (defined last: the system headers above use these words).
#define device
#define constant
#define threadgroup
#define thread
