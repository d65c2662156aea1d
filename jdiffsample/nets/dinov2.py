"""DINOv2's ViT/14 as a feature network (FD_DINOv2), read from the released ``.pth`` without torch.

A Flax port of facebookresearch/dinov2's ``DinoVisionTransformer`` as its hub models build it
(``dinov2_vitl14`` ...: ``img_size=518``, ``patch_size=14``, LayerScale ``init_values=1.0``, an MLP
feed-forward, no register tokens, positional embeddings interpolated without antialiasing and with
``interpolate_offset=0.1``):

* patch embedding: a 14x14 convolution of stride 14 (``patch_embed.proj``);
* a CLS token, then positional embeddings: the stored ones are for a 37x37 grid (518 px); for
  another grid ``gh x gw`` the 37x37 table is resized bicubically (PyTorch's kernel, ``a = -0.75``,
  no antialiasing) with the *scale factors* ``(g + 0.1) / 37`` as the original passes them to
  ``interpolate`` (so the sampling positions are those of a ``g + 0.1`` grid, not of ``g``);
* pre-norm blocks ``x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))`` (LayerNorm eps 1e-6,
  exact GELU, LayerScale ``gamma``);
* the final LayerNorm; the feature is the normed CLS token ``[B, D]``.

Width, depth and heads come from the state dict's shapes (ViT-S/B/L/g are 384/768/1024/1536 wide
with 6/12/16/24 heads: heads are ``width // 64``). ViT-L/14 (``dinov2_vitl14_pretrain.pth``,
1024 wide, 24 deep, 16 heads) is what EDM2's FD_DINOv2 uses. Inputs are NHWC float images already
normalised (see :func:`jdiffsample.fid.load_dinov2` for EDM2's preprocessing), with sides a
multiple of 14. Every product runs at full float32 precision.
"""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import resize, xla_options
from jdiffsample.nets.formats import statedict, torchfile

__all__ = ["DinoVisionTransformer", "load_params", "config_from_state_dict", "features_fn",
           "PATCH", "HEAD_DIM"]

PATCH = 14
HEAD_DIM = 64  # every released DINOv2 ViT has 64-wide heads
LN_EPS = 1e-6
_HI = jax.lax.Precision.HIGHEST


def _dense(features: int, name: str):
    return nn.Dense(features, precision=_HI, name=name)


class Attention(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        qkv = _dense(3 * d, "qkv")(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, precision=_HI) * (d // self.num_heads) ** -0.5
        a = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v, precision=_HI)
        return _dense(d, "proj")(a.reshape(b, n, d))


class LayerScale(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("gamma", nn.initializers.ones, (x.shape[-1],))


class Block(nn.Module):
    num_heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = x + LayerScale(name="ls1")(Attention(self.num_heads, name="attn")(
            nn.LayerNorm(epsilon=LN_EPS, name="norm1")(x)))
        h = nn.LayerNorm(epsilon=LN_EPS, name="norm2")(x)
        h = _dense(d, "mlp_fc2")(nn.gelu(_dense(int(d * self.mlp_ratio), "mlp_fc1")(h), approximate=False))
        return x + LayerScale(name="ls2")(h)


def interpolate_pos_embed(table, grid_h: int, grid_w: int, offset: float = 0.1, antialias: bool = False):
    """The original's ``interpolate_pos_encoding``: ``table [1, 1 + M*M, D]`` (CLS first) -> the
    table for a ``grid_h x grid_w`` patch grid, ``[1, 1 + grid_h*grid_w, D]``."""
    n = table.shape[1] - 1
    m = int(round(n ** 0.5))
    if m * m != n:
        raise ValueError(f"positional embeddings for {n} patches are not a square grid")
    if grid_h == m and grid_w == m:
        return table
    patch = table[:, 1:].reshape(1, m, m, -1)
    if offset:
        factors = ((grid_h + offset) / m, (grid_w + offset) / m)
        size = tuple(resize.scaled_size(m, f) for f in factors)
        patch = resize.resize_bicubic(patch, size, antialias, scales=(1.0 / factors[0], 1.0 / factors[1]))
    else:
        size = (grid_h, grid_w)
        patch = resize.resize_bicubic(patch, size, antialias)
    if size != (grid_h, grid_w):  # the original asserts the same
        raise ValueError(f"interpolated positional grid {size} != the patch grid {(grid_h, grid_w)}")
    return jnp.concatenate([table[:, :1], patch.reshape(1, grid_h * grid_w, -1)], axis=1)


class DinoVisionTransformer(nn.Module):
    """Images ``[B, H, W, 3]`` (normalised; H, W multiples of 14) -> the normed CLS token ``[B, D]``."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    pos_grid: int = 37
    mlp_ratio: float = 4.0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % PATCH or x.shape[2] % PATCH:
            raise ValueError(f"DINOv2 takes RGB images [B, H, W, 3] with sides a multiple of {PATCH}, "
                             f"got shape {x.shape}")
        d = self.embed_dim
        x = nn.Conv(d, (PATCH, PATCH), strides=PATCH, padding="VALID", precision=_HI, name="patch_embed_proj")(x)
        b, gh, gw, _ = x.shape
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        pos = self.param("pos_embed", nn.initializers.zeros, (1, 1 + self.pos_grid ** 2, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x.reshape(b, gh * gw, d)], axis=1)
        x = x + interpolate_pos_embed(pos, gh, gw, self.interpolate_offset, self.interpolate_antialias)
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, name=f"blocks_{i}")(x)
        return nn.LayerNorm(epsilon=LN_EPS, name="norm")(x[:, 0])


# ---------------------------------------------------------------------------------------------
# weights

_INDEX = re.compile(r"_(\d+)$")
_RENAMES = {"patch_embed_proj": "patch_embed.proj", "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}


def _torch_key(path: tuple) -> str:
    """``blocks_3/mlp_fc1/kernel`` -> ``blocks.3.mlp.fc1.weight``."""
    modules = tuple(_RENAMES.get(m, _INDEX.sub(r".\1", m)) for m in path[:-1])
    return statedict.torch_key(modules + path[-1:])


LAYOUT = statedict.Layout(key=_torch_key)
#: State-dict entries the feature network does not use (the masked-image-modelling token).
_UNUSED = ("mask_token",)


def config_from_state_dict(sd) -> dict:
    """``embed_dim``, ``depth``, ``num_heads``, ``pos_grid`` and ``mlp_ratio`` from the shapes of a
    DINOv2 state dict; ``ValueError`` if it is not one this port runs."""
    what = "a DINOv2 ViT/14 state dict (dinov2_vit*14_pretrain.pth)"
    need = ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight", "blocks.0.mlp.fc1.weight")
    if any(k not in sd for k in need):
        if any(k.startswith("blocks.0.mlp.w12") for k in sd):
            raise ValueError(f"this is {what} with a SwiGLU feed-forward (ViT-g), which is not supported; "
                             f"use dinov2_vitl14_pretrain.pth")
        missing = [k for k in need if k not in sd]
        raise ValueError(f"not {what}: no {', '.join(missing)} (the file holds {statedict.listing(sorted(sd))})")
    if "register_tokens" in sd:
        raise ValueError("DINOv2 with register tokens (dinov2_vit*14_reg4) is not supported; use "
                         "dinov2_vitl14_pretrain.pth, as EDM2's FD_DINOv2 does")
    proj = np.shape(sd["patch_embed.proj.weight"])
    if len(proj) != 4 or proj[1:] != (3, PATCH, PATCH):
        raise ValueError(f"not {what}: patch_embed.proj.weight has shape {proj}, expected [D, 3, 14, 14]")
    dim = int(proj[0])
    if dim % HEAD_DIM:
        raise ValueError(f"not {what}: width {dim} is not a multiple of the 64-wide heads")
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    hidden = int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0])
    tokens = int(np.shape(sd["pos_embed"])[1]) - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ValueError(f"not {what}: pos_embed has {tokens} patch positions, not a square grid")
    return dict(embed_dim=dim, depth=depth, num_heads=dim // HEAD_DIM, pos_grid=grid, mlp_ratio=hidden / dim)


def _abstract(module: DinoVisionTransformer):
    side = module.pos_grid * PATCH
    return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))


def load_params(path_or_state_dict, num_heads: int | None = None) -> tuple[DinoVisionTransformer, dict]:
    """``(module, params)`` from a released ``dinov2_vit*14_pretrain.pth`` (or a state dict of one):
    the shape from the tensors' shapes, every tensor checked (``ValueError`` naming what does not fit).
    ``num_heads`` (the one thing shapes do not tell) defaults to ``width // 64``, as released."""
    sd, what = path_or_state_dict, "DINOv2 ViT/14"
    if isinstance(sd, (str, Path)):
        what = f"DINOv2 ViT/14 ({sd})"
        sd = torchfile.load_state_dict(sd)
    try:
        config = config_from_state_dict(sd)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    if num_heads is not None:
        if num_heads < 1 or config["embed_dim"] % num_heads:
            raise ValueError(f"{what}: {num_heads} heads do not divide the width {config['embed_dim']}")
        config["num_heads"] = int(num_heads)
    module = DinoVisionTransformer(**config)
    params = statedict.match(_abstract(module), sd, layout=LAYOUT, ignore=lambda k: k in _UNUSED,
                             what=f"{what}, {config['embed_dim']} wide, {config['depth']} deep")["params"]
    return module, jax.tree.map(jnp.asarray, params)


def features_fn(module: DinoVisionTransformer, params):
    """``normalised images [B, H, W, 3] -> features [B, D]``, jitted with the weights an argument."""
    apply = jax.jit(module.apply, compiler_options=xla_options.compile_options())
    return lambda x: apply({"params": params}, x)
