"""Forward-pass speed of the Flax ports against the PyTorch originals, side by side on the CPU.

For each network: build the original PyTorch module with random weights, convert the same
weights with ``jdiffsample.nets.<family>.convert_state_dict``, check that both forwards agree
(``rel_err`` = max |flax - torch| / max |torch|, at most ``--tol``), then time them alternately
in one process: ``jax.jit`` of ``module.apply`` with the weights passed as an argument, and the
PyTorch module in eval mode under ``inference_mode``. Prints one JSON line per network with the
median milliseconds per forward of each and ``speed`` = torch ms / flax ms (>= 1: the port is at
least as fast); ``speed_of_fastest`` compares the fastest repeats instead, which is less
sensitive to other load on the machine (``load`` is the 1-minute load average before and after).

The original code is read from checkouts the user passes (never part of this project)::

    python benchmarks/forward_vs_torch.py --edm-repo DIR --adm-repo DIR --dit-repo DIR \
        --edm2-repo DIR [--nets edm adm dit edm2 vae] [--batch 16] [--threads N]

with NVlabs/edm (``training/networks.py``), openai/guided-diffusion
(``guided_diffusion/unet.py``), facebookresearch/DiT (``models.py``) and NVlabs/edm2
(``training/networks_edm2.py``); the SD VAE decoder is diffusers' ``AutoencoderKL`` from the
installed package. A network whose checkout is not given is skipped.

Threads: both libraries get the same ``N`` CPUs (default: all this process may use). XLA's CPU
client sizes its intra-op thread pool from the CPUs the process may run on (it has no thread-count
flag), so the process pins itself to ``N`` CPUs (``os.sched_setaffinity``) before jax is
imported; PyTorch gets ``torch.set_num_threads(N)`` under the same affinity. On a machine shared
with other work, ``--threads 1`` gives the steadier comparison (PyTorch's OpenMP threads slow
down far more than XLA's when a core is taken away).

XLA:CPU backend: jaxlib 0.10 hands float32 convolutions to YNNPACK, which ran 3x3 convolutions
slower than Eigen (and than PyTorch's oneDNN) here (``conv_vs_torch.py``), so jdiffsample compiles
its sampling programs with convolutions given to Eigen on the CPU
(:mod:`jdiffsample.xla_options`). Each network is therefore timed twice: ``flax_ms`` is
``jax.jit(module.apply)`` as XLA compiles it by default, ``flax_opt_ms`` (``speed_opt``) the same
forward with the compile options jdiffsample uses (``xla_opts`` in the first line), or with
``--compiler-option NAME=VALUE`` (repeatable) instead.

The networks (random weights, float32; ``--batch`` images per forward):

* ``edm``: EDMPrecond + SongUNet DDPM++ at 32x32 (model_channels 128, channel_mult [2, 2, 2],
  4 blocks per level, attention at 16x16): EDM's CIFAR-10 network.
* ``adm``: guided-diffusion UNetModel at 32x32, model_channels 128, channel_mult (1, 2, 2, 2),
  3 res blocks, attention at 16 and 8 (64-channel heads), scale-shift norm, resblock up/down,
  learned sigma (``--adm-preset 64x64`` etc. for a released configuration).
* ``dit``: DiT-S/2 on 32x32x4 latents (``--dit-arch`` for another size).
* ``edm2``: EDM2 Precond at 32x32x4 latents with model_channels 128, channel_mult
  (1, 2, 3, 4), 3 blocks, attention at 16 and 8 (img512-XS's layout on half the resolution;
  ``--edm2-res 64`` for the released size), 1000 classes.
* ``vae``: the SD VAE decoder (block_out_channels 128, 256, 512, 512) on 8x8x4 latents
  (``--vae-latent``), so 64x64 images.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

#: Top-level packages of the NVlabs checkouts; edm and edm2 both name them ``training``,
#: ``torch_utils`` and ``dnnlib``, so they are cleared from ``sys.modules`` between imports.
_CHECKOUT_PACKAGES = ("training", "torch_utils", "dnnlib", "guided_diffusion", "models")


def _pin_threads(n: int | None) -> int:
    """Restrict this process to ``n`` CPUs (all allowed ones if None); returns the count."""
    cpus = sorted(os.sched_getaffinity(0))
    if n is not None:
        if not 1 <= n <= len(cpus):
            raise SystemExit(f"--threads must be between 1 and {len(cpus)}")
        cpus = cpus[:n]
        os.sched_setaffinity(0, cpus)
    return len(cpus)


@contextlib.contextmanager
def _checkout(repo: str):
    """Import from the checkout ``repo`` (first on sys.path, its packages freshly imported)."""
    if not os.path.isdir(repo):
        raise SystemExit(f"{repo}: not a directory")
    for name in list(sys.modules):
        if name.split(".")[0] in _CHECKOUT_PACKAGES:
            del sys.modules[name]
    sys.path.insert(0, repo)
    try:
        yield
    finally:
        sys.path.remove(repo)


def _randomize(module, seed: int) -> None:
    """Random weights everywhere (also where the original initialises zeros, so that every
    layer matters): matrices and kernels N(0, 1/fan_in), vectors and scalars += 0.1 N(0, 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)
            else:
                p.add_(0.1 * noise)


def _numpy_state(module) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# One builder per network: (torch_forward, flax_module, flax_variables, flax_forward, inputs).


def _edm_setup(args, batch):
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jdiffsample.nets import edm

    with _checkout(args.edm_repo):
        networks = importlib.import_module("training.networks")
    kwargs = dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                  model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
                  dropout=0.13, embedding_type="positional", channel_mult_noise=1,
                  encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])
    net = networks.EDMPrecond(**kwargs).eval()
    _randomize(net, 0)
    rng = np.random.default_rng(0)
    sigma = np.exp(rng.normal(-1.2, 1.2, batch)).astype(np.float32)
    x = (rng.standard_normal((batch, 3, 32, 32)) * sigma[:, None, None, None]).astype(np.float32)

    module = edm.build("EDMPrecond", kwargs)
    variables = edm.convert_state_dict("EDMPrecond", kwargs, _numpy_state(net))
    tx, ts = torch.from_numpy(x), torch.from_numpy(sigma)
    return dict(
        config="EDMPrecond SongUNet DDPM++ 32x32, model_channels 128, channel_mult [2,2,2], 4 blocks",
        torch=lambda: net(tx, ts),
        flax=lambda v, x, s: module.apply(v, x, s),
        variables=variables,
        flax_args=(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(sigma)),
    )


def _adm_setup(args, batch):
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jdiffsample.nets import adm

    with _checkout(args.adm_repo):
        unet = importlib.import_module("guided_diffusion.unet")
    if args.adm_preset:
        kwargs = dict(adm.PRESETS[args.adm_preset], use_fp16=False)
    else:
        kwargs = dict(image_size=32, in_channels=3, model_channels=128, out_channels=6,
                      num_res_blocks=3, attention_resolutions=(2, 4), dropout=0.0,
                      channel_mult=(1, 2, 2, 2), num_classes=None, use_fp16=False,
                      num_heads=4, num_head_channels=64, num_heads_upsample=-1,
                      use_scale_shift_norm=True, resblock_updown=True,
                      use_new_attention_order=False)
    net = unet.UNetModel(**kwargs).eval()
    _randomize(net, 1)
    size, classes = kwargs["image_size"], kwargs.get("num_classes")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    y = rng.integers(0, classes, batch) if classes else None

    module = adm.build(kwargs)
    variables = adm.convert_state_dict(kwargs, _numpy_state(net))
    tx, tt = torch.from_numpy(x), torch.from_numpy(t)
    ty = None if y is None else torch.from_numpy(y)
    jy = None if y is None else jnp.asarray(y, jnp.int32)
    return dict(
        config=(f"guided-diffusion UNetModel preset {args.adm_preset}" if args.adm_preset else
                "guided-diffusion UNetModel 32x32, model_channels 128, channel_mult (1,2,2,2), "
                "3 res blocks, attention 16/8, scale-shift, resblock up/down"),
        torch=lambda: net(tx, tt, ty),
        flax=lambda v, x, t: module.apply(v, x, t, jy),
        variables=variables,
        flax_args=(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32)),
    )


def _dit_setup(args, batch):
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jdiffsample.nets import dit

    with _checkout(args.dit_repo):
        models = importlib.import_module("models")
    kwargs = dit.arch_kwargs(args.dit_arch, 32)
    net = models.DiT(**kwargs).eval()
    _randomize(net, 2)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((batch, 4, 32, 32)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.float32)
    y = rng.integers(0, 1000, batch)

    module = dit.build("DiT", kwargs)
    variables = dit.convert_state_dict("DiT", kwargs, _numpy_state(net))
    tx, tt, ty = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)
    return dict(
        config=f"{args.dit_arch} on 32x32x4 latents",
        torch=lambda: net(tx, tt, ty),
        flax=lambda v, x, t, y: module.apply(v, x, t, y),
        variables=variables,
        flax_args=(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y, jnp.int32)),
    )


def _edm2_setup(args, batch):
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jdiffsample.nets import edm2

    with _checkout(args.edm2_repo):
        networks = importlib.import_module("training.networks_edm2")
    kwargs = dict(edm2.PRESETS["edm2-img512-xs"], img_resolution=args.edm2_res, use_fp16=False)
    net = networks.Precond(**kwargs).eval()
    _randomize(net, 3)
    res = args.edm2_res
    rng = np.random.default_rng(3)
    sigma = np.exp(rng.normal(-0.4, 1.0, batch)).astype(np.float32)
    x = (rng.standard_normal((batch, 4, res, res)) * sigma[:, None, None, None]).astype(np.float32)
    labels = np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, batch)]

    module = edm2.build("Precond", kwargs)
    variables = edm2.convert_state_dict("Precond", kwargs, _numpy_state(net))
    tx, ts, tl = torch.from_numpy(x), torch.from_numpy(sigma), torch.from_numpy(labels)
    return dict(
        config=f"EDM2 Precond img512-xs layout at {res}x{res}x4, 1000 classes",
        torch=lambda: net(tx, ts, tl),
        flax=lambda v, x, s, c: module.apply(v, x, s, c),
        variables=variables,
        flax_args=(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(sigma), jnp.asarray(labels)),
    )


def _vae_setup(args, batch):
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from jdiffsample.nets import vae

    config = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4,
                  block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=512)
    net = AutoencoderKL(**config).eval()
    _randomize(net, 4)
    size = args.vae_latent
    rng = np.random.default_rng(4)
    z = rng.standard_normal((batch, 4, size, size)).astype(np.float32)

    module = vae.build("AutoencoderKL", config)
    variables = vae.convert_state_dict("AutoencoderKL", config, _numpy_state(net))
    tz = torch.from_numpy(z)
    return dict(
        config=f"SD VAE decoder (diffusers AutoencoderKL) on {size}x{size}x4 latents",
        torch=lambda: net.decode(tz).sample,
        flax=lambda v, z: module.apply(v, z, method="decode"),
        variables=variables,
        flax_args=(jnp.asarray(z.transpose(0, 2, 3, 1)),),
    )


_SETUPS = {"edm": (_edm_setup, "edm_repo"), "adm": (_adm_setup, "adm_repo"),
           "dit": (_dit_setup, "dit_repo"), "edm2": (_edm2_setup, "edm2_repo"),
           "vae": (_vae_setup, None)}


def _bench(name, args, threads):
    import jax
    import numpy as np
    import torch

    setup, repo_arg = _SETUPS[name]
    if repo_arg and not getattr(args, repo_arg):
        return dict(net=name, skipped=f"--{repo_arg.replace('_', '-')} not given")
    torch.manual_seed(0)  # the random buffers and biases the originals draw at construction
    spec = setup(args, args.batch)
    variables, flax_args = spec["variables"], spec["flax_args"]
    lowered = jax.jit(spec["flax"]).lower(variables, *flax_args)

    # "flax": XLA's default compilation; "flax_opt": with jdiffsample's options or --compiler-option
    runs, compile_s = {}, {}
    for kind, options in (("flax", {}), ("flax_opt", args.compiler_options)):
        if kind == "flax_opt" and not options:
            continue
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=options)
        compile_s[kind] = round(time.perf_counter() - start, 1)
        runs[kind] = lambda compiled=compiled: compiled(variables, *flax_args).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            return spec["torch"]()

    theirs = run_torch().numpy()
    rel_err = {}
    for kind, run in runs.items():
        ours = np.asarray(run())
        ours = ours.transpose(0, 3, 1, 2) if ours.ndim == 4 else ours
        rel_err[kind] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())

    for _ in range(args.warmup - 1):
        run_torch(), [run() for run in runs.values()]
    load = os.getloadavg()[0]
    times = {"torch": [], **{kind: [] for kind in runs}}
    for _ in range(args.repeats):  # alternate, so that all see the same machine load
        for kind, run in (("torch", run_torch), *runs.items()):
            start = time.perf_counter()
            run()
            times[kind].append(time.perf_counter() - start)

    record = dict(net=name, config=spec["config"], batch=args.batch, threads=threads,
                  rel_err=float(f"{max(rel_err.values()):.3g}"),
                  agrees=max(rel_err.values()) <= args.tol)
    torch_ms = 1e3 * statistics.median(times["torch"])
    record["torch_ms"] = round(torch_ms, 1)
    for kind in runs:
        ms = 1e3 * statistics.median(times[kind])
        suffix = kind[len("flax"):]
        record[f"flax{suffix}_ms"] = round(ms, 1)
        record[f"speed{suffix}"] = round(torch_ms / ms, 3)
        record[f"speed{suffix}_of_fastest"] = round(min(times["torch"]) / min(times[kind]), 3)
    record["compile_s"] = compile_s
    record["load"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    return record


def _compiler_option(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edm-repo", help="checkout of NVlabs/edm")
    parser.add_argument("--adm-repo", help="checkout of openai/guided-diffusion")
    parser.add_argument("--dit-repo", help="checkout of facebookresearch/DiT")
    parser.add_argument("--edm2-repo", help="checkout of NVlabs/edm2")
    parser.add_argument("--nets", nargs="+", choices=list(_SETUPS), default=list(_SETUPS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, help="CPUs for both libraries (default: all allowed)")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards of each library")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards of each library")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="max |flax - torch| / max |torch| for agreement")
    parser.add_argument("--compiler-option", type=_compiler_option, action="append", default=[],
                        metavar="NAME=VALUE", help="time the second Flax forward with this XLA option "
                        "(repeatable) instead of jdiffsample's compile options")
    parser.add_argument("--adm-preset", help="a jdiffsample.nets.adm.PRESETS name instead of the "
                        "32x32 configuration")
    parser.add_argument("--dit-arch", default="DiT-S/2")
    parser.add_argument("--edm2-res", type=int, default=32)
    parser.add_argument("--vae-latent", type=int, default=8)
    args = parser.parse_args()
    args.compiler_options = dict(args.compiler_option)

    threads = _pin_threads(args.threads)  # before jax creates its CPU client
    import jax
    import torch

    from jdiffsample import xla_options

    args.compiler_options = args.compiler_options or xla_options.compile_options()
    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _torch_compat import python_only_torchvision  # timm and diffusers without torchvision's C++ ops

    python_only_torchvision()
    print(json.dumps(dict(jax=jax.__version__, torch=torch.__version__, device=str(jax.devices()[0]),
                          threads=threads, torch_threads=torch.get_num_threads(),
                          xla_flags=os.environ.get("XLA_FLAGS", ""), xla_opts=args.compiler_options)), flush=True)
    failed = False
    for name in args.nets:
        record = _bench(name, args, threads)
        failed |= record.get("agrees") is False
        print(json.dumps(record), flush=True)
    if failed:
        raise SystemExit("a Flax forward disagrees with the original beyond --tol")


if __name__ == "__main__":
    main()
