"""Flax ports of pretrained diffusion networks, their converters, and loaded networks as values.

Each network family is one module of this package ending with ``FAMILY = Family(...)``
(:mod:`jdiffsample.nets.family`): ``edm`` (NVlabs/edm preconditioned SongUNet/DhariwalUNet),
``adm`` (openai/guided-diffusion UNetModel), ... A converted network is a folder with
``config.json`` and an Orbax checkpoint (:mod:`jdiffsample.nets.checkpoint`)::

    jdiffsample convert edm edm-cifar10-32x32-cond-vp.pkl ckpt/edm-cifar10   # once; no torch needed
    module, variables = nets.load("ckpt/edm-cifar10")                       # module.apply(variables, ...)
    model = nets.load_model("ckpt/edm-cifar10")                              # the same, as one pytree
    denoise = model.denoiser(labels=jnp.arange(8) % 10, guidance=1.5)        # x0_hat = denoise(x, t)
    x0 = jdiffsample.sample(denoise, x, ts, model.schedule, "unipc")

PyTorch files are read by :mod:`jdiffsample.nets.torchfile`, which never imports torch and never
executes code from the file; :mod:`jdiffsample.nets.statedict` matches their tensors to the Flax
parameters strictly.
"""

from __future__ import annotations

from jdiffsample.nets.checkpoint import (CONFIG_NAME, VARIABLES_DIR, bundled, load, load_config, random_variables,
                                         resolve, save)
from jdiffsample.nets.family import Family, get_family
from jdiffsample.nets.family import names as families
from jdiffsample.nets.model import Denoiser, Model, from_config, load_model

__all__ = ["CONFIG_NAME", "VARIABLES_DIR", "save", "load", "load_config", "load_model", "from_config", "resolve",
           "bundled", "random_variables", "Family", "get_family", "families", "Model", "Denoiser", "build", "convert"]


def build(family_name: str, class_name: str, kwargs, *, dtype=None):
    """The Flax module of ``family_name`` for ``class_name`` and its constructor kwargs."""
    import jax.numpy as jnp

    return get_family(family_name).build(class_name, kwargs, dtype=jnp.float32 if dtype is None else dtype)


def convert(family_name: str, src, dst, **options) -> dict:
    """Convert original weights ``src`` of a family into a checkpoint folder ``dst``; returns a
    summary (``jdiffsample convert FAMILY SRC DST`` runs this)."""
    return get_family(family_name).convert(src, dst, **options)
