"""ember: a local LLM runtime. Run GGUF models through llama.cpp from Python, the CLI, or HTTP."""

from ember.errors import (
    ContextOverflowError,
    CorruptModelError,
    EmberError,
    InvalidOptionError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
)
from ember.model import Model
from ember.options import LoadOptions, SamplingOptions
from ember.types import ChatResponse, GenerateResponse, Message

__version__ = "0.1.0"

__all__ = [
    "ChatResponse",
    "ContextOverflowError",
    "CorruptModelError",
    "EmberError",
    "GenerateResponse",
    "InvalidOptionError",
    "InvalidRequestError",
    "LoadOptions",
    "Message",
    "Model",
    "ModelLoadError",
    "ModelNotFoundError",
    "SamplingOptions",
    "__version__",
]
