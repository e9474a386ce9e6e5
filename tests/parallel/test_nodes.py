"""Ranks on other nodes (`--nnodes`, `pagoda worker`), run here as separate process trees on one
machine talking over TCP as two machines would: rank 0 does not start them, they find it.

The contract is the one-process one (transformers' greedy tokens in fp32); a node's rank that
dies fails the step; a node with the wrong secret is never let in."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client
from pathlib import Path

import openai
import psutil
import pytest

from pagoda.cli.main import main
from pagoda.parallel.nodes import accept_ranks, connect
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion
from tests.parallel.test_tensor_parallel import (
    assert_a_dead_rank_fails_the_step,
    assert_reference_tokens,
    tp_engine,
)
from tests.server.server_process import ServerProcess

KEY = "test-secret"


@pytest.fixture(autouse=True)
def dist_key(monkeypatch):
    monkeypatch.setenv("PAGODA_DIST_KEY", KEY)  # inherited by the `pagoda worker` processes


def start_node(port: int, node_rank: int = 1, *extra: str) -> subprocess.Popen[bytes]:
    pagoda = Path(sys.executable).with_name("pagoda")
    return subprocess.Popen([str(pagoda), "worker", "--master-addr", "127.0.0.1",
                             "--master-port", str(port), "--node-rank", str(node_rank), *extra])


def free_port_pair() -> int:
    """A port p with p and p + 1 free, below Linux's ephemeral range (32768+): a port picked by
    binding port 0 is ephemeral, and another test's outgoing connection could take it (or
    p + 1) before the engine binds it ("Address already in use", seen once in ~20 runs)."""
    while True:
        port = random.randrange(20_000, 32_000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


@pytest.mark.parametrize("layout", [
    {"tensor_parallel_size": 2, "num_threads": 1},
    {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "num_threads": 2}])
def test_ranks_on_another_node_decode_transformers_tokens(layout, prompt_ids, reference):
    """TP=2: rank 1 is all of node 1. TP=2 x PP=2 over 2 nodes: node 0 runs stage 0 (ranks 0-1,
    one a local child), node 1 stage 1 (ranks 2-3 under `pagoda worker`); each stage's two ranks
    split its heads, each hands its hidden states to the same rank of the next stage, and stage
    0's ranks compute the LM head together."""
    port = free_port_pair()
    node = start_node(port)
    try:
        engine = tp_engine(nnodes=2, master_port=port, **layout)
        try:
            remote = [w.rank for w in engine.peers.workers if w.process is None]
            assert list(engine.peers.shard.kv_heads) == [0, 1]
            if "pipeline_parallel_size" in layout:
                assert remote == [2, 3] and engine.peers.stage == range(0, 11)
            else:
                assert remote == [1]
            assert_reference_tokens(engine, prompt_ids[:4], reference, "across nodes")
        finally:
            engine.close()
        assert node.wait(30) == 0  # its ranks exit with the engine, then it does
    finally:
        if node.poll() is None:
            node.kill()


def test_a_dead_rank_on_another_node_fails_the_step(prompt_ids):
    port = free_port_pair()
    node = start_node(port)
    try:
        engine = tp_engine(pipeline_parallel_size=2, nnodes=2, master_port=port, num_threads=1)
        (rank,) = psutil.Process(node.pid).children()  # the node's one rank
        assert_a_dead_rank_fails_the_step(engine, rank, prompt_ids[0])
    finally:
        node.kill()
        node.wait(10)


def test_a_wrong_secret_or_a_stranger_is_not_let_in():
    port = free_port_pair()
    answers: list[object] = []

    def knock() -> None:
        for hello, key in [(("rank", 1), b"wrong"), (("rank", 7), KEY.encode()),
                           (("node", 0), KEY.encode())]:
            try:
                conn = Client(("127.0.0.1", port), authkey=key)
                conn.send(hello)
                answers.append(conn.recv()[0])  # the door's refusal
            except Exception as exc:  # noqa: BLE001 - a refused stranger sees an error either way
                answers.append(type(exc).__name__)

    knocker = threading.Timer(0.2, knock)
    knocker.start()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not join"):
        accept_ranks("127.0.0.1", port, {1}, 2, 2, timeout_s=3, key=KEY.encode())
    knocker.join(10)
    # each knock reached the open door and was turned away (not merely too late)
    assert answers == ["AuthenticationError", "error", "error"]


def test_a_silent_connection_does_not_hold_the_door():
    """A peer that connects and never speaks (a port scanner, a load balancer's TCP check)
    must not keep the real ranks out: each connection's handshake runs on its own clock."""
    port = free_port_pair()
    silent: list[socket.socket] = []

    def arrive() -> None:
        silent.append(socket.create_connection(("127.0.0.1", port)))  # and says nothing
        connect(f"127.0.0.1:{port}", ("rank", 1), timeout_s=10, key=KEY.encode())

    threading.Timer(0.5, arrive).start()
    try:
        start = time.monotonic()
        ranks = accept_ranks("127.0.0.1", port, {1}, 2, 2, timeout_s=20, key=KEY.encode())
        assert set(ranks) == {1} and time.monotonic() - start < 10
    finally:
        for s in silent:
            s.close()


def test_refusals(capsys, monkeypatch):
    with pytest.raises(ValueError, match="divide the 3 ranks"):
        tp_engine(tensor_parallel_size=3, nnodes=2, master_port=29600)
    with pytest.raises(ValueError, match="need --master-port"):
        tp_engine(tensor_parallel_size=2, nnodes=2)
    monkeypatch.delenv("PAGODA_DIST_KEY")
    with pytest.raises(ValueError, match="set PAGODA_DIST_KEY"):
        tp_engine(tensor_parallel_size=2, nnodes=2, master_port=free_port_pair())
    assert main(["worker", "--master-addr", "127.0.0.1", "--master-port", "1",
                 "--node-rank", "1"]) == 2
    assert "PAGODA_DIST_KEY" in capsys.readouterr().err
    monkeypatch.setenv("PAGODA_DIST_KEY", KEY)
    assert main(["worker", "--master-addr", "127.0.0.1", "--master-port",
                 str(free_port_pair()), "--node-rank", "1", "--join-timeout", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did not answer" in err


def test_pagoda_serve_with_a_stage_on_another_node(make_engine, loaded_model):
    """`pagoda serve -pp 2 --nnodes 2` answers the openai client with one process's greedy
    text while `pagoda worker` holds stage 1; stopping the server ends the node too."""
    prompt = "The capital of France is"
    expected = loaded_model.tokenizer.decode(run_to_completion(make_engine(), {"r": (
        loaded_model.tokenizer.encode(prompt), SamplingParams(temperature=0, max_tokens=12))})["r"])
    port = free_port_pair()
    node = start_node(port)
    srv = ServerProcess("--pipeline-parallel-size", "2", "--nnodes", "2", "--master-port",
                        str(port), "--threads", "1", "--served-model-name", "m",
                        "--quant-kernel", "wgemm")  # the fp32 product: tp_engine says why
    try:
        srv.wait_ready()
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.api_key, max_retries=0)
        got = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == expected
    finally:
        srv.stop()
        try:
            assert node.wait(30) == 0
        finally:
            if node.poll() is None:
                node.kill()
