#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// bf16 -> fp32 is a 16-bit left shift of the bits; fp32 -> bf16 rounds to nearest even (as torch).
static inline float bf2f(uint16_t b) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f2bf(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

#if defined(__AVX512F__)
// 16 bf16 (256 bits) -> 16 fp32
static inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// exp(x): 2^n · P(r), n = round(x·log2 e), |r| <= ln2/2, P the degree-6 Taylor polynomial
// (relative error < 2e-7); x < -87 gives 0, x > 88 gives inf.
static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.5f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(p, n));
}
#endif

#if defined(__AVX512F__)
// Dot products of one query head with one key, as a vector of partial sums (16 fp32 lanes).
// fp32 FMAs on keys widened from bf16 (any D multiple of 16) ...
template <int D>
struct DotF32 {
    __m512 q[D / 16];
    void set(const uint16_t* qbf) {
        for (int c = 0; c < D / 16; ++c) q[c] = load16(qbf + c * 16);
    }
    inline __m512 operator()(const uint16_t* kt) const {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < D / 16; ++c) acc = _mm512_fmadd_ps(q[c], load16(kt + c * 16), acc);
        return acc;
    }
};
#if defined(__AVX512BF16__)
// ... or, with AVX512-BF16 and D a multiple of 32, bf16 pairs multiplied (exactly) and summed in
// fp32 by one instruction, on the keys as stored.
template <int D>
struct DotBF16 {
    __m512bh q[D / 32];
    void set(const uint16_t* qbf) {
        for (int c = 0; c < D / 32; ++c) q[c] = (__m512bh)_mm512_loadu_si512(qbf + c * 32);
    }
    inline __m512 operator()(const uint16_t* kt) const {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < D / 32; ++c) acc = _mm512_dpbf16_ps(acc, q[c], (__m512bh)_mm512_loadu_si512(kt + c * 32));
        return acc;
    }
};
template <int D>
using Dot = typename std::conditional<D % 32 == 0, DotBF16<D>, DotF32<D>>::type;
#else
template <int D>
using Dot = DotF32<D>;
#endif

// The 16 lane-sums of a[0..15] as one vector (r[i] = sum of a[i]'s lanes): a transpose-and-add
// tree, ~3 instructions per pair instead of a full horizontal reduction per vector.
static inline __m512 sum16(__m512* a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)  // [x.L0+x.L2, x.L1+x.L3, y.L0+y.L2, y.L1+y.L3] (128-bit lanes)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // lane k: 4 floats summing to vector 4i + k
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)
        d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
    // position 4k + m holds vector 4m + k: permute back
    __m512 e = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]))));
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(idx, e);
}
#endif

// scores s[j·ld + t] = scale · q_j · k_t for the G query heads of one kv head, t < n.
// q: G rows of D bf16 (row stride qs), k: n rows of D bf16 (v: the values, and next_k: the
// next task's keys or null, only prefetched here).
template <int D>
static void scores(const uint16_t* q, int64_t qs, int G, const uint16_t* k, const uint16_t* v, int64_t n, float scale,
                   float* s, int64_t ld, const uint16_t* next_k) {
#if defined(__AVX512F__)
    const __m512 sc = _mm512_set1_ps(scale);
    constexpr int64_t AHEAD = 64;  // keys (4 blocks)
    for (int j = 0; j < G; ++j) {
        Dot<D> dot;
        dot.set(q + j * qs);
        float* sj = s + j * ld;
        int64_t t = 0;
        for (; t + 16 <= n; t += 16) {  // 16 keys (2 KB at D = 64, in L1 for the next heads)
            if (j == 0) {
                // the cache streams from DRAM (every layer has its own) and one core alone does not
                // keep enough reads in flight: ask for the keys AHEAD ahead (past the end: the
                // next task's first keys) and this block's values now (measured ~20 % faster)
                const char* ka = t + AHEAD < n ? reinterpret_cast<const char*>(k + (t + AHEAD) * D)
                                 : next_k ? reinterpret_cast<const char*>(next_k + (t + AHEAD - n) * D) : nullptr;
                for (int64_t c = 0; c < 16 * D * 2; c += 64) {
                    if (ka) _mm_prefetch(ka + c, _MM_HINT_T0);
                    _mm_prefetch(reinterpret_cast<const char*>(v + t * D) + c, _MM_HINT_T0);
                }
            }
            __m512 acc[16];
            for (int i = 0; i < 16; ++i) acc[i] = dot(k + (t + i) * D);
            _mm512_storeu_ps(sj + t, _mm512_mul_ps(sum16(acc), sc));
        }
        for (; t < n; ++t) sj[t] = _mm512_reduce_add_ps(dot(k + t * D)) * scale;
    }
#else
    for (int64_t t = 0; t < n; ++t) {
        float kt[D];
        for (int d = 0; d < D; ++d) kt[d] = bf2f(k[t * D + d]);
        for (int j = 0; j < G; ++j) {
            float a = 0.f;
            for (int d = 0; d < D; ++d) a += bf2f(q[j * qs + d]) * kt[d];
            s[j * ld + t] = a * scale;
        }
    }
#endif
}

// s[0..n) <- exp(s - max s) in place; returns the sum.
static float softmax_unnormalised(float* s, int64_t n) {
#if defined(__AVX512F__)
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + i));
    float m = _mm512_reduce_max_ps(mx);
    for (; i < n; ++i) m = s[i] > m ? s[i] : m;
    __m512 mv = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (t < n) {
        __mmask16 mk = (__mmask16)((1u << (n - t)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), mv));
        _mm512_mask_storeu_ps(s + t, mk, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, e));
    }
    return _mm512_reduce_add_ps(sum);
#else
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) m = s[t] > m ? s[t] : m;
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) { s[t] = std::exp(s[t] - m); sum += s[t]; }
    return sum;
#endif
}

// o[j] = sum_t p[j][t] · v_t for the G heads (fp32, D floats each), t < n. With `accumulate` the
// sums continue from the values already in o (the next positions of the same heads: the result is
// the same as one call over all the positions, the additions made in the same order).
template <int D>
static void weighted_sum(const float* p, int64_t ld, int G, const uint16_t* v, int64_t n, float* o, bool accumulate) {
#if defined(__AVX512F__)
    constexpr int C = D / 16;
    for (int j0 = 0; j0 < G; j0 += 4) {
        const int g = G - j0 < 4 ? G - j0 : 4;
        __m512 acc[4][C];
        for (int j = 0; j < g; ++j)
            for (int c = 0; c < C; ++c)
                acc[j][c] = accumulate ? _mm512_loadu_ps(o + (j0 + j) * D + c * 16) : _mm512_setzero_ps();
        for (int64_t t = 0; t < n; ++t) {
            const uint16_t* vt = v + t * D;
            __m512 pj[4];
            for (int j = 0; j < g; ++j) pj[j] = _mm512_set1_ps(p[(j0 + j) * ld + t]);
            for (int c = 0; c < C; ++c) {
                __m512 vc = load16(vt + c * 16);
                for (int j = 0; j < g; ++j) acc[j][c] = _mm512_fmadd_ps(pj[j], vc, acc[j][c]);
            }
        }
        for (int j = 0; j < g; ++j)
            for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + (j0 + j) * D + c * 16, acc[j][c]);
    }
#else
    if (!accumulate)
        for (int j = 0; j < G * D; ++j) o[j] = 0.f;
    for (int64_t t = 0; t < n; ++t)
        for (int j = 0; j < G; ++j) {
            const float pt = p[j * ld + t];
            for (int d = 0; d < D; ++d) o[j * D + d] += pt * bf2f(v[t * D + d]);
        }
#endif
}

// Attention for one kv head of a group of R decode rows whose first P cached positions hold the
// same keys and values (the K samples of one prompt, copied from one prefill), P a multiple of 16.
// The prefix is read once, from the first row's slot, for all R·G query heads; then each row reads
// its own positions [P, n[r]) from its slot; the softmax is over the union. Every score, sum and
// product is computed exactly as for each row alone over its own slot (P a multiple of 16 keeps
// the 16-key blocks of `scores` where they were; the weighted sums continue in order), so the
// output is bitwise the same: sharing only removes reads.
// q: R·G query heads of D bf16, contiguous (row r's G heads at r·G·D); k[r], v[r]: position 0 of
// row r's slot for this kv head; n[r] >= P its valid positions; out[r]: its G output heads (bf16).
// s: R·G·ld floats, o: R·G·D floats of scratch; next_k: keys to prefetch after the last row's.
template <int D>
static void attend_group(const uint16_t* q, int R, int G, const uint16_t* const* k, const uint16_t* const* v,
                         const int64_t* n, int64_t P, float scale, float* s, int64_t ld, float* o,
                         uint16_t* const* out, const uint16_t* next_k) {
    // 1. scores: the shared prefix for all R·G heads (its keys stream once, then stay in L1/L2),
    //    then each row's own keys
    scores<D>(q, D, R * G, k[0], v[0], P, scale, s, ld, k[0] + P * D);
    for (int r = 0; r < R; ++r)
        scores<D>(q + r * G * D, D, G, k[r] + P * D, v[r] + P * D, n[r] - P, scale, s + r * G * ld + P, ld,
                  r + 1 < R ? k[r + 1] + P * D : next_k);
    // 2. softmax of each head over its row's n[r] positions
    for (int r = 0; r < R; ++r)
        for (int j = r * G; j < (r + 1) * G; ++j) {
            const float inv = 1.0f / softmax_unnormalised(s + j * ld, n[r]);
            s[j * ld + ld - 1] = inv;  // ld > n[r]: the column past the last position is free
        }
    // 3. values the same way: the prefix's once for all heads, then each row's own
    weighted_sum<D>(s, ld, R * G, v[0], P, o, false);
    for (int r = 0; r < R; ++r)
        weighted_sum<D>(s + r * G * ld + P, ld, G, v[r] + P * D, n[r] - P, o + r * G * D, true);
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < G; ++j) {
            const float inv = s[(r * G + j) * ld + ld - 1];
            for (int d = 0; d < D; ++d) out[r][j * D + d] = f2bf(o[(r * G + j) * D + d] * inv);
        }
}

// Tasks (group, kv head) in an order that balances threads: rows are sorted by length, so each
// contiguous range of task indices takes groups from both ends.
static inline int64_t balanced(int64_t i, int64_t tasks) { return (i % 2 == 0) ? i / 2 : tasks - 1 - i / 2; }

// Decode attention of B rows over the caches k, v (S, Hkv, L, D), one task per (group, kv head),
// in parallel. Group g is rows order[starts[g] .. starts[g+1]), whose first plen[g] positions are
// the same (at most each row's valid positions - 1, rounded down to 16 here); a row alone is a
// group of one (plen 0: nothing shared).
// prep(b, kvh, qdst) puts row b's G query heads of kv head kvh into qdst (G·D bf16, contiguous),
// writing the cache first where the caller fuses that in, and returns the row's number of valid
// positions (<= 0: nothing to attend, zeros out). out (B, H, D).
template <int D, class Prep>
static void run_groups(const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t H, int64_t Hkv, int64_t L,
                       const int64_t* order, const int64_t* starts, const int64_t* plen, int64_t groups, float scale,
                       Prep prep) {
    const int G = int(H / Hkv);
    int64_t rmax = 1;
    for (int64_t g = 0; g < groups; ++g) rmax = std::max(rmax, starts[g + 1] - starts[g]);
    const int64_t tasks = groups * Hkv, ld = L + 1;  // + 1: a free column for 1/sum (attend_group)
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> o(rmax * G * D), s(rmax * G * ld);
        std::vector<uint16_t> qg(rmax * G * D);
        std::vector<const uint16_t*> kr(rmax), vr(rmax);
        std::vector<uint16_t*> outr(rmax);
        std::vector<int64_t> nr(rmax);
        for (int64_t i = begin; i < end; ++i) {
            const int64_t task = balanced(i, tasks), g = task / Hkv, kvh = task % Hkv;
            int R = 0;
            int64_t P = plen[g];
            for (int64_t x = starts[g]; x < starts[g + 1]; ++x) {
                const int64_t b = order[x];
                uint16_t* ob = out + (b * H + kvh * G) * D;
                int64_t nb = prep(b, kvh, qg.data() + R * G * D);
                if (nb <= 0) {
                    std::memset(ob, 0, size_t(G) * D * 2);
                    continue;
                }
                nb = nb < L ? nb : L;
                const int64_t base = (b * Hkv + kvh) * L * D;
                kr[R] = k + base, vr[R] = v + base, outr[R] = ob, nr[R] = nb;
                P = std::min(P, nb - 1);  // a row's last position is its own newest key: never shared
                ++R;
            }
            if (R == 0) continue;
            P = std::max<int64_t>(P, 0) / 16 * 16;
            const uint16_t* next_k = nullptr;  // the next task's first keys, to prefetch
            if (i + 1 < end) {
                const int64_t t2 = balanced(i + 1, tasks), b2 = order[starts[t2 / Hkv]];
                next_k = k + (b2 * Hkv + t2 % Hkv) * L * D;
            }
            attend_group<D>(qg.data(), R, G, kr.data(), vr.data(), nr.data(), P, scale, s.data(), ld, o.data(),
                            outr.data(), next_k);
        }
    });
}

// RoPE of one head as the runner does it: x·cos + roll(x, D/2)·sin_signed, in fp32, rounded once.
template <int D>
static inline void rope(const uint16_t* x, const uint16_t* cos, const uint16_t* sin_signed, uint16_t* y) {
    for (int d = 0; d < D; ++d)
        y[d] = f2bf(bf2f(x[d]) * bf2f(cos[d]) + bf2f(x[(d + D / 2) % D]) * bf2f(sin_signed[d]));
}

// decode_attention: the queries q (strides qsb per row, qsh per head) over n[b] cached positions.
template <int D>
static void run(const uint16_t* q, int64_t qsb, int64_t qsh, const uint16_t* k, const uint16_t* v, const int64_t* n,
                uint16_t* out, int64_t H, int64_t Hkv, int64_t L, const int64_t* order, const int64_t* starts,
                const int64_t* plen, int64_t groups, float scale) {
    const int64_t G = H / Hkv;
    run_groups<D>(k, v, out, H, Hkv, L, order, starts, plen, groups, scale, [&](int64_t b, int64_t kvh, uint16_t* qg) {
        for (int64_t j = 0; j < G; ++j) std::memcpy(qg + j * D, q + b * qsb + (kvh * G + j) * qsh, D * 2);
        return n[b];
    });
}

// rope_cache_attention: the decode step's attention block after the qkv matmul. Per row, RoPE on
// q and k, the new key and value written into the cache at offset pos[b], then attention over
// the pos[b] + 1 valid positions.
template <int D>
static void run_fused(const uint16_t* qkv, const uint16_t* cos, const uint16_t* sin_signed, const int64_t* pos,
                      uint16_t* k, uint16_t* v, uint16_t* out, int64_t H, int64_t Hkv, int64_t L, int64_t Lr,
                      const int64_t* order, const int64_t* starts, const int64_t* plen, int64_t groups, float scale) {
    const int64_t G = H / Hkv, W = (H + 2 * Hkv) * D;
    run_groups<D>(k, v, out, H, Hkv, L, order, starts, plen, groups, scale,
                  [&](int64_t b, int64_t kvh, uint16_t* qg) -> int64_t {
                      const int64_t p = pos[b];
                      if (p < 0 || p >= L || p >= Lr) return 0;  // no room: nothing written, zeros out
                      const uint16_t *row = qkv + b * W, *c = cos + p * D, *sn = sin_signed + p * D;
                      const int64_t at = ((b * Hkv + kvh) * L + p) * D;
                      rope<D>(row + (H + kvh) * D, c, sn, k + at);
                      std::memcpy(v + at, row + (H + Hkv + kvh) * D, D * 2);
                      for (int64_t j = 0; j < G; ++j) rope<D>(row + (kvh * G + j) * D, c, sn, qg + j * D);
                      return p + 1;
                  });
}

#define DISPATCH_D(D, ...)                                   \
    if (D == 64) { constexpr int DD = 64; __VA_ARGS__; }       \
    else if (D == 128) { constexpr int DD = 128; __VA_ARGS__; } \
    else if (D == 32) { constexpr int DD = 32; __VA_ARGS__; }  \
    else if (D == 16) { constexpr int DD = 16; __VA_ARGS__; }  \
    else TORCH_CHECK(false, "head_dim must be 16, 32, 64 or 128");

static inline const uint16_t* cbf(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
static inline uint16_t* mbf(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// The row groups of run_groups as three int64 tensors: order (B,) a permutation of 0..B-1,
// starts (groups + 1,) with starts[0] = 0 and starts[groups] = B, plen (groups,). Checked here:
// each row must belong to exactly one group (a task writes its rows' outputs and cache entries).
static int64_t check_groups(const torch::Tensor& order, const torch::Tensor& starts, const torch::Tensor& plen,
                            int64_t B) {
    for (auto* t : {&order, &starts, &plen})
        TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1, "groups: int64 vectors");
    const int64_t groups = plen.numel();
    TORCH_CHECK(order.numel() == B && starts.numel() == groups + 1, "groups: order (B,), starts (groups + 1,)");
    const int64_t *o = order.data_ptr<int64_t>(), *st = starts.data_ptr<int64_t>();
    TORCH_CHECK(st[0] == 0 && st[groups] == B, "groups: starts must go from 0 to B");
    std::vector<char> seen(B, 0);
    for (int64_t g = 0; g < groups; ++g) TORCH_CHECK(st[g] < st[g + 1], "groups: starts must increase");
    for (int64_t x = 0; x < B; ++x) {
        TORCH_CHECK(o[x] >= 0 && o[x] < B && !seen[o[x]], "groups: order must be a permutation of the rows");
        seen[o[x]] = 1;
    }
    return groups;
}

// q (B, H, 1, D) bf16, last dim contiguous; k, v (S, Hkv, L, D) bf16 contiguous, S >= B;
// n (B,) int64 valid positions per row; order/starts/plen: the rows sharing a prefix (run_groups).
// Returns (B, H, 1, D): a view of a (B, 1, H, D) buffer, so that transpose(1, 2).reshape(B, 1, H * D)
// is free.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor n, double scale,
                               torch::Tensor order, torch::Tensor starts, torch::Tensor plen) {
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.stride(3) == 1, "q must be (B, H, 1, D), last dim contiguous");
    TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes(), "bad cache");
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
                "bf16 only");
    TORCH_CHECK(n.scalar_type() == at::kLong && n.is_contiguous(), "n must be int64");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
    TORCH_CHECK(k.size(0) >= B && k.size(3) == D && n.numel() == B && H % Hkv == 0 && H / Hkv <= 64, "shapes");
    const int64_t groups = check_groups(order, starts, plen, B);
    auto out = torch::empty({B, 1, H, D}, q.options());
    DISPATCH_D(D, run<DD>(cbf(q), q.stride(0), q.stride(1), cbf(k), cbf(v), n.data_ptr<int64_t>(), mbf(out), H, Hkv, L,
                          order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), plen.data_ptr<int64_t>(), groups,
                          float(scale)))
    return out.transpose(1, 2);
}

// qkv (B, (H + 2 Hkv)·D) bf16 contiguous: the fused projection's output, q heads then k then v;
// cos, sin_signed (>= L, D) bf16 (runner.rope_tables); pos (B,) int64 offsets of the new tokens;
// k, v (S, Hkv, L, D) bf16 caches, written at pos; order/starts/plen: the rows sharing a prefix
// (run_groups). Per task, each row's new key (RoPE'd) and value go into its slot at pos[b], its
// RoPE'd queries into the group's buffer, then attention over pos[b] + 1 positions.
// Returns the attention output (B, H·D) bf16.
torch::Tensor rope_cache_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin_signed, torch::Tensor pos,
                                   torch::Tensor k, torch::Tensor v, int64_t H, double scale, torch::Tensor order,
                                   torch::Tensor starts, torch::Tensor plen) {
    TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && cos.is_contiguous() && sin_signed.is_contiguous(), "layout");
    TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes(), "bad cache");
    for (auto* t : {&qkv, &cos, &sin_signed, &k, &v}) TORCH_CHECK(t->scalar_type() == at::kBFloat16, "bf16 only");
    TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous(), "pos must be int64");
    const int64_t B = qkv.size(0), Hkv = k.size(1), L = k.size(2), D = k.size(3);
    TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && H % Hkv == 0 && H / Hkv <= 64 && k.size(0) >= B, "shapes");
    TORCH_CHECK(pos.numel() == B && cos.size(1) == D && sin_signed.sizes() == cos.sizes(), "rope shapes");
    const int64_t groups = check_groups(order, starts, plen, B);
    auto out = torch::empty({B, H * D}, qkv.options());
    DISPATCH_D(D, run_fused<DD>(cbf(qkv), cbf(cos), cbf(sin_signed), pos.data_ptr<int64_t>(), mbf(k), mbf(v), mbf(out),
                                H, Hkv, L, cos.size(0), order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                                plen.data_ptr<int64_t>(), groups, float(scale)))
    return out;
}

#if defined(__AVX512F__)
// f2bf and bf2f on 16 values: the same integer rounding to nearest even (NaN stays NaN), so the
// vector loops below give bitwise the results of the scalar ones.
static inline __m256i f2bf16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f), hi = _mm512_srli_epi32(u, 16);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    const __mmask16 nan =
        _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}
static inline __m512 bf16_to_f(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
static inline void store16(uint16_t* p, __m256i b) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b); }
#endif

// h += r (rounded to bf16, as a bf16 add), then x = w · bf16(h / rms(h)) as LLaMA's RMSNorm does
// it in bf16 (fp32 statistics, two roundings). h (N, d) is updated in place; returns x (N, d).
// The sum of squares of a row is one fp32 fused multiply-add per element, in column order. With
// AVX-512, 16 rows at a time: elementwise steps vectorised along the row, and the 16 rows' sums in
// the 16 lanes of one vector, each lane still adding its row's squares one by one in column order
// (the same result as the scalar loop, 16 dependency chains at once instead of one).
torch::Tensor add_rms_norm(torch::Tensor h, torch::Tensor r, torch::Tensor w, double eps) {
    TORCH_CHECK(h.is_contiguous() && r.is_contiguous() && w.is_contiguous() && h.sizes() == r.sizes(), "layout");
    for (auto* t : {&h, &r, &w}) TORCH_CHECK(t->scalar_type() == at::kBFloat16, "bf16 only");
    const int64_t d = h.size(-1), N = h.numel() / d;
    TORCH_CHECK(w.numel() == d && 16 * d < (int64_t(1) << 31), "weight");
    auto x = torch::empty_like(h);
    uint16_t* hp = mbf(h);
    const uint16_t *rp = cbf(r), *wp = cbf(w);
    uint16_t* xp = mbf(x);
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / d), [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
        std::vector<float> f(16 * d);  // h of the block's rows as fp32, row-major
        alignas(64) float ss[16];
        const __m512i rows16 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                  _mm512_set1_epi32(int(d)));
        for (int64_t i0 = begin; i0 < end; i0 += 16) {
            const int rows = int(std::min<int64_t>(16, end - i0));
            // 1. h += r in bf16, kept as fp32 too
            for (int k = 0; k < rows; ++k) {
                uint16_t* hi = hp + (i0 + k) * d;
                const uint16_t* ri = rp + (i0 + k) * d;
                float* fk = f.data() + k * d;
                int64_t j = 0;
                for (; j + 16 <= d; j += 16) {
                    const __m256i sb = f2bf16(_mm512_add_ps(load16(hi + j), load16(ri + j)));
                    store16(hi + j, sb);
                    _mm512_storeu_ps(fk + j, bf16_to_f(sb));
                }
                for (; j < d; ++j) {
                    const uint16_t sb = f2bf(bf2f(hi[j]) + bf2f(ri[j]));
                    hi[j] = sb;
                    fk[j] = bf2f(sb);
                }
            }
            // 2. sums of squares, lane k = row k: column j of all the rows, j in order
            const __mmask16 live = __mmask16((1u << rows) - 1);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < d; ++j) {
                const __m512 c = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, rows16, f.data() + j, 4);
                acc = _mm512_fmadd_ps(c, c, acc);
            }
            _mm512_store_ps(ss, acc);
            // 3. x = w · bf16(h / rms)
            for (int k = 0; k < rows; ++k) {
                const float inv = 1.0f / std::sqrt(ss[k] / float(d) + float(eps));
                const float* fk = f.data() + k * d;
                uint16_t* xi = xp + (i0 + k) * d;
                const __m512 iv = _mm512_set1_ps(inv);
                int64_t j = 0;
                for (; j + 16 <= d; j += 16) {
                    const __m512 nrm = bf16_to_f(f2bf16(_mm512_mul_ps(_mm512_loadu_ps(fk + j), iv)));
                    store16(xi + j, f2bf16(_mm512_mul_ps(load16(wp + j), nrm)));
                }
                for (; j < d; ++j) xi[j] = f2bf(bf2f(wp[j]) * bf2f(f2bf(fk[j] * inv)));
            }
        }
#else
        std::vector<float> f(d);
        for (int64_t i = begin; i < end; ++i) {
            uint16_t* hi = hp + i * d;
            const uint16_t* ri = rp + i * d;
            float ss = 0.f;
            for (int64_t j = 0; j < d; ++j) {
                const uint16_t sb = f2bf(bf2f(hi[j]) + bf2f(ri[j]));
                hi[j] = sb;
                f[j] = bf2f(sb);
                ss = std::fma(f[j], f[j], ss);
            }
            const float inv = 1.0f / std::sqrt(ss / float(d) + float(eps));
            uint16_t* xi = xp + i * d;
            for (int64_t j = 0; j < d; ++j) xi[j] = f2bf(bf2f(wp[j]) * bf2f(f2bf(f[j] * inv)));
        }
#endif
    });
    return x;
}

// LLaMA's MLP activation: bf16(silu(g)) · u rounded to bf16, for gu (N, 2·I) = [g | u] -> (N, I).
torch::Tensor silu_mul(torch::Tensor gu) {
    TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.scalar_type() == at::kBFloat16, "gu (N, 2I) bf16");
    const int64_t N = gu.size(0), I = gu.size(1) / 2;
    auto y = torch::empty({N, I}, gu.options());
    const uint16_t* gp = cbf(gu);
    uint16_t* yp = mbf(y);
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / I), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const uint16_t *g = gp + i * 2 * I, *u = g + I;
            uint16_t* yi = yp + i * I;
            int64_t j = 0;
#if defined(__AVX512F__)
            for (; j + 16 <= I; j += 16) {
                const __m512 x = load16(g + j);
                const __m512 sv =
                    _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
                store16(yi + j, f2bf16(_mm512_mul_ps(bf16_to_f(f2bf16(sv)), load16(u + j))));
            }
#endif
            for (; j < I; ++j) {
                const float x = bf2f(g[j]);
                yi[j] = f2bf(bf2f(f2bf(x / (1.0f + std::exp(-x)))) * bf2f(u[j]));
            }
        }
    });
    return y;
}

// Sampling's one pass over the vocabulary (sampling.sample_next, bf16 logits): for each row b,
// m = max x, e = exp((x - m) / t[b]) written as fp32 into work[b, :V] (columns V.. stay as they
// are: zero), and the sums of e over blocks of `block` columns. logits (B, V) bf16, t (B,) fp32,
// work (>= B, nb·block) fp32. Returns (m (B, 1), block sums (B, nb)).
std::vector<torch::Tensor> exp_block_sums(torch::Tensor logits, torch::Tensor t, torch::Tensor work, int64_t block) {
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kBFloat16, "logits");
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && work.is_contiguous() &&
                work.scalar_type() == at::kFloat, "t, work fp32");
    const int64_t B = logits.size(0), V = logits.size(1), W = work.size(1), nb = W / block;
    TORCH_CHECK(t.numel() == B && work.size(0) >= B && nb * block == W && W >= V && block % 16 == 0, "shapes");
    auto m = torch::empty({B, 1}, t.options());
    auto bs = torch::empty({B, nb}, t.options());
    const uint16_t* xp = cbf(logits);
    const float* tp = t.data_ptr<float>();
    float *wp = work.data_ptr<float>(), *mp = m.data_ptr<float>(), *bp = bs.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            const uint16_t* x = xp + b * V;
            float* e = wp + b * W;
            float mx = -INFINITY;
            int64_t i = 0;
#if defined(__AVX512F__)
            __m512 mv = _mm512_set1_ps(-INFINITY);
            for (; i + 16 <= V; i += 16) mv = _mm512_max_ps(mv, load16(x + i));
            mx = _mm512_reduce_max_ps(mv);
#endif
            for (; i < V; ++i) mx = std::max(mx, bf2f(x[i]));
            mp[b] = mx;
            const float inv_t = 1.0f / tp[b];
            for (int64_t k = 0; k < nb; ++k) {
                const int64_t lo = k * block, hi = std::min(V, lo + block);
                float sum = 0.f;
                int64_t j = lo;
#if defined(__AVX512F__)
                __m512 acc = _mm512_setzero_ps();
                const __m512 mvv = _mm512_set1_ps(mx), it = _mm512_set1_ps(inv_t);
                for (; j + 16 <= hi; j += 16) {
                    __m512 ev = exp512(_mm512_mul_ps(_mm512_sub_ps(load16(x + j), mvv), it));
                    _mm512_storeu_ps(e + j, ev);
                    acc = _mm512_add_ps(acc, ev);
                }
                sum = _mm512_reduce_add_ps(acc);
#endif
                for (; j < hi; ++j) {
                    e[j] = std::exp((bf2f(x[j]) - mx) * inv_t);
                    sum += e[j];
                }
                bp[b * nb + k] = sum;
            }
        }
    });
    return {m, bs};
}
