"""Shared test setup: where the golden fixtures are, and what happens when they or an optional
reference package are missing.

The fixtures live in ``../shared/fixtures`` next to the repository (``JDIFFSAMPLE_FIXTURES``
overrides it). Outside CI a missing fixture or reference package skips the tests that need it;
with ``CI=true`` (as ``.ci/run`` sets it) it fails them instead, so that a green CI run means
every test ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _torch_compat import python_only_torchvision

# Compiling is most of these tests' time, and nothing they check (agreement with references within
# tolerances, equality of runs under the same flags) depends on XLA's optimization passes: compile
# without most of them (about 1.5x faster). The pipeline's determinism tests run their subprocesses
# with the full optimizations (tests/test_pipeline.py), and the benchmarks measure optimized code.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# Tests that call the CLI in-process must not read or write the user's compilation cache
# (~/.cache/jdiffsample/xla): a cache shared by two test workers, or left by another JAX build,
# is outside what a test controls. Tests of the cache itself opt in with their own folder.
os.environ.setdefault("JDIFFSAMPLE_COMPILATION_CACHE", "0")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("JDIFFSAMPLE_FIXTURES", ROOT.parent / "shared" / "fixtures"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str):
    """Skip the calling test, or fail it under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: missing inputs fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


def fixture_dir(name: str) -> Path:
    """The folder of golden fixture ``name`` (skips, or fails under CI, when it is absent)."""
    path = FIXTURES / name
    if not path.is_dir():
        missing(f"golden fixture {name} not found at {path}")
    return path


def require(module: str):
    """``pytest.importorskip`` that fails under CI instead of skipping."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        missing(f"{module} is not installed ({err})")


def _memory_mappings() -> int:
    try:
        with open(f"/proc/{os.getpid()}/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free the compiled programs after a test file when the process holds many. XLA:CPU maps each
    program's code into memory (about 140 mappings for a small sampling loop), and a test worker
    that kept a whole suite's programs reached Linux's 65,530 mappings per process
    (vm.max_map_count), where the next compile or cache read segfaulted and pytest-xdist waited for
    the dead worker until CI's limit. One test file adds at most about 15,000; below 40,000 the
    programs stay, for the files after it that compile the same ones."""
    yield
    if _memory_mappings() > 40_000:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def fixtures():
    """The fixtures folder (skips or fails when it is absent)."""
    if not FIXTURES.is_dir():
        missing(f"golden fixtures not found at {FIXTURES}")
    return FIXTURES


python_only_torchvision()  # before any test module imports diffusers, transformers or pytorch-fid


def activation_dtypes(module, variables, *args, **kwargs) -> dict:
    """``{dtype name: count}`` over the outputs of every submodule call in ``module.apply``:
    shows which precision the network actually computed in."""
    import jax

    _, state = jax.jit(lambda v: module.apply(v, *args, capture_intermediates=True, mutable=["intermediates"],
                                              **kwargs))(variables)
    counts: dict = {}
    for leaf in jax.tree.leaves(state["intermediates"]):
        counts[leaf.dtype.name] = counts.get(leaf.dtype.name, 0) + 1
    return counts


@pytest.fixture
def float64():
    """Run the test with float64 enabled in JAX (``pytestmark = pytest.mark.usefixtures("float64")``)."""
    from jdiffsample import schedules

    with schedules.float64():
        yield


@pytest.fixture(scope="module")
def mixture():
    """A 16-dimensional, 4-component Gaussian mixture: an exact denoiser for solver tests."""
    import jax

    from jdiffsample import testing

    return testing.GaussianMixture.random(jax.random.key(0), 16, 4, spread=0.5, var_range=(0.2, 0.6))
