"""An `/v1/embeddings` request body, checked before anything is sent upstream or looked up.

OpenAI's `input` has four shapes; each becomes a tuple of inputs, one per vector (and per cache
entry), every input a string or a tuple of token ids:

    "text"        -> ("text",)          ["a", "b"]        -> ("a", "b")
    [1, 2, 3]     -> ((1, 2, 3),)        [[1, 2], [3]]     -> ((1, 2), (3,))

Checked here (400 naming the field): the shapes above and nothing else, no empty input or empty
string or empty token list, no lone surrogates, token ids non-negative, at most MAX_INPUTS inputs,
`encoding_format` float|base64, `dimensions` / `truncate_prompt_tokens` integers, `user` a
string. Ranges that depend on the model (does it take `dimensions`, how long may an input be,
which token ids exist) are the upstream's to judge: its 400 is passed through.

Fields not listed in KNOWN_FIELDS are not refused here: the gateway does not know whether they
change the vector, so such a request bypasses the cache and goes upstream whole, and the upstream
decides (`pagoda serve` refuses unknown fields with a 400 naming them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_INPUTS = 2048  # OpenAI's limit per request, and `pagoda serve`'s
ENCODING_FORMATS = ("float", "base64")
KNOWN_FIELDS = frozenset(
    {"model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens"})

EmbeddingInput = str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InvalidField:
    """Why a request is refused: a 400 whose `param` names the field (e.g. `input[3]`)."""

    param: str
    message: str


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[EmbeddingInput, ...]  # never empty; in the client's order
    encoding_format: str  # how the client wants vectors back: "float" | "base64"
    dimensions: int | None
    truncate_prompt_tokens: int | None
    user: str | None
    unknown_fields: tuple[str, ...]  # sorted; any makes the request bypass the cache

    @property
    def vector_options(self) -> tuple[int | None, int | None]:
        """The options that change a vector, hence part of every cache key."""
        return (self.dimensions, self.truncate_prompt_tokens)


def parse_embedding_request(body: dict[str, Any]) -> EmbeddingRequest | InvalidField:
    """The typed request, or the first problem found in `body` (a JSON object with `model`)."""
    inputs = _inputs(body.get("input"))
    if isinstance(inputs, InvalidField):
        return inputs
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODING_FORMATS:
        return InvalidField("encoding_format",
                            f"'encoding_format' must be 'float' or 'base64', got {encoding!r}.")
    for name in ("dimensions", "truncate_prompt_tokens"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return InvalidField(name, f"'{name}' must be an integer.")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        return InvalidField("user", "'user' must be a string.")
    return EmbeddingRequest(
        model=body["model"], inputs=inputs, encoding_format=encoding,
        dimensions=body.get("dimensions"),
        truncate_prompt_tokens=body.get("truncate_prompt_tokens"), user=user,
        unknown_fields=tuple(sorted(set(body) - KNOWN_FIELDS)),
    )


def _inputs(value: Any) -> tuple[EmbeddingInput, ...] | InvalidField:
    if isinstance(value, str):
        problem = _text_problem(value, "input")
        return problem if problem is not None else (value,)
    if not isinstance(value, list):
        return InvalidField("input", "'input' must be a string, a list of strings, a list of "
                                     "token ids or a list of token-id lists.")
    if not value:
        return InvalidField("input", "'input' must not be an empty list.")
    if len(value) > MAX_INPUTS:
        return InvalidField("input", f"'input' has {len(value)} items; at most {MAX_INPUTS} "
                                     "inputs fit in one request.")
    first = value[0]
    if isinstance(first, int) and not isinstance(first, bool):
        ids = _token_ids(value, "input")  # one input given as token ids
        return ids if isinstance(ids, InvalidField) else (ids,)
    if not isinstance(first, (str, list)):
        return InvalidField("input[0]", "'input[0]' must be a string, a token id or a list of "
                                        "token ids.")
    inputs: list[EmbeddingInput] = []
    text = isinstance(first, str)  # every item must have the first item's shape
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if text and isinstance(item, str):
            problem = _text_problem(item, where)
            if problem is not None:
                return problem
            inputs.append(item)
        elif not text and isinstance(item, list):
            ids = _token_ids(item, where)
            if isinstance(ids, InvalidField):
                return ids
            inputs.append(ids)
        else:
            expected = "a string" if text else "a list of token ids"
            return InvalidField(where, f"'{where}' must be {expected}, like input[0].")
    return tuple(inputs)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_ids(value: list[Any], where: str) -> tuple[int, ...] | InvalidField:
    if not value:
        return InvalidField(where, f"'{where}' must not be an empty list of token ids.")
    for j, token in enumerate(value):
        if not _is_token_id(token):
            return InvalidField(where, f"'{where}' item {j} is not a token id (an integer >= 0).")
    return tuple(value)


def _text_problem(text: str, where: str) -> InvalidField | None:
    if not text:
        return InvalidField(where, f"'{where}' must not be an empty string.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (legal in JSON escapes, not in UTF-8)
        return InvalidField(where, f"'{where}' is not valid Unicode (lone surrogate).")
    return None
