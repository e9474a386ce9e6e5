"""Incremental detokenization with stop strings.

Text comes from `tokenizers`' DecodeStream, which withholds an incomplete UTF-8 character until
the token completing it arrives. Stop strings may span several tokens, so the last
`len(longest stop) - 1` characters are held back until they cannot begin a stop string.
"""

from __future__ import annotations

from pagoda.loader.tokenizer import Tokenizer
from pagoda.sampling.params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.stream = tokenizer.decode_stream(params.skip_special_tokens)
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.num_emitted = 0  # characters already handed to the caller
        self.num_tokens = 0

    def update(self, token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that matched (text is cut there), else None."""
        for token_id in token_ids:
            self.num_tokens += 1
            piece = self.stream.step(self.tokenizer.raw, token_id)
            if not piece:
                continue
            search_from = max(0, len(self.text) - self.hold)
            self.text += piece
            if self.stops and self.num_tokens > self.min_tokens:
                hit = self._find_stop(search_from)
                if hit is not None:
                    return hit
        return None

    def _find_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            idx = self.text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.text = self.text[: idx + len(stop) if self.include_stop else idx]
        return stop

    def take_delta(self, finished: bool) -> str:
        """New text since the last call; held-back characters are released once finished."""
        end = len(self.text) if finished or not self.stops else max(
            self.num_emitted, len(self.text) - self.hold)
        delta = self.text[self.num_emitted:end]
        self.num_emitted = end
        return delta
