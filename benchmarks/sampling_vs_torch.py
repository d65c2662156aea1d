"""Sampling throughput of jdiffsample against the original PyTorch sampling code, same device.

For each network, random weights of the released size are built with the original PyTorch code,
converted with jdiffsample's converter, and both sides sample one batch from the same noise:

* ``edm``: EDM's CIFAR-10 DDPM++ (``EDMPrecond`` + ``SongUNet``, 55.7M parameters, 32x32). The
  original is ``edm_sampler`` of NVlabs/edm ``generate.py`` (Heun, 18 Karras steps, 35 model calls,
  float64 state); jdiffsample runs its ``heun`` solver on the same grid. Same method: their images
  must agree (``rel_diff``).
* ``adm``: guided-diffusion's ADM-64 UNet (ImageNet 64x64 preset, class-conditional). The original
  is ``GaussianDiffusion.p_sample_loop`` with 250 respaced DDPM steps (``timestep_respacing='250'``);
  jdiffsample runs UniPC-3 with 10 model calls.
* ``dit``: DiT-XL/2 (675M parameters, 32x32x4 latents, class-conditional). The original is DiT's
  ``sample.py`` loop (``create_diffusion('250')``, ``p_sample_loop``, no guidance); jdiffsample runs
  UniPC-3 with 10 and 20 model calls.

Each side runs ``--repeats`` times after one untimed (compiling / warming) run; the JSON lines give
median seconds per batch, images/s, the speed-up (images/s ours / theirs) and, on GPUs, peak device
memory (``torch.cuda.max_memory_allocated``; JAX's ``peak_bytes_in_use``). ``--dtype bfloat16``
runs both in bf16 (PyTorch under ``torch.autocast``; jdiffsample with bf16 network compute).
Run on a GPU machine with checkouts of the originals::

    python benchmarks/sampling_vs_torch.py --edm-repo EDM --adm-repo GUIDED_DIFFUSION --dit-repo DIT \
        --batch 64 --dtype float32
    python benchmarks/sampling_vs_torch.py ... --batch 64 --dtype bfloat16

``--small`` shrinks every network and the batch, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_vs_torch import _checkout, _numpy_state, _randomize  # noqa: E402  (same loader helpers)


def _device_peak(torch, jax) -> dict:
    out = {}
    if torch.cuda.is_available():
        out["torch_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["jax_peak_gb"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    return out


def _time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _edm(args, torch, device):
    import jax.numpy as jnp
    import numpy as np

    from jdiffsample import schedules, timesteps
    from jdiffsample.nets import edm

    with _checkout(args.edm_repo):
        networks = importlib.import_module("training.networks")
        generate = importlib.import_module("generate")
    channels, blocks = (32, 1) if args.small else (128, 4)
    kwargs = dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                  model_channels=channels, channel_mult=[2, 2, 2], num_blocks=blocks, attn_resolutions=[16],
                  dropout=0.13, embedding_type="positional", channel_mult_noise=1,
                  encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])
    net = networks.EDMPrecond(**kwargs).eval()
    _randomize(net, 0)
    variables = edm.convert_state_dict("EDMPrecond", kwargs, _numpy_state(net))
    net = net.to(device)
    module = edm.build("EDMPrecond", kwargs, dtype=_jax_dtype(args))
    noise = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype(np.float32)

    def theirs():
        with torch.inference_mode(), _autocast(torch, args, device):
            out = generate.edm_sampler(net, torch.from_numpy(noise).to(device), num_steps=18)
        torch.cuda.synchronize() if device == "cuda" else None
        return out.float().cpu().numpy()

    schedule = schedules.VE()
    ts = jnp.asarray(timesteps.karras(schedule, 18, final_zero=True), jnp.float32)
    x0 = jnp.asarray(noise.transpose(0, 2, 3, 1)) * ts[0]
    ours = _jitted(module, variables, x0, ts, schedule, "heun", {}, lambda m, v, x, t: m.apply(v, x, t))
    return [dict(net="edm", method="Heun, 18 steps (35 model calls), both sides", theirs=theirs, ours=ours,
                 compare=lambda a, b: b.transpose(0, 3, 1, 2) - a)]


def _ddpm_family(args, torch, device, name):
    """ADM-64 (guided-diffusion) or DiT-XL/2 (DiT): 250-step DDPM of the original vs UniPC-3."""
    import jax.numpy as jnp
    import numpy as np

    from jdiffsample import nets, timesteps
    from jdiffsample.nets import adm, dit

    rng = np.random.default_rng(1)
    if name == "adm":
        with _checkout(args.adm_repo):
            unet = importlib.import_module("guided_diffusion.unet")
            script_util = importlib.import_module("guided_diffusion.script_util")
        kwargs = dict(adm.PRESETS["64x64"], use_fp16=False)
        if args.small:
            kwargs.update(model_channels=32, num_res_blocks=1, num_head_channels=16)
        net = unet.UNetModel(**kwargs).eval()
        diffusion = script_util.create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                                          timestep_respacing="250")
        shape, family = (args.batch, 3, kwargs["image_size"], kwargs["image_size"]), "adm"
        module, convert = adm.build(kwargs, dtype=_jax_dtype(args)), lambda sd: adm.convert_state_dict(kwargs, sd)
        schedule = adm.discrete_schedule(dict(type="VPDiscrete", noise_schedule="cosine", diffusion_steps=1000))
        classes = kwargs["num_classes"]
    else:
        with _checkout(args.dit_repo):
            models = importlib.import_module("models")
            dit_diffusion = importlib.import_module("diffusion")
        kwargs = dict(dit.DEFAULTS, **dit.DIT_CONFIGS["DiT-S/2" if args.small else "DiT-XL/2"])
        if args.small:
            kwargs.update(input_size=8, depth=2)
        net = models.DiT(**kwargs).eval()
        diffusion = dit_diffusion.create_diffusion("250")
        shape, family = (args.batch, 4, kwargs["input_size"], kwargs["input_size"]), "dit"
        module, convert = dit.build("DiT", kwargs, dtype=_jax_dtype(args)), lambda sd: dit.convert_state_dict(
            "DiT", kwargs, sd)
        schedule = adm.discrete_schedule(dict(type="VPDiscrete", noise_schedule="linear", diffusion_steps=1000))
        classes = kwargs["num_classes"]
    _randomize(net, 1)
    variables = convert(_numpy_state(net))
    net = net.to(device)
    noise = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, classes, args.batch)

    def theirs():
        with torch.inference_mode(), _autocast(torch, args, device):
            out = diffusion.p_sample_loop(net.forward, shape, torch.from_numpy(noise).to(device), clip_denoised=False,
                                          model_kwargs=dict(y=torch.from_numpy(labels).to(device)), device=device)
        torch.cuda.synchronize() if device == "cuda" else None
        return out.float().cpu().numpy()

    denoise = nets.get_family(family).denoise
    rows = []
    for nfe in (10,) if name == "adm" else (10, 20):
        ts = jnp.asarray(timesteps.logsnr(schedule, nfe), jnp.float32)
        x0 = jnp.asarray(noise.transpose(0, 2, 3, 1)) * float(schedule.prior_std(ts[0]))
        ours = _jitted(module, variables, x0, ts, schedule, "unipc", dict(order=3),
                       lambda m, v, x, t, _y=jnp.asarray(labels, jnp.int32): denoise(m, v, x, t, _y, schedule))
        rows.append(dict(net=name, method=f"original: DDPM 250 steps; jdiffsample: UniPC-3, NFE {nfe}",
                         theirs=theirs, ours=ours, compare=None))
    return rows


def _jitted(module, variables, x0, ts, schedule, solver, options, forward):
    """``() -> images`` of jdiffsample.sample jitted with the weights as an argument."""
    import jax
    import numpy as np

    import jdiffsample

    @jax.jit
    def run(v, x):
        return jdiffsample.sample(lambda y, t: forward(module, v, y, t), x, ts, schedule, solver, **options)

    return lambda: np.asarray(run(variables, x0).block_until_ready())


def _jax_dtype(args):
    import jax.numpy as jnp

    return jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32


def _autocast(torch, args, device):
    if args.dtype == "bfloat16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edm-repo", help="checkout of NVlabs/edm")
    parser.add_argument("--adm-repo", help="checkout of openai/guided-diffusion")
    parser.add_argument("--dit-repo", help="checkout of facebookresearch/DiT")
    parser.add_argument("--nets", nargs="+", choices=("edm", "adm", "dit"), default=["edm", "adm", "dit"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny networks and batch, to check the script on a CPU")
    args = parser.parse_args()
    import jax
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _torch_compat import (
        python_only_torchvision,  # the originals' imports without torchvision's C++ ops
    )

    python_only_torchvision()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # TF32 off on both sides for float32: the same arithmetic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        jax.config.update("jax_default_matmul_precision", "highest" if args.dtype == "float32" else None)
    print(json.dumps(dict(jax=jax.__version__, torch=torch.__version__, jax_device=str(jax.devices()[0]),
                          torch_device=device, batch=args.batch, dtype=args.dtype, small=args.small)), flush=True)
    repos = dict(edm=args.edm_repo, adm=args.adm_repo, dit=args.dit_repo)
    for name in args.nets:
        if not repos[name]:
            print(json.dumps(dict(net=name, skipped=f"give --{name}-repo")), flush=True)
            continue
        rows = _edm(args, torch, device) if name == "edm" else _ddpm_family(args, torch, device, name)
        for row in rows:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            theirs_s, ours_s = _time(row["theirs"], args.repeats), _time(row["ours"], args.repeats)
            out = dict(net=row["net"], method=row["method"], theirs_s=round(theirs_s, 3), ours_s=round(ours_s, 3),
                       theirs_img_s=round(args.batch / theirs_s, 2), ours_img_s=round(args.batch / ours_s, 2),
                       speedup=round(theirs_s / ours_s, 2), **_device_peak(torch, jax))
            if row["compare"] is not None:
                a, b = row["theirs"](), row["ours"]()
                out["rel_diff"] = float(np.abs(row["compare"](a, b)).max() / np.abs(a).max())
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
