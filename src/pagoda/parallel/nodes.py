"""Ranks on other machines: rank 0's door for them, and `pagoda worker`, which starts a node's
ranks.

torchrun's shape: every node knows the master's address and port; rank 0 (the engine, node 0)
hosts the TCPStore on `master_port` and listens for its workers on `master_port + 1`. A node
runs `pagoda worker --master-addr A --master-port P --node-rank I`: it asks rank 0 which ranks
are its own (node I of N holds ranks I*k .. I*k+k-1, k = ranks / N), starts one
`python -m pagoda.parallel.worker --connect A:P+1 --rank R` per rank, and lives as long as they
do. Each such worker connects back, says its rank and gets the same orders a local child gets
over its pipes (the model path, the config: every node needs the same files at the same path).

Everything a worker and rank 0 exchange is pickled, so the connection is authenticated both
ways (multiprocessing's HMAC challenge) with the secret in PAGODA_DIST_KEY, which every node
must share; the TCPStore and gloo themselves are not authenticated (torch.distributed's
limits): run them on a private network.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import (
    Client,
    Connection,
    answer_challenge,
    deliver_challenge,
)

log = logging.getLogger(__name__)

KEY_ENV = "PAGODA_DIST_KEY"
JOIN_TIMEOUT_S = 600.0  # how long a node or rank keeps knocking before rank 0 is up
HANDSHAKE_TIMEOUT_S = 10.0  # a connection not authenticated and greeted by then is cut off


def dist_key() -> bytes:
    key = os.environ.get(KEY_ENV, "")
    if not key:
        raise ValueError(f"ranks on several machines exchange pickled messages: set {KEY_ENV} "
                         "to the same secret on every node")
    return key.encode()


def node_ranks(node: int, nnodes: int, world: int) -> range:
    per_node = world // nnodes
    return range(node * per_node, (node + 1) * per_node)


def accept_ranks(host: str, port: int, wanted: set[int], nnodes: int, world: int,
                 timeout_s: float, key: bytes) -> dict[int, Connection]:
    """Rank 0's side: answer each node 1..nnodes-1 (which ranks are its own), and take one
    connection per rank in `wanted`; returns {rank: connection} or raises once `timeout_s`
    passes without all of them."""
    nodes_seen: set[int] = set()
    ranks: dict[int, Connection] = {}
    arrivals: queue.Queue[tuple[Connection, object] | Exception] = queue.Queue()
    door = socket.create_server((host, port))
    door.settimeout(0.2)  # the accept loop checks `closed` this often
    closed = threading.Event()

    def greet(peer: socket.socket) -> None:
        """One connection's handshake (HMAC both ways, then its hello), on a clock of its own:
        a peer that never speaks is cut off after HANDSHAKE_TIMEOUT_S instead of holding the
        door (multiprocessing's Listener authenticates inside accept(), with no timeout)."""
        conn = Connection(os.dup(peer.fileno()))
        # shutdown() ends a read blocked on the duplicate too, without closing its fd under it
        watchdog = threading.Timer(HANDSHAKE_TIMEOUT_S, peer.shutdown, (socket.SHUT_RDWR,))
        watchdog.start()
        try:
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
            arrivals.put((conn, conn.recv()))
        except Exception as exc:  # noqa: BLE001 - a bad peer (wrong key, silence) must not
            conn.close()  # stop the others
            if not closed.is_set():
                arrivals.put(exc)
        finally:
            watchdog.cancel()
            peer.close()

    def accept_loop() -> None:
        while not closed.is_set():
            try:
                peer, _ = door.accept()
            except TimeoutError:
                continue
            except OSError:  # the door was closed
                return
            peer.setblocking(True)
            threading.Thread(target=greet, args=(peer,), daemon=True,
                             name="pagoda-node-greeting").start()

    threading.Thread(target=accept_loop, daemon=True, name="pagoda-node-door").start()
    deadline = time.monotonic() + timeout_s
    try:
        while set(ranks) != wanted:
            left = deadline - time.monotonic()
            try:
                arrival = arrivals.get(timeout=max(left, 0.01))
            except queue.Empty:
                missing = sorted(wanted - set(ranks))
                raise TimeoutError(f"ranks {missing} did not join within {timeout_s:.0f} s "
                                   f"(run `pagoda worker --master-addr {host} --master-port "
                                   f"{port - 1} --node-rank I` on each other node)") from None
            if isinstance(arrival, Exception):
                log.warning("a connection to the node door failed: %s", arrival)
                continue
            conn, hello = arrival
            kind, number = hello if isinstance(hello, tuple) and len(hello) == 2 else ("?", -1)
            if kind == "node" and 0 < number < nnodes and number not in nodes_seen:
                nodes_seen.add(number)
                conn.send(("ranks", list(node_ranks(number, nnodes, world))))
                conn.close()
            elif kind == "rank" and number in wanted and number not in ranks:
                ranks[number] = conn
            else:
                conn.send(("error", f"unexpected {hello!r}: nodes 1..{nnodes - 1} once each, "
                           f"ranks {sorted(wanted)}"))
                conn.close()
    except BaseException:
        for conn in ranks.values():
            conn.close()
        raise
    finally:
        closed.set()
        door.close()
    return ranks


def connect(address: str, hello: tuple[str, int], timeout_s: float, key: bytes) -> Connection:
    """A worker's or node's connection to rank 0's door, retried until rank 0 is up."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = Client((host, int(port)), authkey=key)
            conn.send(hello)
            return conn
        except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 at {address} did not answer in "
                                   f"{timeout_s:.0f} s") from None
            time.sleep(1.0)


def run_node(master_addr: str, master_port: int, node_rank: int, timeout_s: float) -> int:
    """`pagoda worker`: start this node's ranks and wait for them; their worst exit code."""
    key = dist_key()  # refuse before waiting for rank 0
    door = f"{master_addr}:{master_port + 1}"
    conn = connect(door, ("node", node_rank), timeout_s, key)
    kind, detail = conn.recv()
    conn.close()
    if kind != "ranks":
        raise ValueError(f"rank 0 refused node {node_rank}: {detail}")
    log.info("node %d: starting ranks %s for rank 0 at %s", node_rank, detail, master_addr)
    children = [subprocess.Popen([sys.executable, "-m", "pagoda.parallel.worker", "--connect",
                                  door, "--rank", str(rank)]) for rank in detail]

    def stop(signum: int, _frame: object) -> None:
        for child in children:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    codes = [child.wait() for child in children]
    log.info("node %d: ranks exited with %s", node_rank, codes)
    return max(codes, default=0)
