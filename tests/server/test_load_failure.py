"""A model that cannot load ends `pagoda serve` with exit status 1 and a one-line reason in its
log, rather than a 0 status that tells a supervisor all was well; a model or draft file that
does not exist is refused before the server starts, in one line (exit status 2, as for any
bad flag)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.server_process import free_port


def serve(*args: str) -> subprocess.CompletedProcess:
    pagoda = Path(sys.executable).with_name("pagoda")
    return subprocess.run([str(pagoda), "serve", *args, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300)


def test_a_failed_load_exits_1_with_the_reason():
    done = serve("--pipeline-parallel-size", "40")
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "model loading failed:" in line]
    assert len(lines) == 1 and re.search("exceeds .* 30 layers", lines[0]), done.stderr[-2000:]


@pytest.mark.parametrize("args", [
    ["--model", "/nonexistent/model.gguf"],
    ["--speculative-method", "hybrid", "--draft-model", "/nonexistent/model.gguf"],
])
def test_a_missing_model_file_is_a_one_line_error(args):
    done = serve(*args)
    assert done.returncode == 2 and done.stderr == (
        "pagoda serve: error: model '/nonexistent/model.gguf' is neither a GGUF file nor a "
        "model directory\n"), done.stderr[-2000:]
