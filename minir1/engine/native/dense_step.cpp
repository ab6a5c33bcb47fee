// The forward of a dense model (Llama, Qwen2, Qwen3: minir1/models/dense.py) on the engine's GQA cache in
// a single native call, fp32 arithmetic, CPU: decode steps (one token per row) and prefills (many tokens of
// a row). Why one call: at decode sizes every PyTorch op costs more in dispatch than in arithmetic, and a
// batch-1 step is a chain of matrix-vector products whose only limit should be the memory bandwidth of
// streaming the weights once.
//
// Weights are packed once per weight version (minir1/engine/native/dense.py) as panels (common.h), in fp32
// or in bf16 (half the bytes to stream; widened exactly to fp32 in the GEMM). The cache is KVCache.kv:
// [layers, rows, S, 2·KV·Dh] (the keys of the KV heads, then their values), fp32, contiguous.
//
// Per layer (pre-norm): x += o_proj(attention(rope(q), rope(k), v)); x += down(act(gate) · up), with
//   q, k, v   one GEMM over [W_q; W_k; W_v], plus their biases (Qwen2; Llama's attention_bias)
//   q/k norm  Qwen3's RMSNorm over each head of q and k, before RoPE
//   RoPE      on the two halves of each head (rotate_half), cos and sin scaled by the attention factor
//   attention each query head h reads KV head h / (H / KV) (grouped-query attention), scale Dh^-1/2

#include "common.h"

using namespace minir1;

namespace {

// hidden_act: 0 silu, 1 gelu (erf), 2 gelu with the tanh approximation, 3 relu.
inline float activate(float g, int act) {
    switch (act) {
        case 1: return 0.5f * g * (1.0f + std::erf(g * 0.70710678118654752f));
        case 2: return 0.5f * g * (1.0f + std::tanh(0.79788456080286536f * (g + 0.044715f * g * g * g)));
        case 3: return g > 0.f ? g : 0.f;
        default: return g / (1.0f + exp1(-g));
    }
}

// RoPE on the two halves of one head, in place.
inline void rope_half(float* x, const float* cos, const float* sin, int Dh) {
    const int h = Dh / 2;
    for (int i = 0; i < h; i++) {
        const float a = x[i], b = x[h + i];
        x[i] = a * cos[i] - b * sin[i];
        x[h + i] = b * cos[i] + a * sin[i];
    }
}

inline void add_bias(float* y, const float* bias, int n) {
    if (bias)
        for (int i = 0; i < n; i++) y[i] += bias[i];
}

}  // namespace

extern "C" {

// Shapes and constants; mirrors minir1.models.dense.DenseConfig (see dense.py).
struct DenseDims {
    int32_t D, H, KV, Dh, V, qk_norm, act, bf16;  // bf16: the embedding and packed weights are bf16
    float eps, attention_factor;
    const float* inv_freq;  // [Dh / 2], rope scaling applied (DenseTransformer.inv_freq)
};

// One layer's weights: packed matrices (fp32 or bf16 as DenseDims.bf16 says), fp32 vectors; a null bias or
// q/k norm is absent.
struct DenseLayer {
    const float *in_norm, *post_norm;
    const void* w_qkv;  // [W_q; W_k; W_v]: N = (H + 2·KV)·Dh, K = D
    const float *b_qkv, *q_norm, *k_norm;
    const void* w_o;    // N = D, K = H·Dh
    const float* b_o;
    int32_t I;
    const void* gu;     // [W_gate; W_up]: N = 2·I, K = D
    const float* b_gu;
    const void* down;   // N = D, K = I
    const float* b_down;
};

}  // extern "C"

namespace {

// B tokens through every layer. Token b sits at position pos[b] of cache row rows[b] (null: row b); all
// tokens' keys and values are written before any attends, so a prefill's causality comes from positions.
//   cache   [n_layers, cache_rows, S, 2·KV·Dh]
//   output  hidden_out [B, D] (before the final norm) when given; logits [n_logits, pad16(V)] for the tokens
//           in logit_index (null: all). Returns 0.
template <typename W>
int dense_step(const DenseDims* d, const DenseLayer* layers, int n_layers, const W* embed, const float* final_norm,
               const W* lm_head, int B, const int64_t* tokens, const int64_t* pos, const int64_t* rows, float* cache,
               int64_t cache_rows, int64_t S, const int64_t* logit_index, int n_logits, float* logits,
               float* hidden_out, int threads) {
    const int D = d->D, H = d->H, KV = d->KV, Dh = d->Dh, half = Dh / 2, G = H / KV;
    const int Dp = pad16(D), Nqkv = pad16((H + 2 * KV) * Dh), HD = H * Dh, HDp = pad16(HD);
    const int64_t width = 2 * (int64_t)KV * Dh, row_stride = S * width, layer_stride = cache_rows * row_stride;
    const float scale = 1.0f / std::sqrt((float)Dh);
    std::vector<float> cos((size_t)B * half), sin((size_t)B * half);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < half; i++) {
            const float angle = (float)pos[b] * d->inv_freq[i];
            cos[(size_t)b * half + i] = std::cos(angle) * d->attention_factor;
            sin[(size_t)b * half + i] = std::sin(angle) * d->attention_factor;
        }
    int maxI = 0;
    for (int l = 0; l < n_layers; l++) maxI = layers[l].I > maxI ? layers[l].I : maxI;
    const int ldh = pad16(2 * maxI);
    std::vector<float> x((size_t)B * Dp, 0.f), xn((size_t)B * Dp, 0.f), qkv((size_t)B * Nqkv), o((size_t)B * HDp, 0.f),
        h((size_t)B * ldh);
    for (int b = 0; b < B; b++) {
        const W* e = embed + tokens[b] * D;
        for (int i = 0; i < D; i++) x[(size_t)b * Dp + i] = widen(e[i]);
    }

    for (int l = 0; l < n_layers; l++) {
        const DenseLayer& ly = layers[l];
        float* kv = cache + l * layer_stride;
        for (int b = 0; b < B; b++) rmsnorm(&x[(size_t)b * Dp], ly.in_norm, &xn[(size_t)b * Dp], D, d->eps);
        gemm(B, (H + 2 * KV) * Dh, D, xn.data(), Dp, static_cast<const W*>(ly.w_qkv), qkv.data(), Nqkv, false, threads);
        for (int b = 0; b < B; b++) {
            float* t = &qkv[(size_t)b * Nqkv];
            add_bias(t, ly.b_qkv, (H + 2 * KV) * Dh);
            const float *cb = &cos[(size_t)b * half], *sb = &sin[(size_t)b * half];
            for (int hh = 0; hh < H + KV; hh++) {  // the query heads, then the key heads
                float* head = t + hh * Dh;
                if (d->qk_norm) rmsnorm(head, hh < H ? ly.q_norm : ly.k_norm, head, Dh, d->eps);
                rope_half(head, cb, sb, Dh);
            }
            std::memcpy(kv + (rows ? rows[b] : b) * row_stride + pos[b] * width, t + HD, sizeof(float) * width);
        }
        // One task per (token, KV head): its G query heads over the row's positions 0..pos.
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && B * KV > 1)
        for (int task = 0; task < B * KV; task++) {
            const int b = task / KV, g = task % KV, n = (int)pos[b] + 1;
            const float* base = kv + (rows ? rows[b] : b) * row_stride;
            const float* q = &qkv[(size_t)b * Nqkv + (size_t)g * G * Dh];
            std::vector<float> sc((size_t)G * n);
            for (int s = 0; s < n; s++) {
                const float* k = base + (int64_t)s * width + g * Dh;
                for (int j = 0; j < G; j++) {
                    const float* qh = q + j * Dh;
                    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                    for (int i = 0; i < Dh; i++) acc += qh[i] * k[i];
                    sc[(size_t)j * n + s] = acc;
                }
            }
            for (int j = 0; j < G; j++) {
                float* p = &sc[(size_t)j * n];
                float mx = -INFINITY;
                for (int s = 0; s < n; s++) mx = p[s] > mx ? p[s] : mx;
                const float inv = 1.f / exp_sum(p, n, scale, mx * scale);
                float* oh = &o[(size_t)b * HDp + (size_t)(g * G + j) * Dh];
                for (int i = 0; i < Dh; i++) oh[i] = 0.f;
                for (int s = 0; s < n; s++) {
                    const float w = p[s] * inv;
                    const float* v = base + (int64_t)s * width + (int64_t)KV * Dh + g * Dh;
#pragma omp simd
                    for (int i = 0; i < Dh; i++) oh[i] += w * v[i];
                }
            }
        }
        gemm(B, D, HD, o.data(), HDp, static_cast<const W*>(ly.w_o), x.data(), Dp, true, threads);  // residual add
        for (int b = 0; b < B; b++) add_bias(&x[(size_t)b * Dp], ly.b_o, D);

        const int I = ly.I, ldi = pad16(2 * I);
        for (int b = 0; b < B; b++) rmsnorm(&x[(size_t)b * Dp], ly.post_norm, &xn[(size_t)b * Dp], D, d->eps);
        gemm(B, 2 * I, D, xn.data(), Dp, static_cast<const W*>(ly.gu), h.data(), ldi, false, threads);
        for (int b = 0; b < B; b++) {
            float* hb = &h[(size_t)b * ldi];
            add_bias(hb, ly.b_gu, 2 * I);
            if (d->act == 0) {
                swiglu(hb, I, 1.0f);
            } else {
                for (int i = 0; i < I; i++) hb[i] = activate(hb[i], d->act) * hb[I + i];
            }
        }
        gemm(B, D, I, h.data(), ldi, static_cast<const W*>(ly.down), x.data(), Dp, true, threads);
        for (int b = 0; b < B; b++) add_bias(&x[(size_t)b * Dp], ly.b_down, D);
    }
    output_head(B, D, Dp, d->V, x.data(), xn.data(), final_norm, lm_head, d->eps, hidden_out, logit_index, n_logits,
                logits, threads);
    return 0;
}

}  // namespace

extern "C" {

int minir1_dense_step(const DenseDims* d, const DenseLayer* layers, int n_layers, const void* embed,
                      const float* final_norm, const void* lm_head, int B, const int64_t* tokens, const int64_t* pos,
                      const int64_t* rows, float* cache, int64_t cache_rows, int64_t S, const int64_t* logit_index,
                      int n_logits, float* logits, float* hidden_out, int threads) {
    if (d->bf16)
        return dense_step(d, layers, n_layers, static_cast<const uint16_t*>(embed), final_norm,
                          static_cast<const uint16_t*>(lm_head), B, tokens, pos,
                          rows, cache, cache_rows, S, logit_index, n_logits, logits, hidden_out, threads);
    return dense_step(d, layers, n_layers, static_cast<const float*>(embed), final_norm,
                      static_cast<const float*>(lm_head), B, tokens, pos, rows,
                      cache, cache_rows, S, logit_index, n_logits, logits, hidden_out, threads);
}

// Every row of a batch decoded to its end in one call (common.h: generate_rows, which says what the
// arguments mean); the model arguments are minir1_dense_step's.
int minir1_dense_generate(const DenseDims* d, const DenseLayer* layers, int n_layers, const void* embed,
                          const float* final_norm, const void* lm_head, float* cache, int64_t cache_rows, int64_t S,
                          int threads, int B, int max_new, const int64_t* pos0, const int64_t* stop, int n_stop,
                          float temperature, const float* u, int64_t n_u, int64_t* out_tokens, float* out_logp,
                          int32_t* lengths, int32_t* stopped, float* logits,
                          int max_steps) {
    auto step = [&](int n, const int64_t* tok, const int64_t* pos, const int64_t* rows, float* out) {
        minir1_dense_step(d, layers, n_layers, embed, final_norm, lm_head, n, tok, pos, rows, cache, cache_rows, S,
                          nullptr, n, out, nullptr, threads);
    };
    return generate_rows(step, B, d->V, pad16(d->V), max_new, pos0, stop, n_stop, temperature, u, n_u, out_tokens,
                         out_logp, lengths, stopped, logits, max_steps);
}

// Packs `batch` weights W [N, K] (y = x W^T) into panels [ceil(N/16)][K][16], zero-padded: fp32 (bf16 = 0)
// or bf16 bits (bf16 = 1), kept in the weight's own type.
void minir1_dense_pack(const void* w, int bf16, int64_t batch, int N, int K, void* out, int threads) {
    if (bf16)
        pack_panels(static_cast<const uint16_t*>(w), batch, N, K, static_cast<uint16_t*>(out), threads);
    else
        pack_panels(static_cast<const float*>(w), batch, N, K, static_cast<float*>(out), threads);
}

}  // extern "C"
