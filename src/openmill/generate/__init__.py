"""Generation: the engine (KV cache, rolling buffer, continuous batching), sampling, streaming
text with stop strings, weight-only quantization. See docs/inference.md."""

from openmill.generate.engine import Engine, PromptTooLong, generate, generate_batch
from openmill.generate.sampling import SamplingParams, sample_next
from openmill.generate.stream import TextStream

__all__ = ["Engine", "PromptTooLong", "SamplingParams", "TextStream", "generate", "generate_batch", "sample_next"]
