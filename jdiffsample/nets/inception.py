"""InceptionV3 as the FID feature network (the variant of pytorch-fid and TensorFlow's FID).

The standard FID features are the 2048 pooled activations of the InceptionV3 graph released with
TensorFlow's FID code ("2015-12-05"). pytorch-fid ships those weights as a PyTorch state dict,
``pt_inception-2015-12-05-6726825d.pth``; this module is a Flax network with the same layers and
:func:`load_params` reads that file (with :mod:`jdiffsample.nets.formats.torchfile`: no torch, no code
from the file). The weights are not shipped with jdiffsample.

The FID graph differs from torchvision's ``inception_v3`` in its pooling branches: the average
pools of the A, C and first E blocks exclude the zero padding from the mean, and the last E
block max-pools. Every convolution is ``conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU``.

Inputs are NHWC images in ``[0, 1]`` of any size; like pytorch-fid the network resizes them to
299x299 (bilinear, half-pixel centres, no anti-aliasing) and maps them to ``[-1, 1]``.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiffsample import xla_options
from jdiffsample.nets.formats import statedict, torchfile

__all__ = ["InceptionV3", "resize", "load_params", "init_shapes", "RESOLUTION", "DIM"]

RESOLUTION = 299
DIM = 2048
BN_EPS = 1e-3


class BatchNorm(nn.Module):
    """Inference-mode batch norm with the four tensors of a PyTorch ``BatchNorm2d``."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class ConvBN(nn.Module):
    """``relu(bn(conv(x)))`` with torchvision's ``BasicConv2d`` layout (``conv``, ``bn``)."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


def _cb(name, features, kernel, stride=1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return ConvBN(features, kernel, stride, padding, name=name)


def _avg_pool_3x3(x):
    """3x3, stride 1, the zero padding left out of each mean."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride=1):
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), (stride, stride), pad)


class BlockA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _cb("branch1x1", 64, 1)(x)
        b5 = _cb("branch5x5_2", 64, 5, padding=2)(_cb("branch5x5_1", 48, 1)(x))
        b3 = _cb("branch3x3dbl_1", 64, 1)(x)
        b3 = _cb("branch3x3dbl_3", 96, 3, padding=1)(_cb("branch3x3dbl_2", 96, 3, padding=1)(b3))
        bp = _cb("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class BlockB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _cb("branch3x3", 384, 3, stride=2)(x)
        bd = _cb("branch3x3dbl_1", 64, 1)(x)
        bd = _cb("branch3x3dbl_3", 96, 3, stride=2)(_cb("branch3x3dbl_2", 96, 3, padding=1)(bd))
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], -1)


class BlockC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = _cb("branch1x1", 192, 1)(x)
        b7 = _cb("branch7x7_1", c7, 1)(x)
        b7 = _cb("branch7x7_3", 192, **col)(_cb("branch7x7_2", c7, **row)(b7))
        bd = _cb("branch7x7dbl_1", c7, 1)(x)
        for i, (features, shape) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], 2):
            bd = _cb(f"branch7x7dbl_{i}", features, **shape)(bd)
        bp = _cb("branch_pool", 192, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class BlockD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _cb("branch3x3_2", 320, 3, stride=2)(_cb("branch3x3_1", 192, 1)(x))
        b7 = _cb("branch7x7x3_1", 192, 1)(x)
        b7 = _cb("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = _cb("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = _cb("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], -1)


class BlockE(nn.Module):
    max_pool: bool  # the FID graph's last block max-pools; the one before averages

    @nn.compact
    def __call__(self, x):
        def split(name, y):  # a 1x3 and a 3x1 convolution of the same input, side by side
            return jnp.concatenate([_cb(f"{name}a", 384, (1, 3), padding=(0, 1))(y),
                                    _cb(f"{name}b", 384, (3, 1), padding=(1, 0))(y)], -1)

        b1 = _cb("branch1x1", 320, 1)(x)
        b3 = split("branch3x3_2", _cb("branch3x3_1", 384, 1)(x))
        bd = _cb("branch3x3dbl_2", 384, 3, padding=1)(_cb("branch3x3dbl_1", 448, 1)(x))
        bd = split("branch3x3dbl_3", bd)
        pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
        bp = _cb("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


def resize(images):
    """``[B, H, W, C] -> [B, 299, 299, C]``: pytorch-fid's bilinear resize, without antialiasing."""
    return jax.image.resize(images, (images.shape[0], RESOLUTION, RESOLUTION, images.shape[-1]), "bilinear",
                            antialias=False)


class InceptionV3(nn.Module):
    """Images ``[B, H, W, 3]`` in ``[0, 1]`` -> pooled features ``[B, 2048]`` (pytorch-fid's
    block 3, TensorFlow's ``pool_3``). ``resize=False`` skips the resize to 299x299."""

    resize: bool = True

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 takes RGB images [B, H, W, 3], got shape {x.shape}")
        if self.resize:
            x = resize(x)
        x = 2.0 * x - 1.0
        x = _cb("Conv2d_1a_3x3", 32, 3, stride=2)(x)
        x = _cb("Conv2d_2a_3x3", 32, 3)(x)
        x = _max_pool_3x3(_cb("Conv2d_2b_3x3", 64, 3, padding=1)(x), 2)
        x = _cb("Conv2d_4a_3x3", 192, 3)(_cb("Conv2d_3b_1x1", 80, 1)(x))
        x = _max_pool_3x3(x, 2)
        for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = BlockA(pool, name=name)(x)
        x = BlockB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = BlockC(c7, name=name)(x)
        x = BlockD(name="Mixed_7a")(x)
        x = BlockE(False, name="Mixed_7b")(x)
        x = BlockE(True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# weights

#: State-dict entries the feature network does not use (the classifier).
_UNUSED = ("fc.weight", "fc.bias")


def init_shapes() -> dict:
    """The parameter tree's shapes (``jax.ShapeDtypeStruct`` leaves), without computing anything."""
    shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, RESOLUTION, RESOLUTION, 3)))
    return shapes["params"]


def load_params(path_or_state_dict) -> dict:
    """Flax parameters from pytorch-fid's weights file (or an already loaded state dict).

    Every tensor the network needs must be present with its shape; ``num_batches_tracked`` and
    the classifier (``fc``) are ignored; anything else is an error (a different network).
    """
    what = "pytorch-fid's InceptionV3"
    sd = path_or_state_dict
    if isinstance(sd, (str, Path)):
        what = f"pytorch-fid's InceptionV3 ({sd})"
        sd = torchfile.load_state_dict(sd)
    ignore = lambda k: k.endswith("num_batches_tracked") or k in _UNUSED  # noqa: E731
    params = statedict.match({"params": init_shapes()}, sd, ignore=ignore, what=what)["params"]
    return jax.tree.map(jnp.asarray, params)


def features_fn(params):
    """``images [B, H, W, 3] in [0, 1] -> features [B, 2048]``, jitted with the weights as an
    argument (closed over, they would be baked into the compiled program as constants)."""
    apply = jax.jit(InceptionV3().apply, compiler_options=xla_options.compile_options())
    return lambda x: apply({"params": params}, x)
