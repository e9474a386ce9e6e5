"""Tokenizer facade: encoding, chat templates, and the raw `tokenizers.Tokenizer` for streaming.

Both model sources (GGUF metadata and HF directories) go through transformers' AutoTokenizer, which
builds a fast tokenizer and exposes the model's chat template. Converting a GGUF's vocabulary takes
seconds (gguf's reader walks every token string; 262k of them for Gemma 3), so the converted
tokenizer is saved once under ~/.cache/pagoda/tokenizers (or $PAGODA_CACHE_DIR), keyed by the
file's path, size and mtime and the transformers version, and later loads read that folder.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as RawTokenizer
from tokenizers.decoders import DecodeStream

from pagoda.loader.token_bytes import TokenBytes


@dataclass(frozen=True)
class TokenizerFiles:
    """Where a tokenizer is read from; calling it builds the transformers tokenizer. A plain
    value, so a Tokenizer not yet built pickles (the engine process sends its own to the
    server)."""

    directory: str
    gguf_file: str | None = None

    def __call__(self) -> Any:
        from transformers import AutoTokenizer

        if self.gguf_file:
            return _gguf_tokenizer(self.directory, self.gguf_file)
        return AutoTokenizer.from_pretrained(self.directory)


class Tokenizer:
    """Built on first use: a process that loads a model but never encodes (a tensor- or
    pipeline-parallel rank) skips transformers' import and the vocabulary (~1.3 s)."""

    def __init__(self, load: Callable[[], Any], eos_token_ids: tuple[int, ...] = ()):
        self._load = load  # () -> the transformers tokenizer
        self._eos_token_ids = eos_token_ids  # () -> the tokenizer's own eos token

    @functools.cached_property
    def hf(self) -> Any:
        return self._load()

    @functools.cached_property
    def raw(self) -> RawTokenizer:
        return self.hf._tokenizer

    @functools.cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The model file's end-of-sequence ids, else the tokenizer's own (built for it)."""
        if self._eos_token_ids:
            return self._eos_token_ids
        eos = self.hf.eos_token_id
        return (eos,) if eos is not None else ()

    @functools.cached_property
    def vocab_size(self) -> int:
        return len(self.hf)

    @functools.cached_property
    def all_special_ids(self) -> set[int]:
        return set(self.hf.all_special_ids)

    @classmethod
    def from_pretrained(cls, directory: str, gguf_file: str | None = None,
                        eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        return cls(TokenizerFiles(directory, gguf_file), tuple(eos_token_ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_unicode(text)
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        """An incremental decoder; `.step(self.raw, token_id)` returns new text or None.

        It holds back bytes of an incomplete UTF-8 character until the token completing it arrives.
        """
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        """`token_bytes(id)`: the token's own bytes, also when it holds part of a UTF-8
        character (its `token_str` is then U+FFFD)."""
        return TokenBytes(self.raw, self.token_str)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use completions instead")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)


log = logging.getLogger(__name__)


class TextError(ValueError):
    """Text the tokenizer cannot take (a lone UTF-16 surrogate, which JSON's \\uD800 escapes
    can produce but UTF-8 cannot encode)."""


def check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TextError(f"the text is not valid Unicode: a lone surrogate at character "
                        f"{exc.start}") from None


def _cache_dir(gguf_path: str) -> str:
    import transformers

    st = os.stat(gguf_path)
    key = f"{os.path.realpath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    root = os.environ.get("PAGODA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "pagoda")
    return os.path.join(root, "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:24])


def _gguf_tokenizer(directory: str, gguf_file: str) -> Any:
    """transformers' tokenizer of a GGUF file, from the conversion cache when it is there."""
    from transformers import AutoTokenizer

    cached = _cache_dir(os.path.join(directory, gguf_file))
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry: convert again
            log.warning("ignoring the tokenizer cache %s (%s)", cached, exc)
    hf = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    try:  # written to a temporary folder and renamed, so concurrent loads never see half of it
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cached))
        hf.save_pretrained(tmp)
        try:
            os.rename(tmp, cached)
        except OSError:  # another process stored it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.warning("could not cache the converted tokenizer (%s)", exc)
    return hf
