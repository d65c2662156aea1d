"""The run's description, plan and runner: one declaration per setting (seen in --help, the manifest
and the API), --dry-run, one program for sample/eval/text2image, the micro-batch default, weights
split over a data x model mesh, and the checks of all of these."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
from _helpers import assert_cli_fails
from conftest import fixture_dir

from jdiffsample import cli, nets, pipeline, timesteps
from jdiffsample.commands import _flags
from jdiffsample.pipeline import settings as st


def _extended():
    """Settings with one more field, declared the way every field is."""
    return dataclasses.make_dataclass(
        "Extended", [("wobble", float, st.setting(0.5, "a new setting for this test", check=lambda v: float(v),
                                                  kind=float))],
        bases=(st.Settings,), frozen=True)


def test_a_new_field_is_a_flag_a_manifest_entry_and_a_keyword(tmp_path, monkeypatch, capsys):
    extended = _extended()
    parser = cli.argparse.ArgumentParser()
    _flags.add_settings(parser, extended)
    assert "--wobble" in parser.format_help() and "a new setting for this test (default 0.5)" in parser.format_help()
    args = parser.parse_args(["--wobble", "0.25", "--nfe", "3"])
    given = extended(**_flags.values(args, extended))
    assert given.wobble == 0.25 and given.nfe == 3
    assert given.to_json()["wobble"] == 0.25 and extended.from_json(given.to_json()) == given

    # the API takes it as a keyword, and the run's manifest records it (and fingerprints it)
    monkeypatch.setattr(pipeline.generate.__globals__["Settings"], "create", extended.create)
    out = tmp_path / "run"
    pipeline.generate("digits", out, num=2, nfe=2, wobble=0.75, log=None)
    assert pipeline.read_manifest(out)["settings"]["wobble"] == 0.75
    with pytest.raises(ValueError, match="unknown setting.*wobbel"):
        pipeline.generate("digits", tmp_path / "other", num=2, wobbel=1.0, log=None)


def test_every_field_is_declared_once_with_help_and_a_flag():
    for cls in (st.Settings, st.Output):
        for f in st.fields(cls):
            assert f.help and (f.flag is None or f.flag.startswith("--")), f
    flags = [f.flag for f in st.fields(st.Settings) + st.fields(st.Output) if f.flag]
    assert len(flags) == len(set(flags))
    assert st.Settings().threshold_ratio == 0.995  # the default is the declaration's


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["sample", "--model", "digits", "--out", str(out), "--nfe", "5", "--grid", "karras",
                     "--class-labels", "3", "--dry-run"]) == 0
    text = capsys.readouterr().out
    grid = timesteps.karras(nets.load_model("digits").schedule, 5)
    assert "grid: karras: " + ", ".join(f"{t:.4g}" for t in grid) in text
    assert "UniPC-3" in text and "labels: (3,) of 10 classes" in text and "micro-batch 64" in text
    assert not out.exists()


def test_the_micro_batch_defaults_to_what_the_run_needs(tmp_path):
    summary = pipeline.generate("digits", tmp_path / "four", num=4, nfe=2, log=None)
    manifest = pipeline.read_manifest(tmp_path / "four")
    assert manifest["settings"]["micro_batch"] == 4 and summary.generated == 4
    plan = pipeline.plan("digits", pipeline.Settings(nfe=2), num=4)
    assert plan.micro_batch == 4 and pipeline.Runner(plan, num=4).batch == 4
    assert pipeline.plan("digits", pipeline.Settings(nfe=2), num=500).micro_batch == st.DEFAULT_MICRO_BATCH
    # an explicit value is kept, and it is what the images depend on
    assert pipeline.plan("digits", pipeline.Settings(nfe=2, micro_batch=3), num=500).micro_batch == 3


def test_a_damaged_checkpoint_is_one_line_naming_the_array(tmp_path, capsys):
    """The digest and per-array checksums are written at conversion; flipped bytes in a variables
    file fail the load with one line instead of sampling with other weights."""
    folder = fixture_dir("edm_ddpmpp_vp_tiny")
    dst = tmp_path / "edm"
    assert cli.main(["convert", "edm", str(folder / "state_dict.pt"), str(dst), "--kwargs",
                     str(folder / "config.json")]) == 0
    config = nets.read_config(dst)
    assert len(config["digest"]) == 64 and len(config["checksums"]) > 20
    assert nets.model_digest(dst) == config["digest"]
    data = max((p for p in (dst / "variables").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert_cli_fails(["sample", "--model", dst, "--out", tmp_path / "out", "--num", "2"], "damaged", capsys,
                     tmp_path / "out")


@pytest.mark.parametrize("argv, message", [
    (["--model-parallel", "2"], "--model-parallel 2 splits the weights over 2 devices, but this process has one"),
    (["--model-parallel", "0"], "model_parallel (--model-parallel) must be a positive integer, got 0"),
])
def test_bad_mesh(argv, message, tmp_path, capsys):
    assert_cli_fails(["sample", "--model", "digits", "--out", tmp_path / "out", "--num", "2", *argv], message,
                     capsys, tmp_path / "out")


MESH_SCRIPT = textwrap.dedent("""
    import json, sys, warnings, jax, numpy as np
    warnings.filterwarnings("ignore", message=".*truncated.*")
    from jdiffsample import pipeline
    assert jax.device_count() == 8
    out = {}
    for name, model, extra in json.loads(sys.argv[1]):
        runs = {}
        for mp in (1, 4):
            plan = pipeline.plan(model, pipeline.Settings(nfe=2, seed=1, model_parallel=mp, **extra), num=2)
            runner = pipeline.Runner(plan, num=2)
            images, _ = runner(np.arange(2))
            runs[mp] = (images.astype(int), runner.param_bytes(), len(runner.devices))
        diff = int(np.abs(runs[1][0] - runs[4][0]).max())
        out[name] = dict(diff=diff, same=bool((runs[1][0] == runs[4][0]).all()),
                         share=runs[4][1]["per_device"] / runs[4][1]["total"],
                         full=runs[1][1]["per_device"] == runs[1][1]["total"], devices=runs[4][2])
    print(json.dumps(out))
""")


def test_weights_split_over_four_devices_give_the_same_images(tmp_path):
    """DiT, EDM2, the SD UNet, FLUX.1 and SD3 at model-parallel 4 on 8 CPU devices: the images of
    model-parallel 1 (within 2/255) with at most 0.3 of the weights' bytes on each device."""
    assert cli.main(["convert", "vae", str(fixture_dir("vae_tiny")), str(tmp_path / "vae")]) == 0
    for family, name, extra in (("dit", "dit_tiny", ["--vae", str(tmp_path / "vae")]), ("edm2", "edm2_tiny", [])):
        folder = fixture_dir(name)
        assert cli.main(["convert", family, str(folder / "state_dict.pt"), str(tmp_path / family), "--config",
                         str(folder / "config.json"), *extra]) == 0
    for family, name in (("sd", "sd_tiny"), ("flux", "flux_tiny"), ("sd3", "sd3_tiny")):
        assert cli.main(["convert", family, str(fixture_dir(name)), str(tmp_path / family)]) == 0
    text = dict(prompts=["a red cat"], negative_prompts=["blurry"], max_sequence_length=8)
    cases = [("dit", str(tmp_path / "dit"), dict(class_labels=3, guidance=2.0)),
             ("edm2", str(tmp_path / "edm2"), dict(class_labels=3)),
             ("sd", str(tmp_path / "sd"), dict(prompts=["a red cat"], guidance=3.0, negative_prompts=["blurry"])),
             ("flux", str(tmp_path / "flux"), dict(text, true_cfg=2.0, height=32, width=32)),
             ("sd3", str(tmp_path / "sd3"), dict(text, guidance=4.0, height=16, width=16))]
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in result.items():
        assert r["full"] and r["devices"] == 4 and r["share"] <= 0.3 and r["diff"] <= 2, (name, r)
