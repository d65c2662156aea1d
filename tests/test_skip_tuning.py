"""Tests for jdiffsample.skip_tuning on the converted golden fixtures."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import assert_skips_scaled, skip_consumer_inputs
from conftest import fixture_dir

from jdiffsample import skip_tuning
from jdiffsample.nets import adm, edm
from jdiffsample.nets.formats import torchfile


# Decoder blocks of the 16x16, 3-level, 2-block fixtures that concatenate a skip, deepest first.
TINY_CONSUMERS = [f"{r}x{r}_block{i}" for r in (4, 8, 16) for i in range(3)]


def _load(name):
    folder = fixture_dir(name)
    cfg = json.loads((folder / "config.json").read_text())
    sd = torchfile.load_state_dict(folder / "state_dict.pt")
    io = dict(np.load(folder / "io.npz"))
    x = jnp.asarray(io["x"].transpose(0, 2, 3, 1))
    if cfg["class_name"] == "UNetModel":
        module = adm.build(cfg["kwargs"])
        variables = adm.convert_state_dict(cfg["kwargs"], sd)
        args = (x, jnp.asarray(io["timesteps"]), jnp.asarray(io["y"]))
    else:
        module = edm.build(cfg["class_name"], cfg["kwargs"])
        variables = edm.convert_state_dict(cfg["class_name"], cfg["kwargs"], sd)
        args = (x, jnp.asarray(io["sigma"]), jnp.asarray(io["class_labels"]))
    apply = jax.jit(module.apply)
    if cfg["class_name"] == "UNetModel":  # output block j's first block takes skip j
        consumers = {f"output_blocks_{j}_0" for j in range(len(variables["skip"]))}
        consumes = lambda m: m.name in consumers  # noqa: E731
    else:
        consumes = lambda m: tuple(m.path[-2:]) in {("dec", n) for n in TINY_CONSUMERS}  # noqa: E731
    inputs_of = skip_consumer_inputs(lambda v: module.apply(v, *args), variables, consumes)
    return dict(module=module, variables=variables, run=lambda v: np.asarray(apply(v, *args)),
                output=io["output"].transpose(0, 2, 3, 1), inputs_of=inputs_of)


@pytest.fixture(scope="module", params=["adm_guided_tiny", "edm_adm_edm_tiny"])
def net(request):
    return _load(request.param)


def test_identity_at_rho_one_is_bit_identical(net):
    base = net["run"](net["variables"])
    ref = net["output"]
    assert np.abs(base - ref).max() <= 1e-5 * np.abs(ref).max()  # it is the real network
    same = skip_tuning.apply(net["variables"], rho_top=1.0, rho_bottom=1.0)
    assert np.array_equal(net["run"](same), base)


@pytest.mark.parametrize("rho_top,rho_bottom", [(1.0, 0.7), (0.7, 1.0)])
def test_tuned_network_scales_each_skip(net, rho_top, rho_bottom):
    """The paper's schedule rho_i = rho_bottom + i (rho_top - rho_bottom) / k, i = 0 the deepest skip
    (consumed first), and each consuming block's input holds exactly rho_i times the skip."""
    tuned = skip_tuning.apply(net["variables"], rho_top=rho_top, rho_bottom=rho_bottom)["skip"]
    names = sorted(tuned)
    k = len(names) - 1
    expected = [rho_bottom + i * (rho_top - rho_bottom) / k for i in range(k + 1)]
    np.testing.assert_allclose([float(tuned[n]) for n in names], expected, rtol=1e-7)
    assert_skips_scaled(net["inputs_of"], {n: tuned[n] for n in names})
    assert np.all(np.isfinite(net["run"](skip_tuning.apply(net["variables"], rho_top=rho_top, rho_bottom=rho_bottom))))


def test_scales_follow_adm_architecture():
    cfg = json.loads((fixture_dir("adm_guided_tiny") / "config.json").read_text())
    kw = cfg["kwargs"]
    variables = adm.convert_state_dict(kw, torchfile.load_state_dict(
        fixture_dir("adm_guided_tiny") / "state_dict.pt"))
    n_input_blocks = 1 + len(kw["channel_mult"]) * kw["num_res_blocks"] + len(kw["channel_mult"]) - 1
    names = [name for name, _ in skip_tuning.scales(variables)]
    # one skip per input block; output block j consumes input block (n - 1 - j)
    assert names == [adm.skip_name(j) for j in range(n_input_blocks)]
    assert names[0] == "00_output_blocks.0" and names[-1] == "08_output_blocks.8"


@pytest.mark.parametrize("name", ["edm_adm_edm_tiny", "edm_ddpmpp_vp_tiny", "edm_ncsnpp_ve_tiny"])
def test_scales_follow_edm_architecture(name):
    cfg = json.loads((fixture_dir(name) / "config.json").read_text())
    module = edm.build(cfg["class_name"], cfg["kwargs"])
    variables = edm.convert_state_dict(cfg["class_name"], cfg["kwargs"], torchfile.load_state_dict(
        fixture_dir(name) / "state_dict.pt"))
    scales = skip_tuning.scales(variables)
    names = [n for n, _ in scales]
    assert names == list(module.skip_names)
    assert names == [f"{j:02d}_{block}" for j, block in enumerate(TINY_CONSUMERS)]
    assert all(value == 1.0 for _, value in scales)


def _toy(n=5, nested=False):
    skip = {f"{j:02d}_block{j}": np.float32(1.0) for j in reversed(range(n))}  # unsorted on purpose
    if nested:
        skip = {"model": skip}
    return {"params": {"w": np.ones(3, np.float32)}, "skip": skip}


@pytest.mark.parametrize("nested", [False, True])
def test_rho_schedule_and_order(nested):
    v = _toy(5, nested)
    tuned = skip_tuning.apply(v, rho_top=1.0, rho_bottom=0.6)
    scales = skip_tuning.scales(tuned)
    prefix = "model/" if nested else ""
    assert [n for n, _ in scales] == [f"{prefix}{j:02d}_block{j}" for j in range(5)]
    np.testing.assert_allclose([s for _, s in scales], [0.6, 0.7, 0.8, 0.9, 1.0], rtol=1e-6)
    leaf = tuned["skip"]["model"]["00_block0"] if nested else tuned["skip"]["00_block0"]
    assert leaf.dtype == np.float32 and leaf.shape == ()
    # rho_top on the outermost, rho_bottom on the deepest; setting is absolute, not cumulative
    again = skip_tuning.apply(tuned, rho_top=0.9, rho_bottom=0.5)
    np.testing.assert_allclose([s for _, s in skip_tuning.scales(again)],
                               [0.5, 0.6, 0.7, 0.8, 0.9], rtol=1e-6)


def test_apply_is_pure():
    v = _toy(3)
    before = skip_tuning.scales(v)
    tuned = skip_tuning.apply(v, rho_bottom=0.5)
    assert skip_tuning.scales(v) == before
    assert tuned is not v and tuned["skip"] is not v["skip"]
    assert tuned["params"] is v["params"]  # other collections are shared, not copied


def test_single_skip_gets_rho_bottom():
    v = {"skip": {"only": np.float32(1)}}
    assert skip_tuning.scales(skip_tuning.apply(v, rho_top=1.0, rho_bottom=0.8)) == [
        ("only", pytest.approx(0.8))]


def test_apply_is_traceable():
    v = _toy(3)
    f = jax.jit(lambda variables, r: skip_tuning.apply(variables, rho_bottom=r)["skip"])
    out = f(v, 0.4)
    np.testing.assert_allclose([out[k] for k in sorted(out)], [0.4, 0.7, 1.0], rtol=1e-6)


@pytest.mark.parametrize("variables, message", [
    ({"params": {}}, "no 'skip' collection"),
    ({"params": {}, "skip": {}}, "is empty"),
    ({"skip": 1.0}, "must be a mapping"),
    ([1, 2], "mapping of collections"),
    ({"skip": {"a": np.ones(2)}}, "expected a scalar"),
])
def test_bad_variables(variables, message):
    with pytest.raises(ValueError, match=message):
        skip_tuning.apply(variables, rho_bottom=0.5)
    with pytest.raises(ValueError, match=message):
        skip_tuning.scales(variables)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rho_bottom=float("nan")), "rho_bottom must be finite"),
    (dict(rho_top=float("inf")), "rho_top must be finite"),
    (dict(rho_bottom=True), "rho_bottom must be a real scalar"),
    (dict(rho_bottom=np.ones(2)), "rho_bottom must be a real scalar"),
    (dict(rho_top="1"), "rho_top must be a real scalar"),
])
def test_bad_rho(kwargs, message):
    with pytest.raises(ValueError, match=message):
        skip_tuning.apply(_toy(3), **kwargs)


def test_rhos_argument_checks():
    with pytest.raises(ValueError, match="positive integer"):
        skip_tuning.rhos(0)
    assert skip_tuning.rhos(3, 1.0, 0.0) == pytest.approx([0.0, 0.5, 1.0])
