"""``timesteps.flow_match``: the grids of diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux),
bit for bit, from the scheduler configs of the golden fixtures and variants of them, at several step
counts and image sizes; and once through ``FluxPipeline`` itself (its own base sigmas and its
``calculate_shift`` of the image's token count)."""

import itertools
import json

import numpy as np
import pytest
from conftest import fixture_dir, require

from jdiffsample import schedules, timesteps

VARIANTS = [{}, {"shift": 1.7}, {"shift": 3.16}, {"shift_terminal": 0.1}, {"use_karras_sigmas": True},
            {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}, {"time_shift_type": "linear"}]
STEPS = [1, 2, 9, 28]
TOKENS = [16, 256, 4096]  # image tokens: from below the configs' base to above their maximum


def _config(name):
    return json.loads((fixture_dir(name) / "scheduler" / "scheduler_config.json").read_text())


def _calculate_shift(seq, config):
    """diffusers' own ``calculate_shift`` (FluxPipeline's; SD3's is a copy with another default)."""
    require("transformers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(seq, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                           config["max_shift"])


@pytest.mark.parametrize("name", ["flux_tiny", "sd3_tiny"])
def test_sigmas_equal_the_schedulers(name):
    """Static shift (SD3's 3.0, and shifts that float32 does not hold), dynamic shift from the token
    count (exponential and linear), shift_terminal, karras / exponential / beta respacing; the
    scheduler's own base sigmas (what StableDiffusion3Pipeline uses) and FluxPipeline's."""
    diffusers = require("diffusers")
    base = _config(name)
    for variant, n in itertools.product(VARIANTS + [{"use_dynamic_shifting": not base["use_dynamic_shifting"]}],
                                        STEPS):
        config = {**base, **variant}
        if config.get("shift_terminal") and n < 2:
            with pytest.raises(ValueError, match="shift_terminal needs at least 2 steps"):
                timesteps.flow_match_sigmas(config, n, image_seq_len=16)
            continue
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        dynamic = config["use_dynamic_shifting"]
        for pipeline, seq in itertools.product(["flux", "sd3"], TOKENS if dynamic else TOKENS[:1]):
            mu = dict(mu=_calculate_shift(seq, config)) if dynamic else {}
            if pipeline == "flux":
                scheduler.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), **mu)
            else:
                scheduler.set_timesteps(n, **mu)
            ours = timesteps.flow_match_sigmas(config, n, image_seq_len=seq, pipeline=pipeline)
            assert np.array_equal(ours, scheduler.sigmas.numpy().astype(np.float64)), (variant, n, seq, pipeline)


@pytest.mark.parametrize("name,shift", [("flux_tiny", 1.0), ("sd3_tiny", 3.0)])
def test_times_on_a_rectified_flow(name, shift):
    """The times are the schedule's at those sigmas (its own shift only reparametrizes t): from t = 1
    exactly, strictly decreasing, to 0."""
    config = _config(name)
    sch = schedules.RectifiedFlow(shift=shift)
    ts = timesteps.flow_match(sch, 28, config, image_seq_len=1024)
    sigmas = timesteps.flow_match_sigmas(config, 28, image_seq_len=1024)
    with schedules.float64():
        np.testing.assert_allclose(np.asarray(sch.sigma(ts)), sigmas, rtol=1e-15, atol=0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and np.all(np.diff(ts) < 0) and len(ts) == 29


def test_bad_configs():
    flux, sd3 = _config("flux_tiny"), _config("sd3_tiny")
    with pytest.raises(ValueError, match="pass image_seq_len"):
        timesteps.flow_match_sigmas(flux, 4)
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        timesteps.flow_match_sigmas({**sd3, "invert_sigmas": True}, 4)
    with pytest.raises(ValueError, match="pipeline must be one of"):
        timesteps.flow_match_sigmas(sd3, 4, pipeline="wan")
    with pytest.raises(ValueError, match="needs a flow schedule"):
        timesteps.flow_match(schedules.VE(), 4, sd3)
    # mu given directly, as set_timesteps takes it
    scheduler = require("diffusers").FlowMatchEulerDiscreteScheduler.from_config(flux)
    scheduler.set_timesteps(4, sigmas=np.linspace(1.0, 0.25, 4), mu=0.8)
    assert np.array_equal(timesteps.flow_match_sigmas(flux, 4, mu=0.8), scheduler.sigmas.numpy().astype(np.float64))


def test_flux_pipeline_runs_on_these_sigmas():
    """FluxPipeline on the tiny fixture at two image sizes: the sigmas it steps through are
    ``flow_match_sigmas`` of its scheduler config with image_seq_len = its packed latent tokens
    ((h / 2) (w / 2) of the latent)."""
    require("transformers")
    torch = require("torch")
    diffusers = require("diffusers")
    folder = fixture_dir("flux_tiny")
    io = np.load(folder / "io.npz")
    pipe = diffusers.FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for n, size in [(3, int(io["height"])), (5, 2 * int(io["height"]))]:
        seen = []

        def record(p, i, t, kwargs):
            seen.append(p.scheduler.sigmas.numpy().astype(np.float64))
            return kwargs

        pipe(height=size, width=size, num_inference_steps=n, output_type="latent", callback_on_step_end=record,
             prompt_embeds=torch.from_numpy(io["t5_prompt_embeds"][:1]),
             pooled_prompt_embeds=torch.from_numpy(io["pooled_prompt_embeds"][:1]))
        tokens = (size // pipe.vae_scale_factor // 2) ** 2
        assert np.array_equal(seen[0], timesteps.flow_match_sigmas(dict(pipe.scheduler.config), n,
                                                                   image_seq_len=tokens)), (n, size)
