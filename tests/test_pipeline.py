"""The sampling pipeline and ``jdiffsample sample``: outputs, determinism across devices, batch
sizes and processes, resuming after SIGKILL, and one-line errors.

The model is a tiny stand-in built here (an EDM ``EDMPrecond`` SongUNet on 8x8x1 with random
weights, 10 classes), so compiles stay short; runs share a persistent compilation cache. Runs
that need fresh XLA flags or several processes are subprocesses.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_cli_fails, assert_within_one_level, benchmark, rebuild

from jdiffsample import pipeline

KWARGS = dict(img_resolution=8, img_channels=1, label_dim=10, sigma_data=0.5, model_type="SongUNet",
              model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0,
              embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
              decoder_type="standard", resample_filter=[1, 1])
NUM, SHARD, BATCH, MICRO = 24, 5, 6, 2  # 5 shards, the last one partial; batches straddle shards
RUN = ["--solver", "unipc", "--nfe", "4", "--num", str(NUM), "--shard-size", str(SHARD), "--seed", "3",
       "--micro-batch", str(MICRO)]


def _standin(path: Path, label_dim: int) -> Path:
    """Save an EDM network with random weights (no zero-initialized layer) at ``path``."""
    import jax.numpy as jnp

    from jdiffsample import nets
    from jdiffsample.nets import edm

    kwargs = dict(KWARGS, label_dim=label_dim)
    module = edm.build("EDMPrecond", kwargs)
    variables = nets.random_variables(module, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)),
                                      jnp.zeros((1, label_dim)) if label_dim else None)
    nets.save(path, "edm", "EDMPrecond", kwargs, variables)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return dict(cond=_standin(root / "cond", 10), uncond=_standin(root / "uncond", 0))


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JDIFFSAMPLE_COMPILATION_CACHE="1")
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)  # determinism with XLA's full optimizations
    return env


def _cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "jdiffsample.cli", "sample", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


@pytest.fixture(scope="session")
def reference(models, env, tmp_path_factory):
    """One uninterrupted single-process, single-device run: (out folder, its stderr)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    err = _finish(_cli(["--model", str(models["cond"]), "--out", str(out), "--batch", str(BATCH), *RUN], env))
    return out, err


def _shard_files(out: Path):
    return sorted(out.glob("samples_*.npz"))


def _read_png(path: Path) -> np.ndarray:
    """Decode the 8-bit, unfiltered, non-interlaced PNGs that pipeline.write_png makes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3}[color]
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * channels)
    assert depth == 8 and not rows[:, 0].any()
    return rows[:, 1:].reshape(height, width, channels)


def _assert_same_images(a, b):
    """The same labels and the same images, bit for bit."""
    (ia, la), (ib, lb) = a, b
    np.testing.assert_array_equal(la, lb)
    assert ia.shape == ib.shape and ia.dtype == ib.dtype == np.uint8
    np.testing.assert_array_equal(ia, ib)


# ---------------------------------------------------------------------------------------------


def test_outputs(reference, tmp_path):
    out, err = reference
    manifest = json.loads((out / pipeline.MANIFEST).read_text())
    settings = manifest["settings"]
    assert settings["num"] == NUM and settings["shard_size"] == SHARD and settings["seed"] == 3
    assert settings["solver"] == "unipc" and settings["nfe"] == 4 and len(settings["grid_values"]) == 5
    assert "batch" not in settings and manifest["versions"]["jax"]
    assert [s["file"] for s in manifest["shards"]] == [p.name for p in _shard_files(out)]
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]

    with np.load(out / "samples_000004.npz") as shard:  # ADM evaluator layout
        assert shard.files == ["arr_0", "arr_1"]
        assert shard["arr_0"].dtype == np.uint8 and shard["arr_0"].shape == (4, 8, 8, 1)
        assert shard["arr_1"].dtype == np.int32 and shard["arr_1"].shape == (4,)
    images, labels = pipeline.load_samples(out)
    assert images.shape == (NUM, 8, 8, 1) and 0 < images.std() and set(labels) <= set(range(10))
    assert len(set(labels)) > 3  # 'random' labels

    grid = _read_png(out / pipeline.PREVIEW)
    assert grid.shape == (5 * 33 + 1, 5 * 33 + 1, 1)  # 24 images, 5 x 5, enlarged 4x
    np.testing.assert_array_equal(grid[1:33, 1:33, 0], images[0, :, :, 0].repeat(4, 0).repeat(4, 1))

    merged = pipeline.export_npz(out, tmp_path / "all.npz")
    with np.load(merged) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    assert pipeline.export_png(out, tmp_path / "png") == NUM
    np.testing.assert_array_equal(_read_png(tmp_path / "png" / "000000" / "000017.png"), images[17])

    assert err.count("compiled in") == 1 and f"{NUM}/{NUM}" in err and "img/s" in err and "ETA" in err
    assert f"{NUM} images in" in err  # the summary


def test_images_rebuilt_by_hand(reference, models):
    """Samples of the run, rebuilt from their documented keys, noise scale (sigma_max), random labels,
    grid (UniPC's logSNR grid for NFE 4) and solver: the pipeline computes what it says it does."""
    from jdiffsample import nets, timesteps

    images, labels = pipeline.load_samples(reference[0])
    model = nets.load_model(models["cond"])
    grid = timesteps.logsnr(model.schedule, 4)
    np.testing.assert_allclose(pipeline.read_manifest(reference[0])["settings"]["grid_values"], grid, rtol=1e-12)
    picks = [0, 17, 23]
    manual, drawn = rebuild(model, picks, seed=3, times=grid, solver="unipc", labels="random")
    np.testing.assert_array_equal(drawn, labels[picks])
    assert_within_one_level(manual, images[picks])


def test_devices_and_batch_sizes(models, env, reference, tmp_path):
    """4 forced host devices with batch 16, 1 device with batch 7 and a regenerated subset give
    the reference's images (1 device, batch 6) bit for bit: every device computes chunks of
    MICRO samples, whatever the batch and the device count."""
    script = textwrap.dedent(f"""
        import sys, jax, numpy as np
        from jdiffsample import pipeline
        assert jax.device_count() == 4
        model, out = sys.argv[1], sys.argv[2]
        args = dict(num={NUM}, shard_size={SHARD}, seed=3, solver="unipc", nfe=4, micro_batch={MICRO},
                    log=None)
        s4 = pipeline.generate(model, out + "/dev4", batch=16, **args)
        s1 = pipeline.generate(model, out + "/dev1", batch=7, devices=jax.devices()[:1], **args)
        assert s4.devices == 4 and s1.devices == 1 and s4.fingerprint == s1.fingerprint
        runner = pipeline.from_manifest(out + "/dev1", batch=7, devices=jax.devices()[:1])
        images, labels = runner([17, 2, 23, 9])
        np.savez(out + "/subset.npz", images=images, labels=labels)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(models["cond"]), str(tmp_path)], capture_output=True,
                          text=True, timeout=900,
                          env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0, proc.stderr
    ref = pipeline.load_samples(reference[0])
    _assert_same_images(pipeline.load_samples(tmp_path / "dev4"), ref)
    _assert_same_images(pipeline.load_samples(tmp_path / "dev1"), ref)
    assert [json.loads((tmp_path / d / "manifest.json").read_text())["fingerprint"] for d in ("dev1", "dev4")] \
        == [json.loads((reference[0] / "manifest.json").read_text())["fingerprint"]] * 2
    with np.load(tmp_path / "subset.npz") as subset:  # any subset alone, beside other (padding) samples
        images, labels = pipeline.load_samples(tmp_path / "dev1")
        np.testing.assert_array_equal(subset["images"], images[[17, 2, 23, 9]])
        np.testing.assert_array_equal(subset["labels"], labels[[17, 2, 23, 9]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes(models, env, reference, tmp_path):
    """Two processes (jax.distributed on loopback) write the reference's images between them."""
    out, port = tmp_path / "run", _free_port()
    procs = [_cli(["--model", str(models["cond"]), "--out", str(out), "--batch", str(BATCH), *RUN, "--distributed",
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], env)
             for i in range(2)]
    errs = [_finish(p) for p in procs]
    assert "[1/2]" in errs[0] and "[2/2]" in errs[1]
    assert [p.name for p in _shard_files(out)] == [p.name for p in _shard_files(reference[0])]
    _assert_same_images(pipeline.load_samples(out), pipeline.load_samples(reference[0]))


def _check_final_shards(out: Path):
    """Every file under a final shard name is complete."""
    for path in _shard_files(out):
        index = int(path.stem.split("_")[1])
        n = min(SHARD, NUM - index * SHARD)
        with np.load(path) as data:
            assert data["arr_0"].shape == (n, 8, 8, 1) and data["arr_1"].shape == (n,)


def test_kill_and_resume(models, env, reference, tmp_path):
    """SIGKILL at random points (startup, then after random numbers of shards), then a resume:
    exactly the reference's images, and no partial file ever under a final name."""
    out = tmp_path / "run"
    args = ["--model", str(models["cond"]), "--out", str(out), "--batch", str(BATCH), *RUN]
    rng = random.Random(int(os.environ.get("PIPELINE_KILL_SEED", "0")))
    n_shards = -(-NUM // SHARD)
    targets = [None, *sorted(rng.sample(range(1, n_shards), 2))]
    killed_at = []  # finished shards when each kill landed
    for target in targets:
        proc = _cli(args, env)
        deadline = time.monotonic() + (rng.uniform(0.5, 3.0) if target is None else 600)
        # A warm compilation cache makes the run write a shard every ~12 ms on the 2-core machine:
        # poll every millisecond and land the kill within a few, before the next shard is done.
        # The startup kill lands at a random time before the first shard is written.
        while proc.poll() is None and time.monotonic() < deadline:
            if len(_shard_files(out)) >= (target or 1):
                if target is not None:
                    time.sleep(rng.uniform(0.0, 0.004))
                break
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_at.append(len(_shard_files(out)))
        proc.communicate()
        _check_final_shards(out)
    assert len(killed_at) == 3 and any(0 < n < n_shards for n in killed_at), killed_at
    err = _finish(_cli(args, env))
    _check_final_shards(out)
    assert not list(out.glob(".samples_*")), "temporary files left behind"
    _assert_same_images(pipeline.load_samples(out), pipeline.load_samples(reference[0]))
    assert "found done" in err or "nothing to do" in err

    again = _finish(_cli(args, env))  # a finished folder: nothing to do
    assert "nothing to do" in again


@pytest.mark.parametrize("case, message", [
    ("unknown_solver", "unknown solver 'nope'"),
    ("bad_order", "option order of solver unipc must be one of 1, 2, 3, got 5"),
    ("bad_nfe", "nfe (--nfe) must be a positive integer, got 0"),
    ("guidance_uncond", "classifier-free guidance needs a class-conditional network"),
    ("guide_uncond", "a guide network (--guide-model) needs a guidance weight (--guidance)"),
    ("bad_interval", "guidance_interval (--guidance-interval) must be LO,HI with 0 <= LO < HI"),
    ("labels_uncond", "the model is unconditional"),
    ("bad_label", "class label 12 is not an integer in [0, 9]"),
    ("other_settings", "holds samples made with other settings (seed: 3 there, 4 here)"),
    ("not_checkpoint", "is not a jdiffsample network checkpoint"),
    ("unknown_model", "neither a directory nor a bundled model"),
    ("foreign_folder", "is not empty and holds no manifest.json"),
    ("option_solver", "--eta does not apply to solver unipc"),
    ("micro_batch", "micro_batch (--micro-batch) must be a positive integer, got 0"),
    ("other_micro_batch", "holds samples made with other settings (micro_batch: 2 there, 4 here)"),
])
def test_bad_arguments(case, message, models, reference, tmp_path, capsys):
    cond, uncond, out = str(models["cond"]), str(models["uncond"]), str(tmp_path / "out")
    argv = {
        "unknown_solver": ["--model", cond, "--out", out, "--solver", "nope"],
        "bad_order": ["--model", cond, "--out", out, "--order", "5"],
        "bad_nfe": ["--model", cond, "--out", out, "--solver", "heun", "--nfe", "0"],
        "guide_uncond": ["--model", cond, "--out", out, "--guide-model", uncond],
        "bad_interval": ["--model", cond, "--out", out, "--guidance", "2", "--guidance-interval", "3,1"],
        "guidance_uncond": ["--model", uncond, "--out", out, "--guidance", "2"],
        "labels_uncond": ["--model", uncond, "--out", out, "--class-labels", "3"],
        "bad_label": ["--model", cond, "--out", out, "--class-labels", "1,12"],
        "other_settings": ["--model", cond, "--out", str(reference[0]), *RUN, "--seed", "4"],
        "not_checkpoint": ["--model", str(tmp_path), "--out", out],
        "unknown_model": ["--model", "no-such-model", "--out", out],
        "foreign_folder": ["--model", cond, "--out", str(models["cond"])],
        "option_solver": ["--model", cond, "--out", out, "--eta", "0.5"],
        "micro_batch": ["--model", cond, "--out", out, "--micro-batch", "0"],
        "other_micro_batch": ["--model", cond, "--out", str(reference[0]), *RUN, "--micro-batch", "4"],
    }[case]
    before = sorted(p.name for p in reference[0].iterdir())
    assert_cli_fails(["sample", *argv], message, capsys, tmp_path / "out")
    assert sorted(p.name for p in reference[0].iterdir()) == before


def test_png_and_atomic_write(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pipeline.write_png(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(_read_png(tmp_path / "a.png"), rgb)
    grid = pipeline.image_grid(np.stack([rgb[:4, :4]] * 5), pad=1)
    assert grid.shape == (2 * 33 + 1, 3 * 33 + 1, 3)

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        pipeline.output.atomic_write(tmp_path / "samples_000000.npz", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_cli_asks_for_deterministic_gpu_kernels(monkeypatch):
    from jdiffsample.commands import sample

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    sample.deterministic_gpu_kernels()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                       "--xla_gpu_deterministic_ops=true")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")  # the user's choice stays
    sample.deterministic_gpu_kernels()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"
    monkeypatch.delenv("XLA_FLAGS")
    sample.deterministic_gpu_kernels()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=true"


def test_new_labels_seed_and_skip_tuning_do_not_recompile(models, tmp_path):
    """The weights (Skip-Tuning scales included), labels and seed are arguments of the compiled
    program: a second run with other ones spends under 10% of the first one's XLA compile time,
    through the pipeline and through jdiffsample.sample."""
    import jax

    import jdiffsample
    from jdiffsample import nets, skip_tuning, timesteps

    compile_seconds = benchmark("compile_once").compile_seconds

    common = dict(num=6, solver="unipc", nfe=4, micro_batch=MICRO, batch=BATCH, shard_size=SHARD, log=None)
    first = compile_seconds(lambda: pipeline.generate(models["cond"], tmp_path / "a", seed=11, class_labels=[1, 2],
                                                      skip_tuning=0.9, **common))
    second = compile_seconds(lambda: pipeline.generate(models["cond"], tmp_path / "b", seed=12,
                                                       class_labels="random", skip_tuning=0.7, **common))
    assert first > 0 and second < 0.1 * first, (first, second)

    model = nets.load_model(models["cond"])
    ts = timesteps.logsnr(model.schedule, 4)

    def run(labels, rho, seed):
        tuned = model.with_variables(skip_tuning.apply(model.variables, rho_bottom=rho))
        x = jax.random.normal(jax.random.key(seed), (4, 8, 8, 1)) * ts[0]
        out = jdiffsample.sample(tuned.denoiser(np.asarray(labels)), x, ts, model.schedule, "sa_solver",
                                 key=jax.random.key(seed))
        return np.asarray(out)

    first = compile_seconds(lambda: run([1, 2, 3, 4], 0.9, 0))
    second = compile_seconds(lambda: run([5, 6, 7, 8], 0.7, 1))
    assert first > 0 and second < 0.1 * first, (first, second)


def test_sampling_programs_compile_with_the_xla_options(models, monkeypatch):
    """The pipeline's program and jdiffsample.sample compile with xla_options.compile_options():
    an option XLA does not know must then fail their compilation (and nothing else does)."""
    import jax

    import jdiffsample
    from jdiffsample import schedules, timesteps, xla_options

    monkeypatch.setattr(xla_options, "compile_options", lambda devices=None: {"xla_no_such_option_for_this_test": 1})
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option_for_this_test"):
        plan = pipeline.plan(models["cond"], pipeline.Settings(solver="ddim", nfe=2), num=2)
        pipeline.Runner(plan, batch=2)(np.arange(2))
    schedule = schedules.VE()
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option_for_this_test"):
        jdiffsample.sample(lambda x, t: x, np.ones((2, 3), np.float32), timesteps.logsnr(schedule, 2), schedule, "ddim")
