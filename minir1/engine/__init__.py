"""Inference: batched generation on MLA's latent KV cache, sampling, streaming, MTP self-speculative decoding.

  batch.py        DecodeBatch: add rows (prefill), step, retire; Row, Completion, StreamEvent
  cache.py        the latent cache (DeepSeek-V2 §2.1.2)
  sampling.py     SamplingParams; temperature / top-k / top-p / min-p; log-probabilities
  speculative.py  MTP drafts verified by the main model (DeepSeek-V3 §2.2)
  engine.py       Engine.generate / Engine.stream over one DecodeBatch
  native/         the fused C++ decode step and sampler (the PyTorch path stays the reference)
"""

from minir1.engine.batch import Completion, DecodeBatch, Row, StreamEvent
from minir1.engine.engine import Engine
from minir1.engine.sampling import SamplingParams, process_logits, sample

__all__ = ["Completion", "DecodeBatch", "Engine", "Row", "SamplingParams", "StreamEvent", "process_logits",
           "sample"]
