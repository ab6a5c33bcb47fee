"""The engine's native path: C++ sources compiled on first use (`build.py`), the fused decode step of
DeepSeek-V3 models and the sampler (`fused.py`), and the dense families' decode step (`dense.py`). The
PyTorch path stays the reference; tests compare the two."""

from typing import Any

from minir1.engine.native.build import enabled, load
from minir1.engine.native.dense import DenseDecoder
from minir1.engine.native.fused import FusedDecoder, native_sample, native_sampling


def decoder_for(model: Any) -> FusedDecoder | None:
    """The native decoder for this model's family (None: outside what the kernels cover, or disabled)."""
    if getattr(model, "cache_kind", None) == "gqa":
        return DenseDecoder.for_model(model)
    return FusedDecoder.for_model(model)


__all__ = ["DenseDecoder", "FusedDecoder", "decoder_for", "enabled", "load", "native_sample", "native_sampling"]
