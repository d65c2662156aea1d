"""Text to image in a notebook: prompts in, uint8 images out, with any solver and grid.

::

    from jdiffsample import text2image
    images = text2image.generate("ckpt/sd15", ["a photo of a cat"], guidance=7.5, solver="unipc", nfe=20)

``generate`` runs the same plan and compiled program as ``jdiffsample sample`` (each sample's noise
from its index and the seed), or, given ``latents``, the same program started from those latents:
then the result can be compared with another implementation started from the same latents
(diffusers' pipelines take ``latents=``). Image-to-image starts from an image encoded by the VAE and
noised to the time ``t(strength)``, and solves from there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jdiffsample.pipeline import Runner, Settings, plan

__all__ = ["generate"]


def generate(model, prompts: str | Sequence[str], *, latents=None, image=None, strength: float = 0.8,
             batch: int | None = None, devices=None, return_latents: bool = False, **settings) -> np.ndarray:
    """uint8 NHWC images, one per prompt (``prompts`` cycled to the number of ``latents`` when given).

    Args:
      model: a converted text-to-image checkpoint (``jdiffsample convert sd``), or a loaded Model.
      prompts: a string or a non-empty list; sample i uses prompt i mod len.
      latents: optional starting noise, NHWC, unit variance (diffusers' ``latents``); default:
        drawn per sample index from ``seed``.
      image, strength: image-to-image: uint8 ``[B, H, W, 3]`` (or one image) encoded (the VAE's
        posterior mean), noised to the grid time that leaves ``int(N strength)`` of the N steps, then
        solved with those steps, as diffusers' img2img pipelines do (``latents`` then is the noise
        added to it).
      batch, devices: samples per compiled call and the devices (no effect on the images).
      return_latents: return the final latents (float32 NHWC) instead of decoded images.
      settings: the fields of :class:`jdiffsample.pipeline.Settings`: ``negative_prompts``,
        ``guidance``, ``guidance_rescale``, ``solver``, ``nfe``, ``grid`` (e.g. ``"diffusers"``: the
        timesteps the folder's diffusers scheduler would use), ``options``, ``seed``, ``height``,
        ``width``, ``dtype``, ``max_sequence_length``, ``model_parallel``, ...
    """
    if prompts is None or (not isinstance(prompts, str) and not prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    s = Settings.create(prompts=prompts, latents_only=return_latents, **settings)
    count = len(s.prompts) if latents is None else len(latents)
    noise = None
    if latents is not None:
        noise = np.asarray(latents, np.float32)
        if noise.ndim != 4 or not len(noise):
            raise ValueError(f"latents must be [B, H/8, W/8, C] (NHWC), got shape {noise.shape}")
        if not np.all(np.isfinite(noise)):
            raise ValueError("latents hold NaN or inf values")
    the_plan = plan(model, s, num=count, init_images=image, strength=strength)
    shape = the_plan.stages[0].sample_shape
    if noise is not None and noise.shape[1:] != tuple(shape):
        pixels = the_plan.record.get("pixels")
        raise ValueError(f"latents must be [B, {', '.join(map(str, shape))}] for {pixels[0]} x {pixels[1]} images, "
                         f"got {tuple(noise.shape)}")
    runner = Runner(the_plan, devices=devices, batch=batch, num=count)
    return runner(np.arange(count), noise=noise)[0]
