"""What a model can do, read from the model itself: its GGUF metadata, its vocabulary and its chat template.

Ollama's names and rules (server/images.go, `Capabilities`): a GGUF with a pooling type is an embedding model,
any other one completes text; a template that writes `<think>`/`</think>` thinks; a vocabulary with
fill-in-the-middle tokens can insert (`suffix`). ember offers tools to every model that completes text (the
template renders them, or ember writes them into the system prompt), so `tools` goes with `completion`.

Facts are cached per model file (path, size and modification time), so a request pays for reading a file's
header once, and for the vocabulary (about a second for a large one) only when it asks for an insertion.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ember.chat_template import CHATML_TEMPLATE
from ember.errors import ModelLoadError
from ember.store.gguf_file import GGUFInfo, read_gguf
from ember.store.model_directory import read_model_directory
from ember.store.resolve import TRANSFORMERS, ModelSource
from ember.thinking import template_thinks


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _gguf_info(key: tuple[str, int, int]) -> GGUFInfo:
    return read_gguf(Path(key[0]))


@functools.lru_cache(maxsize=32)
def _directory_template(key: tuple[str, int, int]) -> str | None:
    return read_model_directory(Path(key[0])).chat_template


@functools.lru_cache(maxsize=32)
def _fim_tokens(key: tuple[str, int, int]) -> tuple[int, int, int] | None:
    from ember.engine.llamacpp import LlamaModel
    from ember.options import LoadOptions

    try:
        vocabulary = LlamaModel.vocab_only(Path(key[0]), LoadOptions())
    except ModelLoadError:  # llama.cpp cannot read its vocabulary: loading it would fail with the reason
        return None
    try:
        return vocabulary.fim_tokens()
    finally:
        vocabulary.close()


def gguf_info(path: Path) -> GGUFInfo:
    """The GGUF header of a model file, read once per version of the file."""
    return _gguf_info(_file_key(path))


def fim_tokens(path: Path) -> tuple[int, int, int] | None:
    """The model's fill-in-the-middle tokens (prefix, suffix, middle), as llama.cpp finds them; None if none
    (and for a transformers model directory, whose engine does not insert)."""
    if path.is_dir():
        return None
    return _fim_tokens(_file_key(path))


def effective_template(source: ModelSource, override: str | None = None) -> str:
    """The chat template a request renders with: its own, the Modelfile's, the model's, or ChatML."""
    if source.engine == TRANSFORMERS:
        return override or source.template or _directory_template(_file_key(source.path)) or CHATML_TEMPLATE
    return override or source.template or gguf_info(source.path).chat_template or CHATML_TEMPLATE


def is_embedding_model(source: ModelSource) -> bool:
    if source.engine == TRANSFORMERS:
        return False  # the transformers engine serves causal language models only
    info = gguf_info(source.path)
    return info.arch_value("pooling_type") is not None


def thinks(source: ModelSource, template: str | None = None) -> bool:
    """Whether the model thinks with this request's template (its own when the request gives none). An upstream
    model's template is its server's: ember cannot tell, and leaves `think` to the server."""
    if source.upstream is not None:
        return False
    if source.engine == TRANSFORMERS:
        return False  # its runner does not split a thinking part from the answer
    return template_thinks(effective_template(source, template))


@dataclass(frozen=True)
class Capabilities:
    completion: bool
    embedding: bool
    tools: bool
    insert: bool
    thinking: bool

    def names(self) -> list[str]:
        """As /api/show lists them."""
        order = ("completion", "embedding", "tools", "insert", "thinking")
        return [name for name in order if getattr(self, name)]


def model_capabilities(source: ModelSource) -> Capabilities:
    """Everything the model can do (reads its vocabulary once per file, for `insert`). An upstream model
    completes text and takes tools; whether its server embeds or thinks is the server's to say."""
    if source.upstream is not None:
        return Capabilities(completion=True, embedding=False, tools=True, insert=False, thinking=False)
    embedding = is_embedding_model(source)
    completion = not embedding
    if source.engine == TRANSFORMERS:  # text only: no tool calls, insertion or thinking there yet
        return Capabilities(completion=True, embedding=False, tools=False, insert=False, thinking=False)
    return Capabilities(
        completion=completion,
        embedding=embedding,
        tools=completion,
        insert=completion and fim_tokens(source.path) is not None,
        thinking=completion and thinks(source),
    )
