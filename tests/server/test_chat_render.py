"""Rendering a chat: long conversations are rendered and tokenized off the event loop (seconds
of Jinja and tokenizer work would stall every other client), with the same tokens."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from pagoda.server import chat
from pagoda.server.engine_client import INLINE_TOKENIZE_CHARS
from pagoda.server.protocol import ChatMessage


def test_long_chats_render_off_the_event_loop(loaded_model, monkeypatch):
    llm = SimpleNamespace(tokenizer=loaded_model.tokenizer)
    real = chat.render_chat
    threads: list[threading.Thread] = []

    def recording(*args):
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(chat, "render_chat", recording)
    short = [ChatMessage(role="user", content="hi")]
    long = [ChatMessage(role="user", content="word " * (INLINE_TOKENIZE_CHARS // 4))]
    assert asyncio.run(chat.render_chat_off_loop(llm, short)) == real(llm, short)
    assert asyncio.run(chat.render_chat_off_loop(llm, long)) == real(llm, long)
    assert threads[0] is threading.main_thread()
    assert threads[1] is not threading.main_thread()
