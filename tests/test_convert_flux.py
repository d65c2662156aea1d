"""Tests for ``jdiffsample convert flux`` (``jdiffsample.nets.flux.convert``) on folders laid out as the
released ones (components split into numbered bfloat16 safetensors with their index), its refusal
of bad folders, and the streaming save it relies on (``nets.formats.lazy``, ``nets.formats.checkpoint``).

References: the ``flux_tiny`` fixture re-saved here in bfloat16 and sharded by diffusers' and
transformers' own ``save_pretrained``, and their ``FluxTransformer2DModel`` / ``T5EncoderModel`` loaded
from those files (test-only).
"""

from __future__ import annotations

import json
import shutil
import weakref

import jax
import numpy as np
import pytest
from conftest import fixture_dir, require
from _helpers import assert_convert_fails, rel_err

from jdiffsample import cli, nets
from jdiffsample.nets import flux, t5
from jdiffsample.nets.formats import checkpoint, lazy
from jdiffsample.nets import flux_transformer as ft


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The fixture with its transformer and T5 saved in bfloat16, split into shards with an index."""
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    base = fixture_dir("flux_tiny")
    folder = tmp_path_factory.mktemp("released") / "FLUX.1-tiny"
    shutil.copytree(base, folder, ignore=lambda d, names: [n for n in names if n in ("transformer", "text_encoder_2",
                                                                                      "io.npz")])
    diffusers.FluxTransformer2DModel.from_pretrained(base / "transformer").to(torch.bfloat16).save_pretrained(
        folder / "transformer", max_shard_size="100KB")
    transformers.T5EncoderModel.from_pretrained(base / "text_encoder_2").to(torch.bfloat16).save_pretrained(
        folder / "text_encoder_2", max_shard_size="40KB")
    return folder


def test_released_layout(released, tmp_path):
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    shards = sorted(p.name for p in (released / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (released / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (released / "text_encoder_2" / "model.safetensors.index.json").is_file()
    dst = tmp_path / "ckpt"
    assert cli.main(["convert", "flux", str(released), str(dst)]) == 0
    model = nets.load_model(dst)
    dtypes = {part: {x.dtype.name for x in jax.tree.leaves(tree)} for part, tree in model.variables["params"].items()}
    assert dtypes == dict(transformer={"bfloat16"}, text_encoder_2={"bfloat16"}, vae={"float32"},
                          text_encoder={"float32"})
    config = json.loads((dst / "config.json").read_text())
    assert config["scheduler"]["use_dynamic_shifting"] and config["default_max_sequence_length"] == 512
    assert config["schedule"]["type"] == "RectifiedFlow"
    assert (dst / "tokenizer_2" / "tokenizer.json").is_file() and (dst / "tokenizer" / "vocab.json").is_file()

    # the stored bf16 weights, computed in float32, are the originals' (upcast) forward
    reference = diffusers.FluxTransformer2DModel.from_pretrained(released / "transformer").float().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 16)).astype(np.float32)
    enc, pooled = rng.standard_normal((2, 3, 32)).astype(np.float32), rng.standard_normal((2, 32)).astype(np.float32)
    t, g = np.array([0.9, 0.2], np.float32), np.array([3.5, 1.0], np.float32)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model.apply(x, enc, pooled, t, g))
    with torch.no_grad():
        theirs = reference(hidden_states=torch.from_numpy(np.asarray(ft.pack_latents(x))),
                           encoder_hidden_states=torch.from_numpy(enc), pooled_projections=torch.from_numpy(pooled),
                           timestep=torch.from_numpy(t), img_ids=torch.from_numpy(ft.latent_image_ids(4, 6)),
                           txt_ids=torch.from_numpy(ft.text_ids(3)), guidance=torch.from_numpy(g)).sample.numpy()
    assert rel_err(ft.pack_latents(ours), theirs) < 1e-5
    ids = t5.T5Tokenizer.from_folder(dst / "tokenizer_2")(["a photo of the cat"], max_length=9)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model.apply(ids, method=lambda m, i: m.text_encoder_2(i)))
    t5_reference = transformers.T5EncoderModel.from_pretrained(released / "text_encoder_2").float().eval()
    with torch.no_grad():
        theirs = t5_reference(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    assert rel_err(ours, theirs) < 1e-5


def _copy(src, dst, skip=()):
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip])
    return dst


def test_refuses_bad_folders(released, tmp_path, capsys):
    dst = tmp_path / "out"
    no_t5 = _copy(released, tmp_path / "no_t5", skip=("text_encoder_2",))
    shards = sorted((released / "transformer").glob("*.safetensors"))
    missing_shard = _copy(released, tmp_path / "missing_shard")
    (missing_shard / "transformer" / shards[1].name).unlink()
    bad_index = _copy(released, tmp_path / "bad_index")
    index_file = bad_index / "text_encoder_2" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["encoder.final_layer_norm.weight"] = "model-00009-of-00009.safetensors"
    index_file.write_text(json.dumps(index))
    truncated = _copy(released, tmp_path / "truncated")
    data = (released / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    (truncated / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    mixed = _copy(released, tmp_path / "mixed")
    config = json.loads((mixed / "text_encoder_2" / "config.json").read_text())
    (mixed / "text_encoder_2" / "config.json").write_text(json.dumps(dict(config, d_model=48)))
    cases = [(fixture_dir("sd3_tiny"), "StableDiffusion3Pipeline.*convert sd3"),
             (fixture_dir("sd_tiny"), "StableDiffusionPipeline"),
             (no_t5, "text_encoder_2/ folder is missing"), (missing_shard, f"shard {shards[1].name} is missing"),
             (bad_index, "model-00009-of-00009.safetensors is missing"), (truncated, "truncated"),
             (mixed, "T5's d_model is 48")]
    for src, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            flux.convert(src, dst)
        assert "\n" not in str(err.value) and not dst.exists()
        assert_convert_fails("flux", src, dst, [], pattern, capsys)
    dst.mkdir()
    with pytest.raises(FileExistsError):
        flux.convert(released, dst)


def test_streaming_save_reads_few_arrays_at_once(tmp_path, monkeypatch):
    """Lazy leaves are read while they are written, one at a time under a small budget, and the
    checkpoint restores as any other."""
    monkeypatch.setattr(checkpoint, "SAVE_CONCURRENT_GB", 1e-6)  # 1 kB: each 16 kB array alone
    live, reads, peak = set(), [], [0]

    def reader(i):
        def read():
            array = np.full((64, 64), i, np.float32)
            live.add(i)
            reads.append(i)
            peak[0] = max(peak[0], len(live))
            weakref.finalize(array, live.discard, i)
            return array
        return read

    leaves = {f"w{i}": lazy.LazyArray(reader(i), (64, 64), np.float32) for i in range(12)}
    leaves["t"] = lazy.LazyArray(reader(99), (64, 64), np.float32)[:, 8:40].T.astype(np.float16)
    summary = checkpoint.save_converted(tmp_path / "ck", "vae", "AutoencoderKL", {}, {"params": leaves}, tensors=13,
                                        started=0.0)
    assert summary["parameters"] == 12 * 64 * 64 + 32 * 64
    assert sorted(reads) == [*range(12), 99] and peak[0] <= 2, (reads, peak)
    restored = checkpoint.restore(tmp_path / "ck")["params"]
    for i in range(12):
        np.testing.assert_array_equal(restored[f"w{i}"], np.full((64, 64), i, np.float32))
    assert restored["t"].shape == (32, 64) and restored["t"].dtype == np.float16


def test_lazy_array_operations(tmp_path):
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a = lazy.LazyArray(lambda: values.copy(), values.shape, values.dtype)
    for op in (lambda x: x.T, lambda x: x.transpose(1, 0, 2), lambda x: x[:, 1:, ::2], lambda x: x[1],
               lambda x: x.astype(np.float16).T[::-1]):
        np.testing.assert_array_equal(np.asarray(op(a)), op(values))
        assert op(a).shape == op(values).shape and op(a).dtype == op(values).dtype
    with pytest.raises(ValueError, match="basic indices"):
        a[np.array([0, 1])]
