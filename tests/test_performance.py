"""Performance properties that tests can pin down: the memory passes of the solver loop, the
projected-gradient method behind the bound's optimizer, and the command line's cold start (what
it imports, its persistent compilation cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import benchmark

from jdiffsample import cli, optimize, schedules


# --------------------------------------------------------------------------------------------
# The solver loop's memory passes, in XLA's optimized program


@pytest.fixture(scope="module")
def passes():
    """Compiles with XLA's optimizations (conftest turns most of them off for speed)."""
    counter = benchmark("solver_passes")
    saved = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "").lower() in ("1", "true", "t", "yes", "y", "on")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield lambda solver, options: counter.count(solver, options, (4, 16, 16, 3), 10)
    finally:
        jax.config.update("jax_disable_most_optimizations", saved)


@pytest.mark.parametrize("solver,options,most", [
    # next state, the corrected one inside its kernel: x + 4 history reads (2M: x + 2), 1 write;
    # history: the model output (E: with x) in, 1 slot out
    ("unipc", dict(order=3, variant="bh2"), 8),
    ("dpmpp", dict(order=2), 6),
    ("deis", dict(order=3, variant="tab"), 8),
    # + JAX's threefry draw: on the CPU a rolled 5-round loop over two uint32 arrays, 56 passes
    ("sa_solver", dict(predictor_order=3, corrector_order=4, tau=1.0), 64),
])
def test_solver_step_reads_and_writes_each_array_once_per_kernel(passes, solver, options, most):
    total, denoiser, rows = passes(solver, options)
    assert denoiser == pytest.approx(2, abs=0.01)  # the opaque denoiser: read x (and t), write D
    assert not [r for r in rows if r[1] == "copy"], rows  # no copy of the ring buffer or the state
    assert total <= most + 0.01, rows


def test_pass_counter_sees_copies_and_in_place_updates():
    """The counter itself, on a hand-written loop body: a copy of a [3, N] buffer, an in-place slot update."""
    counter = benchmark("solver_passes")
    hlo = """
%fused_update (param_0: f32[3,8], param_1: f32[8], param_2: s32[]) -> f32[3,8] {
  %param_0 = f32[3,8]{1,0} parameter(0)
  %param_1 = f32[8]{0} parameter(1)
  %bitcast.1 = f32[1,8]{1,0} bitcast(%param_1)
  %param_2 = s32[] parameter(2)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[3,8]{1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_2, %constant.1)
}

%body (arg: (s32[], f32[3,8], f32[8])) -> (s32[], f32[3,8], f32[8]) {
  %arg = (s32[], f32[3,8]{1,0}, f32[8]{0}) parameter(0)
  %get-tuple-element.0 = s32[] get-tuple-element(%arg), index=0
  %get-tuple-element.1 = f32[3,8]{1,0} get-tuple-element(%arg), index=1
  %get-tuple-element.2 = f32[8]{0} get-tuple-element(%arg), index=2
  %copy.1 = f32[3,8]{1,0} copy(%get-tuple-element.1)
  %fusion.1 = f32[3,8]{1,0} fusion(%copy.1, %get-tuple-element.2, %get-tuple-element.0), kind=kLoop, calls=%fused_update
  ROOT %tuple.1 = (s32[], f32[3,8]{1,0}, f32[8]{0}) tuple(%get-tuple-element.0, %fusion.1, %get-tuple-element.2)
}

ENTRY %main (x: (s32[], f32[3,8], f32[8])) -> (s32[], f32[3,8], f32[8]) {
  %x = (s32[], f32[3,8]{1,0}, f32[8]{0}) parameter(0)
  ROOT %while.1 = (s32[], f32[3,8]{1,0}, f32[8]{0}) while(%x), condition=%cond, body=%body
}
"""
    rows = {name: (op, read, written) for name, op, read, written in counter.loop_traffic(hlo, 8 * 4)}
    assert rows == {"copy.1": ("copy", 3.0, 3.0), "fusion.1": ("fusion", 1.0, 1.0)}


# --------------------------------------------------------------------------------------------
# The bound's optimizer


def test_simplex_projection_satisfies_its_optimality_conditions():
    rng = np.random.default_rng(0)
    with schedules.float64():
        for n, total in [(1, 2.0), (5, 1.0), (9, 3.5), (9, 1e-3)]:
            v = rng.normal(size=n) * 2.0
            p = np.asarray(optimize.project_simplex(jnp.asarray(v), total))
            assert np.all(p >= 0) and np.isclose(p.sum(), total, rtol=1e-14)
            # KKT: p = max(v - theta, 0) with one theta for the support, v <= theta off it.
            theta = (v - p)[p > 0]
            assert np.ptp(theta) < 1e-12 and np.all(v[p == 0] <= theta[0] + 1e-12)


def test_projected_gradient_follows_jaxopt_iterate_for_iterate():
    """``pg_run`` is jaxopt.ProjectedGradient(acceleration=False): the same iterates and iteration count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jaxopt

    def loss(w):  # a smooth non-quadratic loss, minimized on the simplex {w >= 0, sum w = 2}
        target = jnp.asarray([0.9, -0.3, 0.5, 2.0, 0.1], w.dtype)
        scale = jnp.asarray([1.0, 4.0, 0.5, 2.0, 8.0], w.dtype)
        return jnp.sum(scale * (w - target) ** 2) + jnp.sum(jnp.exp(w)) * 0.1

    with schedules.float64():
        w0 = jnp.full(5, 0.4)
        project = lambda w: optimize.project_simplex(w, 2.0)  # noqa: E731
        for maxiter in (1, 3, 7, 60):
            ours = optimize.pg_run(jax.value_and_grad(loss), project, optimize.pg_start(w0, w0.dtype), maxiter, 1e-9)
            ref = jaxopt.ProjectedGradient(
                fun=loss, projection=jaxopt.projection.projection_simplex, maxiter=maxiter, tol=1e-9,
                acceleration=False, implicit_diff=False,
            ).run(w0, 2.0)
            np.testing.assert_allclose(ours.x, ref.params, rtol=0, atol=1e-12)
            assert int(ours.it) == int(ref.state.iter_num)
            np.testing.assert_allclose(ours.error, ref.state.error, rtol=1e-5)  # a norm of tiny differences


def test_fast_compile_falls_back_when_xla_lacks_the_options(monkeypatch):
    monkeypatch.setattr(optimize, "_FAST_COMPILE", {"xla_no_such_option_for_this_test": True})
    out = optimize._on_cpu(lambda v: v * 2.0 + 1.0, (), (np.arange(3.0),))
    np.testing.assert_array_equal(np.asarray(out), [1.0, 3.0, 5.0])
    assert out.dtype == np.float64


# --------------------------------------------------------------------------------------------
# The command line's cold start


def _steps(env, *flags):
    """``jdiffsample [flags] steps --nfe 3`` in a fresh process; returns its JSON and its imports."""
    code = ("import json, sys; from jdiffsample import cli; rc = cli.main(sys.argv[1:]); "
            "print(json.dumps(sorted(m for m in ('flax', 'jaxopt', 'scipy') if m in sys.modules)), file=sys.stderr); "
            "sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, *flags, "steps", "--nfe", "3", "--schedule", "ve"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(run.stdout), json.loads(run.stderr.strip().splitlines()[-1])


def test_cli_caches_compiled_programs_and_imports_little(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JDIFFSAMPLE_COMPILATION_CACHE="1")
    cache = tmp_path / "xdg" / "jdiffsample" / "xla"
    first, imported = _steps(env)
    assert imported == []  # neither Flax (other commands' options) nor jaxopt/SciPy (the old optimizer)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries  # every program, however fast it compiled
    second, _ = _steps(env)
    assert second == first and sorted(p.name for p in cache.iterdir()) == entries  # all read back

    off, _ = _steps(dict(env, XDG_CACHE_HOME=str(tmp_path / "off")), "--no-compilation-cache")
    assert off == first and not (tmp_path / "off").exists()


def test_compilation_cache_settings(monkeypatch, tmp_path):
    """The folder: the user's JAX_COMPILATION_CACHE_DIR, else XDG's; the opt-outs (flag, environment)."""
    saved = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_enable_compilation_cache")}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    try:
        assert cli.compilation_cache_dir() == str(tmp_path / "jdiffsample" / "xla")
        assert cli.configure_compilation_cache() == str(tmp_path / "jdiffsample" / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jdiffsample" / "xla")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
        assert cli.configure_compilation_cache() == str(tmp_path / "mine")
        assert cli.configure_compilation_cache(False) is None and not jax.config.jax_enable_compilation_cache
        for value, wanted in [("0", False), ("off", False), ("1", True)]:
            monkeypatch.setenv(cli.CACHE_ENV, value)
            assert cli._cache_wanted(type("Args", (), {"no_compilation_cache": False})) is wanted
        assert not cli._cache_wanted(type("Args", (), {"no_compilation_cache": True}))
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def test_cli_builds_only_the_chosen_commands_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["steps", "--help"])
    assert "--nfe" in capsys.readouterr().out
    assert cli._chosen(["--no-compilation-cache", "convert", "edm"]) == "convert"
    assert cli._chosen(["--help"]) is None


# --------------------------------------------------------------------------------------------
# XLA compile options of the sampling programs


def test_cpu_programs_take_convolutions_from_eigen_where_xla_accepts_it(monkeypatch):
    from jdiffsample import xla_options

    monkeypatch.delenv("JDIFFSAMPLE_EIGEN_CONV", raising=False)
    zero = np.float32(0)
    try:  # whether this XLA compiles with the option, asked of XLA itself
        jax.jit(lambda a: a * 2.0).lower(zero).compile(compiler_options=xla_options.EIGEN_CONV)
        accepted = True
    except jax.errors.JaxRuntimeError:
        accepted = False
    if jax.__version__.startswith("0.10."):
        assert accepted  # the jaxlib CI runs: the option must be in use there
    assert xla_options.compile_options(jax.devices("cpu")) == (xla_options.EIGEN_CONV if accepted else {})
    assert not xla_options.accepted({"xla_no_such_option_for_this_test": "1"})
    monkeypatch.setenv("JDIFFSAMPLE_EIGEN_CONV", "0")
    assert xla_options.compile_options(jax.devices("cpu")) == {}


def test_eigen_convolutions_agree_with_xlas_default():
    """Same convolution, other library: equal up to float32 rounding (NHWC, 3x3, 'SAME')."""
    from jdiffsample import xla_options

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 7, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 8)).astype(np.float32) / 12.0
    lowered = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(x, w)
    default = np.asarray(lowered.compile()(x, w))
    eigen = np.asarray(lowered.compile(compiler_options=xla_options.EIGEN_CONV)(x, w))
    reference = np.zeros((2, 9, 7, 8), np.float64)  # the sum written out, in float64
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(3):
        for j in range(3):
            reference += padded[:, i:i + 9, j:j + 7] @ w[i, j].astype(np.float64)
    scale = np.abs(reference).max()
    assert np.abs(default - reference).max() / scale < 1e-6
    assert np.abs(eigen - reference).max() / scale < 1e-6
