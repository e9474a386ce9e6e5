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


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(PAGODA + args, capture_output=True, text=True, env=ENV,
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


def test_chat_reads_turns_from_stdin_and_skips_a_line_that_is_not_utf8():
    """One session (a model load per `pagoda chat`): a line that is not UTF-8 is reported and
    skipped, the next turn is answered, /reset and /exit work."""
    res = subprocess.run(PAGODA + ["chat", "--temperature", "0", "--max-tokens", "16",
                                   "--kv-cache-memory", "32MiB"],
                         input=b"\xff\xfe\nWhat is the capital of France?\n/reset\n/exit\n",
                         env=ENV, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert b"not valid UTF-8" in res.stderr
    assert b"Paris" in res.stdout
    assert b"[conversation cleared]" in res.stderr


def test_bad_input_is_one_line_and_exit_2():
    res = run(["generate", "hi", "--temperature", "-1"])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "temperature" in res.stderr
    res = run(["generate", "hi", "--model", "/no/such/model.gguf"])
    assert res.returncode == 2 and "error" in res.stderr.strip().splitlines()[-1]
    assert len(res.stderr.strip().splitlines()) == 1


def test_more_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """Each of these printed a traceback (and a bench run saved onto a directory lost the run
    after measuring it); now refused before any work, in one line (run in this process: the
    same `main` as the command, without a torch import per case)."""
    from pagoda.cli.main import main

    array = tmp_path / "array.json"
    array.write_text("[]")
    cases = [
        (["generate", "hi", "--max-model-len", "-1"], "max_model_len"),
        (["generate", "hi", "--threads", "-3"], "num_threads"),
        (["generate", "hi", "--max-num-seqs", "0"], "max_num_seqs"),
        (["bench", "plot", str(array), "--out", str(tmp_path / "p")], "not a `pagoda bench"),
        (["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1",
          "--save-result", str(tmp_path)], "is a directory"),
        (["bench", "offline", "--num-prompts", "0"], "--num-prompts"),
        (["cost", "--seconds-per-token", "0.01", "--hourly-usd", "nan",
          "--requests-per-month", "1", "--tokens-per-request", "1"], "finite number"),
        (["quantize", "--out", str(array)], "array.json"),
    ]
    for args, says in cases:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
        assert says in err, (args, err)

