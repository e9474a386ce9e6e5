"""Grammar masks over drafted rows (speculative decoding): a draft that ends the grammar with its
stop token, or breaks it, leaves the rows after it with its own row's mask, and the matcher is
rolled back to the request's accepted tokens afterwards."""

from __future__ import annotations

import pytest
import torch

from pagoda.sampling.constraint import StructuredOutputs
from pagoda.structured_output.grammar_compiler import GrammarCompiler
from pagoda.structured_output.manager import StructuredOutputManager


@pytest.fixture
def manager(loaded_model):
    tok, vocab = loaded_model.tokenizer, loaded_model.config.vocab_size
    return StructuredOutputManager(GrammarCompiler(tok.hf, vocab, tok.eos_token_ids), vocab)


def ready(manager: StructuredOutputManager, req_id: str, constraint: StructuredOutputs) -> None:
    manager.add(req_id, constraint)
    while not manager.poll(req_id)[0]:
        manager.wait(1.0)


@pytest.mark.parametrize("constraint", [StructuredOutputs.choice(["yes", "no"]),
                                        StructuredOutputs("grammar", 'start: "yes" | "no"')],
                         ids=["xgrammar", "llguidance"])
def test_a_draft_ending_the_grammar(manager, loaded_model, constraint):
    tok = loaded_model.tokenizer
    eos = tok.eos_token_ids[0]
    answer = tok.encode("yes")
    ready(manager, "r", constraint)
    draft = answer + [eos, answer[0]]  # the stop token, then a token past the grammar's end
    rows = range(len(draft) + 1)
    logits = torch.zeros(len(rows), loaded_model.config.vocab_size)
    manager.apply_masks(logits, {"r": rows}, {"r": draft})
    allowed = torch.isfinite(logits)
    assert allowed[0, answer[0]] and not allowed[0, eos]
    stop_row = len(answer)  # scores the position after the answer: the stop token is allowed
    assert allowed[stop_row, eos]
    for later in rows[stop_row + 1:]:
        assert torch.equal(allowed[later], allowed[stop_row])
    # rolled back: the request's own tokens are accepted from the start, then it terminates
    manager.advance({"r": answer + [eos]})
    assert manager._matchers["r"].is_terminated()


def test_a_rejected_draft_keeps_its_rows_mask(manager, loaded_model):
    tok = loaded_model.tokenizer
    ready(manager, "r", StructuredOutputs.choice(["yes", "no"]))
    bad = tok.encode("maybe")[:1]
    rows = range(3)
    logits = torch.zeros(3, loaded_model.config.vocab_size)
    manager.apply_masks(logits, {"r": rows}, {"r": bad + bad})
    assert torch.equal(torch.isfinite(logits[1]), torch.isfinite(logits[0]))
    assert torch.equal(torch.isfinite(logits[2]), torch.isfinite(logits[0]))
    assert not manager._matchers["r"].is_terminated()
