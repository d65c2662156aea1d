"""Peak memory of converting a real-sized checkpoint, against the checkpoint's size.

Writes a random state dict of a released architecture with ``torch.save`` (DiT-XL/2, 675M
parameters, float32 as released; EDM2-XXL, 1.5B parameters, float16 as released), or, for ``flux``,
a diffusers FLUX.1 pipeline folder written directly as sharded bfloat16 safetensors (the released
layout: FLUX.1's widths, 3 double + 5 single blocks instead of 19 + 38, the released VAE and
CLIP-L, a T5 of T5-XXL's width with one layer; about 4.5 GB), then runs ``jdiffsample convert`` on
it in a fresh process and reads that process's peak resident memory (``VmHWM``)::

    python benchmarks/convert_memory.py --family dit --workdir /tmp/convert-memory
    python benchmarks/convert_memory.py --family edm2 --workdir /tmp/convert-memory
    python benchmarks/convert_memory.py --family flux --workdir /tmp/convert-memory \
        --tokenizers ../shared/fixtures/flux_tiny

``flux`` reports the peak against the folder's size, and the peak of converting the tiny
``--tokenizers`` fixture folder (whose tokenizer folders it copies) as the fixed cost of the process.
Needs torch (dit, edm2) and about 3x the checkpoint size of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CASES = {
    "dit": dict(arch="DiT-XL/2", dtype="float32"),
    "edm2": dict(preset="edm2-img512-xxl", dtype="float16"),
    "flux": dict(dtype="bfloat16"),
}
#: The synthetic FLUX.1 folder's parts (configs as the released ones but for the block counts and T5's depth).
FLUX_CONFIGS = {
    "transformer": dict(_class_name="FluxTransformer2DModel", attention_head_dim=128, axes_dims_rope=[16, 56, 56],
                        guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
                        num_layers=3, num_single_layers=5, out_channels=None, patch_size=1, pooled_projection_dim=768),
    "vae": dict(_class_name="AutoencoderKL", block_out_channels=[128, 256, 512, 512], down_block_types=[
        "DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, layers_per_block=2,
        norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False),
    "text_encoder": dict(architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_size=768,
                         intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", eos_token_id=2),
    "text_encoder_2": dict(architectures=["T5EncoderModel"], model_type="t5", d_model=4096, d_kv=64, d_ff=10240,
                           num_heads=64, num_layers=1, feed_forward_proj="gated-gelu", vocab_size=32128,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128),
}
SHARD_BYTES = 10**9


def state_dict_shapes(family: str) -> dict:
    """PyTorch name -> shape of every tensor the family's converter expects."""
    import jax
    from flax import traverse_util

    if family == "dit":
        from jdiffsample.nets import dit

        module = dit.build("DiT", dit.arch_kwargs("DiT-XL/2"))
        layout = dit.LAYOUT
        inputs = dit.example_inputs(module)
    else:
        from jdiffsample.nets import edm2
        from jdiffsample.nets.formats import statedict

        module = edm2.build("Precond", edm2.PRESETS["edm2-img512-xxl"])
        layout = statedict.DEFAULT
        inputs = edm2.example_inputs(module)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return {layout.key(p): tuple(layout.shape(p, leaf.shape))
            for p, leaf in traverse_util.flatten_dict(abstract["params"]).items()}


def flux_shapes(part: str) -> dict:
    """diffusers/transformers name -> shape of every tensor of a part of :data:`FLUX_CONFIGS`."""
    import jax
    from flax import traverse_util

    from jdiffsample.nets import clip, diffusers_blocks, flux_transformer, t5, vae

    config = FLUX_CONFIGS[part]
    build, layout = {"transformer": (flux_transformer, flux_transformer.LAYOUT), "vae": (vae, diffusers_blocks.LAYOUT),
                     "text_encoder": (clip, clip.LAYOUT), "text_encoder_2": (t5, t5.LAYOUT)}[part]
    name = config.get("_class_name") or config["architectures"][0]
    module = build.build(name, config)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *build.example_inputs(module))
    shapes = {layout.key(p): tuple(layout.shape(p, leaf.shape))
              for p, leaf in traverse_util.flatten_dict(abstract["params"]).items()}
    for key in [k for k in shapes if k.endswith(".weight:attn")]:  # the single blocks' proj_out, as stored
        base = key[: -len(":attn")]
        rows, cols = shapes.pop(key), shapes.pop(base + ":mlp")
        shapes[base] = (rows[0], rows[1] + cols[1])
    return shapes


def write_safetensors(path: Path, shapes: dict, rng) -> int:
    """Random bfloat16 tensors of ``shapes`` written one at a time (header first); returns the bytes."""
    import ml_dtypes

    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        header[name] = dict(dtype="BF16", shape=list(shape), data_offsets=[offset, offset + nbytes])
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, shape in shapes.items():
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in) + (len(shape) == 1)
            f.write(value.astype(ml_dtypes.bfloat16).tobytes())
    return path.stat().st_size


def write_flux_folder(path: Path, tokenizers: Path) -> int:
    """A FLUX.1 pipeline folder of :data:`FLUX_CONFIGS` with sharded bfloat16 weights (shards of at most
    :data:`SHARD_BYTES`, with their index); the tokenizers, scheduler and model_index.json copied from
    ``tokenizers`` (a FLUX fixture folder). Returns the bytes of weights written."""
    import shutil

    rng = np.random.default_rng(0)
    total = 0
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(tokenizers / name, path / name, dirs_exist_ok=True)
    shutil.copyfile(tokenizers / "model_index.json", path / "model_index.json")
    for part, config in FLUX_CONFIGS.items():
        folder = path / part
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
        shards, size = [{}], 0
        for name, shape in flux_shapes(part).items():
            nbytes = int(np.prod(shape)) * 2
            if size and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = shape
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(folder / file, shard, rng)
            weight_map.update({name: file for name in shard})
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(dict(metadata={}, weight_map=weight_map)))
    return total


#: Runs ``jdiffsample convert`` and reports the process's own peak resident memory (VmHWM). Not
#: ``RUSAGE_CHILDREN``: Linux carries a forked child's memory high-water mark over from its parent's
#: (``signal->maxrss`` survives the exec), so a child of this script, which has just generated gigabytes
#: of random weights, would report at least this script's size.
_CHILD = """import sys
from jdiffsample import cli
code = cli.main(sys.argv[1:])
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("VmHWM_kB", peak, file=sys.stderr)
sys.exit(code)"""


def convert_peak(family: str, src: Path, dst: Path, options=()) -> tuple[int, float, str]:
    """``(peak RSS bytes, seconds, stdout)`` of ``jdiffsample convert`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, "convert", family, str(src), str(dst), *options,
                           "--overwrite"], capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"convert failed:\n{proc.stderr}")
    peak = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VmHWM_kB"))) * 1024
    return peak, seconds, proc.stdout.strip()


def write_checkpoint(family: str, path: Path) -> int:
    import torch

    dtype = getattr(torch, CASES[family]["dtype"])
    rng = np.random.default_rng(0)
    sd = {k: torch.from_numpy(rng.standard_normal(s, dtype=np.float32)).to(dtype)
          for k, s in state_dict_shapes(family).items()}
    torch.save(sd, path)
    return sum(v.numel() for v in sd.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(CASES), required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--tokenizers", type=Path, help="flux: a FLUX fixture folder (tokenizers, scheduler)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.family == "flux":
        return flux_main(args)
    src, dst = args.workdir / f"{args.family}.pt", args.workdir / f"{args.family}-converted"
    if not src.exists():
        params = write_checkpoint(args.family, src)
        print(f"wrote {src} ({params:,} parameters)", flush=True)
    case = CASES[args.family]
    option = ["--arch", case["arch"]] if "arch" in case else ["--preset", case["preset"]]
    peak, seconds, out = convert_peak(args.family, src, dst, option)
    size = src.stat().st_size
    print(json.dumps(dict(family=args.family, checkpoint_bytes=size, dtype=case["dtype"], peak_rss_bytes=peak,
                          peak_over_checkpoint=round(peak / size, 2), seconds=round(seconds, 1), converter=out)))
    return 0


def flux_main(args) -> int:
    if args.tokenizers is None:
        raise SystemExit("--family flux needs --tokenizers (a FLUX fixture folder such as flux_tiny)")
    src, dst = args.workdir / "flux", args.workdir / "flux-converted"
    if not (src / "model_index.json").exists():
        print(f"wrote {write_flux_folder(src, args.tokenizers):,} bytes of weights to {src}", flush=True)
    size = sum(p.stat().st_size for p in src.rglob("*.safetensors"))
    base, _, _ = convert_peak("flux", args.tokenizers, args.workdir / "flux-tiny-converted")
    peak, seconds, out = convert_peak("flux", src, dst)
    print(json.dumps(dict(family="flux", folder_bytes=size, dtype="bfloat16", peak_rss_bytes=peak,
                          peak_over_folder=round(peak / size, 3), tiny_fixture_peak_rss_bytes=base,
                          above_tiny_over_folder=round((peak - base) / size, 3), seconds=round(seconds, 1),
                          converter=out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
