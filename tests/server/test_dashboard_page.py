"""The live metrics page at `/dashboard` in a real browser (Debian's chromium via Playwright):
charts fill from /metrics while the official `openai` client streams requests, its numbers agree
with /metrics, and its histogram quantile is Prometheus' histogram_quantile."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.server.test_chat_page import ARGS, CHROMIUM


@pytest.fixture(scope="module")
def dashboard(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(server.url + "/dashboard")
        expect(page.get_by_test_id("state")).to_have_text(re.compile("updated"))
        yield page
        browser.close()


def scrapes(page) -> int:
    return int(page.get_by_test_id("state").get_attribute("data-scrapes") or 0)


def wait_scrapes(page, n: int) -> None:
    start = scrapes(page)
    page.wait_for_function(f"Number(document.getElementById('state').dataset.scrapes) >= "
                           f"{start + n}")


def test_charts_follow_live_traffic(dashboard, oai, model):
    def stream(i: int) -> int:
        chunks = oai.completions.create(model=model, prompt=f"Count to ten, take {i}:",
                                        max_tokens=24, temperature=0, stream=True)
        return sum(1 for _ in chunks)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(n > 0 for n in pool.map(stream, range(8)))
    wait_scrapes(dashboard, 1)
    expect(dashboard.get_by_test_id("model")).to_have_text(model)
    ttft = dashboard.get_by_test_id("ttft").inner_text()
    itl = dashboard.get_by_test_id("itl").inner_text()
    assert re.fullmatch(r"[\d.]+ ms", ttft) and re.fullmatch(r"[\d.]+ ms", itl), (ttft, itl)
    history = dashboard.evaluate("window.pagodaDashboard.history")
    assert max(v for v in history["output"] if v is not None) > 0
    assert any(v is not None and v > 0 for v in history["ttft50"])
    for chart in ("throughput", "ttft", "itl", "queue", "kv"):
        points = dashboard.evaluate(
            f"document.getElementById('chart-{chart}').data.map(t => t.y.length)")
        assert points and min(points) >= 2, (chart, points)


def test_numbers_agree_with_metrics(dashboard, server):
    wait_scrapes(dashboard, 1)  # traffic is over; the counters no longer move
    text = httpx.get(server.url + "/metrics").text
    generated = sum(float(v) for v in re.findall(
        r"^pagoda:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M))
    kv = sum(float(v) for v in re.findall(r"^pagoda:kv_cache_usage_perc\{[^}]*\} (\S+)$",
                                          text, re.M))
    wait_scrapes(dashboard, 1)
    assert float(dashboard.get_by_test_id("generated").inner_text()) == generated
    assert dashboard.get_by_test_id("kv").inner_text() == f"{100 * kv:.1f} %"
    assert dashboard.get_by_test_id("queue").inner_text() == "0 / 0"


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.9, 0.99, 1.0])
def test_quantile_is_prometheus_histogram_quantile(dashboard, q):
    cumulative = [[0.01, 2], [0.05, 10], [0.1, 10], [0.5, 30], [float("inf"), 31]]

    def reference(q: float) -> float:  # Prometheus' bucketQuantile
        rank = q * cumulative[-1][1]
        prev_le, prev_count = 0.0, 0
        for le, count in cumulative:
            if count >= rank:
                if le == float("inf"):
                    return prev_le
                if count == prev_count:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
            prev_le, prev_count = le, count
        return prev_le

    js = dashboard.evaluate(
        "([q, c]) => window.pagodaDashboard.quantile(q, c.map(([le, n]) => "
        "[le === 'inf' ? Infinity : le, n]))",
        [q, [["inf" if le == float("inf") else le, n] for le, n in cumulative]])
    assert js == pytest.approx(reference(q))


def test_the_page_needs_no_api_key_and_no_internet(server):
    """/dashboard, its script and the chart library are served by this server (open like
    /metrics); nothing is fetched from elsewhere."""
    html = httpx.get(server.url + "/dashboard").text
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith("/static/") for s in sources), sources
    for src in sources:
        r = httpx.get(server.url + src)
        assert r.status_code == 200 and len(r.content) > 500, src
