"""The engine's native path: C++ sources compiled on first use (`build.py`) and the fused decode step and
sampler over them (`fused.py`). The PyTorch path stays the reference; tests compare the two."""

from minir1.engine.native.build import enabled, load
from minir1.engine.native.fused import FusedDecoder, native_sample, native_sampling

__all__ = ["FusedDecoder", "enabled", "load", "native_sample", "native_sampling"]
