"""Several prompts in one completions request: one engine request each, scheduled together,
their outputs merged into one response whose choice `index` is prompt_index * n + sample.

OpenAI's numbering; vLLM and lm-evaluation-harness (which sends a batch of token-id prompts per
request) read it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from pagoda.engine.outputs import RequestOutput
from pagoda.server.engine_client import EngineClient, Ticket


class TicketGroup:
    """The admission tickets of a request's prompts, released together."""

    def __init__(self, tickets: list[Ticket]):
        self.tickets = tickets

    def release(self) -> None:
        for ticket in self.tickets:
            ticket.release()


def admit_all(client: EngineClient, num_prompts: int) -> TicketGroup:
    """A ticket per prompt, or a 503 for the whole request. A batch larger than --max-waiting
    could never get in ticket by ticket (a retry would fail the same way for ever): with nothing
    waiting it is taken whole, as one request; else 503 until the queue is empty."""
    whole = num_prompts > client.config.max_waiting and client.num_pending == 0
    tickets: list[Ticket] = []
    try:
        for _ in range(num_prompts):
            tickets.append(client.admit(over_limit=whole))
    except BaseException:
        TicketGroup(tickets).release()  # a 503 for the batch gives back what it took
        raise
    return TicketGroup(tickets)


def reindexed(out: RequestOutput, prompt_index: int, n: int) -> RequestOutput:
    """`out` with its samples numbered as choices of the whole batch."""
    if prompt_index == 0:
        return out
    return dataclasses.replace(out, outputs=[
        dataclasses.replace(o, index=prompt_index * n + o.index) for o in out.outputs])


async def merged(streams: list[AsyncIterator[RequestOutput]], n: int
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, re-indexed output) from every stream as they arrive. Closing this
    iterator closes every stream (aborting what has not finished)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None | BaseException]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    await queue.put((i, reindexed(out, i, n)))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
