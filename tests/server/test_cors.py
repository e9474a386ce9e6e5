"""CORS: a web page of another origin calls the API from a real browser (Debian's chromium via
Playwright), preflight and API key included; a server limited to other origins refuses it.

The page comes from another port of this machine (a web app in development, the usual case),
served by a plain HTTP server: its `fetch` to the API is a genuine cross-origin request by
chromium. (Chromium itself refuses a page of a public origin calling a loopback address, CORS
or not: Local Network Access.)"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import sync_playwright

from pagoda.server.app import build_app
from pagoda.server.cli import string_list
from pagoda.server.config import ServerConfig
from tests.server.test_chat_page import ARGS, CHROMIUM

ORIGIN = "http://127.0.0.1:5999"  # an origin the restricted server does not list
# a JSON POST with an Authorization header: not a "simple" request, so chromium preflights it
FETCH = """async ([url, key]) => {
    try {
        const r = await fetch(url + "/v1/chat/completions", {method: "POST",
            headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key},
            body: JSON.stringify({messages: [{role: "user", content: "Hi"}], max_tokens: 3})});
        const body = await r.json();
        return {status: r.status, text: body.choices ? body.choices[0].message.content : null,
                error: body.error ? body.error.code : null};
    } catch (e) {
        return {failed: String(e)};
    }
}"""


class AppPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"<html><body>a web app</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def app_page():
    site = ThreadingHTTPServer(("127.0.0.1", 0), AppPage)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{site.server_port}/")
            yield page
            browser.close()
    finally:
        site.shutdown()


def test_a_page_of_another_origin_calls_the_api(app_page, server):
    answer = app_page.evaluate(FETCH, [server.url, server.api_key])
    assert answer.get("status") == 200 and answer["text"], answer
    # an error answer is readable too (the CORS headers are on it): a wrong key
    assert app_page.evaluate(FETCH, [server.url, "wrong"]) == {
        "status": 401, "text": None, "error": "invalid_api_key"}


def test_origins_not_listed_are_refused():
    """`--allowed-origins http://other.example`: a preflight from another origin gets no CORS
    grant (the browser then refuses the call); the listed origin gets one."""
    config = ServerConfig(allowed_origins=string_list(["http://other.example"],
                                                      "--allowed-origins"))
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    http = TestClient(build_app(config))  # no lifespan: no model needed for preflights
    refused = http.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    granted = http.options("/v1/chat/completions",
                           headers={"Origin": "http://other.example", **preflight})
    assert granted.status_code == 200
    assert granted.headers["access-control-allow-origin"] == "http://other.example"
    # an answer (here /health while no model is loaded) lets the page read Retry-After
    answer = http.get("/health", headers={"Origin": "http://other.example"})
    assert answer.headers["access-control-expose-headers"] == "retry-after"
    off = TestClient(build_app(ServerConfig(allowed_origins=())))
    assert "access-control-allow-origin" not in off.options(
        "/v1/models", headers={"Origin": ORIGIN, **preflight}).headers


@pytest.mark.parametrize("values, want", [
    (["*"], ("*",)),
    (["http://a", "http://b"], ("http://a", "http://b")),
    (["http://a,http://b"], ("http://a", "http://b")),
    (['["http://a", "http://b"]'], ("http://a", "http://b")),  # vLLM's JSON form
    ([], ()),
])
def test_flag_values(values, want):
    assert string_list(values, "--allowed-origins") == want


def test_a_bad_json_list_is_a_clear_error():
    with pytest.raises(ValueError, match="--allowed-origins: not a JSON list of strings"):
        string_list(['["http://a", 3]'], "--allowed-origins")
