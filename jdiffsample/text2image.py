"""Text to image in a notebook: prompts in, uint8 images out, with any solver and grid.

::

    from jdiffsample import text2image
    images = text2image.generate("ckpt/sd15", ["a photo of a cat"], guidance=7.5, solver="unipc", nfe=20)

``generate`` samples through :class:`jdiffsample.pipeline.Sampler` (each sample's noise from its
index and the seed, as ``jdiffsample sample`` does), or, given ``latents``, from those starting
latents with the same denoiser: then the result can be compared with another implementation
started from the same latents (diffusers' pipelines take ``latents=``). Image-to-image starts from
an image encoded by the VAE and noised to the time ``t(strength)``, and solves from there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["generate"]


def generate(model_dir, prompts: str | Sequence[str], *, negative_prompts=None, guidance: float | None = 7.5,
             guidance_rescale: float | None = None, solver: str = "unipc", nfe: int = 20, grid="logsnr",
             options: dict | None = None, latents=None, seed: int = 0, height: int | None = None,
             width: int | None = None, image=None, strength: float = 0.8, batch: int = 8,
             dtype: str = "float32", return_latents: bool = False) -> np.ndarray:
    """uint8 NHWC images, one per prompt (``prompts`` cycled to the number of ``latents`` when given).

    Args:
      model_dir: a converted Stable Diffusion checkpoint (``jdiffsample convert sd``).
      prompts, negative_prompts: a string or a list; sample i uses entry i mod len.
      guidance: classifier-free guidance weight (None: the conditional model alone).
      guidance_rescale: Lin et al.'s rescale phi (diffusers' ``guidance_rescale``).
      solver, nfe, grid, options: as for ``jdiffsample sample``; ``grid`` may be ``"diffusers"``
        (the timesteps the folder's diffusers scheduler would use) or explicit times.
      latents: optional starting noise, NHWC, unit variance (diffusers' ``latents``); default:
        drawn per sample index from ``seed``.
      height, width: image size in pixels (multiples of 8; default: the UNet's sample size).
      image, strength: image-to-image: uint8 ``[B, H, W, 3]`` (or one image) encoded (the VAE's
        posterior mean), noised to the grid time that leaves ``int(N strength)`` of the N steps, then
        solved with those steps, as diffusers' img2img pipelines do (``latents`` then is the noise
        added to it).
      batch: samples per compiled call (Sampler path).
      return_latents: return the final latents (float32 NHWC) instead of decoded images.
    """
    import jax
    import jax.numpy as jnp

    from jdiffsample import nets, pipeline, xla_options
    from jdiffsample.pipeline import settings as st
    from jdiffsample.solvers import registry

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    common = dict(solver=solver, nfe=nfe, options=options, guidance=guidance, guidance_rescale=guidance_rescale,
                  prompts=prompts, negative_prompts=negative_prompts, height=height, width=width, dtype=dtype)
    if latents is None and image is None:
        sampler = pipeline.Sampler(model_dir, grid=grid, seed=seed, batch=batch,
                                   micro_batch=min(batch, len(prompts)), latents_only=return_latents, **common)
        return sampler(np.arange(len(prompts)))[0]

    model = nets.load_model(model_dir, dtype=dtype)
    fam, info = model.family_info, registry.get(solver)
    if fam.encode_prompts is None:
        raise ValueError(f"{model_dir} is a {model.family} network, not a text-to-image model")
    shape, pixels = st.sample_shape(model, height, width)
    n_steps, final_zero = info.steps_for_nfe(nfe, zero_end=model.schedule.zero_end)
    _, ts = st.make_grid(grid, model.schedule, n_steps, final_zero, info, dict(options or {}), model)
    count = len(prompts) if latents is None else len(latents)
    noise = (jax.random.normal(jax.random.key(seed), (count, *shape)) if latents is None
             else jnp.asarray(latents, jnp.float32))
    if noise.shape[1:] != tuple(shape):
        raise ValueError(f"latents must be [B, {', '.join(map(str, shape))}] for {pixels[0]} x {pixels[1]} images, "
                         f"got {tuple(noise.shape)}")
    index = np.arange(count)
    cond = fam.encode_prompts(model, nets.resolve(model_dir), prompts, *pixels)
    rows = lambda table: {k: v[index % v.shape[0]] for k, v in table.items()}  # noqa: E731
    uncond = None
    if guidance is not None:
        uncond = rows(fam.encode_prompts(model, nets.resolve(model_dir), negative_prompts, *pixels))
    denoise = model.denoiser(conditioning=rows(cond), uncond_conditioning=uncond, guidance=guidance,
                             guidance_rescale=guidance_rescale)
    x = noise * model.schedule.prior_std(ts[0])
    if image is not None:
        ts, x = _from_image(model, image, strength, ts, noise)
    xla = xla_options.compile_options()
    x = jax.jit(lambda d, x, ts, key: info.fn(d, x, ts, model.schedule, key=key, **info.resolve(options)),
                compiler_options=xla)(
        denoise, x, jnp.asarray(ts, jnp.float32), jax.random.split(jax.random.key(seed), count))
    if return_latents:
        return np.asarray(x)
    decode = jax.jit(lambda m, z: pipeline.program.quantize(m.apply(z, method="decode")), compiler_options=xla)
    return np.asarray(decode(model, x))


def _from_image(model, image, strength: float, ts, noise):
    """Image-to-image: the latents of ``image`` noised to the grid time at ``strength``, and the rest
    of the grid."""
    import jax.numpy as jnp

    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    image = np.asarray(image)
    image = image[None] if image.ndim == 3 else image
    if image.dtype != np.uint8 or image.ndim != 4:
        raise ValueError(f"image must be uint8 [H, W, 3] or [B, H, W, 3], got {image.dtype} {image.shape}")
    steps = len(ts) - 1
    start = steps - max(min(int(steps * strength), steps), 1)  # diffusers' img2img: int(N strength) steps
    ts = np.asarray(ts)[start:]
    latents = model.apply(jnp.asarray(image, jnp.float32) / 127.5 - 1.0, method="encode")
    if latents.shape[1:] != noise.shape[1:]:
        raise ValueError(f"the image gives latents {tuple(latents.shape[1:])}, the noise is {tuple(noise.shape[1:])}")
    latents = jnp.broadcast_to(latents, noise.shape)
    t = jnp.float32(ts[0])
    return ts, model.schedule.alpha(t) * latents + model.schedule.sigma(t) * noise
