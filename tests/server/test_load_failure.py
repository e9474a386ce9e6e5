"""A model that cannot load ends `pagoda serve` with exit status 1 and a one-line reason in its
log, rather than a 0 status that tells a supervisor all was well."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.server_process import free_port


@pytest.mark.parametrize("args,reason", [
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["--pipeline-parallel-size", "40"], "exceeds .* 30 layers"),
])
def test_a_failed_load_exits_1_with_the_reason(args, reason):
    pagoda = Path(sys.executable).with_name("pagoda")
    done = subprocess.run([str(pagoda), "serve", *args, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "model loading failed:" in line]
    assert len(lines) == 1 and re.search(reason, lines[0]), done.stderr[-2000:]
