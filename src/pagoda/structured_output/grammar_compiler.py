"""Compiles constraints into xgrammar `CompiledGrammar`s off the engine step.

Compiling a grammar against the vocabulary takes milliseconds to tens of milliseconds (a
20-property schema: ~12 ms cold on a 49k vocabulary), so it runs in one worker thread while the
engine keeps stepping; the step only asks whether a future is done. Results (and failures) are
kept in an LRU keyed by the constraint's hash, so a repeated constraint costs a dict lookup.
The tokenizer's xgrammar view (`TokenizerInfo`, ~0.2 s for 49k tokens, seconds for 262k) is
built on that thread too, on first use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pagoda.sampling.constraint import StructuredOutputs
from pagoda.structured_output.grammar import LarkGrammar, build_grammar
from pagoda.structured_output.lark_matcher import LarkMatcher

CACHE_SIZE = 256


class GrammarCompiler:
    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 cache_size: int = CACHE_SIZE):
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()  # the cache is touched by the engine thread only, but
        # `compile_now` (benchmarks, tests) may come from elsewhere
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pagoda-grammar")
        self._xgr_compiler = None
        self._llg_tokenizer = None

    def submit(self, constraint: StructuredOutputs) -> Future:
        """A future of the compiled grammar, as a factory of matchers (already done when the
        constraint is cached); it raises ConstraintError when it cannot be compiled."""
        key = constraint.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._executor.submit(self._compile, constraint)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def compile_now(self, constraint: StructuredOutputs) -> Any:
        return self.submit(constraint).result()

    def _compile(self, constraint: StructuredOutputs) -> Callable[[], Any]:
        """A factory of fresh matchers for the constraint (one per request)."""
        grammar = build_grammar(constraint)
        if isinstance(grammar, LarkGrammar):
            import llguidance

            tokenizer = self._lark_tokenizer()
            stop_ids = tuple(self.stop_token_ids)
            return lambda: LarkMatcher(llguidance.LLMatcher(tokenizer, grammar.source), stop_ids)
        import xgrammar as xgr

        compiled = self._compiler().compile_grammar(grammar)
        return lambda: xgr.GrammarMatcher(compiled)

    def _lark_tokenizer(self) -> Any:
        if self._llg_tokenizer is None:
            import llguidance.hf

            self._llg_tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.stop_token_ids[0])
        return self._llg_tokenizer

    def _compiler(self) -> Any:
        if self._xgr_compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(
                self.hf_tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
            # one thread: the engine's own threads run the model meanwhile
            self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._xgr_compiler

    def warm_up(self) -> Future:
        """Build the tokenizer view in the background (the first constraint then compiles fast)."""
        return self._executor.submit(self._compiler)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
