"""The chat page at `/` in a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(120_000)
        page.goto(server.url + "/")
        page.get_by_test_id("api-key").fill(server.api_key)
        page.get_by_test_id("api-key").dispatch_event("change")
        expect(page.get_by_test_id("model")).to_have_text("SmolLM2-135M-Instruct")
        expect(page.get_by_test_id("conn")).to_have_text("connected")
        yield page
        browser.close()


def ask(page, question: str) -> None:
    page.get_by_test_id("input").fill(question)
    page.get_by_test_id("input").press("Enter")


def last_reply(page):
    return page.locator('.msg[data-role="assistant"]').last


def test_streamed_reply_with_stats(page):
    page.get_by_test_id("max-tokens").fill("24")
    page.get_by_test_id("system").fill("You are a concise assistant.")
    ask(page, "What is the capital of France?")
    expect(page.locator('.msg[data-role="user"]').last).to_have_text(
        "What is the capital of France?")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "done")
    assert reply.locator(".text").inner_text().strip()
    stats = reply.locator(".stats").inner_text()
    assert re.search(r"TTFT \d+ ms", stats) and re.search(r"[\d.]+ tok/s", stats), stats
    tokens = int(re.search(r"(\d+) tokens", stats).group(1))
    assert 1 <= tokens <= 24
    expect(page.get_by_test_id("status")).to_have_text("done")


def test_text_streams_in_and_stop_cancels(page, server):
    page.get_by_test_id("max-tokens").fill("2000")
    ask(page, "Write a very long story about a dragon who learns to bake bread.")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "streaming")
    seen = [len(reply.locator(".text").inner_text())]
    deadline = time.monotonic() + 60
    while len(set(seen)) < 3:  # several distinct lengths: the text arrives piece by piece
        assert time.monotonic() < deadline, seen
        seen.append(len(reply.locator(".text").inner_text()))
        page.wait_for_timeout(50)
    assert server.kv()["num_running"] == 1
    page.get_by_test_id("stop").click()
    expect(reply).to_have_attribute("data-state", "stopped")
    expect(page.get_by_test_id("status")).to_have_text("stopped")
    text = reply.locator(".text").inner_text()
    stats = reply.locator(".stats").inner_text()
    assert int(re.search(r"(\d+) tokens", stats).group(1)) < 2000
    kv = server.wait_all_blocks_free(timeout=5)  # the engine really stopped the request
    assert kv["num_running"] == 0 and kv["num_free_blocks"] == kv["num_total_blocks"]
    page.wait_for_timeout(500)
    assert reply.locator(".text").inner_text() == text  # nothing arrives after the stop
    assert page.get_by_test_id("send").is_enabled()


def test_question_is_kept_while_the_socket_is_down(page):
    """Sending while the WebSocket is (re)connecting must not swallow the question: it stays in
    the input with a status line, and goes out once the socket is back."""
    page.get_by_test_id("max-tokens").fill("4")
    page.evaluate("() => { const ws = state.ws; state.ws = null; ws.close(); }")
    expect(page.get_by_test_id("conn")).to_have_text("offline")
    ask(page, "Are you there?")
    expect(page.get_by_test_id("input")).to_have_value("Are you there?")
    expect(page.get_by_test_id("status")).to_contain_text("not connected")
    page.evaluate("() => connect()")
    expect(page.get_by_test_id("conn")).to_have_text("connected")
    page.get_by_test_id("input").press("Enter")
    expect(page.locator('.msg[data-role="user"]').last).to_have_text("Are you there?")
    expect(last_reply(page)).to_have_attribute("data-state", "done")
    expect(page.get_by_test_id("input")).to_have_value("")
