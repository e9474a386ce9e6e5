"""Every ISA flavour of the C++ kernels is tested on every machine that can run it: an AVX-512
machine runs the avx2 and generic flavours too. A flavour this CPU cannot execute is a reported
skip naming the missing flags."""

from __future__ import annotations

import pytest

from pagoda.kernels import build


@pytest.fixture(params=list(build.FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> str:
    name = request.param
    if not build.can_run(name):
        pytest.skip(f"this CPU cannot run the {name} flavour (lacks "
                    f"{', '.join(build.missing_flags(name))})")
    assert build.load(name) is not None, f"the {name} kernels did not build"
    return name
