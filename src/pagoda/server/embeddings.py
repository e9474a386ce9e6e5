"""POST /v1/embeddings: inputs checked and tokenized here, each embedded as its own engine request.

Every input of a request becomes one engine request, so the engine's pooling scheduler packs the
inputs of one large request and those of many small concurrent requests alike under its token
budget. The HTTP request holds one admission ticket; a client that disconnects cancels the
handler, and each input's request is aborted (AsyncLLM's generator sends the abort).
"""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
import orjson
from fastapi.responses import Response

from pagoda.loader.tokenizer import TextError, check_unicode
from pagoda.server.embeddings_protocol import MAX_INPUTS, EmbeddingRequest
from pagoda.server.engine_client import EngineClient, error_of, off_loop_if_long
from pagoda.server.errors import APIError


async def create_embedding(client: EngineClient, request: EmbeddingRequest) -> Response:
    llm = client.require_llm()
    client.check_model(request.model)
    if llm.info.task != "embed":
        raise APIError(400, f"the model '{client.model_name}' generates text and does not serve "
                       "embeddings (serve it with --task embed to embed with it)", "model")
    if request.dimensions is not None:
        raise APIError(400, f"the model '{client.model_name}' does not support 'dimensions' "
                       "(it was not trained for shortened embeddings)", "dimensions")
    limit = llm.info.max_model_len
    truncate = request.truncate_prompt_tokens
    if truncate == -1:
        truncate = limit
    if truncate is not None and not 1 <= truncate <= limit:
        raise APIError(400, f"truncate_prompt_tokens must be -1 or in [1, {limit}]",
                       "truncate_prompt_tokens")
    items = _items(request.input)
    texts = [(i, t) for i, t in enumerate(items) if isinstance(t, str)]
    sequences: list[list[int]] = [t if isinstance(t, list) else [] for t in items]
    if texts:
        tokenize = llm.tokenizer.hf
        strings = [t for _, t in texts]
        kwargs = {"truncation": True, "max_length": truncate} if truncate else {}
        encoded = await off_loop_if_long(sum(map(len, strings)), tokenize, strings, **kwargs)
        for (i, _), ids in zip(texts, encoded["input_ids"], strict=True):
            sequences[i] = ids
    vocab = llm.model_config.vocab_size
    for i, ids in enumerate(sequences):
        if isinstance(items[i], list):
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"input[{i}]: token ids must be in [0, {vocab})", "input")
            if truncate:
                sequences[i] = ids = ids[:truncate]
        if len(ids) > limit:
            raise APIError(400, f"input[{i}] has {len(ids)} tokens; this model embeds at most "
                           f"{limit} (set truncate_prompt_tokens to cut inputs instead)", "input")
    ticket = client.admit()
    started = time.monotonic()
    try:
        outputs = await asyncio.gather(*(llm.embed(ids, timeout=client.config.request_timeout)
                                         for ids in sequences))
    finally:
        ticket.release()
    for out in outputs:
        if out.error or out.embedding is None:
            raise error_of(out.error or "no embedding was returned")
    client.metrics.embedding_latency.labels(client.model_name).observe(time.monotonic() - started)
    num_tokens = sum(map(len, sequences))
    # EmbeddingResponse's shape, printed by orjson: validating and encoding 100k floats through
    # pydantic and json took longer than embedding them
    body = {"object": "list", "model": client.model_name,
            "data": [{"object": "embedding", "index": i,
                      "embedding": _encode(out.embedding, request.encoding_format)}
                     for i, out in enumerate(outputs)],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}
    return Response(orjson.dumps(body), media_type="application/json")


def _items(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The request's inputs as a list of texts / token-id lists, each checked for emptiness."""
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [list(value)]  # type: ignore[arg-type]
    else:
        items = list(value)  # type: ignore[arg-type]
    if not items:
        raise APIError(400, "input must not be empty", "input")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request ({len(items)} given)",
                       "input")
    for i, item in enumerate(items):
        if len(item) == 0:
            raise APIError(400, f"input[{i}] must not be empty", "input")
        if isinstance(item, str):
            try:
                check_unicode(item)
            except TextError as exc:
                raise APIError(400, f"input[{i}]: {exc}", "input") from None
    return items


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
