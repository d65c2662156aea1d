"""Nothing lost, nothing trusted blindly: damaged shards are found and written again, destinations
are replaced only when they are jdiffsample's own outputs (and then whole, atomically), interrupted
or failing commands say one line, and every argument is checked before any work."""

from __future__ import annotations

import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_cli_fails
from conftest import fixture_dir

import jdiffsample
from jdiffsample import cli, grids, nets, pipeline, schedules, text2image, timesteps
from jdiffsample.pipeline import output

RUN = ["--model", "digits", "--nfe", "3", "--num", "10", "--shard-size", "4", "--seed", "5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (its folder, its images and labels)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(["sample", *RUN, "--out", str(out)]) == 0
    return out, pipeline.load_samples(out)


def _run(out, *extra, capsys=None) -> str:
    if capsys is not None:
        capsys.readouterr()
    assert cli.main(["sample", *RUN, "--out", str(out), *extra]) == 0
    return "" if capsys is None else capsys.readouterr().err


def _same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "record"])
def test_a_damaged_shard_is_written_again(damage, reference, tmp_path, capsys):
    """A truncated, emptied, altered or unrecorded shard is reported by name, refused by the export,
    and written again by the same command: the run's images equal an uninterrupted run's."""
    out = tmp_path / "run"
    _run(out)
    shard = out / ("samples_000000.npz" if damage != "record" else "samples_000002.npz")
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[:200]))
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    else:
        (out / "samples_000002.json").unlink()  # killed between the shard and its record
    with pytest.raises(ValueError, match=shard.name):
        pipeline.load_samples(out)
    with pytest.raises(ValueError, match=shard.name):
        pipeline.export_npz(out, tmp_path / "all.npz")
    assert not (tmp_path / "all.npz").exists()
    # the same command finds it, writes it again, and only then exports
    err = _run(out, "--export", str(tmp_path / "all.npz"), capsys=capsys)
    assert f"{shard.name}: " in err and "writing it again" in err
    _same(pipeline.load_samples(out), reference[1])
    with np.load(tmp_path / "all.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], reference[1][0])
    assert "writing it again" not in _run(out, capsys=capsys)


def test_exports_refuse_and_replace_whole(reference, tmp_path, capsys):
    out, (images, labels) = reference
    npz, png = tmp_path / "all.npz", tmp_path / "png"
    assert pipeline.export_npz(out, npz) == npz
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    assert_cli_fails(["sample", *RUN, "--out", out, "--export", npz], "already exists; give --overwrite", capsys)
    npz.write_bytes(b"old")
    assert cli.main(["sample", *RUN, "--out", str(out), "--export", str(npz), "--overwrite"]) == 0
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["arr_0"], images)

    # a PNG export replaces an earlier one whole: no old files mixed with the new ones
    (png / "000000").mkdir(parents=True)
    for i in range(40):
        (png / "000000" / f"{i:06d}.png").write_bytes(b"old")
    assert_cli_fails(["sample", *RUN, "--out", out, "--export", png], "already exists", capsys)
    assert pipeline.export_png(out, png, overwrite=True) == 10
    assert sorted(p.name for p in (png / "000000").iterdir()) == [f"{i:06d}.png" for i in range(10)]
    # never a folder of other files, a file where a folder goes, or a place inside the run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert_cli_fails(["sample", *RUN, "--out", out, "--export", tmp_path / "mine", "--overwrite"],
                     "holds files other than an earlier PNG export", capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert_cli_fails(["sample", *RUN, "--out", out, "--export", tmp_path / "file", "--overwrite"],
                     "is a file; a PNG export is a folder", capsys)
    assert_cli_fails(["sample", *RUN, "--out", out, "--export", out / "x.npz"], "lies inside the run folder", capsys)


def test_convert_replaces_only_checkpoints_and_never_its_source(tmp_path, capsys):
    src = tmp_path / "vae"
    import shutil

    shutil.copytree(fixture_dir("vae_tiny"), src)
    before = sorted(p.name for p in src.iterdir())
    assert_cli_fails(["convert", "vae", src, src, "--overwrite"], "holds the source", capsys)
    assert sorted(p.name for p in src.iterdir()) == before
    assert_cli_fails(["convert", "vae", src, tmp_path, "--overwrite"], "holds the source", capsys)
    assert sorted(p.name for p in src.iterdir()) == before
    dst = tmp_path / "ck"
    assert cli.main(["convert", "vae", str(src), str(dst)]) == 0
    assert_cli_fails(["convert", "vae", src, dst], "already exists; replace it with --overwrite", capsys)
    (dst / "notes.txt").write_text("mine")
    assert_cli_fails(["convert", "vae", src, dst, "--overwrite"], "holds files that are not part of its checkpoint",
                     capsys)
    assert (dst / "notes.txt").exists()


def test_eval_refuses_an_earlier_evaluation_and_checks_everything_first(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--solvers", "ddim", "--nfe", "2", "--grids", "logsnr", "--skip", "", "--samples", "4",
            "--batch", "4", "--micro-batch", "4", "--ref-steps", "2", "--no-plot", "--out", str(out)]
    assert cli.main(args) == 0
    first = (out / "results.csv").read_text()
    capsys.readouterr()
    assert_cli_fails(args, "holds an earlier evaluation; give --overwrite", capsys)
    for bad, message in ((["--skip", "-1"], "--skip values are Skip-Tuning scales"),
                         (["--grids", "ays"], "no published Align Your Steps schedule"),
                         (["--ref-steps", "0"], "--ref-steps must be a positive integer, got 0")):
        assert_cli_fails([*args, *bad, "--overwrite"], message, capsys)
        assert (out / "results.csv").read_text() == first and (out / "results.md").exists()
    (out / "notes.txt").write_text("mine")
    assert_cli_fails([*args, "--overwrite"], "holds files an eval does not write", capsys)
    (out / "notes.txt").unlink()
    assert cli.main([*args, "--overwrite", "--seed", "1"]) == 0
    assert (out / "results.csv").read_text() != first and sorted(p.name for p in out.iterdir()) == [
        "baselines.json", "grids.json", "results.csv", "results.md"]


def test_interrupts_and_system_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C: exit 130 with how to resume; a full disk and a read-only folder: one line, exit 2, the
    finished shards valid."""
    out = tmp_path / "run"
    real = output.write_shard
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(output, "write_shard", interrupted)
    assert cli.main(["sample", *RUN, "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted; finished shards are kept: rerun the same command to resume" in err

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "samples_000001.npz"))

    monkeypatch.setattr(output, "write_shard", full)
    assert_cli_fails(["sample", *RUN, "--out", out, "--quiet"], "No space left on device", capsys)
    monkeypatch.setattr(output, "write_shard", real)
    output.verify_shard(out, output.plan(10, 4)[0], (8, 8, 1), "uint8", True)  # the shard before stays valid

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(output, "_create_exclusive", read_only)
    assert_cli_fails(["sample", *RUN, "--out", tmp_path / "ro" / "run", "--quiet"], "Permission denied", capsys)


def test_text2image_prompts_are_checked(capsys):
    for prompts in ([], None, ""):
        with pytest.raises(ValueError, match="prompts must be a string or a non-empty list of strings|prompt 0 is "
                                             "empty"):
            text2image.generate("digits", prompts)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "digits", "--solver", "heun", "--nfe", "1"], "the NFE (--nfe) must be a positive multiple"),
    (["sample", "--model", "digits", "--grid", "diffusers"], "--grid diffusers is not available for edm networks"),
    (["steps", "--p", "-5"], "--p is the exponent of the error weight"),
    (["steps", "--maxiter", "0"], "--maxiter must be a positive integer, got 0"),
    (["steps", "--learned", "--maxiter", "-5"], "--maxiter must be a positive integer, got -5"),
])
def test_checked_before_any_work(argv, message, tmp_path, capsys):
    if argv[0] == "sample":
        argv = [*argv, "--out", str(tmp_path / "out"), "--num", "2"]
    assert_cli_fails(argv, message, capsys, tmp_path / "out")


def test_silently_wrong_becomes_visible(tmp_path, capsys):
    """A traced grid that increases gives NaN, not a sample; a run whose samples end non-finite says so."""
    schedule = schedules.VE()
    ts = timesteps.logsnr(schedule, 4)
    x = jnp.ones((2, 3))

    @jax.jit
    def run(ts):
        return jdiffsample.sample(lambda x, t: 0.5 * x, x, ts, schedule, "unipc")

    assert np.all(np.isfinite(run(jnp.asarray(ts))))
    assert np.all(np.isnan(run(jnp.asarray(ts[::-1]))))

    model = nets.load_model("digits")
    broken = model.with_variables(jax.tree.map(lambda a: a * np.nan if a.ndim == 4 else a, model.variables))
    summary = pipeline.generate(broken, tmp_path / "nan", num=2, nfe=2, log=None)
    assert summary.nonfinite == 2
    pipeline.generate(broken, tmp_path / "nan2", num=2, nfe=2)
    assert "2 sample(s) ended with NaN or inf values" in capsys.readouterr().err


def test_a_learned_grid_is_learned_once(tmp_path, monkeypatch):
    """A resumed run reuses the grid its manifest records instead of learning it again."""
    common = dict(num=4, nfe=3, grid="learned", learn_iters=2, learn_batch=4, shard_size=2, log=None)
    pipeline.generate("digits", tmp_path / "run", **common)
    grid = pipeline.read_manifest(tmp_path / "run")["settings"]["grid_values"]
    (tmp_path / "run" / "samples_000001.npz").unlink()
    pipeline.plan.__globals__["_GRID_CACHE"].clear()

    def refuse(*args, **kwargs):
        raise AssertionError("the grid was learned again")

    monkeypatch.setattr(grids, "make", refuse)
    summary = pipeline.generate("digits", tmp_path / "run", **common)
    assert summary.generated == 2 and pipeline.read_manifest(tmp_path / "run")["settings"]["grid_values"] == grid
