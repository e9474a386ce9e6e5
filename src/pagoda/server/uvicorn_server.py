"""uvicorn's server with SIGTERM/SIGINT meaning "stop accepting, drain, exit 0".

uvicorn already stops listening and waits for in-flight requests (up to
`timeout_graceful_shutdown`) on a signal, but then re-raises the signal so the process dies by
it. A server asked to stop should instead report success once it has drained.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from pagoda.server.engine_client import EngineClient

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: EngineClient):
        super().__init__(config)
        self.client = client

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.client.check_engine() != "failed":  # a failure stays visible (and exits 1)
            self.client.status = "draining"  # /health and new requests answer 503 from now on
        log.info("signal %d: no new requests; draining in-flight ones", sig)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
