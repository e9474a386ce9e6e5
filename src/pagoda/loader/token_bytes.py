"""A token's own bytes (OpenAI's logprob `bytes`), which its decoded text cannot always give.

A token may hold part of a UTF-8 character (byte-level BPE splits "東" into several tokens, a
SentencePiece vocabulary falls back to `<0xE6>` pieces): decoding it alone yields U+FFFD, whose
bytes are not the token's. The vocabulary's own spelling of bytes is read instead:

- byte-level BPE (GPT-2's scheme: SmolLM2, Llama 3, Qwen): each byte is written as one printable
  character; the table is rebuilt here from that scheme's rule;
- SentencePiece with byte fallback (Gemma, Llama 2): `<0xNN>` is byte NN and `▁` a space.

Added tokens (`<|im_end|>`) are their text. The concatenated bytes of a text's tokens are then
that text's UTF-8 (tests/engine/test_detokenizer.py checks both vocabularies).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable Latin-1 bytes ('!'..'~',
    '¡'..'¬', '®'..'ÿ') stand for themselves; every other byte, in increasing order, takes the
    next code point from 256 up (so a space is 'Ġ', U+0120, and a newline 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    shifted = 256
    for b in range(256):
        if b not in printable:
            alphabet[chr(shifted)] = b
            shifted += 1
    return alphabet


def _decoder_types(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    found = {decoder.get("type", "")}
    for part in decoder.get("decoders") or ():
        found |= _decoder_types(part)
    return found


class TokenBytes:
    """`token_bytes(id)` for one `tokenizers.Tokenizer` (built once per tokenizer)."""

    def __init__(self, raw: Any, token_text: Callable[[int], str]):
        self._raw = raw
        self._token_text = token_text  # the decoded text, for added tokens and unknown schemes
        self._added = {i: t.content for i, t in raw.get_added_tokens_decoder().items()}
        kinds = _decoder_types(json.loads(raw.to_str()).get("decoder"))
        self._alphabet = byte_level_alphabet() if "ByteLevel" in kinds else None
        self._byte_fallback = "ByteFallback" in kinds

    def __call__(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._raw.id_to_token(token_id)
        if piece is None:  # outside the vocabulary
            return self._token_text(token_id).encode()
        if self._alphabet is not None and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        if self._byte_fallback:
            byte = _BYTE_PIECE.fullmatch(piece)
            if byte:
                return bytes([int(byte.group(1), 16)])
            return piece.replace("\u2581", " ").encode()
        return self._token_text(token_id).encode()
