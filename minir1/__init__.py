"""minir1: DeepSeek-R1's whole system, end to end, at a size anyone can train."""

from minir1.checkpoint import load
from minir1.engine import Completion, DecodeBatch, Engine, SamplingParams, StreamEvent
from minir1.errors import CheckpointError, ConfigError
from minir1.models.base import CausalLM, ModelOutput
from minir1.models.deepseek_v3 import ModelConfig, Transformer
from minir1.tokenizer import Tokenizer

__all__ = ["CausalLM", "CheckpointError", "Completion", "ConfigError", "DecodeBatch", "Engine", "ModelConfig",
           "ModelOutput", "SamplingParams", "StreamEvent", "Tokenizer", "Transformer", "load"]
__version__ = "0.1.0"
