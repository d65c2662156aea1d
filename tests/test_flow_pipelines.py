"""FLUX.1 and Stable Diffusion 3 through the run pipeline: the same images as diffusers' pipelines
from the same starting noise (their default flow Euler from t = 1 on the folder's grid, SD3 with
UniPC and DPM-Solver++ on flow sigmas, FLUX.1-dev's distilled guidance and true CFG), the seeds'
methods on flow models from the CLI, one compile and determinism across batch sizes, and bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from _helpers import assert_cli_fails, benchmark, randomize
from conftest import fixture_dir, require

from jdiffsample import cli, pipeline, text2image

PIXELS = 2


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    for family, name in (("flux", "flux_tiny"), ("sd3", "sd3_tiny")):
        assert cli.main(["convert", family, str(fixture_dir(name)), str(root / family)]) == 0
    return root


def _io(name):
    return dict(np.load(fixture_dir(name) / "io.npz"))


def _pixels(images01) -> np.ndarray:
    """diffusers' output_type='np' images as 8-bit levels."""
    return np.round(np.asarray(images01) * 255).astype(int)


def _common(io) -> dict:
    return dict(height=int(io["height"]), width=int(io["width"]), max_sequence_length=int(io["max_sequence_length"]))


@pytest.mark.filterwarnings("ignore:.*truncated.*")
def test_flux_images_are_the_pipelines(converted):
    """FLUX.1-dev: Euler from t = 1 on the pipeline's dynamically shifted grid, distilled guidance 3.5
    (the fixture's images), and true CFG with a negative prompt against FluxPipeline run here."""
    torch = require("torch")
    diffusers = require("diffusers")
    io = _io("flux_tiny")
    prompts, noise = [str(p) for p in io["prompts"]], io["noise_nchw"].transpose(0, 2, 3, 1)
    common = dict(solver="euler", nfe=int(io["steps"]), grid="diffusers", latents=noise, **_common(io))
    ours = text2image.generate(converted / "flux", prompts, guidance=float(io["guidance"]), **common)
    assert np.abs(ours.astype(int) - _pixels(io["images"])).max() <= PIXELS

    pipe = diffusers.FluxPipeline.from_pretrained(str(fixture_dir("flux_tiny")))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe._pack_latents(torch.from_numpy(io["noise_nchw"]), 2, 16, 16, 16)
    with torch.no_grad():
        theirs = pipe(prompt=prompts, negative_prompt=["blurry", "low quality"], true_cfg_scale=2.5, guidance_scale=2.0,
                      num_inference_steps=int(io["steps"]), latents=latents, output_type="np", **_common(io)).images
    ours = text2image.generate(converted / "flux", prompts, negative_prompts=["blurry", "low quality"], true_cfg=2.5,
                               guidance=2.0, **common)
    assert np.abs(ours.astype(int) - _pixels(theirs)).max() <= PIXELS
    assert np.abs(_pixels(theirs) - _pixels(io["images"])).max() > 10  # the guidance changed the images


def _exact_timesteps(cls):
    """diffusers' multistep scheduler ``cls``, but handing the network 1000 sigma instead of the integer
    part of it: with ``use_flow_sigmas`` its ``timesteps`` are int64 (the network sees 999 for sigma
    0.99966), which moves this tiny random network's images by up to 10 levels; the update rules,
    which these tests compare, use the exact sigmas either way."""
    torch = require("torch")

    class Exact(cls):
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(torch.float32)

    return Exact


@pytest.mark.filterwarnings("ignore:.*truncated.*")
@pytest.mark.parametrize("solver, scheduler, options", [
    ("euler", None, {}),
    ("unipc", "UniPCMultistepScheduler", dict(order=2, variant="bh2")),
    ("dpmpp", "DPMSolverMultistepScheduler", dict(order=2)),
], ids=["euler", "unipc", "dpmpp"])
def test_sd3_images_are_the_pipelines(converted, solver, scheduler, options):
    """SD3 with CFG 5.0 and negative prompts: the fixture's images (the default flow Euler from
    t = 1), and UniPC / DPM-Solver++ with flow sigmas (``use_flow_sigmas``, ``flow_prediction``) run
    through StableDiffusion3Pipeline here, on the sigmas those schedulers use."""
    io = _io("sd3_tiny")
    prompts, negative = [str(p) for p in io["prompts"]], [str(p) for p in io["negative_prompts"]]
    noise = io["noise_nchw"].transpose(0, 2, 3, 1)
    kw = dict(negative_prompts=negative, guidance=float(io["guidance"]), latents=noise, solver=solver,
              options=options, **_common(io))
    if scheduler is None:
        ours = text2image.generate(converted / "sd3", prompts, nfe=int(io["steps"]), grid="diffusers", **kw)
        assert np.abs(ours.astype(int) - _pixels(io["images"])).max() <= PIXELS
        return
    torch = require("torch")
    diffusers = require("diffusers")
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(fixture_dir("sd3_tiny")))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _exact_timesteps(getattr(diffusers, scheduler))(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=2)
    with torch.no_grad():
        theirs = pipe(prompt=prompts, negative_prompt=negative, guidance_scale=float(io["guidance"]),
                      num_inference_steps=5, latents=torch.from_numpy(io["noise_nchw"]), output_type="np",
                      **_common(io)).images
    sigmas = pipe.scheduler.sigmas.double().numpy()
    times = sigmas / (3.0 - 2.0 * sigmas)  # the sigmas as times of the folder's RectifiedFlow(shift=3)
    ours = text2image.generate(converted / "sd3", prompts, nfe=5, grid=tuple(times), **kw)
    assert np.abs(ours.astype(int) - _pixels(theirs)).max() <= PIXELS


@pytest.mark.filterwarnings("ignore:.*truncated.*")
def test_the_seeds_methods_run_on_flow_models(converted, tmp_path):
    """The optimized grid with UniPC, SA-Solver, and grids learned or found (GITS) on the model's own
    trajectories, from the CLI on SD3, with --dry-run showing what each runs."""
    base = ["sample", "--model", str(converted / "sd3"), "--prompt", "a red cat", "--negative-prompt", "blurry",
            "--guidance", "4", "--nfe", "4", "--num", "2", "--height", "16", "--width", "16", "--quiet",
            "--max-sequence-length", "8", "--learn-iters", "2", "--learn-batch", "2"]
    runs = {}
    for name, extra in (("optimized", ["--grid", "optimized"]), ("sa", ["--solver", "sa_solver"]),
                        ("learned", ["--grid", "learned"]), ("gits", ["--grid", "gits"]),
                        ("logsnr", [])):
        assert cli.main([*base, *extra, "--out", str(tmp_path / name)]) == 0, name
        runs[name] = pipeline.load_samples(tmp_path / name)[0]
        grid = pipeline.read_manifest(tmp_path / name)["settings"]["grid_values"]
        assert np.all(np.diff(grid) < 0)
    for name in ("optimized", "learned", "gits", "sa"):
        assert not np.array_equal(runs[name], runs["logsnr"]), name
    # the API with the same settings: the CLI's first image (its program, compiled once)
    images = text2image.generate(converted / "sd3", "a red cat", negative_prompts=["blurry"], guidance=4.0,
                                 grid="optimized", nfe=4, height=16, width=16, max_sequence_length=8, micro_batch=2)
    assert images.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(images[0], runs["optimized"][0])


@pytest.mark.filterwarnings("ignore:.*truncated.*")
def test_flux_cli_is_deterministic_resumable_and_compiles_once(converted, tmp_path):
    compile_seconds = benchmark("compile_once").compile_seconds
    common = dict(prompts=["a photo of the cat", "a horse"], height=32, width=32, nfe=3, grid="diffusers",
                  solver="euler", max_sequence_length=8, micro_batch=2, num=4, shard_size=2, log=None)
    first = compile_seconds(lambda: pipeline.generate(converted / "flux", tmp_path / "a", batch=2, seed=1, **common))
    second = compile_seconds(lambda: pipeline.generate(converted / "flux", tmp_path / "b", batch=2, seed=1,
                                                       guidance=2.0, **common))
    assert first > 0 and second < 0.1 * first, (first, second)
    a, b = pipeline.load_samples(tmp_path / "a")[0], pipeline.load_samples(tmp_path / "b")[0]
    assert not np.array_equal(a, b)  # another distilled guidance (an argument of the same program)
    pipeline.generate(converted / "flux", tmp_path / "c", batch=4, seed=1, **common)
    np.testing.assert_array_equal(pipeline.load_samples(tmp_path / "c")[0], a)  # batch 2 or 4: same images
    (tmp_path / "c" / "samples_000001.npz").unlink()
    summary = pipeline.generate(converted / "flux", tmp_path / "c", batch=4, seed=1, **common)
    assert summary.generated == 2 and summary.skipped == 2
    np.testing.assert_array_equal(pipeline.load_samples(tmp_path / "c")[0], a)


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    """A FLUX.1-schnell-shaped folder: the fixture with a transformer without guidance embedding."""
    diffusers = require("diffusers")
    folder = tmp_path_factory.mktemp("schnell") / "FLUX.1-schnell-tiny"
    shutil.copytree(fixture_dir("flux_tiny"), folder)
    config = diffusers.FluxTransformer2DModel.load_config(folder / "transformer")
    model = randomize(diffusers.FluxTransformer2DModel.from_config({**config, "guidance_embeds": False}), 3)
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer")
    dst = folder.parent / "ckpt"
    assert cli.main(["convert", "flux", str(folder), str(dst)]) == 0
    return dst


@pytest.mark.parametrize("case, message", [
    ("schnell_guidance", "has no guidance input (it is not guidance-distilled"),
    ("true_cfg_alone", "--true-cfg is classifier-free guidance against a negative prompt: give --negative-prompt"),
    ("negative_without_cfg", "a negative prompt acts through classifier-free guidance: give --true-cfg W"),
    ("size", "FLUX.1 needs height and width that are positive multiples of 4"),
    ("true_cfg_sd3", "--true-cfg applies to FLUX.1"),
    ("sd_sequence", "--max-sequence-length applies to text models with a T5 encoder"),
    ("slg_flux", "--slg-layers is skip-layer guidance for SD3 models; flux networks cannot skip blocks"),
    ("slg_range", "--slg-layers must name blocks in [0, 1] (this transformer has 2), got 1,2"),
    ("slg_unguided", "skip-layer guidance (--slg-layers) acts with classifier-free guidance: give --guidance W"),
    ("slg_steps", "slg_steps (--slg-steps) must be START,STOP with 0 <= START < STOP <= 1, got (0.5, 0.2)"),
    ("slg_scale_alone", "--slg-scale and --slg-steps set skip-layer guidance, which --slg-layers turns on"),
    ("slg_no_step", "--slg-steps 0.5,0.6 selects none of the 2 steps"),
])
def test_bad_input(case, message, converted, schnell, tmp_path, capsys):
    flux, sd3 = str(converted / "flux"), str(converted / "sd3")
    argv = {
        "schnell_guidance": ["--model", str(schnell), "--guidance", "3.5"],
        "true_cfg_alone": ["--model", flux, "--true-cfg", "2"],
        "negative_without_cfg": ["--model", flux, "--negative-prompt", "blurry"],
        "size": ["--model", flux, "--height", "30", "--width", "32"],
        "true_cfg_sd3": ["--model", sd3, "--true-cfg", "2", "--negative-prompt", "x"],
        "sd_sequence": ["--model", "digits", "--max-sequence-length", "8"],
        "slg_flux": ["--model", flux, "--slg-layers", "1"],
        "slg_range": ["--model", sd3, "--guidance", "4", "--slg-layers", "2,1"],
        "slg_unguided": ["--model", sd3, "--slg-layers", "1"],
        "slg_steps": ["--model", sd3, "--guidance", "4", "--slg-layers", "1", "--slg-steps", "0.5,0.2"],
        "slg_scale_alone": ["--model", sd3, "--guidance", "4", "--slg-scale", "3"],
        "slg_no_step": ["--model", sd3, "--guidance", "4", "--slg-layers", "1", "--slg-steps", "0.5,0.6",
                        "--nfe", "2", "--solver", "euler", "--height", "16", "--width", "16"],
    }[case]
    if case != "sd_sequence":
        argv = [*argv, "--prompt", "a cat"]
    assert_cli_fails(["sample", *argv, "--out", tmp_path / "out", "--num", "2"], message, capsys, tmp_path / "out")


def test_long_prompts_are_truncated_with_one_warning(converted, schnell):
    with pytest.warns(UserWarning) as caught:
        images = text2image.generate(schnell, ["a " * 40 + "cat"], nfe=2, height=16, width=16, max_sequence_length=8)
    assert images.shape == (1, 16, 16, 3)
    t5 = [w for w in caught if "T5" in str(w.message) or "max_sequence_length" in str(w.message)]
    assert len(t5) == 1, [str(w.message) for w in caught]
