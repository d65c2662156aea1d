"""Sampling throughput of an EDM DDPM++ network with EDM's Heun sampler, float32 vs bfloat16.

Defaults are the CIFAR-10 DDPM++ architecture of EDM (model_channels 128, channel_mult [2, 2, 2],
4 blocks per resolution, attention at 16x16) with random weights, 18 Heun steps on EDM's grid
(35 model calls) and batch 256: the configuration EDM samples CIFAR-10 with. Meant for a GPU;
``--small`` gives a tiny configuration that checks the script on a CPU.

    python benchmarks/edm_sampling_throughput.py            # on a GPU
    python benchmarks/edm_sampling_throughput.py --small    # smoke run on a CPU

Prints one JSON line per dtype: compile seconds, median seconds per batch, images/s, and the
largest difference of the bf16 samples from the float32 ones (same noise, same weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import schedules, solvers, timesteps
from jdiffsample.nets import edm


def network_kwargs(small: bool) -> dict:
    return dict(
        img_resolution=8 if small else 32, img_channels=3, label_dim=0, model_type="SongUNet",
        model_channels=16 if small else 128, channel_mult=[2, 2] if small else [2, 2, 2],
        num_blocks=1 if small else 4, attn_resolutions=[4] if small else [16], dropout=0.13,
        embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
        decoder_type="standard", resample_filter=[1, 1],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="tiny network for a CPU smoke run")
    args = parser.parse_args()
    batch = 4 if args.small else args.batch

    kwargs = network_kwargs(args.small)
    res = kwargs["img_resolution"]
    sch = schedules.VE()
    ts = jnp.asarray(timesteps.karras(sch, args.steps, final_zero=True), jnp.float32)
    noise = jax.random.normal(jax.random.key(0), (batch, res, res, 3)) * ts[0]
    f32_module = edm.build("EDMPrecond", kwargs)
    variables = jax.jit(f32_module.init)(jax.random.key(1), noise[:1], jnp.ones((1,)))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
    print(json.dumps(dict(device=str(jax.devices()[0]), jax=jax.__version__, params=n_params,
                          batch=batch, steps=args.steps, nfe=solvers.get("heun").nfe(args.steps, True))))

    outputs = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        module = edm.build("EDMPrecond", kwargs, dtype=dtype)

        @jax.jit
        def sample(variables, x, module=module):
            return solvers.heun(lambda x, t: module.apply(variables, x, t), x, ts, sch)

        start = time.perf_counter()
        out = sample(variables, noise).block_until_ready()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sample(variables, noise).block_until_ready()
            times.append(time.perf_counter() - start)
        outputs[name] = np.asarray(out, np.float32)
        per_batch = statistics.median(times)
        record = dict(dtype=name, compile_s=round(compile_s, 2), s_per_batch=round(per_batch, 4),
                      images_per_s=round(batch / per_batch, 1), finite=bool(np.isfinite(outputs[name]).all()))
        if name == "bfloat16":
            diff = np.abs(outputs["bfloat16"] - outputs["float32"])
            record["max_abs_diff_vs_f32"] = float(diff.max())
            record["rms_diff_vs_f32"] = float(np.sqrt(np.mean(diff**2)))
            record["rms_f32"] = float(np.sqrt(np.mean(outputs["float32"] ** 2)))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
