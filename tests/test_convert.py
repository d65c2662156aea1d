"""Converters end to end: ``jdiffsample convert`` (and the convert/*.py wrappers) on the golden
fixtures, nets.save/load/load_model and the denoisers, and the guarantees on failure (one error
line, exit 2, nothing written to DST)."""

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _torch_pickles as tp
from conftest import ROOT, fixture_dir
from jdiffsample import cli, nets, schedules
from jdiffsample.nets.formats import checkpoint, torchfile

EDM_FIXTURES = ["edm_ddpmpp_vp_tiny", "edm_ncsnpp_ve_tiny", "edm_adm_edm_tiny"]
ADM_FIXTURES = ["adm_guided_tiny"]
#: One compiled program per network (t is traced): ``DENOISE(denoiser, x, t)``.
DENOISE = jax.jit(lambda denoiser, x, t: denoiser(x, t))
APPLY = jax.jit(lambda model, *args: model.apply(*args))  # one program instead of an eager op each


def _no_torch_dir() -> str:
    """A directory whose ``torch`` package raises ImportError: put first on PYTHONPATH, it
    proves the converters never import torch."""
    folder = Path(tempfile.gettempdir()) / f"jdiffsample-no-torch-{os.getuid()}"
    (folder / "torch").mkdir(parents=True, exist_ok=True)
    (folder / "torch" / "__init__.py").write_text(
        'raise ImportError("torch is blocked: the converters must not need it")\n')
    return str(folder)


def run_cli(family, *args, wrapper=False):
    """``jdiffsample convert FAMILY ...`` (or the convert/FAMILY.py wrapper) in a subprocess with
    torch blocked; returns the CompletedProcess."""
    path = os.pathsep.join(p for p in (_no_torch_dir(), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    command = ([str(ROOT / "convert" / f"{family}.py")] if wrapper
               else ["-m", "jdiffsample.cli", "convert", family])
    return subprocess.run([sys.executable, *command, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def _leftovers(dst: Path):
    """Anything at dst or temporary siblings a failed conversion might leave."""
    return [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.") or p == dst]


def _fixture(name):
    folder = fixture_dir(name)
    return folder, json.loads((folder / "config.json").read_text()), dict(np.load(folder / "io.npz"))


_APPLY = {}


def _forward(module, variables, io):
    """The network on the fixture inputs, NCHW like the reference output (jitted once per network)."""
    apply = _APPLY.setdefault(id(module), jax.jit(module.apply))
    x = jnp.asarray(io["x"].transpose(0, 2, 3, 1))
    if "sigma" in io:
        labels = io.get("class_labels")
        out = apply(variables, x, jnp.asarray(io["sigma"], jnp.float32),
                    None if labels is None else jnp.asarray(labels, jnp.float32))
    else:
        out = apply(variables, x, jnp.asarray(io["timesteps"], jnp.float32),
                    jnp.asarray(io["y"]))
    return np.asarray(out).transpose(0, 3, 1, 2)


def _close(out, ref, rel=1e-5):
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max error {err:.2e} of max |output|"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every fixture converted once through the CLI: {name: (dst, stdout)}."""
    out = {}
    base = tmp_path_factory.mktemp("converted")
    for i, name in enumerate(EDM_FIXTURES + ADM_FIXTURES):
        folder = fixture_dir(name)
        dst = base / name
        wrapper = i % 2 == 1  # the convert/*.py wrappers run the same command
        if name in EDM_FIXTURES:
            r = run_cli("edm", folder / "state_dict.pt", dst, "--kwargs", folder / "config.json", wrapper=wrapper)
        else:
            r = run_cli("adm", folder / "state_dict.pt", dst, "--config", folder / "config.json", wrapper=wrapper)
        assert r.returncode == 0, r.stderr
        assert re.search(r"in \d+\.\d+ s$", r.stdout.strip()), r.stdout
        out[name] = (dst, r.stdout.strip())
    return out


@pytest.fixture(scope="module")
def loaded(converted):
    """nets.load of every converted fixture: {name: (module, variables, config)}."""
    return {name: (*nets.load(dst), nets.read_config(dst)) for name, (dst, _) in converted.items()}


@pytest.fixture(scope="module")
def models(converted):
    """nets.load_model of every converted fixture: {name: Model}."""
    return {name: nets.load_model(dst) for name, (dst, _) in converted.items()}


@pytest.mark.parametrize("name", EDM_FIXTURES + ADM_FIXTURES)
def test_cli_conversion_reproduces_fixture(converted, loaded, name):
    _, stdout = converted[name]
    _, cfg, io = _fixture(name)
    module, variables, config = loaded[name]
    assert config["class_name"] == cfg["class_name"]
    assert config["family"] == ("adm" if name in ADM_FIXTURES else "edm")
    assert {"jax", "flax", "orbax-checkpoint", "jdiffsample"} <= set(config["versions"])
    assert set(variables) == {"params", "skip"}
    _close(_forward(module, variables, io), io["output"])
    print(f"{name}: {stdout}")


@pytest.mark.parametrize("name", EDM_FIXTURES)
def test_edm_denoiser(models, name):
    """denoise(x, t) = net(x, sigma=t, one_hot(labels)): row i at t = sigma_i is the fixture's output i."""
    _, _, io = _fixture(name)
    model = models[name]
    labels = io.get("class_labels")
    denoise = model.denoiser(None if labels is None else labels.argmax(1))
    assert isinstance(model.schedule, schedules.VE)
    x = jnp.asarray(io["x"].transpose(0, 2, 3, 1))
    scale = np.abs(io["output"]).max()
    for i, sigma in enumerate(io["sigma"]):  # within 2e-5: XLA fuses the preconditioning into the program
        out = np.asarray(DENOISE(denoise, x, float(sigma)))[i].transpose(2, 0, 1)
        assert np.abs(out - io["output"][i]).max() <= 2e-5 * scale
    if labels is None:
        with pytest.raises(ValueError, match="unconditional"):
            model.denoiser(np.zeros(4, int))
    else:  # label -1 is the null label: the original's all-zero class vector
        null = np.asarray(APPLY(model, x, jnp.ones(len(x)), jnp.zeros_like(labels)))
        assert np.allclose(DENOISE(model.denoiser(np.full(len(x), -1)), x, 1.0), null, atol=1e-5 * scale)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
            model.denoiser(np.full(len(x), 10))


def test_edm_schedule_range(models, loaded):
    """EDM sampling range: generate.py's [0.002, 80] clipped to the preconditioner's own range."""
    schedule = models["edm_ncsnpp_ve_tiny"].schedule
    assert schedule == schedules.VE(sigma_min=0.02, sigma_max=80.0)
    assert schedules.from_config(loaded["edm_ncsnpp_ve_tiny"][2]["schedule"]) == schedule
    assert schedules.from_config(loaded["edm_adm_edm_tiny"][2]["schedule"]) == schedules.VE(sigma_min=0.002,
                                                                                            sigma_max=80.0)


def test_adm_denoiser_uses_eps_half_at_model_time(models, loaded):
    """denoise(x, t_n) with t_n = (n + 1) / N is x0 from the fixture's epsilon at timestep n."""
    _, _, io = _fixture("adm_guided_tiny")
    model = models["adm_guided_tiny"]
    linear = schedules.VPDiscrete.from_betas(schedules.guided_diffusion_betas("linear", 1000))
    assert schedules.from_config(loaded["adm_guided_tiny"][2]["schedule"]) == linear
    with pytest.raises(ValueError, match="class-conditional"):
        model.denoiser()
    with pytest.raises(ValueError, match="classifier-free guidance needs .* unconditional mode"):
        model.denoiser(io["y"], guidance=2.0)
    denoise, schedule = model.denoiser(io["y"]), model.schedule
    assert isinstance(schedule, schedules.VPDiscrete) and schedule.num_steps == 1000
    x = io["x"].transpose(0, 2, 3, 1)
    eps_ref = io["output"][:, :3].transpose(0, 2, 3, 1)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    for i, n in enumerate(io["timesteps"]):
        t = (int(n) + 1) / 1000
        assert float(schedule.model_time(t)) == pytest.approx(float(n), abs=1e-3)
        got = np.asarray(DENOISE(denoise, jnp.asarray(x), t))[i]
        ref = (x[i] - np.sqrt(1 - abar[n]) * eps_ref[i]) / np.sqrt(abar[n])
        _close(got, ref, 1e-4)


def _edm_heun_reference(denoise, x, ts):
    """EDM Algorithm 2 without churn, written out (VE: t is sigma)."""
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        d = (x - denoise(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_next > 0:
            d2 = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * 0.5 * (d + d2)
        x = x_next
    return x


def test_sample_end_to_end_with_heun(models):
    import jdiffsample
    from jdiffsample import timesteps

    name = "edm_ddpmpp_vp_tiny"
    _, _, io = _fixture(name)
    model = models[name]
    denoise, schedule = model.denoiser(io["class_labels"].argmax(1)), model.schedule
    ts = timesteps.karras(schedule, 4, final_zero=True)
    x = jax.random.normal(jax.random.key(0), io["x"].transpose(0, 2, 3, 1).shape) * ts[0]
    out = np.asarray(jdiffsample.sample(denoise, x, ts, schedule, solver="heun"))
    assert out.shape == x.shape and np.all(np.isfinite(out))
    ref = np.asarray(_edm_heun_reference(lambda x, t: DENOISE(denoise, x, t), x, [float(t) for t in ts]))
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())


def test_synthetic_edm_snapshot_via_cli(tmp_path, loaded):
    """An EDM network-snapshot pickle (persistence objects, nested storage blobs) converts via the
    CLI with class and kwargs read from the pickle, and reproduces the fixture."""
    name = "edm_adm_edm_tiny"
    folder, cfg, _ = _fixture(name)
    sd = torchfile.load_state_dict(folder / "state_dict.pt", copy=True)
    sentinel = tmp_path / "pwned"
    src = f"open({str(sentinel)!r}, 'w').write('executed')\n"
    net = tp.edm_network(cfg["class_name"], cfg["kwargs"], sd, module_src=src)
    (tmp_path / "network-snapshot-000100.pkl").write_bytes(tp.edm_snapshot(net))
    r = run_cli("edm", tmp_path / "network-snapshot-000100.pkl", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert not sentinel.exists()
    config = nets.read_config(tmp_path / "out")
    assert config["kwargs"] == cfg["kwargs"] and config["source"]["kind"] == "edm_pickle"
    _, variables = nets.load(tmp_path / "out")
    _, reference, _ = loaded[name]  # converted from the fixture's state_dict.pt
    assert jax.tree.structure(variables) == jax.tree.structure(reference)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, reference)))


# ---------------------------------------------------------------------------------------------
# failures: one clear line on stderr, non-zero exit, nothing at DST


def _assert_failed(r, dst, pattern):
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jdiffsample convert edm: error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert _leftovers(dst) == [], _leftovers(dst)


def test_cli_refuses_malicious_pickle(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tp.Reduce(tp.Global("posix", "system"), (f"touch {sentinel}",))
    net = tp.edm_network("EDMPrecond", {}, {"model.w": np.ones(2, np.float32)},
                         extra_modules={"x": evil})
    (tmp_path / "evil.pkl").write_bytes(tp.edm_snapshot(net))
    r = run_cli("edm", tmp_path / "evil.pkl", tmp_path / "out")
    _assert_failed(r, tmp_path / "out", r"global posix\.system, which is not on the allow-list")
    assert not sentinel.exists()


def _convert(family):
    """``jdiffsample convert FAMILY`` in-process (faster than a subprocess for error paths)."""
    return lambda args: cli.main(["convert", family, *args])


def test_cli_error_paths(tmp_path, capsys):
    edm, adm = _convert("edm"), _convert("adm")
    ddpmpp = fixture_dir("edm_ddpmpp_vp_tiny")
    adm_dir = fixture_dir("adm_guided_tiny")
    raw = (ddpmpp / "state_dict.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (edm, [ddpmpp / "state_dict.pt", "DST"], r"config with class_name and kwargs"),
        (edm, [tmp_path / "cut.pt", "DST", "--kwargs", ddpmpp / "config.json"],
         r"truncated or corrupt"),
        (edm, [tmp_path / "nope.pkl", "DST"], r"no such file"),
        (edm, [ddpmpp / "state_dict.pt", "DST", "--kwargs", tmp_path / "bad.json"],
         r"not valid JSON"),
        (edm, [ddpmpp / "state_dict.pt", "DST", "--kwargs",
               fixture_dir("edm_ncsnpp_ve_tiny") / "config.json"],
         r"state_dict does not fit VEPrecond"),
        (edm, [ddpmpp / "state_dict.pt", "DST", "--kwargs", adm_dir / "config.json"],
         r"unsupported network class 'UNetModel'"),
        (adm, [adm_dir / "state_dict.pt", "DST", "--preset", "64x64"],
         r"does not fit the UNetModel kwargs.*shape mismatches"),
        (adm, [adm_dir / "state_dict.pt", "DST", "--preset", "1024x1024"],
         r"unknown ADM preset '1024x1024'"),
        (adm, [ddpmpp / "state_dict.pt", "DST", "--config", adm_dir / "config.json"],
         r"missing keys"),
        (adm, [adm_dir / "state_dict.pt", "DST", "--config", adm_dir / "config.json",
               "--key", "ema"], r"no entry 'ema'"),
    ]
    for i, (script, args, pattern) in enumerate(cases):
        dst = tmp_path / f"out{i}"
        rc = script([str(dst) if a == "DST" else str(a) for a in args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and re.search(pattern, err[0]), (i, err)
        assert _leftovers(dst) == [], (i, _leftovers(dst))


def test_cli_existing_destination_is_kept(tmp_path, capsys):
    adm = _convert("adm")
    folder = fixture_dir("adm_guided_tiny")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    args = [str(folder / "state_dict.pt"), str(dst), "--config", str(folder / "config.json")]
    assert adm(args) == 2
    assert "already exists; replace it with --overwrite" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # --overwrite replaces only a checkpoint folder (or an empty one): never a folder of user files
    assert adm(args + ["--overwrite"]) == 2
    assert "is not a jdiffsample checkpoint" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    (dst / "keep.txt").unlink()
    assert adm(args) == 2  # an empty folder exists too
    assert adm(args + ["--overwrite"]) == 0
    assert adm(args + ["--overwrite", "--noise-schedule", "cosine"]) == 0  # a checkpoint: replaced whole
    cosine = schedules.VPDiscrete.from_betas(schedules.guided_diffusion_betas("cosine", 1000))
    assert schedules.from_config(nets.read_config(dst)["schedule"]) == cosine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_convert_edm_legacy_state_dict(tmp_path, loaded):
    """A legacy (non-zip) torch.save state_dict converts like the zip one."""
    name = "edm_ncsnpp_ve_tiny"
    folder = fixture_dir(name)
    sd = torchfile.load_state_dict(folder / "state_dict.pt")
    root = OrderedDict((k, tp.array_tensor(v, str(i))) for i, (k, v) in enumerate(sd.items()))
    (tmp_path / "legacy.pt").write_bytes(tp.legacy_blob(root))
    info = nets.convert("edm", tmp_path / "legacy.pt", tmp_path / "out", kwargs=folder / "config.json")
    assert info["class_name"] == "VEPrecond" and info["tensors"] == len(sd)
    _, variables = nets.load(tmp_path / "out")
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, loaded[name][1])))


# ---------------------------------------------------------------------------------------------
# save / load


def _tiny_variables():
    return {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3).T}},
            "skip": {"00_a": np.ones((), np.float32)}}


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_save_is_atomic(tmp_path, monkeypatch, exc):
    class Failing:
        def save(self, path, tree):
            Path(path).mkdir(parents=True)
            (Path(path) / "partial").write_bytes(b"x")
            raise exc("disk full")

        def close(self):
            pass

    monkeypatch.setattr(checkpoint, "_checkpointer", Failing)
    dst = tmp_path / "a" / "b" / "ckpt"
    with pytest.raises(exc):
        nets.save(dst, "edm", "EDMPrecond", {}, _tiny_variables(), extra={"schedule": {}})
    assert list(tmp_path.iterdir()) == []  # even the parents this call created are gone


def test_save_load_round_trip_and_errors(tmp_path):
    v = _tiny_variables()
    dst = nets.save(tmp_path / "ck", "adm", "UNetModel", {"image_size": np.int64(8)}, v,
                    extra={"schedule": {"type": "VE"}, "note": "hi"})
    cfg = nets.read_config(dst)
    assert cfg["kwargs"] == {"image_size": 8} and cfg["note"] == "hi"
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0o700
    with pytest.raises(FileExistsError):
        nets.save(dst, "adm", "UNetModel", {}, v)
    with pytest.raises(ValueError, match="unknown network family 'nope'; choose one of .*adm.*edm"):
        nets.save(tmp_path / "x", "nope", "UNetModel", {}, v)
    with pytest.raises(ValueError, match="neither a directory nor a bundled model"):
        nets.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        nets.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a jdiffsample network config"):
        nets.load(tmp_path / "empty")


def test_conversion_memory_is_bounded(tmp_path):
    """Peak Python-visible allocations while converting stay within 3x the checkpoint size."""
    folder = fixture_dir("adm_guided_tiny")
    size = (folder / "state_dict.pt").stat().st_size
    nets.convert("adm", folder / "state_dict.pt", tmp_path / "warm", config=folder / "config.json")
    tracemalloc.start()
    try:
        nets.convert("adm", folder / "state_dict.pt", tmp_path / "out", config=folder / "config.json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 3 * size, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB checkpoint"


def test_checkpoint_saved_on_another_device_loads_here(tmp_path):
    """Orbax records each array's device; a checkpoint written on a device this process lacks
    (here CPU device 1 of 2; in practice a CPU-made checkpoint loaded on a GPU) still loads."""
    script = textwrap.dedent("""
        import sys, jax, jax.numpy as jnp
        from jdiffsample import nets
        from jdiffsample.nets import edm
        kwargs = dict(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet",
                      model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                      embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                      decoder_type="standard", resample_filter=[1, 1])
        module = edm.build("EDMPrecond", kwargs)
        variables = nets.random_variables(module, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))
        variables = jax.device_put(variables, jax.devices()[1])
        nets.save(sys.argv[1], "edm", "EDMPrecond", kwargs, variables)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "net")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert len(jax.devices()) == 1
    module, variables = nets.load(tmp_path / "net")
    leaves = jax.tree.leaves(variables)
    assert leaves and all(x.devices() == {jax.devices()[0]} for x in leaves)
