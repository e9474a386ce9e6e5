"""The legacy completions log-prob shape keys alternatives by token text, where distinct ids can
read the same: the text must keep its most likely id's log-prob, whatever order ids arrive in."""

from pagoda.server.logprobs import completion_logprobs

TEXTS = {1: "\ufffd", 2: "\ufffd", 3: "a", 4: "b"}


def test_colliding_texts_keep_the_most_likely_ids_logprob():
    entry = {2: -3.0, 1: -0.5, 3: -1.0, 4: -2.0}  # ids 1 and 2 both read U+FFFD
    out = completion_logprobs([3], [entry], 4, TEXTS.__getitem__, 0)
    assert out.top_logprobs == [{"\ufffd": -0.5, "a": -1.0, "b": -2.0}]
    assert out.tokens == ["a"] and out.token_logprobs == [-1.0]


def test_the_sampled_token_is_listed_even_outside_the_top_n():
    entry = {1: -0.5, 3: -1.0, 4: -2.0}
    out = completion_logprobs([4], [entry], 1, TEXTS.__getitem__, 5)
    assert out.top_logprobs == [{"\ufffd": -0.5, "b": -2.0}]
    assert out.text_offset == [5] and out.token_logprobs == [-2.0]
