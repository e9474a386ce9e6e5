"""Incremental detokenization: multi-byte characters split across tokens, stop strings."""

from __future__ import annotations

from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.sampling.params import SamplingParams


def stream(tokenizer, ids, params):
    detok = IncrementalDetokenizer(tokenizer, params)
    pieces, stop = [], None
    for t in ids:
        stop = detok.update([t])
        pieces.append(detok.take_delta(stop is not None))
        if stop:
            break
    if not stop:
        pieces.append(detok.take_delta(True))
    return pieces, stop


def test_multibyte_characters_split_across_tokens(loaded_model):
    tok = loaded_model.tokenizer
    text = "Grüße aus 東京 🎉 und naïve café"
    ids = tok.encode(text)
    # byte-level BPE: at least one token must end mid-character for this test to mean anything
    partial = [i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i])]
    assert partial, "expected a token boundary inside a multi-byte character"
    pieces, _ = stream(tok, ids, SamplingParams())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_token_bytes_rebuild_the_text(loaded_model):
    """Byte-level BPE: a token's own bytes (OpenAI's logprob `bytes`) join into the text's
    UTF-8 even where a token's decoded text is U+FFFD; an added token is its text."""
    tok = loaded_model.tokenizer
    text = "Grüße aus 東京 🎉 und naïve café\n\ttabs  and spaces"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.token_str(t) for t in ids)
    assert b"".join(tok.token_bytes(t) for t in ids) == text.encode()
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.token_bytes(im_end) == b"<|im_end|>"


def test_stop_string_spanning_tokens(loaded_model):
    tok = loaded_model.tokenizer
    ids = tok.encode("Hello world, this is the END of it all")
    stop = " the END"
    assert not any(stop in tok.decode([t]) for t in ids), "stop must span several tokens"
    pieces, hit = stream(tok, ids, SamplingParams(stop=[stop]))
    assert hit == stop
    assert "".join(pieces) == "Hello world, this is"


def test_stop_string_included_when_asked(loaded_model):
    tok = loaded_model.tokenizer
    ids = tok.encode("one two three four")
    pieces, hit = stream(tok, ids, SamplingParams(stop=["three"], include_stop_str_in_output=True))
    assert "".join(pieces) == "one two three"


def test_no_stop_keeps_everything(loaded_model):
    tok = loaded_model.tokenizer
    ids = tok.encode("abc def")
    pieces, hit = stream(tok, ids, SamplingParams(stop=["zzz"]))
    assert hit is None and "".join(pieces) == "abc def"
