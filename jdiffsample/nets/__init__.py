"""Flax ports of pretrained diffusion networks, their converters, and loaded networks as values.

Each network family is one module of this package ending with ``FAMILY = Family(...)``
(:mod:`jdiffsample.nets.family`), listed in :mod:`jdiffsample.nets.families`: ``edm`` (NVlabs/edm
preconditioned SongUNet/DhariwalUNet), ``adm`` (openai/guided-diffusion UNetModel), ... Shared Flax
blocks live in :mod:`jdiffsample.nets.layers`, file formats and checkpoint I/O in
:mod:`jdiffsample.nets.formats`. A converted network is a folder with ``config.json`` and an Orbax
checkpoint::

    jdiffsample convert edm edm-cifar10-32x32-cond-vp.pkl ckpt/edm-cifar10   # once; no torch needed
    model = nets.load_model("ckpt/edm-cifar10")                              # a pytree: module + variables
    denoise = model.denoiser(labels=jnp.arange(8) % 10, guidance=1.5)        # x0_hat = denoise(x, t)
    x0 = jdiffsample.sample(denoise, x, ts, model.schedule, "unipc")

PyTorch files are read by :mod:`jdiffsample.nets.formats.torchfile`, which never imports torch and
never executes code from the file; :mod:`jdiffsample.nets.formats.statedict` matches their tensors
to the Flax parameters strictly.
"""

from __future__ import annotations

from jdiffsample.nets.families import FAMILIES, get as get_family, names as family_names
from jdiffsample.nets.family import Conversion, Family, Sampling
from jdiffsample.nets.formats.checkpoint import CONFIG_NAME, VARIABLES_DIR, bundled, read_config, resolve
from jdiffsample.nets.model import (Classifier, Denoiser, Model, build, convert, from_config, load, load_model,
                                    model_digest, random_variables, save)

__all__ = ["CONFIG_NAME", "VARIABLES_DIR", "FAMILIES", "Family", "Conversion", "Sampling", "Model", "Denoiser",
           "Classifier", "save", "load", "load_model", "from_config", "read_config", "resolve", "bundled", "random_variables",
           "get_family", "family_names", "build", "convert", "model_digest"]
