"""Weight bytes per device of the released FLUX.1 and SD3.5 pipelines at --model-parallel N.

No weights are needed: the Flax modules are built from the released configurations (written out
below, as the released folders' config.json files give them) and their parameter shapes are split
with the families' rules (:mod:`jdiffsample.nets.sharding`), the same rules the runner applies; the
transformer and T5 counted in bfloat16 (as released), CLIP and the VAE in float32 (as converted).
The runner's manifest reports the same sums from the placed arrays (``param_bytes_per_device``)::

    python benchmarks/param_bytes.py --model-parallel 1 2 4 8
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from jdiffsample.nets import flux, sd3, sharding

CLIP_L = dict(_class_name="CLIPTextModel", model_type="clip_text_model", hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, projection_dim=768, eos_token_id=2, pad_token_id=1, bos_token_id=0)
CLIP_G = dict(CLIP_L, _class_name="CLIPTextModelWithProjection", hidden_size=1280, intermediate_size=5120,
              num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(_class_name="T5EncoderModel", model_type="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6, is_gated_act=True,
              dense_act_fn="gelu_new")
VAE16 = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=16,
             layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
             use_post_quant_conv=False, down_block_types=["DownEncoderBlock2D"] * 4,
             up_block_types=["UpDecoderBlock2D"] * 4, mid_block_add_attention=True)
PIPELINES = {
    "FLUX.1-dev": (flux, "FluxPipeline", dict(
        transformer=dict(attention_head_dim=128, num_attention_heads=24, num_layers=19, num_single_layers=38,
                         joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, patch_size=1,
                         axes_dims_rope=[16, 56, 56], guidance_embeds=True),
        vae=dict(VAE16, scaling_factor=0.3611, shift_factor=0.1159), text_encoder=CLIP_L, text_encoder_2=T5_XXL)),
    "SD3.5-large": (sd3, "StableDiffusion3Pipeline", dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                         num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
                         dual_attention_layers=[]),
        vae=dict(VAE16, scaling_factor=1.5305, shift_factor=0.0609), text_encoder=dict(CLIP_L, _class_name=
        "CLIPTextModelWithProjection"), text_encoder_2=CLIP_G, text_encoder_3=T5_XXL, num_train_timesteps=1000)),
}
#: parts stored in bfloat16 as released (the others are converted to float32)
BF16_PARTS = ("transformer", "text_encoder_2", "text_encoder_3")


def part_of(path: str) -> str:
    return path.split("/")[1]


def bytes_per_device(family, class_name: str, kwargs: dict, n: int) -> tuple[int, int]:
    """``(bytes on one device, bytes of one copy)`` of the pipeline's weights at model-parallel ``n``."""
    module = family.build(class_name, kwargs)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *family.example_inputs(module))
    rule = family.FAMILY.sampling.sharding
    per_device = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        name = sharding.path_names(path)
        itemsize = 2 if name.startswith("params/") and part_of(name) in BF16_PARTS else 4
        size = int(np.prod(leaf.shape)) * itemsize
        spec = sharding.spec(name, leaf.shape, n, rule)
        total += size
        per_device += size // n if any(a is not None for a in spec) else size
    return per_device, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-parallel", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    rows = {}
    for name, (family, class_name, kwargs) in PIPELINES.items():
        for n in args.model_parallel:
            per, total = bytes_per_device(family, class_name, kwargs, n)
            rows[f"{name} N={n}"] = dict(per_device_gb=round(per / 1e9, 2), total_gb=round(total / 1e9, 2),
                                         share=round(per / total, 3))
            print(f"{name:12s} --model-parallel {n}: {per / 1e9:6.2f} GB per device of {total / 1e9:6.2f} GB "
                  f"({per / total:.3f})", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
