"""minir1: DeepSeek-R1's whole system, end to end, at a size anyone can train."""

from minir1.engine import Completion, Engine, SamplingParams, StreamEvent
from minir1.model import ConfigError, ModelConfig, ModelOutput, Transformer
from minir1.tokenizer import Tokenizer

__all__ = ["Completion", "ConfigError", "Engine", "ModelConfig", "ModelOutput", "SamplingParams", "StreamEvent",
           "Tokenizer", "Transformer"]
__version__ = "0.1.0"
