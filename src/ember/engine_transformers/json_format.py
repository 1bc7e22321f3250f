"""JSON answers (`format: "json"` or a JSON schema) through outlines-core: the schema becomes a regular
expression, the regular expression an index over the model's vocabulary, and at each step the tokens that
cannot continue a valid answer are masked out. Indexes are kept per schema, so each is built once per load.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from ember.errors import InvalidRequestError

ANY_OBJECT = '{"type": "object"}'  # what `format: "json"` asks for, as in Ollama: one JSON object


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """Each ordinary token's bytes: byte-level BPE (GPT-2, Llama 3, SmolLM) or SentencePiece (▁, <0x..>)."""
    special = set(tokenizer.all_special_ids)
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    decoder = json.dumps(backend.get("decoder") or {})
    byte_level = "ByteLevel" in decoder
    table = _byte_decoder()
    result: dict[int, bytes] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if byte_level:
            if all(char in table for char in token):
                result[token_id] = bytes(table[char] for char in token)
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            result[token_id] = bytes([int(token[3:5], 16)])
        else:
            result[token_id] = token.replace("▁", " ").encode()
    return result


class JsonConstraint:
    """One answer's position in its schema's index."""

    def __init__(self, guide: Any, vocab_size: int) -> None:
        self.guide = guide
        self.vocab_size = vocab_size

    def mask(self, scores: Any) -> Any:
        import torch

        allowed = [token for token in self.guide.get_tokens() if token < scores.shape[-1]]
        masked = torch.full_like(scores, float("-inf"))
        index = torch.tensor(allowed, dtype=torch.long, device=scores.device)
        masked[0, index] = scores[0, index]
        return masked

    def advance(self, token: int) -> None:
        if not self.guide.is_finished():
            self.guide.advance(token)

    @property
    def finished(self) -> bool:
        return self.guide.is_finished()


class JsonFormats:
    """The model's vocabulary for outlines-core, made at the first JSON request, and an index per schema."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.eos_id = min(eos_ids)
        self.vocab_size = vocab_size
        self._vocabulary: Any = None
        self._index = lru_cache(maxsize=16)(self._build_index)

    def constraint(self, format_: str | dict[str, Any] | None) -> JsonConstraint | None:
        if format_ is None or format_ == "":
            return None
        if format_ == "json":
            schema = ANY_OBJECT
        elif isinstance(format_, dict):
            schema = json.dumps(format_)  # key order kept: it is the order the answer writes them in
        else:
            raise InvalidRequestError(f'format must be "json" or a JSON schema object, not {format_!r}')
        try:
            from outlines_core import Guide
        except ImportError:
            raise InvalidRequestError(
                "JSON output with the transformers engine needs outlines-core: pip install 'ember[transformers]'"
            ) from None
        return JsonConstraint(Guide(self._index(schema)), self.vocab_size)

    def _build_index(self, schema: str) -> Any:
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        try:
            regex = build_regex_from_schema(schema)
        except Exception as error:
            raise InvalidRequestError(f"format: this JSON schema is not supported: {error}") from None
        if self._vocabulary is None:
            grouped: dict[bytes, list[int]] = {}
            for token_id, data in token_bytes(self.tokenizer).items():
                if token_id != self.eos_id:
                    grouped.setdefault(data, []).append(token_id)
            self._vocabulary = Vocabulary(self.eos_id, grouped)
        return Index(regex, self._vocabulary)
