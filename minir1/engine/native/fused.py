"""The engine's forward on the latent cache in one native call (minir1/engine/native/decode_step.cpp) for the
whole batch, in place of ~150 PyTorch ops per token: decode steps, prefills, and speculative decoding's
verification and MTP drafts.

`FusedDecoder.for_model(model)` returns None when the model or machine is outside what the kernel
covers (then the engine keeps its PyTorch path, which remains the reference, and tests compare the
two): fp32 weights on the CPU, a C++ compiler present, MINIR1_NATIVE not set to 0. It covers every
ModelConfig otherwise (q_lora_rank None or set, dense and MoE layers, group-limited routing, shared
experts or none, YaRN, an MTP module).

Weight packing. At each prefill the decoder checks the parameters' version counters and storage; after
an optimizer step (GRPO updates the policy between rollouts) or a load it repacks: every linear
layer's weight transposed into 16-column panels, and MLA's up-projections folded in (DeepSeek-V2
§2.1.2): W_UK into the query projection (scaled by the softmax scale) and W_UV into o_proj, accumulated
in float64 (`absorb`). Packing costs about 2.5 ms for a model of a few million parameters.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from minir1.engine.native import build as kernels
from minir1.models.deepseek_v3 import MLP, Block, ModelOutput, MoE, Transformer

_P = ctypes.c_void_p
log = logging.getLogger(__name__)

# Decode steps per native call of FusedDecoder.generate: a long generation returns to Python between them
# (where Ctrl-C is seen) at a cost of ~0.1 ms each.
GENERATE_CHUNK_STEPS = 64


class _Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("D", "H", "C", "R", "q_rank", "V", "E", "top_k", "n_group",
                                              "topk_group", "norm_topk")] + \
               [(n, ctypes.c_float) for n in ("eps", "eps_q", "eps_kv", "scaling", "attention_factor")] + \
               [("inv_freq", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("post_norm", _P), ("w_a", _P), ("q_a_norm", _P), ("w_q", _P), ("kv_norm", _P),
                ("w_o", _P), ("ffn_kind", ctypes.c_int32), ("I", ctypes.c_int32), ("gu", _P), ("down", _P),
                ("router", _P), ("bias", _P), ("experts_gu", _P), ("experts_down", _P), ("Ie", ctypes.c_int32)]


def pack(weight: Tensor, out: Tensor | None = None) -> Tensor:
    """A linear layer's weight W [..., N, K] (y = x W^T) -> panels [..., ceil(N/16), K, 16], zero-padded;
    leading dimensions (stacked experts) are kept. `out`, if given and of that shape, is reused."""
    w = weight.detach()
    if w.dtype != torch.float32 or not w.is_contiguous():
        w = w.float().contiguous()
    *lead, N, K = w.shape
    shape = (*lead, -(-N // 16), K, 16)
    if out is None or out.shape != shape:
        out = torch.empty(shape)
    batch = math.prod(lead)
    if batch and N and K:
        kernels.load("decode_step").minir1_pack(_P(w.data_ptr()), ctypes.c_int64(batch), N, K,
                                                _P(out.data_ptr()), torch.get_num_threads())
    return out


def _unsupported(model: Transformer) -> str | None:
    if getattr(model, "cache_kind", None) != "mla":
        return "the fused decode step runs DeepSeek-V3's MLA models"
    cfg = model.config
    params = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return "the fused decode step runs fp32 weights on the CPU"
    if cfg.n_routed_experts > 1024 or cfg.n_group > 256 or cfg.qk_rope_head_dim > 512:
        return "more experts, groups or rope dimensions than the kernel's fixed buffers"
    return None


def memory_available() -> int | None:
    """Bytes of memory the system can still give (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fits_in_memory(nbytes: int, what: str) -> bool:
    """Whether `nbytes` more fit with a quarter of the available memory to spare; a warning when not."""
    available = memory_available()
    if available is None or nbytes <= 0.75 * available:
        return True
    log.warning("minir1: %s needs %.1f GiB, more than the memory left allows (%.1f GiB available); generation "
                "runs on the PyTorch path instead", what, nbytes / 2**30, available / 2**30)
    return False


def _addr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def absorb(attn: Any, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """MLA's absorbed projections of one attention layer (DeepSeek-V2 §2.1.2), for decoding on the latent cache:
    q·k = (W_UK^T q_nope)·c_KV + q_R·k_R, so W_UK and the softmax scale fold into the query projection
    (q_abs [H·(C + R), Kq]); o_proj(W_UV · o_latent) = (o_proj ∘ W_UV) · o_latent, one matrix over the heads'
    latents (w_o [D, H·C]). Accumulated in float64 and rounded once, in one native call
    (decode_step.cpp: minir1_absorb; `absorb_reference` is the same in PyTorch)."""
    H, nope, R, v, C = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_rank
    w_kv = attn.kv_b_proj.weight.detach().float().contiguous()
    w_q = (attn.q_proj if attn.q_rank is None else attn.q_b_proj).weight.detach().float().contiguous()
    w_out = attn.o_proj.weight.detach().float().contiguous()
    Kq, D = w_q.shape[1], w_out.shape[0]
    q_abs, w_o = torch.empty(H * (C + R), Kq), torch.empty(D, H * C)
    kernels.load("decode_step").minir1_absorb(
        _P(w_kv.data_ptr()), _P(w_q.data_ptr()), _P(w_out.data_ptr()), H, nope, v, C, R, Kq, D,
        ctypes.c_double(softmax_scale), _P(q_abs.data_ptr()), _P(w_o.data_ptr()), torch.get_num_threads())
    return q_abs, w_o


def absorb_reference(attn: Any, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """`absorb` in PyTorch float64 (the tests' reference)."""
    H, nope, R, v, C = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_rank
    w_kv = attn.kv_b_proj.weight.detach().double().view(H, nope + v, C)
    w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]                              # [H, nope, C], [H, v, C]
    q_w = (attn.q_proj if attn.q_rank is None else attn.q_b_proj).weight.detach().double().view(H, nope + R, -1)
    q_abs = torch.cat((torch.bmm(w_uk.transpose(1, 2), q_w[:, :nope]), q_w[:, nope:]), dim=1)
    q_abs = (q_abs * softmax_scale).reshape(H * (C + R), -1).float()
    w_o = torch.einsum("dhv,hvc->dhc", attn.o_proj.weight.detach().double().view(-1, H, v), w_uv)
    return q_abs, w_o.reshape(w_o.shape[0], H * C).float()


class PackedWeights:
    """The model's weights in the kernel's layout (see the module docstring), with the pointers the kernel
    reads; `stale()` says whether a weight changed since the last `pack()`."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.signature: Any = None
        self._keep: list[Tensor] = []
        self._buffers: dict[str, Tensor] = {}

    def stale(self) -> bool:
        """A weight was replaced or written in place since the last pack, by its storage and version counter.
        A kernel that writes weights without bumping the counter (torch's fused AdamW) is not seen: minir1's
        training loop bumps the counters after every step; a loop of your own must too
        (`torch.autograd.graph.increment_version`), or build a new Engine."""
        return self._current_signature() != self.signature

    def _current_signature(self) -> tuple:
        biases = (m.gate.e_score_correction_bias for m in self.model.moe_layers())
        return tuple((t.data_ptr(), t._version) for t in (*self.model.parameters(), self.model.rotary.inv_freq,
                                                           *biases))

    def _packed(self, key: str, weight: Tensor) -> int:
        """Pack into last time's buffer for `key` (fresh pages would cost more than the packing)."""
        out = self._buffers[key] = pack(weight, self._buffers.get(key))
        return self._ptr(out)

    def _ptr(self, t: Tensor) -> int:
        t = t.detach().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _pack_block(self, key: str, block: Block, ly: _Layer) -> None:
        cfg = self.model.config
        attn = block.self_attn
        q_abs, w_o = absorb(attn, self.model.rotary.softmax_scale)
        if attn.q_rank is None:
            ly.w_a = self._packed(f"{key}.w_a", torch.cat((q_abs, attn.kv_a_proj_with_mqa.weight)))
        else:
            ly.w_a = self._packed(f"{key}.w_a", torch.cat((attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight)))
            ly.q_a_norm = self._ptr(attn.q_a_layernorm.weight)
            ly.w_q = self._packed(f"{key}.w_q", q_abs)
        ly.kv_norm = self._ptr(attn.kv_a_layernorm.weight)
        ly.w_o = self._packed(f"{key}.w_o", w_o)
        ly.in_norm = self._ptr(block.input_layernorm.weight)
        ly.post_norm = self._ptr(block.post_attention_layernorm.weight)
        mlp = block.mlp
        dense = mlp if isinstance(mlp, MLP) else mlp.shared_experts
        if dense is not None:
            ly.I = dense.down_proj.weight.shape[1]
            ly.gu = self._packed(f"{key}.gu", dense.gate_up_proj.weight)
            ly.down = self._packed(f"{key}.down", dense.down_proj.weight)
        if isinstance(mlp, MoE):
            ly.ffn_kind, ly.Ie = 1, cfg.moe_intermediate_size
            ly.router = self._packed(f"{key}.router", mlp.gate.weight)
            ly.bias = self._ptr(mlp.gate.e_score_correction_bias.float())
            ly.experts_gu = self._packed(f"{key}.experts_gu", mlp.experts.gate_up_proj)
            ly.experts_down = self._packed(f"{key}.experts_down", mlp.experts.down_proj)

    @torch.no_grad()
    def pack(self) -> None:
        model, cfg = self.model, self.model.config
        self._keep = []
        self.layers = (_Layer * max(1, cfg.num_hidden_layers))()
        for i, block in enumerate(model.layers):
            self._pack_block(str(i), block, self.layers[i])
        self.mtp_layers, self.mtp_norm = (_Layer * 1)(), None
        if len(model.mtp):
            self._pack_block("mtp", model.mtp[0].block, self.mtp_layers[0])
            self.mtp_norm = self._ptr(model.mtp[0].norm.weight)
        attn0 = (model.mtp[0].block if len(model.mtp) else model.layers[0]).self_attn
        rot = model.rotary
        self.dims = _Dims(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                           cfg.q_lora_rank or 0, cfg.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                           cfg.n_group, cfg.topk_group, int(cfg.norm_topk_prob), model.norm.eps,
                           attn0.q_a_layernorm.eps if cfg.q_lora_rank else 1e-6, attn0.kv_a_layernorm.eps,
                           cfg.routed_scaling_factor, rot.attention_factor, self._ptr(rot.inv_freq.float()))
        self.embed = self._ptr(model.embed_tokens.weight)
        self.final_norm = self._ptr(model.norm.weight)
        self.lm_head = self._packed("lm_head", model.lm_head.weight)
        self.signature = self._current_signature()


class FusedDecoder:
    """The engine's forward on a LatentCache through the native kernel: decode steps, prefills, the
    main model's verification of speculative drafts, and the MTP module that drafts them."""

    name = "fused decode step"  # what its errors call it

    def __init__(self, model: Transformer, lib: ctypes.CDLL) -> None:
        self.model, self.lib = model, lib
        self._fn = lib.minir1_decode_step
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [_P, _P, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, ctypes.c_int, _P, _P, _P, _P,
                             ctypes.c_int64, ctypes.c_int64, _P, ctypes.c_int, _P, _P, _P, ctypes.c_int]
        self._moe = [m for m in (layer.mlp for layer in model.layers) if isinstance(m, MoE)]
        self.weights = PackedWeights(model)
        # OpenMP threads per call (None: torch.get_num_threads()). A server sets fewer, leaving a core to
        # its HTTP event loop: a parallel region whose worker thread waits for a busy core stalls the step.
        self.threads: int | None = None

    @classmethod
    def for_model(cls, model: Transformer) -> FusedDecoder | None:
        if _unsupported(model) is not None:
            return None
        if not fits_in_memory(sum(p.numel() * 4 for p in model.parameters()),
                              what="the native decode step's packed copy of the weights"):
            return None
        lib = kernels.load("decode_step")
        return None if lib is None else cls(model, lib)

    def refresh(self) -> None:
        """Repack if any weight changed since the last packing. The engine calls this at each prefill
        (a check costs ~0.1 ms, as much as a tenth of a decode step, so not at every step)."""
        if self.weights.stale():
            self.weights.pack()

    # -- forwards ---------------------------------------------------------------------------------------
    def forward(self, kv: Tensor, ids: Tensor, positions: Tensor, logits_at: Tensor | None = None) -> ModelOutput:
        """The model over ids [B, T] at positions [B, T] of the cache's rows 0..B-1 (kv: LatentCache.kv
        [layers, B, S, C + R], fp32, contiguous), as `Transformer.forward(ids, positions=, cache=)`:
        logits [B, T, V] (or [B, 1, V] at `logits_at` [B]) and, for a prefill (logits_at given) or T > 1 (a
        speculative verification), hidden states [B, T, D], which MTP drafts from."""
        B, T = ids.shape
        rows = None if T == 1 else torch.arange(B).repeat_interleave(T)  # None: token b is row b's
        at = None if logits_at is None else torch.arange(B) * T + logits_at.to(torch.long)
        # Hidden states for prefills (logits_at given; MTP drafts from them, even after a one-token prompt) and
        # speculative verification (T > 1); a plain decode step skips them.
        logits, hidden = self._run(kv, ids.reshape(-1), positions.reshape(-1), rows, at,
                                   want_hidden=T > 1 or logits_at is not None)
        return ModelOutput(logits=logits.view(B, -1, logits.shape[-1]),
                           hidden=None if hidden is None else hidden.view(B, T, -1))

    def prefill(self, kv: Tensor, prompts: list[list[int]]) -> Tensor:
        """Every prompt into its cache row (row i of kv: positions 0..len-1), without padding -> the logits
        after each prompt's last token [P, V]."""
        lengths = torch.tensor([len(p) for p in prompts])
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        rows = torch.arange(len(prompts)).repeat_interleave(lengths)
        starts = lengths.cumsum(0) - lengths
        positions = torch.arange(len(tokens)) - starts.repeat_interleave(lengths)
        return self._run(kv, tokens, positions, rows, starts + lengths - 1)[0]

    def mtp(self, kv: Tensor, hidden: Tensor, next_ids: Tensor, positions: Tensor) -> Tensor:
        """MTP depth 1 (DeepSeek-V3 §2.2) over hidden [B, T, D] and the next tokens [B, T] at positions
        [B, T], its block on the cache layer after the main model's -> logits [B, T, V]."""
        model = self.model
        if not len(model.mtp):
            raise ValueError("fused decode step: this model has no MTP module")
        module = model.mtp[0]
        B, T = next_ids.shape
        with torch.inference_mode():
            h = module.eh_proj(torch.cat((module.enorm(model.embed_tokens(next_ids)), module.hnorm(hidden)), -1))
        rows = torch.arange(B).repeat_interleave(T)
        logits, _ = self._run(kv, next_ids.reshape(-1), positions.reshape(-1), rows, None,
                              x_in=h.reshape(B * T, -1), mtp=True)
        return logits.view(B, T, -1)

    def generate(self, kv: Tensor, tokens: Sequence[Sequence[int]], stopped: Sequence[bool], positions: Tensor,
                 max_new: int, stop_ids: Sequence[int], temperature: float,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Rows 0..B-1 of the cache decoded to their ends in one native call (common.h: generate_rows), as
        DecodeBatch's step/retire loop does for one group of rows with untruncated sampling: row b has
        generated tokens[b] (at least one; its last sits at positions[b], not yet in the cache), stopped[b]
        if it ended on one of stop_ids; it runs until a stop token or max_new tokens. The sampler's uniforms
        are drawn from `generator` up front, in the order the loop would draw them, and as many as the
        longest run could need (so the generator ends further on than the loop would leave it).
        -> (tokens [B, max_new], their log-probabilities, lengths [B], stopped [B], decode steps)."""
        if self.weights.signature is None:
            self.weights.pack()
        cfg, B = self.model.config, len(tokens)
        S = kv.shape[2] if kv.dim() == 4 else 0
        lengths = torch.tensor([len(t) for t in tokens], dtype=torch.int32)
        positions = positions.to(torch.long).contiguous()
        if not self.supports(kv) or not 0 < B <= kv.shape[1] or positions.shape != (B,) or int(lengths.min()) < 1:
            raise ValueError(f"{self.name}: generate needs 1..{kv.shape[1]} rows with at least one token each, one "
                             f"position per row, and a contiguous fp32 CPU cache [layers, rows, S, {self.cache_width}]")
        if int(lengths.max()) > max_new or any(not 0 <= t < cfg.vocab_size for row in tokens for t in row):
            raise ValueError(f"{self.name}: generate got a row longer than max_new ({max_new}) or a token id "
                             f"outside [0, {cfg.vocab_size})")
        if int(positions.min()) < 0 or int((positions + max_new - lengths).max()) > S:
            raise ValueError(f"{self.name}: the rows' positions plus the tokens still to generate exceed the "
                             f"cache's length {S}")
        out_tokens = torch.zeros(B, max_new, dtype=torch.long)
        out_logp = torch.zeros(B, max_new)
        for b, row in enumerate(tokens):
            out_tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        done = torch.tensor([bool(x) for x in stopped], dtype=torch.int32)
        need = int(((max_new - lengths) * (1 - done)).clamp_min(0).sum()) if temperature > 0 else 0
        u = torch.rand(need, generator=generator) if need else torch.zeros(1)
        logits = torch.empty(B, -(-cfg.vocab_size // 16) * 16)
        start, steps = lengths.clone(), 0
        while True:  # in chunks of GENERATE_CHUNK_STEPS steps, so that Ctrl-C is seen between them
            gained = lengths - start
            drawn = int(gained.sum()) if need else 0  # one uniform per token gained
            now = (positions + gained).contiguous()
            # generate_rows' arguments, after the model's (common.h)
            rows_args = (B, max_new, _P(now.data_ptr()), _P(stop.data_ptr()), len(stop), ctypes.c_float(temperature),
                         _P(u[drawn:].data_ptr()), ctypes.c_int64(need - drawn), _P(out_tokens.data_ptr()),
                         _P(out_logp.data_ptr()), _P(lengths.data_ptr()), _P(done.data_ptr()),
                         _P(logits.data_ptr()), GENERATE_CHUNK_STEPS)
            chunk = self._generate(kv, rows_args)
            if chunk < 0:
                raise RuntimeError(f"{self.name}: generate ran out of uniforms (a bug: they are sized for the worst "
                                   "case)")
            steps += chunk
            if chunk < GENERATE_CHUNK_STEPS:
                return out_tokens, out_logp, lengths, done.bool(), steps

    def _generate(self, kv: Tensor, rows_args: tuple) -> int:
        cfg, w = self.model.config, self.weights
        fn = self.lib.minir1_generate
        fn.restype = ctypes.c_int
        loads = torch.zeros(len(self._moe), cfg.n_routed_experts, dtype=torch.int32)
        steps = fn(ctypes.byref(w.dims), w.layers, cfg.num_hidden_layers, _P(w.embed), _P(w.final_norm),
                   _P(w.lm_head), _P(kv.data_ptr()), ctypes.c_int64(kv.shape[1]), ctypes.c_int64(kv.shape[2]),
                   _P(loads.data_ptr()), loads.numel(), self.threads or torch.get_num_threads(), *rows_args)
        if steps > 0:
            for m, load in zip(self._moe, loads):
                m.last_load.copy_(load)
        return steps

    def _run(self, kv: Tensor, tokens: Tensor, positions: Tensor, rows: Tensor | None, logit_index: Tensor | None,
             x_in: Tensor | None = None, mtp: bool = False, want_hidden: bool = False) -> tuple[Tensor, Tensor | None]:
        cfg, w = self.model.config, self.weights
        x_in = None if x_in is None else x_in.float().contiguous()
        tokens, positions, rows, logit_index, logits, hidden = self._prepare(
            kv, tokens, positions, rows, logit_index, x_in, cfg.num_hidden_layers + (1 if mtp else 0), want_hidden)
        N, n_logits = tokens.shape[0], logits.shape[0]
        loads = None if mtp else torch.zeros(len(self._moe), cfg.n_routed_experts, dtype=torch.int32)
        layers, n_layers = (w.mtp_layers, 1) if mtp else (w.layers, cfg.num_hidden_layers)
        self._fn(ctypes.byref(w.dims), layers, n_layers, cfg.num_hidden_layers if mtp else 0, w.embed,
                 _addr(x_in), w.mtp_norm if mtp else w.final_norm, w.lm_head, N, tokens.data_ptr(),
                 positions.data_ptr(), _addr(rows), kv.data_ptr(), kv.shape[1], kv.shape[2], _addr(logit_index),
                 n_logits, logits.data_ptr(), _addr(hidden), _addr(loads), self.threads or torch.get_num_threads())
        if loads is not None:
            for m, load in zip(self._moe, loads):
                m.last_load.copy_(load)
        return logits[:, :cfg.vocab_size], hidden

    def _prepare(self, kv: Tensor, tokens: Tensor, positions: Tensor, rows: Tensor | None,
                 logit_index: Tensor | None, x_in: Tensor | None, layers_needed: int,
                 want_hidden: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None]:
        """Pack the weights if never packed, make the index tensors contiguous int64 and check them, and
        allocate the outputs -> (tokens, positions, rows, logit_index, logits [n, pad16(V)], hidden or None)."""
        if self.weights.signature is None:
            self.weights.pack()
        cfg = self.model.config
        tokens, positions = tokens.to(torch.long).contiguous(), positions.to(torch.long).contiguous()
        rows = None if rows is None else rows.to(torch.long).contiguous()
        logit_index = None if logit_index is None else logit_index.to(torch.long).contiguous()
        self._check(kv, tokens, positions, rows, logit_index, x_in, layers_needed)
        N = tokens.shape[0]
        logits = torch.empty(N if logit_index is None else logit_index.shape[0], -(-cfg.vocab_size // 16) * 16)
        hidden = torch.empty(N, cfg.hidden_size) if want_hidden else None
        return tokens, positions, rows, logit_index, logits, hidden

    def _check(self, kv: Tensor, tokens: Tensor, positions: Tensor, rows: Tensor | None, logit_index: Tensor | None,
               x_in: Tensor | None, layers_needed: int) -> None:
        """Everything the kernel indexes raw memory with, checked first (a few microseconds): a wrong input is
        a ValueError, never a read or write out of bounds."""
        cfg = self.model.config

        def fail(msg: str) -> None:
            raise ValueError(f"{self.name}: {msg}")

        if not self.supports(kv):
            fail(f"the cache must be a contiguous fp32 CPU tensor [layers, rows, S, {self.cache_width}], got "
                 f"{kv.dtype} {tuple(kv.shape)} on {kv.device}")
        if kv.shape[0] < layers_needed:
            fail(f"the cache has {kv.shape[0]} layers, this forward needs {layers_needed}")
        if tokens.dim() != 1 or positions.shape != tokens.shape:
            fail(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must be one flat list each")
        N = tokens.shape[0]
        if N == 0:
            fail("no tokens")
        t_lo, t_hi = tokens.aminmax()
        p_lo, p_hi = positions.aminmax()
        if t_lo < 0 or t_hi >= cfg.vocab_size or p_lo < 0 or p_hi >= kv.shape[2]:
            fail(f"token ids must be in [0, {cfg.vocab_size}) and positions in [0, {kv.shape[2]}) (the cache's "
                 "length)")
        if rows is None:
            if N > kv.shape[1]:
                fail(f"{N} tokens, one per cache row, but the cache has {kv.shape[1]} rows")
        elif rows.shape != tokens.shape or int(rows.min()) < 0 or int(rows.max()) >= kv.shape[1]:
            fail(f"cache rows must be one per token, in [0, {kv.shape[1]})")
        if logit_index is not None and (logit_index.dim() != 1 or len(logit_index) == 0 or
                                        int(logit_index.min()) < 0 or int(logit_index.max()) >= N):
            fail(f"logit positions must be a non-empty flat list in [0, {N})")
        if x_in is not None and (x_in.dtype != torch.float32 or tuple(x_in.shape) != (N, cfg.hidden_size)
                                 or not x_in.is_contiguous()):
            fail(f"the MTP input must be contiguous fp32 [{N}, {cfg.hidden_size}], got {x_in.dtype} "
                 f"{tuple(x_in.shape)}")

    @property
    def cache_width(self) -> int:
        """Values per layer, row and position in the cache this decoder runs on."""
        return self.model.config.kv_lora_rank + self.model.config.qk_rope_head_dim

    def supports(self, kv: Tensor) -> bool:
        return (kv.dtype == torch.float32 and kv.is_contiguous() and kv.device.type == "cpu"
                and kv.shape[-1] == self.cache_width)


def native_sampling(logits: Tensor) -> bool:
    """Whether native_sample takes these logits (fp32 rows on the CPU, the library available)."""
    return (logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() == 2
            and logits.stride(-1) == 1 and logits.stride(0) >= logits.shape[1]
            and kernels.load("decode_step") is not None)


def native_sample(logits: Tensor, temperatures: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """minir1.engine.sample without truncation (no top-k / top-p / min-p), every row in one native call:
    logits [B, V]; temperatures [B] (0 = greedy); uniforms [B], the U(0, 1) draw of each sampled row (the
    same numbers the PyTorch path draws from the same generator). -> (tokens [B], their log-probabilities
    under softmax(logits / T) [B]). Call it only where native_sampling(logits) holds."""
    fn = kernels.load("decode_step").minir1_sample
    if fn.argtypes is None:
        fn.argtypes = [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P]
    # What the kernel indexes, checked (the caller has already checked native_sampling: no library look-up here).
    if (logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2 or logits.stride(-1) != 1
            or logits.stride(0) < logits.shape[1] or 0 in logits.shape):
        raise ValueError(f"native sampling takes non-empty fp32 CPU logits [B, V] with unit column stride, got "
                         f"{logits.dtype} {tuple(logits.shape)} on {logits.device}")
    B, V = logits.shape
    temperatures = temperatures.to(torch.float32).contiguous()
    uniforms = uniforms.to(torch.float32).contiguous()
    if temperatures.shape != (B,) or uniforms.shape != (B,):
        raise ValueError(f"native sampling needs one temperature and one uniform per row ({B}), got "
                         f"{tuple(temperatures.shape)} and {tuple(uniforms.shape)}")
    tokens, logp = torch.empty(B, dtype=torch.long), torch.empty(B)
    fn(logits.data_ptr(), B, V, logits.stride(0), temperatures.data_ptr(), uniforms.data_ptr(), tokens.data_ptr(),
       logp.data_ptr())
    return tokens, logp
