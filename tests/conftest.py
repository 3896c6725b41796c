"""Fixtures the test modules share; plain helpers are in tests/helpers.py."""
from __future__ import annotations

import os

import pytest

from tests.helpers import FIXTURES


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one numba thread avoids waiting on a busy second core. A module opts in with
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    import numba
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(n)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(fixture, type): the GGUF of a tests/fixtures checkpoint written by lazymoe's quantizer, made
    once per session on demand."""
    from lazymoe.quantize.convert import convert
    d = tmp_path_factory.mktemp("converted")
    made = {}

    def get(fx, ty):
        if (fx, ty) not in made:
            src = os.path.join(FIXTURES, fx)
            if not os.path.isdir(src):
                pytest.skip(f"fixture {fx} is missing")
            made[fx, ty] = os.fspath(d / f"{fx}-{ty}.gguf")
            convert(src, made[fx, ty], ty, force=True, progress=False)
        return made[fx, ty]
    return get
