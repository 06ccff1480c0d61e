"""Unit tests run as on a machine without a C++ compiler, unless a test says otherwise.

``handler.compile: auto`` (the default) compiles the model at start-up when inductor's C++
compiler works: about half a minute per batch bucket on two cores with a cold cache, for each of
the dozens of classifiers these tests create. Here inductor's compiler setting
(``torch._inductor.config.cpp.cxx``, read from ``$CXX`` when torch is imported) names no compiler,
so ``auto`` takes its real no-compiler path (eager, one log line), in this process and, through
``$CXX``, in the scripts the tests start. Tests of compilation itself take the fixture ``real_compiler``. The end-to-end tests
serve the shipped archives with their real default: compiled.
"""

from __future__ import annotations

import pytest
import torch._inductor.config

from handler.model.optimize import cpp_compiler_problem

NO_COMPILER = "/nonexistent/c++-compiler-for-unit-tests"
REAL_COMPILER = torch._inductor.config.cpp.cxx


def use_compiler(cxx: tuple) -> None:
    torch._inductor.config.cpp.cxx = cxx  # a config proxy: monkeypatch cannot set it
    cpp_compiler_problem.cache_clear()


@pytest.fixture(autouse=True)
def no_cpp_compiler(monkeypatch):
    monkeypatch.setenv("CXX", NO_COMPILER)
    use_compiler((None, NO_COMPILER))
    yield
    use_compiler(REAL_COMPILER)


@pytest.fixture
def real_compiler(monkeypatch, no_cpp_compiler):
    """The machine's own C++ compiler, as inductor would find it."""
    monkeypatch.delenv("CXX")
    use_compiler(REAL_COMPILER)
    if cpp_compiler_problem() is not None:
        pytest.skip(cpp_compiler_problem())
