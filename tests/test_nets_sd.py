"""Tests for Stable Diffusion 1.x/2.x/SDXL: the UNet (``jdiffsample.nets.sd_unet``), the CLIP text
encoders (``nets.clip``), the tokenizer (``jdiffsample.tokenizer``) and the ``sd`` family (``nets.sd``:
conversion of a whole pipeline folder, schedule, conditioning, denoiser).

References: the ``sd_tiny`` and ``sdxl_tiny`` golden fixtures (diffusers pipeline folders with
random weights and the original outputs), and the installed diffusers and transformers (test-only)
on more configurations, every parameter redrawn so that nothing is zero. Tolerance: max
|ours - theirs| <= 1e-5 max |theirs| (float32, full precision).
"""

from __future__ import annotations

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, require
from _helpers import numpy_state_dict, randomize, rel_err

from jdiffsample import cli, nets, skip_tuning
from jdiffsample.nets import clip, sd, sd_unet
from jdiffsample.tokenizer import CLIPTokenizer

RTOL = 1e-5
FIXTURES = ("sd_tiny", "sdxl_tiny")
ENCODERS = {"sd_tiny": ("text_encoder",), "sdxl_tiny": ("text_encoder", "text_encoder_2")}


def nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


def highest(fn, *args, **kwargs):
    with jax.default_matmul_precision("highest"):
        return jax.tree.map(np.asarray, fn(*args, **kwargs))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{fixture name: (folder, io, module, variables, checkpoint dir)}, converted with the CLI and loaded."""
    out = {}
    for name in FIXTURES:
        folder = fixture_dir(name)
        dst = tmp_path_factory.mktemp("sd") / name
        assert cli.main(["convert", "sd", str(folder), str(dst)]) == 0
        module, variables = nets.load(dst)
        out[name] = (folder, np.load(folder / "io.npz"), module, variables, dst)
    return out


def _added(io):
    return dict(text_embeds=io["text1_text_embeds"], time_ids=io["time_ids"]) if "time_ids" in io else None


def _forward(module, io, parts):
    """One jitted program for a fixture: every text encoder's outputs, the conditioning (with and
    without clip_skip=1) and the UNet's output on the fixture's inputs; ``fn(variables) -> dict``."""
    ids = [io["input_ids"]] * len(parts)

    def run(variables):
        def everything(m):
            out = dict(cond=m.encode_text(*ids), unet=m(nhwc(io["latents"]), io["timesteps"], io["context"], _added(io)))
            if m.unet.dtype == jnp.float32:
                out.update(text=[getattr(m, p)(io["input_ids"]) for p in parts], cond_skip=m.encode_text(*ids, clip_skip=1))
            return out
        return module.apply(variables, method=everything)

    fn = jax.jit(run)
    # NumPy leaves throughout, so that other variables (Skip-Tuning's NumPy scales) reuse the compilation
    return lambda variables: highest(fn, jax.tree.map(np.asarray, variables))


@pytest.fixture(scope="module")
def outputs(converted):
    """{fixture name: (forward function, its outputs with the converted variables)}."""
    out = {}
    for name in FIXTURES:
        _, io, module, variables, _ = converted[name]
        fn = _forward(module, io, ENCODERS[name])
        out[name] = (fn, fn(variables))
    return out


# ---------------------------------------------------------------------------------------------
# The golden fixtures, through the converted checkpoint


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_token_ids(converted, name):
    folder, io, _, _, dst = converted[name]
    prompts = [str(p) for p in io["prompts"]]
    for tok in [CLIPTokenizer.from_folder(folder / "tokenizer")] + sd.load_tokenizers(dst):
        ids = tok(prompts)
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, io["input_ids"])


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_text_encoders(converted, outputs, name):
    _, io, module, _, _ = converted[name]
    for i, (part, out) in enumerate(zip(ENCODERS[name], outputs[name][1]["text"])):
        assert len(out["hidden_states"]) == getattr(module, part).num_hidden_layers + 1
        assert rel_err(out["last_hidden_state"], io[f"text{i}_last_hidden_state"]) <= RTOL
        assert rel_err(out["hidden_states"][-2], io[f"text{i}_penultimate_hidden_state"]) <= RTOL
        if f"text{i}_text_embeds" in io:
            assert rel_err(out["text_embeds"], io[f"text{i}_text_embeds"]) <= RTOL
        else:
            assert "text_embeds" not in out


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_conditioning_and_unet(converted, outputs, name):
    _, io, _, _, _ = converted[name]
    out = outputs[name][1]
    assert rel_err(out["cond"]["context"], io["context"]) <= RTOL
    if name == "sdxl_tiny":
        assert rel_err(out["cond"]["text_embeds"], io["text1_text_embeds"]) <= RTOL
        np.testing.assert_array_equal(sd.time_ids(2, (64, 64)), io["time_ids"])
    assert out["unet"].dtype == np.float32
    assert rel_err(out["unet"], nhwc(io["unet_output"])) <= RTOL


def test_checkpoint_records_the_pipeline(converted):
    _, _, module, variables, dst = converted["sdxl_tiny"]
    config = nets.read_config(dst)
    assert config["family"] == "sd" and config["class_name"] == "StableDiffusionXLPipeline"
    assert set(config["kwargs"]) == {"unet", "vae", "text_encoder", "text_encoder_2", "prediction_type"}
    assert config["kwargs"]["text_encoder_2"]["_class_name"] == "CLIPTextModelWithProjection"
    assert config["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    assert config["scheduler"]["beta_schedule"] == "scaled_linear" and config["schedule"]["type"] == "VPDiscrete"
    assert sorted(config["tokenizers"]) == ["tokenizer", "tokenizer_2"]
    assert (dst / "tokenizer_2" / "vocab.json").is_file()
    assert set(variables["params"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    names = [n for n, _ in skip_tuning.scales(variables)]
    assert names == [f"unet/{n}" for n in module.unet.skip_names] and len(names) == 4
    # init creates exactly the converted tree (random_variables / example_inputs work)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *sd.example_inputs(module))
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, dict(variables))
    model = nets.load_model(dst)
    assert model.sample_shape == (8, 8, 4) and model.num_classes == 0 and nets.get_family("sd").sampling.skip_tuning


def test_skip_tuning_scales_change_the_output(converted, outputs):
    variables = converted["sd_tiny"][3]
    fn, base = outputs["sd_tiny"]
    np.testing.assert_array_equal(fn(skip_tuning.apply(variables, 1.0, 1.0))["unet"], base["unet"])
    assert rel_err(fn(skip_tuning.apply(variables, 1.0, 0.7))["unet"], base["unet"]) > 1e-3


def test_bfloat16_close_to_float32(converted):
    _, io, _, variables, dst = converted["sdxl_tiny"]
    config = nets.read_config(dst)
    module = sd.build(config["class_name"], config["kwargs"], dtype=jnp.bfloat16)
    assert module.unet.dtype == module.text_encoder_2.dtype == module.vae.dtype == jnp.bfloat16
    out = _forward(module, io, ENCODERS["sdxl_tiny"])(variables)
    assert out["unet"].dtype == out["cond"]["context"].dtype == np.float32
    assert 0 < rel_err(out["unet"], nhwc(io["unet_output"])) < 3e-2
    assert 0 < rel_err(out["cond"]["context"], io["context"]) < 3e-2


# ---------------------------------------------------------------------------------------------
# diffusers' pipelines and schedulers: conditioning, time ids, denoiser, schedule


@pytest.mark.parametrize("name", FIXTURES)
def test_encode_text_matches_diffusers_pipeline(converted, outputs, name):
    torch = require("torch")
    diffusers = require("diffusers")
    folder, io, module, _, _ = converted[name]
    out = outputs[name][1]
    prompts = [str(p) for p in io["prompts"]]
    if name == "sd_tiny":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
        theirs = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        assert rel_err(out["cond"]["context"], theirs[0].detach().numpy()) <= RTOL
        # diffusers' clip_skip (final LayerNorm of an earlier state) reaches for the text_model attribute that
        # transformers 5's CLIPTextModel no longer has: the same formula, from transformers' outputs
        encoder = pipe.text_encoder
        with torch.no_grad():
            states = encoder(torch.from_numpy(io["input_ids"]), output_hidden_states=True).hidden_states
            skipped = encoder.final_layer_norm(states[-2]).numpy()
        assert rel_err(out["cond_skip"]["context"], skipped) <= RTOL
        return
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    for clip_skip, cond in ((None, out["cond"]), (1, out["cond_skip"])):
        theirs = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                    clip_skip=clip_skip)
        assert rel_err(cond["context"], theirs[0].detach().numpy()) <= RTOL
        assert rel_err(cond["text_embeds"], theirs[2].detach().numpy()) <= RTOL
    add = pipe._get_add_time_ids((48, 40), (2, 4), (64, 56), dtype=None,
                                 text_encoder_projection_dim=module.text_encoder_2.projection_dim)
    np.testing.assert_array_equal(sd.time_ids(1, (64, 56), (48, 40), (2, 4)), add.numpy())


class _Recorder:
    """A stand-in network for the denoiser tests: returns ``output``, records the timesteps it is given."""

    def __init__(self, output, unet=None, prediction_type="epsilon"):
        self.output, self.unet, self.prediction_type, self.calls = output, unet, prediction_type, []

    def apply(self, variables, x, steps, context, added=None):
        self.calls.append((np.asarray(steps), context, added))
        return jnp.asarray(self.output)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unet_denoise_matches_ddim_prediction(converted, prediction_type):
    torch = require("torch")
    diffusers = require("diffusers")
    folder, io, _, _, dst = converted["sd_tiny"]
    schedule = sd.schedule(nets.read_config(dst)["scheduler"])
    ddim = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler", prediction_type=prediction_type)
    ddim.set_timesteps(10)
    net = _Recorder(nhwc(io["unet_output"]))
    for n in (999, 250, 3):
        t = (n + 1) / schedule.num_steps  # the continuous time of training step n
        ours = sd.unet_denoise(net, None, jnp.asarray(nhwc(io["latents"])), jnp.float32(t), io["context"], None,
                               schedule, prediction_type)
        np.testing.assert_allclose(net.calls[-1][0], [n, n], atol=1e-3)
        theirs = ddim.step(torch.from_numpy(io["unet_output"]), n, torch.from_numpy(io["latents"]))
        assert rel_err(ours, nhwc(theirs.pred_original_sample.numpy())) <= 1e-5


def test_family_denoise_takes_the_conditioning_dict(converted):
    _, io, module, _, dst = converted["sdxl_tiny"]
    fam = nets.get_family("sd").sampling
    schedule = nets.load_model(dst).schedule
    net = _Recorder(nhwc(io["unet_output"]), unet=module.unet)
    cond = dict(context=io["context"], text_embeds=io["text1_text_embeds"], time_ids=io["time_ids"])
    x = jnp.asarray(nhwc(io["latents"]))
    ours = fam.denoise(net, {}, x, 0.5, None, schedule, **cond)
    _, context, added = net.calls[-1]
    assert context is cond["context"] and added == dict(text_embeds=cond["text_embeds"], time_ids=cond["time_ids"])
    np.testing.assert_array_equal(ours, sd.unet_denoise(net, {}, x, 0.5, context, added, schedule, "epsilon"))
    assert fam.conditioning(module) == ("context", "text_embeds", "time_ids")


@pytest.mark.parametrize("config", [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=500),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
], ids=["scaled_linear", "linear", "cosine", "zero_snr"])
def test_schedule_matches_diffusers(config):
    """Our float64 alpha_bar against diffusers' float32 one (whose rounding reaches 4e-5 at the tiny
    end of the zero-SNR schedule)."""
    require("torch")
    diffusers = require("diffusers")
    theirs = diffusers.EulerDiscreteScheduler(**config).alphas_cumprod.numpy()
    schedule = sd.schedule(config)
    np.testing.assert_allclose(schedule.alphas_cumprod, theirs, rtol=1e-4)
    assert schedule.num_steps == config.get("num_train_timesteps", 1000)


# ---------------------------------------------------------------------------------------------
# The tokenizer against transformers' CLIPTokenizer on several folder layouts

AWKWARD = ["a photo of the cat", "", "  The   RED\tdog\n", "Hello!! <|STARTOFTEXT|> x",
           "café naïve Ünïcödé ß 東京 😀", "it's 42 cats, 3.14159 - \"quoted\" (paren) [x] #tag @me",
           "<|endoftext|>hi<|startoftext|>", "don't we'll I'M", "x!y ! z!!", "a" * 40,
           "the red dog and a cat in the photo the red dog and a cat"]
_AT = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _tokenizer_folders(base, tmp):
    """The fixture folder, an SD 2.x-style one (pad '!', AddedToken dicts, special_tokens_map.json), one
    with tokenizer_config's added_tokens_decoder, and one holding only tokenizer.json (as transformers saves)."""
    sd2, decoder, saved = tmp / "sd2", tmp / "decoder", tmp / "saved"
    for folder in (sd2, decoder):
        folder.mkdir()
        for f in ("vocab.json", "merges.txt"):
            shutil.copyfile(base / f, folder / f)
    names = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    special = {k: dict(_AT, content=v) for k, v in names.items()}
    (sd2 / "tokenizer_config.json").write_text(json.dumps(dict(special, pad_token="!", model_max_length=16,
                                                               tokenizer_class="CLIPTokenizer")))
    (sd2 / "special_tokens_map.json").write_text(json.dumps(dict(special, pad_token="!")))
    vocab = json.loads((base / "vocab.json").read_text())
    entries = {str(vocab[t]): dict(_AT, content=t, special=True) for t in ("<|startoftext|>", "<|endoftext|>")}
    for entry in entries.values():
        entry.pop("__type")
    (decoder / "tokenizer_config.json").write_text(json.dumps(dict(
        names, pad_token="<|endoftext|>", added_tokens_decoder=entries, model_max_length=16)))
    transformers = require("transformers")
    transformers.CLIPTokenizer.from_pretrained(sd2).save_pretrained(saved)
    assert not (saved / "vocab.json").exists() and (saved / "tokenizer.json").is_file()
    return [base, sd2, decoder, saved]


def test_tokenizer_matches_transformers(tmp_path):
    transformers = require("transformers")
    for folder in _tokenizer_folders(fixture_dir("sd_tiny") / "tokenizer", tmp_path):
        theirs = transformers.CLIPTokenizer.from_pretrained(folder)
        ours = CLIPTokenizer.from_folder(folder)
        assert (ours.model_max_length, ours.pad_token_id) == (theirs.model_max_length, theirs.pad_token_id)
        expected = theirs(AWKWARD, padding="max_length", max_length=theirs.model_max_length, truncation=True).input_ids
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = ours(AWKWARD)
        assert ids.tolist() == expected, folder.name
        # diffusers' truncation warning names the removed part as transformers decodes it
        long = [p for p in AWKWARD if len(theirs(p).input_ids) > theirs.model_max_length]
        assert len(long) >= 3 and len(caught) == len(long)
        for prompt, warning in zip(long, caught):
            removed = theirs.batch_decode([theirs(prompt).input_ids[theirs.model_max_length - 1:-1]])[0]
            assert "truncated" in str(warning.message) and repr(removed) in str(warning.message)
    assert CLIPTokenizer.from_folder(tmp_path / "sd2").pad_token == "!"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer files"):
        CLIPTokenizer.from_folder(tmp_path)
    folder = fixture_dir("sd_tiny") / "tokenizer"
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(folder / f, tmp_path / f)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# diffusers' UNet2DConditionModel and transformers' CLIP text models on more configurations

UNET_CONFIGS = {
    # SD 2.x style: linear projections, a head count per block, upcast attention; also the sin-cos order
    # and frequency shift changed, no mid block, odd conv kernels, unpadded downsampling, a wider time
    # embedding, centred input and an odd latent size (upsampling to the skip's size).
    "sd2_linear_heads": (dict(
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[16, 32],
        layers_per_block=1, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
        cross_attention_dim=24, norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1, mid_block_type=None,
        conv_in_kernel=5, conv_out_kernel=1, downsample_padding=0, time_embedding_dim=40, center_input_sample=True,
        in_channels=3, out_channels=5, sample_size=8), (7, 5)),
    # SDXL style: no attention in the first block, transformer depths per layer (and reversed explicitly),
    # text_time added conditioning, scale-shift ResNets, layers per block as a list, a mid-block scale.
    "sdxl_nested_depths": (dict(
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[16, 32], layers_per_block=[2, 1], attention_head_dim=[2, 4],
        transformer_layers_per_block=[[1, 1], [2]], reverse_transformer_layers_per_block=[[1, 2], [1, 1, 1]],
        use_linear_projection=True, cross_attention_dim=24, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 24, resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=0.7, norm_num_groups=8, sample_size=8), (8, 8)),
}


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def diffusers_unet(request, tmp_path_factory):
    """(diffusers model, config, inputs, module, variables, ours) for one configuration, saved as a
    folder and read back; ``ours(variables)`` is our jitted output on the inputs."""
    torch = require("torch")
    diffusers = require("diffusers")
    cfg, (height, width) = UNET_CONFIGS[request.param]
    model = randomize(diffusers.UNet2DConditionModel(**cfg), seed=len(request.param))
    folder = tmp_path_factory.mktemp("unet")
    model.save_pretrained(folder)
    config, state_dict = sd_unet.load_folder(folder)
    module = sd_unet.build("UNet2DConditionModel", config)
    variables = sd_unet.convert_state_dict("UNet2DConditionModel", config, state_dict)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.get("in_channels", 4), height, width, generator=gen)
    inputs = dict(sample=x, timestep=torch.tensor([981.0, 17.5]),
                  encoder_hidden_states=torch.randn(2, 5, cfg["cross_attention_dim"], generator=gen))
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(2, 12, generator=gen),
                                           time_ids=torch.tensor([[64.0, 48, 0, 8, 64, 64]] * 2))
        added = {k: v.numpy() for k, v in inputs["added_cond_kwargs"].items()}
    args = (nhwc(x), inputs["timestep"].numpy(), inputs["encoder_hidden_states"].numpy(), added)
    fn = jax.jit(lambda v: module.apply(v, *args))
    return model, cfg, inputs, module, variables, lambda v: highest(fn, v)


def test_unet_matches_diffusers(diffusers_unet):
    torch = require("torch")
    model, cfg, inputs, module, variables, ours = diffusers_unet
    with torch.no_grad():
        theirs = model(**inputs).sample.numpy()
    assert rel_err(ours(variables), nhwc(theirs)) <= RTOL
    layers = cfg["layers_per_block"]
    layers = layers if isinstance(layers, list) else [layers] * len(cfg["block_out_channels"])
    assert len(variables["skip"]) == sum(n + 1 for n in layers) == len(module.skip_names)


def test_skip_scales_scale_the_concatenated_skips(diffusers_unet):
    """Skip j scaled by rho_j in ours == diffusers with the skip part of the j-th consuming ResNet's
    input multiplied by rho_j (hooks), so the scales sit where the skips enter, deepest first."""
    torch = require("torch")
    model, cfg, inputs, _, variables, ours = diffusers_unet
    tuned = skip_tuning.apply(variables, rho_top=1.1, rho_bottom=0.4)
    rhos = [float(v) for _, v in skip_tuning.scales(tuned)]
    channels = list(reversed(cfg["block_out_channels"]))
    hooks, j = [], 0
    for i, block in enumerate(model.up_blocks):
        n = len(block.resnets)
        for k, resnet in enumerate(block.resnets):
            skip_channels = channels[min(i + 1, len(channels) - 1)] if k == n - 1 else channels[i]

            def scale(mod, args, rho=rhos[j], c=skip_channels):
                x = args[0].clone()
                x[:, -c:] *= rho
                return (x, *args[1:])
            hooks.append(resnet.register_forward_pre_hook(scale))
            j += 1
    try:
        with torch.no_grad():
            theirs = model(**inputs).sample.numpy()
    finally:
        for h in hooks:
            h.remove()
    assert rel_err(ours(tuned), nhwc(theirs)) <= RTOL


CLIP_CONFIGS = {
    # SD 2.x / OpenCLIP style: exact GELU, the legacy eos_token_id=2 (pooled at the largest id).
    "gelu_legacy_eos": ("CLIPTextModel", dict(hidden_act="gelu", eos_token_id=2, num_hidden_layers=3)),
    # SDXL's second encoder: projection, quick GELU, the eos_token_id rule.
    "projection": ("CLIPTextModelWithProjection", dict(hidden_act="quick_gelu", eos_token_id=40,
                                                       projection_dim=20, num_hidden_layers=2)),
}


@pytest.mark.parametrize("name", sorted(CLIP_CONFIGS))
def test_text_encoder_matches_transformers(name):
    torch = require("torch")
    transformers = require("transformers")
    class_name, extra = CLIP_CONFIGS[name]
    config = transformers.CLIPTextConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_attention_heads=4,
                                         max_position_embeddings=12, bos_token_id=38, pad_token_id=40, **extra)
    model = randomize(getattr(transformers, class_name)(config), seed=3)
    ids = np.array([[38, 5, 17, 40, 40, 40, 40, 40, 40, 40], [38, 1, 2, 3, 4, 5, 6, 7, 8, 40],
                    [38, 40, 40, 40, 40, 40, 40, 40, 40, 40]])
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids), output_hidden_states=True)
    state_dict = numpy_state_dict(model)
    if name == "gelu_legacy_eos":  # as old checkpoints have it
        state_dict["text_model.embeddings.position_ids"] = np.arange(12)[None]
    kwargs = config.to_dict()
    module = clip.build(class_name, kwargs)
    out = highest(jax.jit(module.apply), clip.convert_state_dict(class_name, kwargs, state_dict), ids)
    assert rel_err(out["last_hidden_state"], theirs.last_hidden_state.numpy()) <= RTOL
    assert len(out["hidden_states"]) == len(theirs.hidden_states) == config.num_hidden_layers + 1
    for ours, reference in zip(out["hidden_states"], theirs.hidden_states):
        assert rel_err(ours, reference.numpy()) <= RTOL
    if class_name == "CLIPTextModel":
        assert rel_err(out["pooler_output"], theirs.pooler_output.numpy()) <= RTOL
    else:
        assert rel_err(out["text_embeds"], theirs.text_embeds.numpy()) <= RTOL


# ---------------------------------------------------------------------------------------------
# Errors: strict matching, unsupported configs, bad folders


def test_state_dict_errors_are_one_line():
    folder = fixture_dir("sd_tiny")
    config, state_dict = sd_unet.load_folder(folder / "unet")
    bad = dict(state_dict)
    bad.pop("conv_in.weight")
    bad["extra.weight"] = np.zeros(1)
    bad["conv_out.bias"] = np.zeros(3)
    with pytest.raises(ValueError) as err:
        sd_unet.convert_state_dict("UNet2DConditionModel", config, bad)
    message = str(err.value)
    assert "\n" not in message and "conv_in.weight" in message and "extra.weight" in message
    assert "conv_out.bias (3,) != (4,)" in message
    cls, config, state_dict = clip.load_folder(folder / "text_encoder")
    bad = {k: v for k, v in state_dict.items() if "final_layer_norm.bias" not in k}
    bad["text_model.embeddings.position_ids"] = np.arange(16)[None] + 1
    with pytest.raises(ValueError) as err:
        clip.convert_state_dict(cls, config, bad)
    assert "\n" not in str(err.value) and "final_layer_norm.bias" in str(err.value)
    assert "position_ids" in str(err.value)


@pytest.mark.parametrize("change, key", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(down_block_types=["AttnDownBlock2D", "DownBlock2D"]), "down_block_types"),
    (dict(num_attention_heads=4), "num_attention_heads"),
    (dict(addition_embed_type="text"), "addition_embed_type"),
    (dict(only_cross_attention=True), "only_cross_attention"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(cross_attention_dim=[32, 16]), "cross_attention_dim"),
    (dict(brand_new_option=1), "brand_new_option"),
])
def test_unsupported_unet_config(change, key):
    config = json.loads((fixture_dir("sd_tiny") / "unet" / "config.json").read_text())
    with pytest.raises(ValueError, match=key) as err:
        sd_unet.build("UNet2DConditionModel", {**config, **change})
    assert "\n" not in str(err.value)


def test_unsupported_text_encoder_config():
    with pytest.raises(ValueError, match="hidden_act"):
        clip.build("CLIPTextModel", dict(model_type="clip_text_model", hidden_act="relu"))
    with pytest.raises(ValueError, match="model_type"):
        clip.build("CLIPTextModel", dict(model_type="t5"))
    with pytest.raises(ValueError, match="model_type"):
        clip.build("CLIPTextModel", dict(hidden_act="gelu"))  # not a transformers config
    with pytest.raises(ValueError, match="CLIPVisionModel"):
        clip.build("CLIPVisionModel", {})


def _copy(src, dst, skip=()):
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip])
    return dst


def test_convert_refuses_bad_folders(tmp_path, capsys):
    base = fixture_dir("sdxl_tiny")
    dst = tmp_path / "out"
    no_index = _copy(base, tmp_path / "a", skip=("model_index.json", "unet", "vae", "text_encoder_2", "io.npz"))
    no_encoder = _copy(base, tmp_path / "b", skip=("text_encoder_2", "io.npz"))
    index = json.loads((base / "model_index.json").read_text())
    null_part = _copy(base, tmp_path / "c", skip=("io.npz",))
    (null_part / "model_index.json").write_text(json.dumps(dict(index, tokenizer_2=[None, None])))
    other = _copy(base, tmp_path / "d", skip=("io.npz",))
    (other / "model_index.json").write_text(json.dumps(dict(index, _class_name="FluxPipeline")))
    mixed = _copy(base, tmp_path / "e", skip=("io.npz", "text_encoder"))
    shutil.copytree(fixture_dir("sd_tiny") / "unet", mixed / "text_encoder")
    cases = [(no_index, "no model_index.json"), (no_encoder, "text_encoder_2/ folder is missing"),
             (null_part, "lists no tokenizer_2"), (other, "FluxPipeline"), (mixed, "model_type")]
    for src, expected in cases:
        with pytest.raises(ValueError, match=expected):
            sd.convert(src, dst)
        assert not dst.exists()
        assert cli.main(["convert", "sd", str(src), str(dst)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("jdiffsample convert sd: error:"), err
        assert not dst.exists() and list(tmp_path.glob(".out*")) == []
