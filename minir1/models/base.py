"""What every model family offers the engine and the trainers.

A family (DeepSeek-V3 today; the dense Llama / Qwen families beside it) subclasses `CausalLM` and keeps
its math in its own file. The engine and the trainers use only what is declared here: the config, a
forward with an optional cache, the MTP draft for speculative decoding, and the balancing hooks (no-ops
for a family without routed experts). Reading and writing Hugging Face checkpoints is the job of the
family's adapter in `minir1/models/hf/`, found by the config's `model_type`: the model never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from minir1.models import hf


@dataclass
class ModelOutput:
    logits: Tensor                                     # [B, T, V]
    hidden: Tensor | None                              # [B, T, D], last block's output (before the final norm);
                                                       # None from the engine's fused decode step
    mtp_logits: list[Tensor] = field(default_factory=list)  # depth k: [B, T-k, V], position i predicts t_{i+k+1}
    aux_loss: Tensor | None = None                     # sequence-wise balance loss summed over MoE layers
    router_load: Tensor | None = None                  # [MoE layers, E] tokens per expert in this forward


class CausalLM(nn.Module):
    """A decoder-only language model: `model(input_ids) -> logits [B, T, V]`.

    `forward(input_ids, positions=, cache=, logits_at=, return_dict=)` is the one entry point for training
    and decoding; with `cache` (an engine cache), attention reads and writes it. `config` has at least
    vocab_size, num_hidden_layers, max_position_embeddings and bos/eos/pad token ids.
    """

    config: Any
    # The KV cache the engine keeps for this family (minir1/engine/cache.py): "mla" (DeepSeek's latent cache).
    cache_kind: ClassVar[str] = ""

    # -- what the engine asks ------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_mtp_modules(self) -> int:
        """Multi-token-prediction depths available for speculative drafts (0: none)."""
        return 0

    def mtp_draft(self, hidden: Tensor, next_ids: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """MTP depth 1 over the given positions: hidden h_i and token t_{i+1} -> logits for t_{i+2}."""
        raise ValueError(f"{type(self).__name__} has no MTP module to draft with")

    # -- what the trainers ask -----------------------------------------------------------------------
    def router_load(self) -> Tensor | None:
        """[MoE layers, E]: tokens routed to each expert in the last forward (None without routed experts)."""
        return None

    def update_route_bias(self, speed: float) -> Tensor | None:
        """Auxiliary-loss-free balancing after an optimizer step (None without routed experts)."""
        return None

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after `to_empty`, e.g. when loading from the meta device)."""

    def num_parameters(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "activated": total, "mtp": 0}

    # -- Hugging Face checkpoints (through the family's adapter) -------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> CausalLM:
        """The model in a Hugging Face-layout directory (any supported family, by config.json's model_type)."""
        return hf.load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
                        state: dict[str, Tensor] | None = None) -> None:
        """Write config.json and safetensors weights (sharded above `max_shard_bytes`). `state`: a full state
        dict to write instead of the model's own (gathered from a sharded model)."""
        hf.save_model(self, path, max_shard_bytes=max_shard_bytes, state=state)
