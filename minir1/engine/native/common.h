// Pieces shared by the native decode steps (decode_step.cpp: DeepSeek-V3's MLA; dense_step.cpp: Llama, Qwen2
// and Qwen3): the packed GEMM, RMSNorm, a vectorised exp, and the gated activations.
//
// Layouts. A packed weight of a linear layer y = x W^T (W [N, K]) is stored as panels
// [ceil(N/16)][K][16] (zero-padded columns), so a 16-column block streams contiguously. Activations
// are row-major with a row stride padded to 16 floats.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace minir1 {

inline int pad16(int n) { return (n + 15) / 16 * 16; }

// Packed weights come as fp32 (float) or bf16 (uint16_t: a float's upper half, widened exactly by a shift);
// the arithmetic is fp32 either way, so bf16 weights halve the bytes a bandwidth-bound step streams.
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {
    const uint32_t bits = (uint32_t)w << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// ---- GEMM: C[M, N] (+)= A[M, K] · B, B packed as above ------------------------------------------------
// Each output element sums over k in order with one FMA per k, whatever the vector width: the AVX-512,
// AVX2 and scalar kernels give the same numbers. The width is chosen at compile time, and the library is
// built per CPU (-march=native; build.py keys it by the CPU's flags), so the fast path is picked at run time.
#if defined(__AVX512F__)
constexpr int MR_MAX = 12;  // 12 accumulator rows of one 16-float register each (of 32)

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

template <int MR, typename W>
inline void micro(int K, const float* __restrict A, int lda, const W* __restrict B, float* __restrict C, int ldc,
                  bool acc) {
    __m512 c[MR];
#pragma GCC unroll 12
    for (int i = 0; i < MR; i++) c[i] = acc ? _mm512_loadu_ps(C + i * ldc) : _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m512 b = load16(B + k * 16);
#pragma GCC unroll 12
        for (int i = 0; i < MR; i++) c[i] = _mm512_fmadd_ps(_mm512_set1_ps(A[i * lda + k]), b, c[i]);
    }
#pragma GCC unroll 12
    for (int i = 0; i < MR; i++) _mm512_storeu_ps(C + i * ldc, c[i]);
}

#elif defined(__AVX2__) && defined(__FMA__)
constexpr int MR_MAX = 6;  // 6 rows x 2 registers of 8 floats

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

template <int MR, typename W>
inline void micro(int K, const float* __restrict A, int lda, const W* __restrict B, float* __restrict C, int ldc,
                  bool acc) {
    __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
        c0[i] = acc ? _mm256_loadu_ps(C + i * ldc) : _mm256_setzero_ps();
        c1[i] = acc ? _mm256_loadu_ps(C + i * ldc + 8) : _mm256_setzero_ps();
    }
    for (int k = 0; k < K; k++) {
        __m256 b0 = load8(B + k * 16), b1 = load8(B + k * 16 + 8);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m256 a = _mm256_broadcast_ss(A + i * lda + k);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(C + i * ldc, c0[i]);
        _mm256_storeu_ps(C + i * ldc + 8, c1[i]);
    }
}

#else
constexpr int MR_MAX = 6;

template <int MR, typename W>
inline void micro(int K, const float* __restrict A, int lda, const W* __restrict B, float* __restrict C, int ldc,
                  bool acc) {
    float c[MR][16];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 16; j++) c[i][j] = acc ? C[i * ldc + j] : 0.f;
    for (int k = 0; k < K; k++)
        for (int i = 0; i < MR; i++) {
            const float a = A[i * lda + k];
            for (int j = 0; j < 16; j++) c[i][j] += a * widen(B[k * 16 + j]);
        }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 16; j++) C[i * ldc + j] = c[i][j];
}
#endif

// The last r < MR_MAX rows of a block, with the kernel of exactly r rows.
template <int R, typename W>
inline void micro_tail(int r, int K, const float* a, int lda, const W* Bp, float* c, int ldc, bool acc) {
    if constexpr (R > 0) {
        if (r == R) micro<R>(K, a, lda, Bp, c, ldc, acc);
        else micro_tail<R - 1>(r, K, a, lda, Bp, c, ldc, acc);
    }
}

template <typename W>
inline void gemm_block(int M, int K, const float* A, int lda, const W* Bp, float* C, int ldc, bool acc) {
    int m = 0;
    for (; m + MR_MAX <= M; m += MR_MAX) micro<MR_MAX>(K, A + m * lda, lda, Bp, C + m * ldc, ldc, acc);
    micro_tail<MR_MAX - 1>(M - m, K, A + m * lda, lda, Bp, C + m * ldc, ldc, acc);
}

// Columns are split across threads in 16-wide panels; each panel stays in L1 across the row blocks. Rows
// go in chunks of 48 (a prefill has hundreds), so the chunk of A stays in L2 while every panel passes.
template <typename W>
void gemm(int M, int N, int K, const float* A, int lda, const W* B, float* C, int ldc, bool acc, int threads) {
    const int nb = pad16(N) / 16, MC = 48;
    for (int m0 = 0; m0 < M; m0 += MC) {
        const int mc = M - m0 < MC ? M - m0 : MC;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && nb > 1)
        for (int j = 0; j < nb; j++)
            gemm_block(mc, K, A + (int64_t)m0 * lda, lda, B + (int64_t)j * K * 16, C + (int64_t)m0 * ldc + j * 16, ldc,
                       acc);
    }
}

// gemm's work shared among the threads of an enclosing parallel region: every thread of the team calls it,
// takes the same static share of the panels, and waits for the others at the end. (Called outside a
// parallel region, the one thread does it all.) Each output element is computed exactly as by gemm.
template <typename W>
void gemm_ws(int M, int N, int K, const float* A, int lda, const W* B, float* C, int ldc, bool acc) {
    const int nb = pad16(N) / 16, MC = 48;
    for (int m0 = 0; m0 < M; m0 += MC) {
        const int mc = M - m0 < MC ? M - m0 : MC;
#pragma omp for schedule(static) nowait
        for (int j = 0; j < nb; j++)
            gemm_block(mc, K, A + (int64_t)m0 * lda, lda, B + (int64_t)j * K * 16, C + (int64_t)m0 * ldc + j * 16, ldc,
                       acc);
    }
#pragma omp barrier
}

#if defined(__AVX512F__)
// r[i] = row i of a 16 x 16 block -> r[k] = its column k (unpack pairs, then 4 x 4 blocks, then 128-bit lanes).
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
        t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
    }
}
#endif

// One panel: rows [16 of them, `rows` real] of W (row stride K) -> o [K][16], zero-padded. fp32 weights on
// AVX-512 go 16 x 16 blocks at a time through registers (3x faster than element by element: GRPO repacks
// every step); the copy is exact either way.
template <typename W>
inline void pack_panel(const W* wp, int rows, int K, W* o) {
    int k = 0;
#if defined(__AVX512F__)
    if constexpr (sizeof(W) == sizeof(float)) {
        for (; k + 16 <= K; k += 16) {
            __m512 r[16];
            for (int c = 0; c < 16; c++)
                r[c] = c < rows ? _mm512_loadu_ps(reinterpret_cast<const float*>(wp) + (int64_t)c * K + k)
                                : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(reinterpret_cast<float*>(o) + (int64_t)(k + i) * 16, r[i]);
        }
    }
#endif
    for (; k < K; k++) {
        W* ok = o + (int64_t)k * 16;
        for (int c = 0; c < rows; c++) ok[c] = wp[(int64_t)c * K + k];
        for (int c = rows; c < 16; c++) ok[c] = W(0);
    }
}

// Packs `batch` weights W [N, K] (y = x W^T) into panels [ceil(N/16)][K][16], zero-padded; one pass over the
// panels, split across threads, 16 rows read in step so each cache line of a panel is written once.
template <typename W>
void pack_panels(const W* w, int64_t batch, int N, int K, W* out, int threads) {
    const int nb = pad16(N) / 16;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t p = 0; p < batch * nb; p++) {
        const int64_t b = p / nb;
        const int j = (int)(p % nb);
        const int rows = N - j * 16 < 16 ? N - j * 16 : 16;
        pack_panel(w + b * (int64_t)N * K + (int64_t)j * 16 * K, rows, K, out + (b * nb + j) * (int64_t)K * 16);
    }
}

// ---- elementwise pieces ---------------------------------------------------------------------------------
inline void rmsnorm(const float* x, const float* w, float* y, int n, float eps) {
    // The reference reduces in fp32 with pairwise sums; double keeps us as close. Eight partial sums
    // break the chain of dependent adds (a row was ~4 cycles per element) and change only the double's
    // last bits, far below the float it is rounded to.
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) part[j] += (double)x[i + j] * x[i + j];
    double ss = 0;
    for (; i < n; i++) ss += (double)x[i] * x[i];
    for (int j = 0; j < 8; j++) ss += part[j];
    const float r = 1.0f / std::sqrt((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

// The end of every decode step: hidden_out [B, D] (before the final norm) when given, then the final RMSNorm
// and the output head for the rows in logit_index (null: all B) into logits [M, pad16(V)]. x and xn are
// [B, Dp] (xn is scratch). Work shared among the threads of an enclosing parallel region, as gemm_ws.
template <typename W>
void output_head_ws(int B, int D, int Dp, int V, const float* x, float* xn, const float* final_norm,
                    const W* lm_head, float eps, float* hidden_out, const int64_t* logit_index, int n_logits,
                    float* logits) {
    if (hidden_out) {
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) std::memcpy(hidden_out + (size_t)b * D, x + (size_t)b * Dp, sizeof(float) * D);
    }
    const int M = logit_index ? n_logits : B;
#pragma omp for schedule(static)
    for (int j = 0; j < M; j++)
        rmsnorm(x + (size_t)(logit_index ? logit_index[j] : j) * Dp, final_norm, xn + (size_t)j * Dp, D, eps);
    gemm_ws(M, V, D, xn, Dp, lm_head, logits, pad16(V), false);
}

// output_head_ws in a parallel region of its own.
template <typename W>
void output_head(int B, int D, int Dp, int V, const float* x, float* xn, const float* final_norm, const W* lm_head,
                 float eps, float* hidden_out, const int64_t* logit_index, int n_logits, float* logits, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    output_head_ws(B, D, Dp, V, x, xn, final_norm, lm_head, eps, hidden_out, logit_index, n_logits, logits);
}

// minir1.model.apply_rope: interleaved pairs in, [rotated evens | rotated odds] out.
inline void rope(const float* x, const float* cos, const float* sin, float* out, int R) {
    const int h = R / 2;
    float tmp[512];
    for (int i = 0; i < h; i++) {
        const float a = x[2 * i], b = x[2 * i + 1];
        tmp[i] = a * cos[i] - b * sin[i];
        tmp[h + i] = b * cos[i] + a * sin[i];
    }
    std::memcpy(out, tmp, sizeof(float) * R);
}

// exp(x) to ~2 ulp (Cephes' expf: range reduction by ln 2, a degree-6 polynomial), eight lanes at a
// time: glibc's expf is scalar, and the exponentials of softmax, SiLU and sampling were a fifth of a
// decode step. The scalar version is the same formula for tails and non-AVX2 builds.
inline float exp1(float x) {
    if (x != x) return x;  // NaN stays NaN (and never reaches the float-to-int conversion below)
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
    const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp8(__m256 x) {
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), y);
}
#endif

// p[i] = exp(p[i] * scale - shift); returns the sum.
inline float exp_sum(float* p, int n, float scale, float shift) {
    int i = 0;
    float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(p + i), _mm256_set1_ps(scale), _mm256_set1_ps(shift)));
        _mm256_storeu_ps(p + i, v);
        acc = _mm256_add_ps(acc, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (float v : lanes) sum += v;
#endif
    for (; i < n; i++) sum += (p[i] = exp1(p[i] * scale - shift));
    return sum;
}

// SwiGLU on a row [gate (n) | up (n)]: gate[i] <- silu(gate[i]) · up[i] · w.
inline void swiglu(float* h, int n, float w) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), vw = _mm256_set1_ps(w);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(h + i), u = _mm256_loadu_ps(h + n + i);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_mul_ps(s, u), vw));
    }
#endif
    for (; i < n; i++) h[i] = h[i] / (1.0f + exp1(-h[i])) * h[n + i] * w;
}

// ---- sampling and whole generations ------------------------------------------------------------------------
// Sampling from logits [B, ld] (first V columns) without truncation, as minir1.engine.sample does, with
// each row's own temperature: 0 takes the argmax (first maximum); otherwise the inverse CDF of
// softmax(logits / T) at u[b] · total, the first index whose running sum exceeds it, never a
// zero-probability token. logp gets log softmax(logits / T) of the chosen token (T = 1 when greedy).
inline void sample_rows(const float* logits, int B, int V, int ld, const float* temperature, const float* u,
                        int64_t* tokens, float* logp) {
    std::vector<float> p((size_t)V);
    for (int b = 0; b < B; b++) {
        const float* z = logits + (size_t)b * ld;
        const float inv = temperature[b] > 0 ? 1.0f / temperature[b] : 1.0f;
        float mx = -INFINITY;
        int arg = 0;
        for (int i = 0; i < V; i++)
            if (z[i] > mx) { mx = z[i]; arg = i; }
        const float mxs = mx * inv;
        std::memcpy(p.data(), z, sizeof(float) * V);
        const double sum = exp_sum(p.data(), V, inv, mxs);
        const float lse = mxs + (float)std::log(sum);
        int pick = arg;
        if (temperature[b] > 0) {
            const double target = (double)u[b] * sum;
            double cum = 0;
            int last = 0;
            pick = -1;
            for (int i = 0; i < V; i++) {
                cum += p[i];
                if (p[i] > 0) last = i;
                if (pick < 0 && cum > target) pick = i;
            }
            if (pick < 0 || pick > last) pick = last;
        }
        tokens[b] = pick;
        logp[b] = z[pick] * inv - lse;
    }
}

// Rows decoded to their ends: what minir1.engine.DecodeBatch's step/retire loop does for one group of rows
// (one temperature, untruncated sampling, stop tokens, no stop strings), without a return to Python per
// token. Row b's tokens so far are out_tokens[b, :lengths[b]] (at least the prefill's one), its last
// token sits at position pos0[b]; stopped[b] = 1 if it already ended on a stop token. A row runs while it
// has neither stopped nor reached max_new tokens; each step every running row, in batch order, takes the
// next uniform of u (none when greedy), the draws DecodeBatch's sampler would take from the generator.
// step(n, tokens, positions, cache_rows, logits) is one decode step of n rows into logits [n, ldl]; a
// finished row keeps its cache row, which no later step touches (no compaction). Out: the rows' tokens,
// log-probabilities (out_logp [B, max_new]), lengths and stopped. At most max_steps steps: the caller resumes
// with each row's position advanced by the tokens it gained and u advanced by all the tokens gained (one
// draw each), so that a long generation returns to Python, where Ctrl-C is seen, every so often. Returns the
// number of decode steps, or -1 if u runs out (the caller sizes it for the worst case).
template <typename Step>
int generate_rows(Step&& step, int B, int V, int ldl, int max_new, const int64_t* pos0, const int64_t* stop,
                  int n_stop, float temperature, const float* u, int64_t n_u, int64_t* out_tokens, float* out_logp,
                  int32_t* lengths, int32_t* stopped, float* logits, int max_steps) {
    std::vector<int64_t> act, tok, pos, new_tok((size_t)B);
    std::vector<float> temps((size_t)B, temperature), draws((size_t)B, 0.f), new_logp((size_t)B);
    for (int b = 0; b < B; b++)
        if (!stopped[b] && lengths[b] < max_new) {
            act.push_back(b);
            tok.push_back(out_tokens[(int64_t)b * max_new + lengths[b] - 1]);
            pos.push_back(pos0[b]);
        }
    int64_t next_u = 0;
    int steps = 0;
    while (!act.empty() && steps < max_steps) {
        const int n = (int)act.size();
        step(n, tok.data(), pos.data(), act.data(), logits);
        if (temperature > 0) {
            if (next_u + n > n_u) return -1;
            for (int i = 0; i < n; i++) draws[i] = u[next_u++];
        }
        sample_rows(logits, n, V, ldl, temps.data(), draws.data(), new_tok.data(), new_logp.data());
        steps++;
        int kept = 0;
        for (int i = 0; i < n; i++) {
            const int64_t b = act[i], t = new_tok[i];
            out_tokens[b * max_new + lengths[b]] = t;
            out_logp[b * max_new + lengths[b]] = new_logp[i];
            lengths[b]++;
            bool is_stop = false;
            for (int s = 0; s < n_stop; s++) is_stop |= stop[s] == t;
            if (is_stop) stopped[b] = 1;
            if (is_stop || lengths[b] >= max_new) continue;
            act[kept] = b;
            tok[kept] = t;
            pos[kept] = pos[i] + 1;
            kept++;
        }
        act.resize(kept);
        tok.resize(kept);
        pos.resize(kept);
    }
    return steps;
}

}  // namespace minir1
