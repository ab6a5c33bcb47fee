"""The engine's forward of a dense model (Llama, Qwen2, Qwen3) on its GQA cache in one native call
(minir1/engine/native/dense_step.cpp): prefills and decode steps for the whole batch.

`DenseDecoder.for_model(model)` returns None when the model or machine is outside what the kernel covers;
the engine then runs the PyTorch path (the reference; tests compare the two). It covers fp32 and bf16
weights on the CPU (bf16 stays bf16 in the packed copy and is widened in the GEMM: half the bytes a
bandwidth-bound batch-1 step streams, with fp32 arithmetic), every DenseConfig otherwise (GQA, biases,
Qwen3's q/k norms, any head_dim, tied heads, every RoPE scaling, every hidden_act). fp16 weights run on
the PyTorch path.

Weight packing, as for DeepSeek-V3 models (fused.py): the linear layers transposed into 16-column panels,
q/k/v concatenated into one matrix and gate/up into another, repacked whenever a parameter's version
changes (a GRPO update). The packed copy is a second copy of the weights, so the decoder declines when it
would not fit in the memory left (then the PyTorch path runs, with a warning).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor

from minir1.engine.native import build as kernels
from minir1.engine.native.fused import FusedDecoder, PackedWeights, _addr, fits_in_memory
from minir1.models.dense import DenseTransformer

_P = ctypes.c_void_p
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "relu": 3}


class _Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("D", "H", "KV", "Dh", "V", "qk_norm", "act", "bf16")] + \
               [(n, ctypes.c_float) for n in ("eps", "attention_factor")] + [("inv_freq", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("post_norm", _P), ("w_qkv", _P), ("b_qkv", _P), ("q_norm", _P), ("k_norm", _P),
                ("w_o", _P), ("b_o", _P), ("I", ctypes.c_int32), ("gu", _P), ("b_gu", _P), ("down", _P),
                ("b_down", _P)]


def _unsupported(model: Any) -> str | None:
    if getattr(model, "cache_kind", None) != "gqa":
        return "the dense decode step runs the dense families' GQA models"
    if type(model).forward is not DenseTransformer.forward:  # a subclass's own forward must not be bypassed
        return f"{type(model).__name__} overrides DenseTransformer.forward"
    dtypes = {p.dtype for p in model.parameters()}
    if any(p.device.type != "cpu" for p in model.parameters()) or len(dtypes) != 1 or \
            dtypes.pop() not in (torch.float32, torch.bfloat16):
        return "the dense decode step runs fp32 or bf16 weights (one dtype) on the CPU"
    if model.config.hidden_act not in ACTIVATIONS:
        return f"hidden_act {model.config.hidden_act!r}"
    return None


class DensePackedWeights(PackedWeights):
    """A dense model's weights in the kernel's layout, fp32 or bf16 as the model's own."""

    def _current_signature(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in (*self.model.parameters(), self.model.inv_freq))

    def _packed(self, key: str, weight: Tensor) -> int:
        w = weight.detach().contiguous()
        N, K = w.shape
        shape = (-(-N // 16), K, 16)
        out = self._buffers.get(key)
        if out is None or tuple(out.shape) != shape or out.dtype != w.dtype:
            out = self._buffers[key] = torch.empty(shape, dtype=w.dtype)
        kernels.load("dense_step").minir1_dense_pack(_P(w.data_ptr()), int(w.dtype == torch.bfloat16),
                                                     ctypes.c_int64(1), N, K, _P(out.data_ptr()),
                                                     torch.get_num_threads())
        return self._ptr(out)

    def _vector(self, t: Any) -> int | None:
        return None if t is None else self._ptr(t.detach().float())

    @torch.no_grad()
    def pack(self) -> None:
        model, cfg = self.model, self.model.config
        self._keep = []
        self.layers = (_Layer * cfg.num_hidden_layers)()
        for i, block in enumerate(model.layers):
            ly, attn, mlp = self.layers[i], block.self_attn, block.mlp
            ly.in_norm = self._vector(block.input_layernorm.weight)
            ly.post_norm = self._vector(block.post_attention_layernorm.weight)
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            ly.w_qkv = self._packed(f"{i}.qkv", torch.cat([p.weight for p in projections]))
            if attn.q_proj.bias is not None:
                ly.b_qkv = self._vector(torch.cat([p.bias for p in projections]))
            if attn.qk_norm:
                ly.q_norm, ly.k_norm = self._vector(attn.q_norm.weight), self._vector(attn.k_norm.weight)
            ly.w_o = self._packed(f"{i}.o", attn.o_proj.weight)
            ly.b_o = self._vector(attn.o_proj.bias)
            ly.I = mlp.down_proj.weight.shape[1]
            ly.gu = self._packed(f"{i}.gu", torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)))
            if mlp.gate_proj.bias is not None:
                ly.b_gu = self._vector(torch.cat((mlp.gate_proj.bias, mlp.up_proj.bias)))
            ly.down = self._packed(f"{i}.down", mlp.down_proj.weight)
            ly.b_down = self._vector(mlp.down_proj.bias)
        self.bf16 = model.embed_tokens.weight.dtype == torch.bfloat16
        self.dims = _Dims(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim, cfg.vocab_size,
                          int(cfg.qk_norm), ACTIVATIONS[cfg.hidden_act], int(self.bf16), cfg.rms_norm_eps,
                          model.attention_factor, self._ptr(model.inv_freq.float()))
        self.embed = self._ptr(model.embed_tokens.weight)
        self.final_norm = self._vector(model.norm.weight)
        self.lm_head = self._packed("lm_head", model.lm_head.weight)
        self.signature = self._current_signature()


class DenseDecoder(FusedDecoder):
    """The engine's forward on a KVCache through the native kernel: prefills and decode steps."""

    name = "dense decode step"

    def __init__(self, model: Any, lib: ctypes.CDLL) -> None:
        self.model, self.lib = model, lib
        self._fn = lib.minir1_dense_step
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [_P, _P, ctypes.c_int, _P, _P, _P, ctypes.c_int, _P, _P, _P, _P, ctypes.c_int64,
                             ctypes.c_int64, _P, ctypes.c_int, _P, _P, ctypes.c_int]
        self.weights = DensePackedWeights(model)
        self.threads: int | None = None

    @classmethod
    def for_model(cls, model: Any) -> DenseDecoder | None:
        if _unsupported(model) is not None:
            return None
        packed = sum(p.numel() * p.element_size() for p in model.parameters())
        if not fits_in_memory(packed, what=f"the native decode step's packed copy of {type(model).__name__}"):
            return None
        lib = kernels.load("dense_step")
        return None if lib is None else cls(model, lib)

    @property
    def cache_width(self) -> int:
        return 2 * self.model.config.num_key_value_heads * self.model.config.dim

    def mtp(self, kv: Tensor, hidden: Tensor, next_ids: Tensor, positions: Tensor) -> Tensor:
        raise ValueError("dense decode step: dense models have no MTP module")

    def _generate(self, kv: Tensor, rows_args: tuple) -> int:
        cfg, w = self.model.config, self.weights
        fn = self.lib.minir1_dense_generate
        fn.restype = ctypes.c_int
        return fn(ctypes.byref(w.dims), w.layers, cfg.num_hidden_layers, _P(w.embed), _P(w.final_norm),
                  _P(w.lm_head), _P(kv.data_ptr()), ctypes.c_int64(kv.shape[1]), ctypes.c_int64(kv.shape[2]),
                  self.threads or torch.get_num_threads(), *rows_args)

    def _run(self, kv: Tensor, tokens: Tensor, positions: Tensor, rows: Tensor | None, logit_index: Tensor | None,
             x_in: Tensor | None = None, mtp: bool = False, want_hidden: bool = False) -> tuple[Tensor, Tensor | None]:
        cfg, w = self.model.config, self.weights
        tokens, positions, rows, logit_index, logits, hidden = self._prepare(
            kv, tokens, positions, rows, logit_index, None, cfg.num_hidden_layers, want_hidden)
        self._fn(ctypes.byref(w.dims), w.layers, cfg.num_hidden_layers, w.embed, w.final_norm, w.lm_head,
                 tokens.shape[0], tokens.data_ptr(), positions.data_ptr(), _addr(rows), kv.data_ptr(), kv.shape[1],
                 kv.shape[2], _addr(logit_index), logits.shape[0], logits.data_ptr(), _addr(hidden),
                 self.threads or torch.get_num_threads())
        return logits[:, :cfg.vocab_size], hidden


__all__ = ["DenseDecoder"]
