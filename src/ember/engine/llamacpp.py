"""The module that talks to llama.cpp (through llama-cpp-python's low-level ctypes API).

Only this module, `sampler.py` (sampler chains), `quantize.py` (llama.cpp's quantizer) and `readout.py`
(embeddings and logprobs: reading llama.cpp's output vectors), kept apart for size, import llama_cpp.

Everything above this file works with Python types: token lists, bytes, options. The names of the C API
drift between llama-cpp-python releases, so `check_backend()` verifies what ember needs once, at first use,
and fails with a message that says what to install instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import llama_cpp as lib
from llama_cpp import llama_grammar

from ember.errors import BackendVersionError, EngineError, InvalidRequestError, ModelLoadError
from ember.options import LoadOptions
from ember.store.gguf_file import read_gguf

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ">=0.3.36,<0.4"
JSON_GRAMMAR = llama_grammar.JSON_GBNF

_REQUIRED_FUNCTIONS = (
    "llama_backend_init",
    "llama_model_load_from_file",
    "llama_model_free",
    "llama_init_from_model",
    "llama_free",
    "llama_model_get_vocab",
    "llama_vocab_n_tokens",
    "llama_vocab_is_eog",
    "llama_vocab_get_add_bos",
    "llama_vocab_bos",
    "llama_vocab_eos",
    "llama_tokenize",
    "llama_token_to_piece",
    "llama_batch_init",
    "llama_batch_free",
    "llama_decode",
    "llama_get_logits_ith",
    "llama_get_embeddings_seq",
    "llama_get_memory",
    "llama_memory_clear",
    "llama_memory_seq_rm",
    "llama_memory_seq_cp",
    "llama_state_seq_get_size",
    "llama_state_seq_get_data",
    "llama_state_seq_set_data",
    "llama_sampler_chain_init",
    "llama_sampler_chain_add",
    "llama_sampler_chain_get",
    "llama_sampler_chain_n",
    "llama_sampler_sample",
    "llama_sampler_accept",
    "llama_sampler_free",
    "llama_sampler_init_greedy",
    "llama_sampler_init_dist",
    "llama_sampler_init_top_k",
    "llama_sampler_init_top_p",
    "llama_sampler_init_min_p",
    "llama_sampler_init_typical",
    "llama_sampler_init_temp",
    "llama_sampler_init_penalties",
    "llama_sampler_init_mirostat",
    "llama_sampler_init_mirostat_v2",
    "llama_sampler_init_grammar",
    "llama_sampler_init_logit_bias",
    "llama_model_chat_template",
    "llama_model_meta_val_str",
    "llama_model_n_ctx_train",
    "llama_model_n_layer",
    "llama_model_n_embd",
    "llama_model_size",
    "llama_model_n_params",
    "llama_model_desc",
    "llama_supports_gpu_offload",
    "llama_adapter_lora_init",
    "llama_adapter_lora_free",
    "llama_set_adapters_lora",
    "llama_model_quantize",
    "llama_model_quantize_default_params",
)

_backend_lock = threading.Lock()
_backend_ready = False
# llama.cpp keeps a pointer to the callback; holding it here keeps ctypes from freeing it.
_log_callback = None
# ggml_log_level in ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama-cpp-python's _logger.py
# still lists an older order, with ERROR at 3).
_GGML_LOG_ERROR = 4
_GGML_LOG_CONTINUE = 5
# llama.cpp explains a failed load only in its log; the last error lines go into ember's error message.
_recent_errors: deque[str] = deque(maxlen=4)
_last_level = 0


def _route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    global _last_level
    if level != _GGML_LOG_CONTINUE:
        _last_level = level
    line = text.decode("utf-8", "replace").rstrip() if text else ""
    if not line:
        return
    if _last_level == _GGML_LOG_ERROR:
        _recent_errors.append(line)
    log.debug("llama.cpp: %s", line)


def forget_llama_errors() -> None:
    """Call before a llama.cpp function whose failure `last_llama_error()` should explain."""
    _recent_errors.clear()


def last_llama_error(after: str = "") -> str:
    """What follows `after` in the newest error line llama.cpp logged with it, else its newest error line."""
    for line in reversed(_recent_errors) if after else ():
        if after in line:
            return line.partition(after)[2]
    return _recent_errors[-1] if _recent_errors else ""


def backend_version() -> str:
    return str(lib.__version__)


def check_backend() -> None:
    """Initialize llama.cpp once; raise BackendVersionError if this llama-cpp-python lacks what ember needs."""
    global _backend_ready, _log_callback
    with _backend_lock:
        if _backend_ready:
            return
        missing = [name for name in _REQUIRED_FUNCTIONS if not hasattr(lib, name)]
        if missing:
            raise BackendVersionError(
                f"llama-cpp-python {backend_version()} lacks {', '.join(missing)}; "
                f"install a version in the range {SUPPORTED_VERSIONS}"
            )
        _log_callback = lib.llama_log_callback(_route_llama_log)
        lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lib.llama_backend_init()
        _backend_ready = True


def supports_gpu_offload() -> bool:
    check_backend()
    return bool(lib.llama_supports_gpu_offload())


@cache
def extra_buffer_types_are_safe() -> bool:
    """Whether to let llama.cpp repack weights into its CPU "extra" buffer types (AMX, the repacked kernels).

    Not on a CPU with AMX: the AMX kernels of the llama.cpp that llama-cpp-python 0.3.36 vendors crash
    (SIGSEGV in llama_decode of the first multi-token batch) with a Q4_1 model, SmolLM2 included; llama-cpp-
    python's own `Llama` crashes the same way. Elsewhere they stay on (faster kernels for Q4_0, Q4_K, IQ4_NL).
    """
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return True
    return "amx_tile" not in flags.split()


@cache
def physical_cores() -> int:
    """Physical cores this process may use: llama.cpp runs slower on hyper-threads than without them."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        physical_id = core_id = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                physical_id = value.strip()
            elif key == "core id":
                core_id = value.strip()
                cores.add((physical_id, core_id))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) or allowed))


class LlamaModel:
    """Weights and vocabulary of one GGUF file, loaded by llama.cpp, and the LoRA adapters loaded for it.

    The adapters belong to the model (llama.cpp ties each to the model it was loaded for); every context
    created from the model applies all of them with scale 1. Close order: contexts, then adapters, then model.
    """

    def __init__(
        self, path: Path, options: LoadOptions, adapters: Sequence[Path] = (), *, vocab_only: bool = False
    ) -> None:
        check_backend()
        params = lib.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = _gpu_layers(options.num_gpu)
        params.main_gpu = options.main_gpu
        params.use_mmap = True if options.use_mmap is None else options.use_mmap
        params.use_mlock = options.use_mlock
        params.use_extra_bufts = extra_buffer_types_are_safe()
        self.path = path
        self.gpu_layers = params.n_gpu_layers
        forget_llama_errors()
        self._model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            reason = last_llama_error("error loading model: ") or "unsupported architecture or not enough memory"
            raise ModelLoadError(
                f"llama.cpp (llama-cpp-python {backend_version()}) could not load {path.name}: {reason}"
            )
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = lib.llama_model_n_ctx_train(self._model)
        self.n_layer: int = lib.llama_model_n_layer(self._model)
        self.n_embd: int = lib.llama_model_n_embd(self._model)
        self.size_bytes: int = lib.llama_model_size(self._model)
        self.n_params: int = lib.llama_model_n_params(self._model)
        self.add_bos: bool = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self.bos_token: int = lib.llama_vocab_bos(self._vocab)
        self.eos_token: int = lib.llama_vocab_eos(self._vocab)
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._eog = [bool(lib.llama_vocab_is_eog(self._vocab, token)) for token in range(self.n_vocab)]
        self.adapters: tuple[Path, ...] = tuple(Path(adapter) for adapter in adapters)
        self._adapters: list[lib.llama_adapter_lora_p] = []
        try:
            for adapter in self.adapters:
                self._adapters.append(self._load_adapter(adapter))
        except BaseException:
            self.close()
            raise

    @classmethod
    def vocab_only(cls, path: Path, options: LoadOptions) -> LlamaModel:
        """The vocabulary alone (no weights): for tokenizing without loading a model."""
        return cls(path, options, vocab_only=True)

    def _load_adapter(self, path: Path) -> lib.llama_adapter_lora_p:
        info = read_gguf(path)  # refuse a damaged file before llama.cpp reads it
        kind = info.metadata.get("general.type"), info.metadata.get("adapter.type")
        if kind != ("adapter", "lora"):
            raise ModelLoadError(
                f"{path.name} is not a LoRA adapter (general.type {kind[0]!r}, adapter.type {kind[1]!r}; "
                "a LoRA adapter GGUF has 'adapter' and 'lora')"
            )
        architecture = self.metadata("general.architecture")
        if info.architecture != architecture:
            raise ModelLoadError(
                f"the LoRA adapter {path.name} is for the {info.architecture!r} architecture but {self.path.name} "
                f"is a {architecture!r} model; use an adapter made for this model"
            )
        forget_llama_errors()
        adapter = lib.llama_adapter_lora_init(self.handle, str(path).encode())
        if not adapter:
            reason = last_llama_error("failed to apply lora adapter: ") or "not enough memory"
            raise ModelLoadError(
                f"llama.cpp could not load the LoRA adapter {path.name} for {self.path.name}: {reason}"
            )
        return adapter

    @property
    def handle(self) -> lib.llama_model_p:
        if not self._model:
            raise EngineError("the model has been closed")
        return self._model

    @property
    def adapter_handles(self) -> tuple[lib.llama_adapter_lora_p, ...]:
        return tuple(self._adapters)

    def close(self) -> None:
        # llama.cpp frees the adapters a model still holds with the model; freeing them first, explicitly,
        # takes each out of the model's set, so nothing is freed twice.
        while getattr(self, "_adapters", None):
            lib.llama_adapter_lora_free(self._adapters.pop())
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()

    def description(self) -> str:
        buffer = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self.handle, buffer, len(buffer))
        return buffer.value.decode("utf-8", "replace")

    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(4096)
        length = lib.llama_model_meta_val_str(self.handle, key.encode(), buffer, len(buffer))
        if length < 0:
            return None
        if length >= len(buffer):
            buffer = ctypes.create_string_buffer(length + 1)
            lib.llama_model_meta_val_str(self.handle, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        template = lib.llama_model_chat_template(self.handle, None)
        return template.decode("utf-8", "replace") if template else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        tokens = (lib.llama_token * capacity)()
        count = lib.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:  # buffer too small: llama.cpp returns minus the size it needs
            capacity = -count
            tokens = (lib.llama_token * capacity)()
            count = lib.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
            if count < 0:
                raise EngineError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(tokens[:count])

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for; control tokens (such as <|im_end|>) give b''."""
        cached = self._pieces[token]
        if cached is None:
            buffer = self._piece_buffer
            length = lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            if length < 0:
                buffer = ctypes.create_string_buffer(-length)
                length = lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            cached = self._pieces[token] = buffer.raw[:length]
        return cached

    def token_text(self, token: int) -> str:
        """The text of a token including special ones (for showing control tokens such as BOS)."""
        buffer = ctypes.create_string_buffer(256)
        length = lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[: max(length, 0)].decode("utf-8", "replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(token) for token in tokens).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return self._eog[token]

    def fim_tokens(self) -> tuple[int, int, int] | None:
        """The fill-in-the-middle tokens (prefix, suffix, middle) llama.cpp found in the vocabulary, or None."""
        vocab = self._vocab
        tokens = (lib.llama_vocab_fim_pre(vocab), lib.llama_vocab_fim_suf(vocab), lib.llama_vocab_fim_mid(vocab))
        return tokens if all(token >= 0 for token in tokens) else None

    def validate_token(self, token: int) -> None:
        if not 0 <= token < self.n_vocab:
            raise InvalidRequestError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")


def _gpu_layers(num_gpu: int) -> int:
    if num_gpu >= 0:
        return num_gpu
    return 999 if lib.llama_supports_gpu_offload() else 0


_FLASH_ATTENTION = {
    None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
    True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class LlamaContext:
    """A llama.cpp context: the KV cache for `num_parallel` sequences of `num_ctx` tokens each.

    The cache is not unified: each sequence has its own stream of cells, so a sequence computes exactly
    the same numbers whether it is decoded alone or next to others (batch-invariant output).

    With `pooling` (a LLAMA_POOLING_TYPE_*) it is an embeddings context instead: one sequence of num_ctx tokens,
    decoded in a single ubatch (llama.cpp pools each ubatch on its own), with pooled embeddings enabled.
    """

    def __init__(self, model: LlamaModel, options: LoadOptions, *, pooling: int | None = None) -> None:
        params = lib.llama_context_default_params()
        threads = options.num_thread or physical_cores()
        params.n_ctx = options.num_ctx * options.num_parallel
        params.n_batch = options.num_batch
        params.n_ubatch = min(options.num_batch, 512)
        params.n_seq_max = options.num_parallel
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = _FLASH_ATTENTION[options.flash_attn]
        params.kv_unified = False
        params.no_perf = True
        if pooling is not None:
            params.n_ctx = params.n_batch = params.n_ubatch = options.num_ctx
            params.n_seq_max = 1
            params.embeddings = True
            params.pooling_type = pooling
        self.model = model
        self.n_seq_max = params.n_seq_max
        self.n_batch = params.n_batch
        self.threads = threads
        forget_llama_errors()
        self._ctx = lib.llama_init_from_model(model.handle, params)
        if not self._ctx:
            reason = last_llama_error() or "not enough memory"
            raise ModelLoadError(
                f"llama.cpp could not create a context of {options.num_ctx} tokens x {options.num_parallel} "
                f"sequences ({reason}); lower num_ctx or num_parallel"
            )
        self.n_ctx: int = lib.llama_n_ctx(self._ctx)
        self._memory = lib.llama_get_memory(self._ctx)
        if model.adapter_handles:
            self._apply_adapters(model.adapter_handles)

    def _apply_adapters(self, handles: tuple[lib.llama_adapter_lora_p, ...]) -> None:
        count = len(handles)
        adapters = (lib.llama_adapter_lora_p_ctypes * count)(*handles)
        scales = (ctypes.c_float * count)(*([1.0] * count))
        forget_llama_errors()
        status = lib.llama_set_adapters_lora(self._ctx, adapters, count, scales)
        if status != 0:
            self.close()
            reason = last_llama_error() or f"status {status}"
            raise ModelLoadError(f"llama.cpp could not apply {count} LoRA adapter(s) to the context: {reason}")

    @property
    def handle(self) -> lib.llama_context_p:
        if not self._ctx:
            raise EngineError("the context has been closed")
        return self._ctx

    def close(self) -> None:
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

    def decode(self, batch: TokenBatch) -> None:
        status = lib.llama_decode(self.handle, batch.raw)
        if status != 0:
            reasons = {1: "no room left in the KV cache", 2: "the decode was aborted", -1: "the batch was invalid"}
            raise EngineError(f"llama_decode failed ({reasons.get(status, f'status {status}')})")

    def forget(self, seq_id: int, start: int = -1, end: int = -1) -> bool:
        """Drop the cached cells of a sequence in positions [start, end); -1 means open-ended."""
        return bool(lib.llama_memory_seq_rm(self._memory, seq_id, start, end))

    def copy_sequence(self, source: int, target: int) -> None:
        """Copy a sequence's KV into another, replacing what it held. Each sequence has its own KV stream here,
        and across streams llama.cpp copies the whole stream buffer (num_ctx cells of every layer, however few
        are used), at the start of the next decode."""
        lib.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def state_size(self, seq_id: int) -> int:
        """Bytes `save_sequence` would return for this sequence's KV."""
        return int(lib.llama_state_seq_get_size(self.handle, seq_id))

    def save_sequence(self, seq_id: int) -> bytearray:
        """A copy of one sequence's KV cells (only the cells it uses), for `restore_sequence`."""
        size = self.state_size(seq_id)
        data = bytearray(size)  # llama.cpp writes straight into it: one copy, not two
        written = lib.llama_state_seq_get_data(self.handle, (ctypes.c_uint8 * size).from_buffer(data), size, seq_id)
        if written != size:
            raise EngineError(f"llama.cpp saved {written} of {size} bytes of sequence {seq_id}'s KV")
        return data

    def restore_sequence(self, seq_id: int, data: bytearray) -> bool:
        """Put KV saved by `save_sequence` (from any sequence of a context like this) into `seq_id`, replacing
        what it held. False if llama.cpp refused it (then the sequence holds nothing)."""
        buffer = (ctypes.c_uint8 * len(data)).from_buffer(data)
        if lib.llama_state_seq_set_data(self.handle, buffer, len(data), seq_id) == 0:
            self.forget(seq_id)
            return False
        return True

    def clear(self) -> None:
        lib.llama_memory_clear(self._memory, True)


class TokenBatch:
    """A reusable llama_batch: one token per entry, each in one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = lib.llama_batch_init(capacity, 0, 1)
        self._token = self.raw.token
        self._pos = self.raw.pos
        self._n_seq_id = self.raw.n_seq_id
        self._seq_id = self.raw.seq_id
        self._logits = self.raw.logits
        self.size = 0

    def clear(self) -> None:
        self.size = 0
        self.raw.n_tokens = 0

    def add(self, token: int, position: int, seq_id: int, wants_logits: bool) -> int:
        """Append a token; return its index in the batch (where its logits will be, if asked for)."""
        index = self.size
        if index >= self.capacity:
            raise EngineError(f"the batch is full ({self.capacity} tokens)")
        self._token[index] = token
        self._pos[index] = position
        self._n_seq_id[index] = 1
        self._seq_id[index][0] = seq_id
        self._logits[index] = wants_logits
        self.size = index + 1
        self.raw.n_tokens = self.size
        return index

    def close(self) -> None:
        if self.raw is not None:
            lib.llama_batch_free(self.raw)
            self.raw = None

    def __del__(self) -> None:
        self.close()


def json_schema_grammar(schema_json: str) -> str:
    """GBNF grammar that only admits JSON valid under the given JSON schema."""
    try:
        return str(llama_grammar.json_schema_to_gbnf(schema_json))
    except Exception as error:  # the converter raises bare Exceptions and KeyErrors on schemas it cannot do
        raise InvalidRequestError(f"the JSON schema cannot be turned into a grammar: {error}") from None
