"""`ember.Model`: the Python API.

    >>> import ember
    >>> model = ember.Model("smollm2", num_ctx=2048)              # doctest: +SKIP
    >>> model.generate("Why is the sky blue?", temperature=0).response  # doctest: +SKIP
    >>> for chunk in model.chat([{"role": "user", "content": "Hi"}], stream=True):  # doctest: +SKIP
    ...     print(chunk["message"]["content"], end="")
    >>> model("Q: Name a planet. A:", max_tokens=8, stop=["\\n"])["choices"][0]["text"]  # doctest: +SKIP

Options use Ollama's names. Load options (num_ctx, num_gpu, num_thread ...) go to the constructor; sampling
options (temperature, top_k, stop, seed, num_predict ...) go with each call, as keywords or as `options={...}`.
A call that names a different load option reloads the model, as Ollama does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, overload

from ember import llama_compat
from ember.collect import collect
from ember.errors import InvalidOptionError, InvalidRequestError
from ember.loaded_model import LoadedModel
from ember.options import LOAD_OPTION_NAMES, LoadOptions, SamplingOptions, load_options, sampling_options
from ember.serve.resolve import apply_defaults
from ember.store.gguf_file import GGUFInfo
from ember.store.resolve import TRANSFORMERS, ModelSource, resolve_model
from ember.types import (
    ChatRequest,
    ChatResponse,
    FormatSpec,
    GenerateRequest,
    GenerateResponse,
    Message,
    Metrics,
    ThinkSpec,
    build_request,
    to_messages,
)

log = logging.getLogger(__name__)

# llama-cpp-python's constructor names, accepted so that `Llama(...)` code ports by renaming the class.
_LLAMA_LOAD_ALIASES = {
    "n_ctx": "num_ctx",
    "n_batch": "num_batch",
    "n_threads": "num_thread",
    "n_gpu_layers": "num_gpu",
    "main_gpu": "main_gpu",
    "flash_attn": "flash_attn",
    "use_mmap": "use_mmap",
    "use_mlock": "use_mlock",
}


class Model:
    """A local model, loaded in this process and ready to answer.

    `name_or_path` is a model name (`smollm2`, `smollm2:135m`) or the path of a .gguf file.
    `system` and `template` replace the model's own system prompt and chat template;
    `options` sets default sampling options for every call.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] | ModelSource | None = None,
        *,
        model_path: str | os.PathLike[str] | None = None,
        system: str | None = None,
        template: str | None = None,
        options: Mapping[str, Any] | None = None,
        verbose: bool = False,
        **load_kwargs: Any,
    ) -> None:
        target = name_or_path if name_or_path is not None else model_path
        if target is None:
            raise InvalidOptionError("give a model name or a path to a .gguf file")
        if verbose:
            logging.getLogger("ember").setLevel(logging.DEBUG)
        source = target if isinstance(target, ModelSource) else resolve_model(target)
        if source.engine == TRANSFORMERS:
            raise InvalidOptionError(
                f"ember.Model loads GGUF models in this process; {source.name} runs on the transformers engine: "
                "serve it (`ember serve`) and call the server, or answer with `ember run`"
            )
        if source.upstream is not None:
            raise InvalidRequestError(
                f"{source.name} is an upstream model: its servers answer through `ember serve`; start the server "
                "and run it there"
            )
        if system is not None or template is not None:
            source = dataclasses.replace(
                source,
                system=system if system is not None else source.system,
                template=template if template is not None else source.template,
            )
        self.source: ModelSource = source
        model_loads = {k: v for k, v in source.parameters.items() if k in LOAD_OPTION_NAMES}
        self._call_defaults = dict(options or {})
        sampling_options(
            {k: v for k, v in source.parameters.items() if k not in LOAD_OPTION_NAMES}, self._call_defaults
        )  # validate now rather than on the first call
        self._loaded = LoadedModel(source, load_options(model_loads, _rename_llama_kwargs(load_kwargs)))

    # --- facts ---------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def options(self) -> LoadOptions:
        """The load options the model is loaded with."""
        return self._loaded.options

    @property
    def info(self) -> GGUFInfo:
        """What the GGUF file says: architecture, parameter count, quantization, context length ..."""
        return self._loaded.info

    @property
    def load_duration(self) -> float:
        """Seconds the last load took."""
        return self._loaded.load_duration_ns / 1e9

    @property
    def loaded(self) -> LoadedModel:
        return self._loaded

    # --- Ollama-style calls --------------------------------------------------------------------------

    @overload
    def generate(self, prompt: str = ..., *, stream: Literal[False] = ..., **kwargs: Any) -> GenerateResponse: ...
    @overload
    def generate(self, prompt: str = ..., *, stream: Literal[True], **kwargs: Any) -> Iterator[GenerateResponse]: ...

    def generate(
        self,
        prompt: str = "",
        *,
        suffix: str | None = None,
        think: ThinkSpec = None,
        system: str | None = None,
        template: str | None = None,
        raw: bool = False,
        format: FormatSpec = None,
        images: list[str] | None = None,
        context: list[int] | None = None,
        stream: bool = False,
        truncate: bool = False,
        options: Mapping[str, Any] | None = None,
        **option_kwargs: Any,
    ) -> GenerateResponse | Iterator[GenerateResponse]:
        """Answer a prompt (wrapped in the chat template unless raw=True). Options by keyword or `options`.
        `suffix` fills in the middle (models with FIM tokens); `think` as in Ollama (a thinking model thinks
        unless told False; the reasoning comes back as `thinking`)."""
        request = build_request(
            GenerateRequest,
            model=self.name,
            prompt=prompt,
            suffix=suffix,
            think=think,
            system=system,
            template=template,
            raw=raw,
            format=format,
            images=images,
            context=context,
            stream=stream,
            truncate=truncate,
            options=self._request_options(options, option_kwargs),
        )
        chunks = self.answer(request)
        return chunks if stream else collect(chunks)

    @overload
    def chat(self, messages: Iterable[Any], *, stream: Literal[False] = ..., **kwargs: Any) -> ChatResponse: ...
    @overload
    def chat(self, messages: Iterable[Any], *, stream: Literal[True], **kwargs: Any) -> Iterator[ChatResponse]: ...

    def chat(
        self,
        messages: Iterable[Mapping[str, Any] | Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        format: FormatSpec = None,
        template: str | None = None,
        think: ThinkSpec = None,
        stream: bool = False,
        truncate: bool = False,
        options: Mapping[str, Any] | None = None,
        **option_kwargs: Any,
    ) -> ChatResponse | Iterator[ChatResponse]:
        """The assistant's next message in a conversation of {'role', 'content'} messages."""
        request = build_request(
            ChatRequest,
            model=self.name,
            messages=to_messages(list(messages)),
            tools=tools,
            tool_choice=tool_choice,
            format=format,
            template=template,
            think=think,
            stream=stream,
            truncate=truncate,
            options=self._request_options(options, option_kwargs),
        )
        chunks = self.answer(request)
        return chunks if stream else collect(chunks)

    def answer(self, request: GenerateRequest | ChatRequest) -> Iterator[Any]:
        """Stream the chunks of a native request on this model: resolved as the server resolves it (Ollama's
        defaults, capability checks), loading the model again first if it names other load options."""
        request = apply_defaults(request, self.source)
        if isinstance(request, ChatRequest):
            return self._with_reload(request.options, lambda loaded: loaded.chat(request))
        return self._with_reload(request.options, lambda loaded: loaded.generate(request))

    # --- llama-cpp-python-style calls ----------------------------------------------------------------

    def __call__(self, prompt: str, **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """`model(prompt, max_tokens=, temperature=, stop=[...], echo=, stream=)` as with llama-cpp-python."""
        return self.create_completion(prompt, **kwargs)

    def create_completion(self, prompt: str, **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """An OpenAI-style text completion dict (or an iterator of chunk dicts with stream=True)."""
        return llama_compat.create_completion(self, prompt, **kwargs)

    def create_chat_completion(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """An OpenAI-style chat completion dict (or an iterator of chunk dicts with stream=True)."""
        return llama_compat.create_chat_completion(self, messages, **kwargs)

    # --- tokens --------------------------------------------------------------------------------------

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of a text (bytes are read as UTF-8); add_special adds BOS when the model wants it."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._loaded.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Iterable[int]) -> str:
        tokens = list(tokens)
        for token in tokens:
            self._loaded.model.validate_token(token)
        return self._loaded.model.detokenize(tokens)

    def count_tokens(self, text: str) -> int:
        """How many tokens a text takes (without BOS), for budgeting a context window."""
        return len(self.tokenize(text, add_special=False))

    # --- lifecycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        self._loaded.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, num_ctx={self.options.num_ctx})"

    # --- internals -----------------------------------------------------------------------------------

    def _request_options(self, options: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {**self._call_defaults, **(options or {}), **kwargs}

    def _with_reload(self, options: Mapping[str, Any] | None, start: Any) -> Iterator[Any]:
        """Start a request, loading the model again first if it names different load options."""
        wanted = {k: v for k, v in (options or {}).items() if k in LOAD_OPTION_NAMES and v is not None}
        changed = {k: v for k, v in wanted.items() if getattr(self._loaded.options, k) != v}
        if changed:
            new_options = load_options({**self._loaded.options.model_dump(), **changed})
            log.info("reloading %s with %s", self.name, changed)
            self._loaded.close()
            self._loaded = LoadedModel(self.source, new_options)
        return start(self._loaded)

    def sampling(self, **options: Any) -> SamplingOptions:
        """The sampling options a call with these keywords would use."""
        return self._loaded.sampling_for(self._call_defaults, options)


def _rename_llama_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    renamed = {}
    for key, value in kwargs.items():
        renamed[_LLAMA_LOAD_ALIASES.get(key, key)] = value
    return renamed


__all__ = ["Metrics", "Model"]
