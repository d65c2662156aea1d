"""Helpers shared by the tests: layouts, errors, random weights for reference networks, and the
benchmark scripts as modules."""

from __future__ import annotations

import importlib.util
import math

import jax
import numpy as np
from conftest import ROOT, require
from flax import traverse_util


def benchmark(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nchw(a):
    """NHWC -> NCHW (PyTorch's layout), contiguous."""
    return np.ascontiguousarray(np.transpose(np.asarray(a), (0, 3, 1, 2)))


def rel_err(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs| (shapes must agree)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def randomize(model, seed: int):
    """Redraw every parameter of a PyTorch module: norm scales 1 + N(0, 0.2), biases N(0, 0.2),
    weights N(0, 1/fan_in), so that no layer is zero-initialised."""
    torch = require("torch")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_((1 if "norm" in name and name.endswith("weight") else 0) + 0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def numpy_state_dict(model) -> dict:
    """A PyTorch module's state dict as NumPy arrays."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def expected_keys(module, example_inputs, layout) -> dict:
    """PyTorch name -> shape of every tensor a converter with ``layout`` expects for ``module``."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)
    return {layout.key(path): tuple(layout.shape(path, leaf.shape))
            for path, leaf in sorted(traverse_util.flatten_dict(abstract["params"]).items())}


def random_state_dict(keys: dict, seed: int = 0) -> dict:
    """Random PyTorch-layout weights for ``{name: shape}`` (fan-in scaled matrices, norm scales
    near 1, small biases), the same for every run."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in keys.items():
        noise = rng.standard_normal(shape)
        value = noise / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else \
            noise * 0.1 + (1.0 if key.endswith(".weight") else 0.0)
        sd[key] = value.astype(np.float32)
    return sd


def check_grad_wrt_times(run, ts0, target, rel: float = 1e-5, ends: bool = False) -> None:
    """The gradient of mean((run(ts) - target)^2) with respect to the interior times of ``ts0``
    equals central finite differences (both jitted, float64). With ``ends``, the gradient is taken
    with respect to every time, the first and last included, and must be finite there too."""
    import jax.numpy as jnp

    def loss(interior, first, last):
        ts = jnp.concatenate([first, interior, last])
        return jnp.mean((run(ts) - target) ** 2)

    ts0 = np.asarray(ts0)
    interior, first, last = ts0[1:-1], ts0[:1], ts0[-1:]
    # one program gives the gradient and, at the shifted times, the losses of the differences
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) if ends else 0))
    grads = value_and_grad(interior, first, last)[1]
    grad = grads[0] if ends else grads
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in (grads if ends else [grads])), grads
    for i in range(interior.shape[0]):
        eps = 1e-6 * float(interior[i])
        e = np.zeros_like(interior)
        e[i] = eps
        fd = (value_and_grad(interior + e, first, last)[0] - value_and_grad(interior - e, first, last)[0]) / (2 * eps)
        assert abs(float(grad[i]) - float(fd)) < rel * max(1.0, abs(float(fd))), (i, grad[i], fd)


def leftovers(dst) -> list:
    """Anything at ``dst`` or temporary siblings that a failed conversion might leave."""
    return [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.") or p == dst]


def assert_convert_fails(family: str, src, dst, options, pattern: str, capsys) -> None:
    """``jdiffsample convert FAMILY SRC DST OPTIONS`` exits 2 with one error line matching
    ``pattern`` and leaves nothing at ``dst``."""
    import re

    from jdiffsample import cli

    assert cli.main(["convert", family, str(src), str(dst), *map(str, options)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jdiffsample convert {family}: error: "), err
    assert re.search(pattern, err[0]), err
    assert leftovers(dst) == [], leftovers(dst)


def assert_cli_fails(argv, message: str, capsys, *unwritten) -> None:
    """``jdiffsample ARGV`` exits 2 with one error line containing ``message`` and writes none of
    the paths ``unwritten``."""
    from jdiffsample import cli

    capsys.readouterr()  # what earlier commands printed
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not any(p.exists() for p in unwritten), [p for p in unwritten if p.exists()]


def converted_fixture(name: str, convert_state_dict):
    """``(folder, config, variables, io)`` of golden fixture ``name``: its state dict converted with
    ``convert_state_dict(class_name, kwargs, state_dict)`` and its 4-D arrays made NHWC."""
    import json

    from conftest import fixture_dir

    from jdiffsample.nets.formats import torchfile

    folder = fixture_dir(name)
    config = json.loads((folder / "config.json").read_text())
    variables = convert_state_dict(config["class_name"], config["kwargs"],
                                   torchfile.load_state_dict(folder / "state_dict.pt"))
    io = {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in np.load(folder / "io.npz").items()}
    return folder, config, variables, io


def pipeline_images(model, indices, *, batch=None, devices=None, **settings):
    """``(images, labels)`` of sample ``indices`` as ``jdiffsample sample`` makes them with
    ``settings`` (the plan and runner of one run, without an output folder)."""
    from jdiffsample import pipeline

    indices = np.asarray(indices)
    plan = pipeline.plan(model, pipeline.Settings.create(**settings), num=len(indices))
    return pipeline.Runner(plan, batch=batch, devices=devices, num=len(indices))(indices)


# -- diffusers' schedulers kept in float64 (test-time references) ------------------------------------


def float64_dpm_solver():
    """diffusers' ``DPMSolverMultistepScheduler`` with the float64 state (and SDE noise) handed to its
    update rules: its ``step`` casts both to float32 first (an upcast meant for half-precision models,
    which alone leaves differences of about 4e-7)."""
    diffusers = require("diffusers")

    class Float64DPMSolver(diffusers.DPMSolverMultistepScheduler):
        def step(self, model_output, timestep, sample, variance_noise=None, **kwargs):
            self._state, self._noise = sample, variance_noise
            return super().step(model_output, timestep, sample, variance_noise=variance_noise, **kwargs)

        def _float64(self, kwargs):
            kwargs = {**kwargs, "sample": self._state}
            if self._noise is not None:
                kwargs["noise"] = self._noise
            return kwargs

        def dpm_solver_first_order_update(self, model_output, *args, **kwargs):
            return super().dpm_solver_first_order_update(model_output, *args, **self._float64(kwargs))

        def multistep_dpm_solver_second_order_update(self, model_output_list, *args, **kwargs):
            return super().multistep_dpm_solver_second_order_update(model_output_list, *args, **self._float64(kwargs))

        def multistep_dpm_solver_third_order_update(self, model_output_list, *args, **kwargs):
            return super().multistep_dpm_solver_third_order_update(model_output_list, *args, **self._float64(kwargs))

    return Float64DPMSolver


def float64_flow_match_euler():
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` whose ``step`` keeps what its float32 cast of the
    state drops (x + (sigma' - sigma) v is linear in x: the dropped part is added back)."""
    torch = require("torch")
    diffusers = require("diffusers")

    class Float64FlowMatchEuler(diffusers.FlowMatchEulerDiscreteScheduler):
        def step(self, model_output, timestep, sample, **kwargs):
            out = super().step(model_output, timestep, sample, **kwargs)
            lost = sample - sample.to(torch.float32).to(sample.dtype)
            return type(out)(prev_sample=out.prev_sample + lost)

    return Float64FlowMatchEuler


def run_scheduler(scheduler, model, x, ts, noise=None):
    """A diffusers scheduler's loop on its ``sigmas`` (set to float64 here) from the state ``x``:
    ``model(state, ts[i])`` gives the model output at step i, ``noise(i)`` the SDE noise of step i
    (``variance_noise``). Returns the final state (float64 NumPy)."""
    torch = require("torch")
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    state = torch.from_numpy(np.array(x))
    for i, timestep in enumerate(scheduler.timesteps):
        out = torch.from_numpy(np.array(model(state.numpy(), ts[i])))
        extra = {} if noise is None else dict(variance_noise=torch.from_numpy(np.array(noise(i))))
        state = scheduler.step(out, timestep, state, **extra).prev_sample
    assert state.dtype == torch.float64
    return state.numpy()


# -- Skip-Tuning: the consuming blocks' inputs ------------------------------------------------------


def skip_consumer_inputs(apply, variables, consumes):
    """A jitted ``skip -> [inputs]``: the inputs of the decoder blocks that take a long skip, in call
    order, recorded with ``nn.intercept_methods`` while ``apply({**variables, "skip": skip})`` runs;
    ``consumes(module)`` tells such a block."""
    from flax import linen as nn

    def run(skip):
        seen = []

        def record(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and consumes(context.module):
                seen.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            apply({**variables, "skip": skip})
        return seen

    return jax.jit(run)


def assert_skips_scaled(inputs_of, scales: dict) -> None:
    """Every consuming block's input ends with the skip's channels times its own scale, exactly (the
    network's float32 product; the same bits where a later constant multiplies the concatenation, as
    EDM2's ``mp_cat`` does, only for powers of 2), and the deepest consumer's main-path channels are
    the unscaled run's: neither the main path scaled nor another skip's scale. The skip channels are
    those an all-zero scaling zeroes. ``scales``: the ``"skip"`` collection {name: rho} to run, in
    consumption order."""
    names = list(scales)
    scales = {n: np.float32(v) for n, v in scales.items()}
    base = [np.asarray(a) for a in inputs_of({n: np.float32(1) for n in names})]
    zero = [np.asarray(a) for a in inputs_of({n: np.float32(0) for n in names})]
    tuned = [np.asarray(a) for a in inputs_of(scales)]
    assert len(base) == len(zero) == len(tuned) == len(names)
    for j, name in enumerate(names):
        nonzero = np.any(zero[j] != 0, axis=tuple(range(zero[j].ndim - 1)))
        c = int(np.argmax(nonzero[::-1])) if nonzero.any() else nonzero.size  # trailing zeroed channels
        assert 0 < c < base[j].shape[-1], (name, c)
        np.testing.assert_array_equal(tuned[j][..., -c:], scales[name] * base[j][..., -c:], err_msg=name)
        if j == 0:
            np.testing.assert_array_equal(tuned[0][..., :-c], base[0][..., :-c])


def rebuild(model, indices, *, seed, times, solver, labels=None, options=None, params=None, **denoiser_options):
    """uint8 images of sample ``indices`` rebuilt by hand from their documented randomness, for
    checking what the pipeline writes: sample i's starting noise from ``fold_in(k_i, 0)`` (times
    sigma at the first time on VE schedules, where sigma = t, else 1), its solver noise from
    ``fold_in(k_i, 2)``, k_i = fold_in(key(seed), i); ``labels`` given (or drawn from
    ``fold_in(k_i, 1)`` when ``"random"``); the model's denoiser with ``denoiser_options``, the
    solver with ``options`` (and learned ``params``) on ``times``, EDM's quantization. Returns
    ``(images, labels)``."""
    import jax.numpy as jnp

    import jdiffsample

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(indices))
    sub = lambda k: jax.vmap(jax.random.fold_in, (0, None))(keys, k)  # noqa: E731
    noise = jax.vmap(lambda k: jax.random.normal(k, model.sample_shape, jnp.float32))(sub(0))
    # the documented scale, not the code's prior_std: sigma_max on VE (EDM's), 1 on VP and flows
    x = noise * (float(times[0]) if model.schedule.is_ve else 1.0)
    if isinstance(labels, str) and labels == "random":
        labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, model.num_classes, jnp.int32))(sub(1))
    denoise = model.denoiser(None if labels is None else np.asarray(labels), **denoiser_options)
    out = jdiffsample.sample(denoise, x, jnp.asarray(times, jnp.float32), model.schedule, solver, key=sub(2),
                             params=params, **(options or {}))
    images = np.asarray(jnp.clip(jnp.floor(out * 127.5 + 128.0), 0, 255).astype(jnp.uint8))
    return images, None if labels is None else np.asarray(labels)


def assert_within_one_level(ours, theirs):
    """Images equal but for rare pixels one 8-bit level apart (float rounding at a level's edge)."""
    ours, theirs = np.asarray(ours, int), np.asarray(theirs, int)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert np.abs(ours - theirs).max() <= 1 and np.mean(ours == theirs) > 0.99, np.abs(ours - theirs).max()
