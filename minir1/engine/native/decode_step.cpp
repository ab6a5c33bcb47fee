// One decode step of a DeepSeek-V3 model (one new token per row) in a single native call, fp32, CPU.
//
// Why: at decode sizes (a few dozen rows) every PyTorch op costs more in dispatch than in arithmetic,
// and MKL runs skinny GEMMs single-threaded. Here the whole step (embedding, every layer, the final
// norm and the output head) is one call: small GEMMs on weights packed once per weight version, split
// across OpenMP threads (the runtime PyTorch already loaded), with the norms, rotary embedding,
// latent-cache attention, routing and SwiGLU as plain loops in between.
//
// The maths is minir1/models/deepseek_v3.py's with MLA's weight absorption (DeepSeek-V2 §2.1.2) carried one step
// further than minir1/engine/cache.py's LatentCache.attend: the key up-projection W_UK is folded into the
// query projection and the value up-projection W_UV into o_proj once, when the weights are packed
// (minir1/engine/native/fused.py), so attention runs directly on the cached latents [c_KV ; k_R].
//
// Layouts: packed weights and activations as in common.h. The cache is LatentCache.kv:
// [layers, rows, max_len, C + R], contiguous.

#include "common.h"

using namespace minir1;

namespace {

// A routing score as a ranking key: NaN ranks lowest (as -inf), so that selection is total.
inline float rank_key(float x) { return x != x ? -INFINITY : x; }

}  // namespace

extern "C" {

// Shapes and constants; mirrors minir1.models.deepseek_v3.ModelConfig (see fused.py).
struct Dims {
    int32_t D, H, C, R, q_rank, V, E, top_k, n_group, topk_group, norm_topk;
    float eps, eps_q, eps_kv, scaling, attention_factor;
    const float* inv_freq;  // [R / 2] rotary frequencies (RotaryEmbedding.inv_freq, YaRN applied)
};

// One decoder layer's packed weights. ffn_kind 0: dense SwiGLU (gu/down, width I); 1: MoE (router,
// experts, optional shared expert in gu/down of width I).
struct Layer {
    const float *in_norm, *post_norm;
    const float *w_a;       // [q_a | kv_a] (with q_lora) or [q absorbed | kv_a] (without), K = D
    const float *q_a_norm;  // q_lora only
    const float *w_q;       // q absorbed, K = q_rank; q_lora only
    const float *kv_norm;
    const float *w_o;       // o_proj with W_UV folded in, K = H * C
    int32_t ffn_kind, I;    // I: dense or shared-expert width (0 = no shared expert)
    const float *gu, *down;
    const float *router, *bias;  // [E] correction bias
    const float *experts_gu, *experts_down;  // per expert packed, each [pad16(2 * Ie) x D] and [pad16(D) x Ie]
    int32_t Ie;
};

// A forward of B tokens through n_layers decoder layers on the latent cache. Token b sits at position
// pos[b] of cache row rows[b] (null: row b): a decode step has one token per row; a prefill, or a
// speculative verification, has several tokens of one row at consecutive positions (every token's
// latent is written before any attends, so causality comes from the positions alone).
//   input   embed[tokens[b]], or x_in [B, D] when given (an MTP module's projected input)
//   cache   [cache layers, cache rows, S, C + R]; layers[l] uses cache layer layer_offset + l
//   output  hidden_out [B, D] (the last layer's output, before the final norm) when given; logits
//           [n_logits, pad16(V)] after final_norm and lm_head for the tokens in logit_index (null: all)
//   loads   [MoE layers, E] tokens per expert (added to) when given. Returns 0.
int minir1_decode_step(const Dims* d, const Layer* layers, int n_layers, int layer_offset, const float* embed,
                       const float* x_in, const float* final_norm, const float* lm_head, int B, const int64_t* tokens,
                       const int64_t* pos, const int64_t* rows, float* cache, int64_t cache_rows, int64_t S,
                       const int64_t* logit_index, int n_logits, float* logits, float* hidden_out, int32_t* loads,
                       int threads) {
    const int D = d->D, H = d->H, C = d->C, R = d->R, CR = C + R, E = d->E, K = d->top_k;
    const int Dp = pad16(D), NQ = d->q_rank > 0 ? d->q_rank : H * CR, Na = pad16(NQ + CR);
    const int Nq = pad16(H * CR), HC = H * C, HCp = pad16(HC), Ep = pad16(E > 0 ? E : 1);
    int maxI = 0, Ie = 0;
    for (int l = 0; l < n_layers; l++) {
        maxI = layers[l].I > maxI ? layers[l].I : maxI;
        Ie = layers[l].Ie > Ie ? layers[l].Ie : Ie;
    }
    const int Iw = pad16(2 * maxI), ldhe = pad16(2 * Ie);  // h: the dense MLP or shared expert; ht: the routed experts
    std::vector<float> cos((size_t)B * (R / 2)), sin((size_t)B * (R / 2));
    std::vector<float> x((size_t)B * Dp, 0.f), xn((size_t)B * Dp, 0.f), a((size_t)B * Na), q((size_t)B * Nq),
        o((size_t)B * HCp, 0.f), h((size_t)B * Iw), rs((size_t)B * Ep);
    std::vector<int> eid((size_t)B * (K > 0 ? K : 1)), start(E + 1, 0), order(eid.size()), where(eid.size());
    std::vector<float> ew(eid.size()), y(E > 0 ? eid.size() * Dp : 0);
    const int64_t row_stride = S * CR, layer_stride = cache_rows * row_stride;
    float* qsrc = d->q_rank > 0 ? q.data() : a.data();  // per head [latent query (C) | rope query (R)]
    const int ldq = d->q_rank > 0 ? Nq : Na;

    // One parallel region for the whole step: the GEMMs share their panels among the threads (gemm_ws), the
    // per-token work (norms, rotary, attention, routing, SwiGLU, the experts' sums) is split by token, and the
    // threads meet at a barrier between dependent pieces, where a region per GEMM would fork and join ~30
    // times a step and leave the per-token work to one thread. Every number is computed as before.
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        std::vector<float> sc, xt((size_t)B * Dp), ht((size_t)B * ldhe);
        std::vector<int> at(K > 0 ? K : 1);
        // RotaryEmbedding.forward: angle = position · inv_freq in fp32, scaled by YaRN's attention factor.
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            for (int i = 0; i < R / 2; i++) {
                const float angle = (float)pos[b] * d->inv_freq[i];
                cos[(size_t)b * (R / 2) + i] = std::cos(angle) * d->attention_factor;
                sin[(size_t)b * (R / 2) + i] = std::sin(angle) * d->attention_factor;
            }
            std::memcpy(&x[(size_t)b * Dp], x_in ? x_in + (size_t)b * D : embed + tokens[b] * D, sizeof(float) * D);
        }

        int moe_index = 0;
        for (int l = 0; l < n_layers; l++) {
            const Layer& ly = layers[l];
            float* kv = cache + (layer_offset + l) * layer_stride;
            // ---- attention (DeepSeek-V2 §2.1, decoding with absorbed up-projections) ---------------------
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) rmsnorm(&x[(size_t)b * Dp], ly.in_norm, &xn[(size_t)b * Dp], D, d->eps);
            gemm_ws(B, NQ + CR, D, xn.data(), Dp, ly.w_a, a.data(), Na, false);
            if (d->q_rank > 0) {
#pragma omp for schedule(static)
                for (int b = 0; b < B; b++)
                    rmsnorm(&a[(size_t)b * Na], ly.q_a_norm, &a[(size_t)b * Na], NQ, d->eps_q);
                gemm_ws(B, H * CR, NQ, a.data(), Na, ly.w_q, q.data(), Nq, false);
            }
            // Every token's latent is written before any token attends (the barrier closing this loop).
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                const float *cb = &cos[(size_t)b * (R / 2)], *sb = &sin[(size_t)b * (R / 2)];
                float* qb = qsrc + (size_t)b * ldq;
                for (int hh = 0; hh < H; hh++) rope(qb + hh * CR + C, cb, sb, qb + hh * CR + C, R);
                float* slot = kv + (rows ? rows[b] : b) * row_stride + pos[b] * CR;
                const float* lat = &a[(size_t)b * Na + NQ];
                rmsnorm(lat, ly.kv_norm, slot, C, d->eps_kv);
                rope(lat + C, cb, sb, slot + C, R);
            }
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                const float* qb = qsrc + (size_t)b * ldq;
                const float* keys = kv + (rows ? rows[b] : b) * row_stride;
                const int n = (int)pos[b] + 1;
                if (sc.size() < (size_t)H * n) sc.resize((size_t)H * n);
                for (int s = 0; s < n; s++) {
                    const float* k = keys + (int64_t)s * CR;
                    for (int hh = 0; hh < H; hh++) {
                        const float* qh = qb + hh * CR;
                        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                        for (int i = 0; i < CR; i++) acc += qh[i] * k[i];
                        sc[(size_t)hh * n + s] = acc;
                    }
                }
                float* ob = &o[(size_t)b * HCp];
                for (int hh = 0; hh < H; hh++) {
                    float* p = &sc[(size_t)hh * n];
                    float mx = -INFINITY;
                    for (int s = 0; s < n; s++) mx = p[s] > mx ? p[s] : mx;
                    const float inv = 1.f / exp_sum(p, n, 1.0f, mx);
                    float* oh = ob + hh * C;
                    for (int i = 0; i < C; i++) oh[i] = 0.f;
                    for (int s = 0; s < n; s++) {
                        const float w = p[s] * inv;
                        const float* k = keys + (int64_t)s * CR;
#pragma omp simd
                        for (int i = 0; i < C; i++) oh[i] += w * k[i];
                    }
                }
            }
            gemm_ws(B, D, HC, o.data(), HCp, ly.w_o, x.data(), Dp, true);  // residual add in place

            // ---- feed-forward: dense SwiGLU, or DeepSeekMoE (DeepSeek-V3 §2.1.2) --------------------------
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) rmsnorm(&x[(size_t)b * Dp], ly.post_norm, &xn[(size_t)b * Dp], D, d->eps);
            if (ly.I > 0) {  // the dense MLP, or the MoE's shared expert
                const int I = ly.I, ldh = pad16(2 * I);
                gemm_ws(B, 2 * I, D, xn.data(), Dp, ly.gu, h.data(), ldh, false);
#pragma omp for schedule(static)
                for (int b = 0; b < B; b++) swiglu(&h[(size_t)b * ldh], I, 1.0f);
                gemm_ws(B, D, I, h.data(), ldh, ly.down, x.data(), Dp, true);
            }
            if (ly.ffn_kind == 1) {
                gemm_ws(B, E, D, xn.data(), Dp, ly.router, rs.data(), Ep, false);
#pragma omp for schedule(static)
                for (int b = 0; b < B; b++) {
                    float* sc_b = &rs[(size_t)b * Ep];
                    float choice[1024];
                    bool allowed[1024], taken[1024];
                    for (int e = 0; e < E; e++) {
                        sc_b[e] = 1.f / (1.f + std::exp(-sc_b[e]));
                        choice[e] = rank_key(sc_b[e] + ly.bias[e]);
                        allowed[e] = true;
                        taken[e] = false;
                    }
                    if (d->n_group > 1 && d->topk_group < d->n_group) {  // group-limited routing
                        const int G = d->n_group, per = E / G;
                        float gs[256];
                        for (int g = 0; g < G; g++) {
                            float m1 = -INFINITY, m2 = -INFINITY;
                            int i1 = -1;
                            for (int e = g * per; e < (g + 1) * per; e++)
                                if (i1 < 0 || choice[e] > m1) { m1 = choice[e]; i1 = e; }
                            for (int e = g * per; e < (g + 1) * per; e++)
                                if (e != i1 && choice[e] > m2) m2 = choice[e];
                            gs[g] = rank_key(m1 + m2);
                        }
                        bool keep[256] = {false};
                        for (int t = 0; t < d->topk_group; t++) {
                            int best = -1;
                            for (int g = 0; g < G; g++)
                                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
                            keep[best] = true;
                        }
                        for (int g = 0; g < G; g++)
                            for (int e = g * per; e < (g + 1) * per; e++) allowed[e] = keep[g];
                    }
                    // Exactly K distinct experts whatever the scores: allowed before not, then the larger key
                    // (NaN ranks as -inf), then the lower index; the PyTorch Router ranks the same way.
                    float total = 0.f;
                    for (int t = 0; t < K; t++) {
                        int best = -1;
                        for (int e = 0; e < E; e++) {
                            if (taken[e]) continue;
                            if (best < 0 || (allowed[e] && !allowed[best]) ||
                                (allowed[e] == allowed[best] && choice[e] > choice[best]))
                                best = e;
                        }
                        taken[best] = true;
                        eid[(size_t)b * K + t] = best;
                        ew[(size_t)b * K + t] = sc_b[best];
                        total += sc_b[best];
                    }
                    for (int t = 0; t < K; t++) {
                        float w = ew[(size_t)b * K + t];
                        if (d->norm_topk) w = w / (total + 1e-20f);
                        ew[(size_t)b * K + t] = w * d->scaling;
                    }
                }
                // Each expert runs once on the tokens routed to it (gathered by a counting sort by expert),
                // the experts dealt out to the threads one at a time, each writing its rows of y.
#pragma omp single
                {
                    std::fill(start.begin(), start.end(), 0);
                    for (int i = 0; i < B * K; i++) {
                        start[eid[i] + 1]++;
                        if (loads) loads[moe_index * E + eid[i]] += 1;
                    }
                    for (int e = 0; e < E; e++) start[e + 1] += start[e];
                    std::vector<int> fill(start.begin(), start.end() - 1);
                    for (int i = 0; i < B * K; i++) {
                        where[i] = fill[eid[i]]++;
                        order[where[i]] = i;
                    }
                }
#pragma omp for schedule(dynamic, 1)
                for (int e = 0; e < E; e++) {
                    const int m = start[e + 1] - start[e];
                    if (!m) continue;
                    const int* picked = &order[start[e]];  // (token, slot) pairs i: token i / K
                    for (int j = 0; j < m; j++)
                        std::memcpy(&xt[(size_t)j * Dp], &xn[(size_t)(picked[j] / K) * Dp], sizeof(float) * D);
                    gemm(m, 2 * Ie, D, xt.data(), Dp, ly.experts_gu + (size_t)e * ldhe * D, ht.data(), ldhe, false, 1);
                    for (int j = 0; j < m; j++) swiglu(&ht[(size_t)j * ldhe], Ie, ew[picked[j]]);
                    gemm(m, D, Ie, ht.data(), ldhe, ly.experts_down + (size_t)e * Dp * Ie, &y[(size_t)start[e] * Dp],
                         Dp, false, 1);
                }
                // Back into the residual: each token adds its experts' outputs in the sorted order (by expert).
#pragma omp for schedule(static)
                for (int b = 0; b < B; b++) {
                    for (int t = 0; t < K; t++) {  // the token's rows of y, in increasing order
                        const int i = where[(size_t)b * K + t];
                        int u = t;
                        for (; u > 0 && at[u - 1] > i; u--) at[u] = at[u - 1];
                        at[u] = i;
                    }
                    float* xr = &x[(size_t)b * Dp];
                    for (int t = 0; t < K; t++) {
                        const float* yr = &y[(size_t)at[t] * Dp];
                        for (int c = 0; c < D; c++) xr[c] += yr[c];
                    }
                }
                moe_index++;
            }
        }
        output_head_ws(B, D, Dp, d->V, x.data(), xn.data(), final_norm, lm_head, d->eps, hidden_out, logit_index,
                       n_logits, logits);
    }
    return 0;
}

// Sampling from logits [B, ld] without truncation, as minir1.engine.sample does (common.h: sample_rows).
int minir1_sample(const float* logits, int B, int V, int ld, const float* temperature, const float* u,
                  int64_t* tokens, float* logp) {
    sample_rows(logits, B, V, ld, temperature, u, tokens, logp);
    return 0;
}

// Every row of a batch decoded to its end in one call (common.h: generate_rows, which says what the
// arguments mean): the decode steps, the sampling and the stop checks with no return to Python in
// between. The model arguments are minir1_decode_step's; loads [n_loads] gets the last step's expert loads.
int minir1_generate(const Dims* d, const Layer* layers, int n_layers, const float* embed, const float* final_norm,
                    const float* lm_head, float* cache, int64_t cache_rows, int64_t S, int32_t* loads, int n_loads,
                    int threads, int B, int max_new, const int64_t* pos0, const int64_t* stop, int n_stop,
                    float temperature, const float* u, int64_t n_u, int64_t* out_tokens, float* out_logp,
                    int32_t* lengths, int32_t* stopped, float* logits,
                    int max_steps) {
    auto step = [&](int n, const int64_t* tok, const int64_t* pos, const int64_t* rows, float* out) {
        if (loads) std::memset(loads, 0, sizeof(int32_t) * (size_t)n_loads);
        minir1_decode_step(d, layers, n_layers, 0, embed, nullptr, final_norm, lm_head, n, tok, pos, rows, cache,
                           cache_rows, S, nullptr, n, out, nullptr, loads, threads);
    };
    return generate_rows(step, B, d->V, pad16(d->V), max_new, pos0, stop, n_stop, temperature, u, n_u, out_tokens,
                         out_logp, lengths, stopped, logits, max_steps);
}

// MLA's weight absorption (DeepSeek-V2 §2.1.2; fused.py says what it is for), accumulated in float64 and
// rounded to fp32 once, as the float64 matmuls it replaces (GRPO absorbs after every step: this is one call
// where those were ~10 PyTorch ops per layer). Inputs are the layer's fp32 weights: w_kv [H, nope + v, C]
// (kv_b_proj), w_q [H, nope + R, Kq] (q_b_proj, or q_proj when queries are not compressed), w_out [D, H·v]
// (o_proj). Outputs:
//   q_abs [H, C + R, Kq]  row (h, c < C): scale · Σ_n W_UK[h, n, c] · w_q[h, n, :];  row (h, C + r): scale · w_q[h, nope + r, :]
//   w_o   [D, H·C]        w_o[d, h·C + c] = Σ_j w_out[d, h·v + j] · W_UV[h, j, c]
void minir1_absorb(const float* w_kv, const float* w_q, const float* w_out, int H, int nope, int v, int C, int R,
                   int Kq, int D, double scale, float* q_abs, float* w_o, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        std::vector<double> acc((size_t)(Kq > C ? Kq : C));
#pragma omp for schedule(static) nowait
        for (int hc = 0; hc < H * C; hc++) {
            const int h = hc / C, c = hc % C;
            std::fill(acc.begin(), acc.begin() + Kq, 0.0);
            for (int n = 0; n < nope; n++) {
                const double u = w_kv[((int64_t)h * (nope + v) + n) * C + c];
                const float* qr = w_q + ((int64_t)h * (nope + R) + n) * Kq;
                for (int k = 0; k < Kq; k++) acc[k] += u * qr[k];
            }
            float* out = q_abs + ((int64_t)h * (C + R) + c) * Kq;
            for (int k = 0; k < Kq; k++) out[k] = (float)(acc[k] * scale);
        }
#pragma omp for schedule(static) nowait
        for (int hr = 0; hr < H * R; hr++) {
            const int h = hr / R, r = hr % R;
            const float* qr = w_q + ((int64_t)h * (nope + R) + nope + r) * Kq;
            float* out = q_abs + ((int64_t)h * (C + R) + C + r) * Kq;
            for (int k = 0; k < Kq; k++) out[k] = (float)((double)qr[k] * scale);
        }
#pragma omp for schedule(static)
        for (int dh = 0; dh < D * H; dh++) {
            const int d = dh / H, h = dh % H;
            std::fill(acc.begin(), acc.begin() + C, 0.0);
            for (int j = 0; j < v; j++) {
                const double o = w_out[(int64_t)d * H * v + (int64_t)h * v + j];
                const float* uv = w_kv + ((int64_t)h * (nope + v) + nope + j) * C;
                for (int c = 0; c < C; c++) acc[c] += o * uv[c];
            }
            float* out = w_o + (int64_t)d * H * C + (int64_t)h * C;
            for (int c = 0; c < C; c++) out[c] = (float)acc[c];
        }
    }
}

// Packs `batch` weights W [N, K] (y = x W^T) into panels [ceil(N/16)][K][16], zero-padded (the layout
// of every weight above); one pass over the panels, split across threads, where a strided PyTorch copy
// takes several times longer. It runs after every weight update (GRPO: every step).
void minir1_pack(const float* w, int64_t batch, int N, int K, float* out, int threads) {
    pack_panels(w, batch, N, K, out, threads);
}

}  // extern "C"
