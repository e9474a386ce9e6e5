"""Tokenizer facade: encoding, chat templates, and the raw `tokenizers.Tokenizer` for streaming.

Both model sources (GGUF metadata and HF directories) go through transformers' AutoTokenizer, which
builds a fast tokenizer and exposes the model's chat template.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer as RawTokenizer
from tokenizers.decoders import DecodeStream


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: tuple[int, ...]):
        self.hf = hf_tokenizer
        self.raw: RawTokenizer = hf_tokenizer._tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = len(hf_tokenizer)
        self.all_special_ids = set(hf_tokenizer.all_special_ids)

    @classmethod
    def from_pretrained(cls, directory: str, gguf_file: str | None = None,
                        eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        hf = AutoTokenizer.from_pretrained(directory, **kwargs)
        eos = eos_token_ids or ((hf.eos_token_id,) if hf.eos_token_id is not None else ())
        return cls(hf, tuple(eos))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
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

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use completions instead")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)
