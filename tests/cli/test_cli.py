"""`pagoda generate` and `pagoda chat` as a user runs them (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.entrypoints.llm import LLM
from pagoda.sampling.params import SamplingParams

PAGODA = [sys.executable, "-m", "pagoda.cli.main"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(PAGODA + args, input=stdin, capture_output=True, text=True, env=ENV,
                          timeout=600)


def test_generate_streams_the_greedy_completion(default_model):
    """`pagoda generate` runs the default model (its GGUF blocks, the default kernels)."""
    prompt = "The capital of France is"
    engine = LLMEngine(EngineConfig(kv_cache_memory=32 << 20, progress=False), loaded=default_model)
    expected = LLM.from_engine(engine).generate(
        prompt, SamplingParams(temperature=0, max_tokens=10))[0].outputs[0].text
    res = run(["generate", prompt, "--temperature", "0", "--max-tokens", "10",
               "--kv-cache-memory", "32MiB"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == prompt + expected + "\n"


def test_chat_reads_turns_from_stdin():
    res = run(["chat", "--temperature", "0", "--max-tokens", "16", "--kv-cache-memory", "32MiB"],
              stdin="What is the capital of France?\n/reset\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "[conversation cleared]" in res.stderr


def test_bad_input_is_one_line_and_exit_2():
    res = run(["generate", "hi", "--temperature", "-1"])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "temperature" in res.stderr
    res = run(["generate", "hi", "--model", "/no/such/model.gguf"])
    assert res.returncode == 2 and "error" in res.stderr.strip().splitlines()[-1]
    assert len(res.stderr.strip().splitlines()) == 1
