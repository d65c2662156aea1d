"""Tests for jdiffsample.nets.formats.torchfile: reading PyTorch files without torch or code execution.

torch is used (through conftest.require) only to *create* files; the reader never imports it.
Synthetic files are also written byte for byte by ``_torch_pickles``, so most tests need no torch.
"""

import io
import json
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import _torch_pickles as tp
from conftest import FIXTURES, fixture_dir, missing, require

from jdiffsample.nets.formats import torchfile
from jdiffsample.nets.formats.torchfile import (CheckpointFormatError, UnsafeCheckpointError,
                                        load_edm_pickle, load_state_dict)

def _torch():
    return require("torch")


# ---------------------------------------------------------------------------------------------
# state dicts written by real torch


def _reference(t):
    """What a tensor should read back as (bf16/float8 compared through float32)."""
    torch = _torch()
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return t.float().numpy()
    return t.numpy()


def _torch_state_dict():
    torch = _torch()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    flat = torch.randn(100, generator=g)  # like guided-diffusion's flat fp32 master buffer
    return {
        "f32": base,
        "transposed": base.t(),                      # same storage, other strides
        "strided": base[1:5:2, 2:9:3],               # offset and steps
        "expanded": base[0].expand(4, 10),           # stride 0
        "master.a": flat[0:12].view(3, 4),           # views into one flat buffer
        "master.b": flat[12:20].view(2, 2, 2),
        "f64": torch.randn(3, dtype=torch.float64, generator=g),
        "f16": base.half(),
        "bf16": base.bfloat16()[2:],
        "f8": torch.linspace(-2, 2, 8).to(torch.float8_e4m3fn),
        "i64": torch.arange(5),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "u16": torch.arange(4).to(torch.uint16),     # a "new" dtype: _rebuild_tensor_v3
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2, 3)),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_state_dict_reads_back_exactly(tmp_path, legacy):
    torch = _torch()
    sd = _torch_state_dict()
    path = tmp_path / "sd.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = load_state_dict(path)
    assert list(got) == list(sd)
    for k, t in sd.items():
        ref = _reference(t)
        value = got[k]
        assert value.shape == tuple(t.shape), k
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            assert value.dtype == {torch.bfloat16: ml_dtypes.bfloat16,
                                   torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn}[t.dtype]
            value = value.astype(np.float32)
        else:
            assert value.dtype == ref.dtype, k
        assert np.array_equal(value, ref), k
    # tensors sharing a storage share memory, as in torch; views are read-only
    assert np.shares_memory(got["f32"], got["transposed"])
    # views into one flat buffer lie back to back in it
    a, b = got["master.a"], got["master.b"]
    assert a.ctypes.data + a.nbytes == b.ctypes.data
    assert not got["f32"].flags.writeable


def test_copy_gives_independent_writable_arrays(tmp_path):
    torch = _torch()
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({"a": base, "t": base.t()}, tmp_path / "sd.pt")
    got = load_state_dict(tmp_path / "sd.pt", copy=True)
    assert got["t"].flags.c_contiguous and got["t"].flags.writeable
    assert not np.shares_memory(got["a"], got["t"])
    got["a"][0, 0] = 99
    assert got["t"][0, 0] == 0
    no_mmap = load_state_dict(tmp_path / "sd.pt", mmap=False)
    assert np.array_equal(no_mmap["t"], base.t().numpy())


def test_fixture_state_dicts_match_torch_load():
    torch = _torch()
    paths = sorted(FIXTURES.glob("*/state_dict.pt"))
    if not paths:
        missing(f"fixtures not found at {FIXTURES}")
    for path in paths:
        ref = torch.load(path, weights_only=True)
        got = load_state_dict(path)
        assert list(got) == list(ref)
        for k, t in ref.items():
            assert np.array_equal(got[k], t.numpy()), (path, k)


def test_wrapped_checkpoint_needs_key(tmp_path):
    torch = _torch()
    sd = {"w": torch.ones(2), "b": torch.zeros(1)}
    torch.save({"state_dict": sd, "ema": {"inner": sd}, "step": 7}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointFormatError, match=r"pass key=.*'state_dict'"):
        load_state_dict(tmp_path / "ckpt.pt")
    assert set(load_state_dict(tmp_path / "ckpt.pt", key="state_dict")) == {"w", "b"}
    assert set(load_state_dict(tmp_path / "ckpt.pt", key=["ema", "inner"])) == {"w", "b"}
    with pytest.raises(CheckpointFormatError, match="no entry 'model'.*state_dict"):
        load_state_dict(tmp_path / "ckpt.pt", key="model")
    with pytest.raises(CheckpointFormatError, match="'inner' is a dict, not a tensor"):
        load_state_dict(tmp_path / "ckpt.pt", key="ema")


def test_plain_pickled_tensors_use_nested_blobs():
    """pickle.dumps of real tensors (as inside EDM snapshots) reads back through
    torch.storage._load_from_bytes without torch."""
    torch = _torch()
    base = torch.arange(20.0).reshape(4, 5)
    blob = pickle.dumps({"p": torch.nn.Parameter(base[1:3]), "t": base.t(),
                         "h": base.half()}, protocol=4)
    got = torchfile.read_pickle(io.BytesIO(blob), "blob")
    assert np.array_equal(got["p"], base[1:3].numpy())
    assert np.array_equal(got["t"], base.t().numpy())
    assert got["h"].dtype == np.float16


# ---------------------------------------------------------------------------------------------
# synthetic files written without torch


def test_synthetic_zip_big_endian_and_geometry(tmp_path):
    data = np.arange(24, dtype=np.float32)
    s = tp.Storage(data, "0")
    root = OrderedDict(a=tp.tensor(s, 0, (4, 6)), t=tp.tensor(s, 0, (6, 4), (1, 6)),
                       off=tp.tensor(s, 5, (2, 3), (6, 2)),
                       old=tp.tensor(tp.Storage(np.arange(3, dtype=np.int64), "1"), v2=False))
    for order in ("little", "big"):
        tp.write_zip(tmp_path / f"{order}.pt", root, byteorder=order)
        got = load_state_dict(tmp_path / f"{order}.pt")
        full = data.reshape(4, 6)
        assert np.array_equal(got["a"], full)
        assert np.array_equal(got["t"], full.T)
        assert np.array_equal(got["off"], [[data[5 + 6 * i + 2 * j] for j in range(3)]
                                           for i in range(2)])
        assert np.array_equal(got["old"], [0, 1, 2]) and got["old"].dtype == np.int64
        assert got["a"].dtype == np.float32  # native order


def test_synthetic_legacy_file(tmp_path):
    a = np.arange(6, dtype=np.float32)
    b = np.arange(4, dtype=np.int64)
    root = OrderedDict(x=tp.array_tensor(a.reshape(2, 3), "10"),
                       y=tp.array_tensor(b, "11"))
    (tmp_path / "legacy.pt").write_bytes(tp.legacy_blob(root))
    got = load_state_dict(tmp_path / "legacy.pt")
    assert np.array_equal(got["x"], a.reshape(2, 3)) and np.array_equal(got["y"], b)


# ---------------------------------------------------------------------------------------------
# EDM snapshot pickles


def _fixture_edm():
    folder = fixture_dir("edm_ncsnpp_ve_tiny")
    cfg = json.loads((folder / "config.json").read_text())
    return cfg, load_state_dict(folder / "state_dict.pt", copy=True)


def test_synthetic_edm_snapshot(tmp_path):
    cfg, sd = _fixture_edm()
    sentinel = tmp_path / "pwned"
    src = f"open({str(sentinel)!r}, 'w').write('module_src was executed')\n"
    kwargs = dict(cfg["kwargs"], dropout=np.float64(0.0))   # numpy scalars occur in real kwargs
    net = tp.edm_network(cfg["class_name"], kwargs, sd, module_src=src)
    (tmp_path / "snap.pkl").write_bytes(tp.edm_snapshot(net))
    name, init, got = load_edm_pickle(tmp_path / "snap.pkl")
    assert name == cfg["class_name"] == "VEPrecond"
    assert init == cfg["kwargs"] and type(init["dropout"]) is float
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], sd[k]), k
    assert not sentinel.exists()


def test_edm_positional_args_and_default_model_type(tmp_path):
    sd = {"model.w": np.ones((2, 2), np.float32)}
    net = tp.edm_network("EDMPrecond", dict(model_channels=8), sd, init_args=(16, 3, 10))
    (tmp_path / "s.pkl").write_bytes(tp.edm_snapshot(net))
    name, init, got = load_edm_pickle(tmp_path / "s.pkl")
    assert init == dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=8,
                        model_type="DhariwalUNet")
    assert list(got) == ["model.w"]


def test_edm_snapshot_pickled_by_real_torch(tmp_path, monkeypatch):
    """Real torch modules whose __reduce__ is that of torch_utils.persistence (NEWOBJ
    ModuleDicts, Parameters, nested storage blobs, numpy scalars)."""
    torch = _torch()
    cfg, sd = _fixture_edm()

    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # resolved by pickle.dump only; never called
        raise AssertionError("must not be called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

    class Persistent(torch.nn.Module):
        def __init__(self, class_name, **init_kwargs):
            super().__init__()
            self._orig_class_name = class_name
            self._init_args, self._init_kwargs = (), dict(init_kwargs)

        def __reduce__(self):
            meta = dict(type="class", version=6, module_src="import os\nos.system('false')\n",
                        class_name=self._orig_class_name, state=dict(self.__dict__))
            return (_reconstruct_persistent_obj, (meta,), None)

    root = Persistent(cfg["class_name"], **cfg["kwargs"])
    root.skip_scale = np.float64(np.sqrt(0.5))
    for key, value in sd.items():
        *mods, leaf = key.split(".")
        node = root
        for m in mods:
            if m not in node._modules:
                child = torch.nn.ModuleDict() if m in ("enc", "dec") else Persistent("Block")
                node.add_module(m, child)
            node = node._modules[m]
        t = torch.from_numpy(np.array(value))
        if leaf in ("resample_filter", "freqs"):
            node.register_buffer(leaf, t)
        else:
            node.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    data = dict(ema=root.eval(), augment_pipe=None, dataset_kwargs=dict(xflip=False))
    (tmp_path / "snap.pkl").write_bytes(pickle.dumps(data, protocol=4))

    name, init, got = load_edm_pickle(tmp_path / "snap.pkl")
    assert name == cfg["class_name"] and init == cfg["kwargs"]
    ref = root.state_dict()
    assert list(got) == list(ref)
    for k, t in ref.items():
        assert np.array_equal(got[k], t.numpy()), k


@pytest.mark.parametrize("class_name", ["SongUNet", "EDM2Precond", "Evil"])
def test_edm_unsupported_class_is_refused(tmp_path, class_name):
    net = tp.edm_network(class_name, dict(img_resolution=8), {"w": np.ones(2, np.float32)})
    (tmp_path / "s.pkl").write_bytes(tp.edm_snapshot(net))
    with pytest.raises(CheckpointFormatError, match=f"unsupported network class '{class_name}'"):
        load_edm_pickle(tmp_path / "s.pkl")


def test_edm_unsupported_model_type_is_refused(tmp_path):
    net = tp.edm_network("EDMPrecond", dict(model_type="UNet2DModel"), {})
    (tmp_path / "s.pkl").write_bytes(tp.edm_snapshot(net))
    with pytest.raises(CheckpointFormatError, match="unsupported model_type 'UNet2DModel'"):
        load_edm_pickle(tmp_path / "s.pkl")


def test_edm_snapshot_without_ema(tmp_path):
    (tmp_path / "s.pkl").write_bytes(tp.dumps(dict(loss_fn=None), protocol=4))
    with pytest.raises(CheckpointFormatError, match="no 'ema' entry"):
        load_edm_pickle(tmp_path / "s.pkl")


def test_edm_reader_rejects_torch_save_files_and_vice_versa(tmp_path):
    tp.write_zip(tmp_path / "sd.pt", OrderedDict(w=tp.array_tensor(np.ones(2, np.float32), "0")))
    with pytest.raises(CheckpointFormatError, match="not an EDM snapshot"):
        load_edm_pickle(tmp_path / "sd.pt")
    (tmp_path / "legacy.pt").write_bytes(tp.legacy_blob(OrderedDict()))
    with pytest.raises(CheckpointFormatError, match="not an EDM snapshot"):
        load_edm_pickle(tmp_path / "legacy.pt")
    (tmp_path / "s.pkl").write_bytes(tp.edm_snapshot(None))
    with pytest.raises(CheckpointFormatError, match="not a torch.save file.*load_edm_pickle"):
        load_state_dict(tmp_path / "s.pkl")
    kinds = {p.name: torchfile.file_kind(p) for p in tmp_path.iterdir()}
    assert kinds == {"sd.pt": "zip", "legacy.pt": "legacy", "s.pkl": "pickle"}


# ---------------------------------------------------------------------------------------------
# malicious files: refused, nothing executed

def _payloads(sentinel: Path):
    cmd = f"touch {sentinel}"
    code = f"open({str(sentinel)!r}, 'w').close()"
    return [
        ("os", "system", (cmd,)),
        ("posix", "system", (cmd,)),
        ("nt", "system", (cmd,)),
        ("subprocess", "Popen", (["touch", str(sentinel)],)),
        ("subprocess", "check_call", (["touch", str(sentinel)],)),
        ("builtins", "eval", (code,)),
        ("builtins", "exec", (code,)),
        ("builtins", "getattr", (tp.Reduce(tp.Global("builtins", "__import__"), ("os",)),
                                 "system")),
        ("builtins", "__import__", ("os",)),
        ("__builtin__", "eval", (code,)),
        ("runpy", "_run_code", (code, {})),
        ("torch", "load", (str(sentinel),)),
        ("torch.serialization", "load", (str(sentinel),)),
        ("numpy", "load", (str(sentinel),)),
        ("torch_utils.persistence", "persistent_class", (None,)),
    ]


def _payload_ids():
    return [f"{m}.{n}" for m, n, _ in _payloads(Path("x"))]


def _evil(sentinel, i):
    module, name, args = _payloads(sentinel)[i]
    return tp.Reduce(tp.Global(module, name), args), f"{'builtins' if module == '__builtin__' else module}.{name}"


@pytest.mark.parametrize("i", range(len(_payload_ids())), ids=_payload_ids())
def test_malicious_globals_are_refused_everywhere(tmp_path, i):
    sentinel = tmp_path / "pwned"
    evil, full = _evil(sentinel, i)
    good = tp.array_tensor(np.ones(3, np.float32), "0")
    cases = {}
    # 1. the data.pkl of a zip-format torch.save file
    tp.write_zip(tmp_path / "zip.pt", OrderedDict(w=good, x=evil))
    cases["zip"] = lambda: load_state_dict(tmp_path / "zip.pt")
    # 2. a legacy torch.save file
    (tmp_path / "legacy.pt").write_bytes(tp.legacy_blob(OrderedDict(x=evil, w=good)))
    cases["legacy"] = lambda: load_state_dict(tmp_path / "legacy.pt")
    # 3. the top level of a plain pickle
    (tmp_path / "top.pkl").write_bytes(tp.dumps(dict(ema=evil), protocol=4))
    cases["top"] = lambda: load_edm_pickle(tmp_path / "top.pkl")
    # 4. deep inside an EDM network's module state
    net = tp.edm_network("EDMPrecond", {}, {"model.w": np.ones(2, np.float32)},
                         extra_modules={"hook": evil})
    (tmp_path / "deep.pkl").write_bytes(tp.edm_snapshot(net))
    cases["deep"] = lambda: load_edm_pickle(tmp_path / "deep.pkl")
    # 5. inside a nested storage blob (torch.storage._load_from_bytes)
    blob = tp.Reduce(tp.Global("torch.storage", "_load_from_bytes"), (tp.legacy_blob(evil),))
    net = tp.edm_network("EDMPrecond", {}, {"model.w": np.ones(2, np.float32)},
                         tensor_fn=lambda a, key, p: tp.parameter(tp.tensor(blob, 0, a.shape)))
    (tmp_path / "nested.pkl").write_bytes(tp.edm_snapshot(net))
    cases["nested"] = lambda: load_edm_pickle(tmp_path / "nested.pkl")
    for where, load in cases.items():
        with pytest.raises(UnsafeCheckpointError, match=f"global {full},"):
            load()
        assert not sentinel.exists(), where


def test_protocol_0_inst_opcode_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    (tmp_path / "p0.pkl").write_bytes(f"(S'touch {sentinel}'\nios\nsystem\n.".encode())
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        load_edm_pickle(tmp_path / "p0.pkl")
    assert not sentinel.exists()


def test_module_src_is_never_executed(tmp_path):
    """A snapshot whose embedded source would write a file loads without running it."""
    sentinel = tmp_path / "pwned"
    src = (f"import os\nopen({str(sentinel)!r}, 'w').write('x')\n"
           f"os.system('touch {sentinel}')\n")
    net = tp.edm_network("VPPrecond", {}, {"model.w": np.ones(2, np.float32)}, module_src=src)
    (tmp_path / "s.pkl").write_bytes(tp.edm_snapshot(net))
    name, _, sd = load_edm_pickle(tmp_path / "s.pkl")
    assert name == "VPPrecond" and list(sd) == ["model.w"]
    assert not sentinel.exists()


def test_pickled_module_record_is_refused(tmp_path):
    """torch.save(model) of a whole module: its class global is refused."""
    torch = _torch()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        load_state_dict(tmp_path / "m.pt")


# ---------------------------------------------------------------------------------------------
# damaged files


def _good_zip(path, n=100):
    root = OrderedDict(a=tp.array_tensor(np.arange(n, dtype=np.float32), "0"),
                       b=tp.array_tensor(np.ones(30, np.float32), "3"))
    tp.write_zip(path, root)
    return root


def test_truncated_zip(tmp_path):
    _good_zip(tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        load_state_dict(tmp_path / "cut.pt")


def test_short_storage_in_zip(tmp_path):
    root = OrderedDict(a=tp.array_tensor(np.ones(100, np.float32), "3"))
    tp.write_zip(tmp_path / "short.pt", root, storage_bytes={"3": b"\0" * 120})
    with pytest.raises(CheckpointFormatError,
                       match="storage archive/data/3 is 120 bytes, tensor needs 400"):
        load_state_dict(tmp_path / "short.pt")


def test_missing_storage_in_zip(tmp_path):
    root = OrderedDict(a=tp.array_tensor(np.ones(4, np.float32), "7"))
    tp.write_zip(tmp_path / "missing.pt", root, storage_bytes={"7": None})
    with pytest.raises(CheckpointFormatError, match="archive/data/7 is missing"):
        load_state_dict(tmp_path / "missing.pt")


def test_corrupt_storage_bytes_fail_crc(tmp_path):
    _good_zip(tmp_path / "ok.pt")
    raw = bytearray((tmp_path / "ok.pt").read_bytes())
    at = raw.index(np.arange(100, dtype=np.float32)[50:52].tobytes())
    raw[at] ^= 0xFF
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match="archive/data/0 fails its CRC check"):
        load_state_dict(tmp_path / "bad.pt")
    with pytest.raises(CheckpointFormatError, match="archive/data/0"):
        load_state_dict(tmp_path / "bad.pt", mmap=False)


def test_tensor_beyond_its_storage(tmp_path):
    s = tp.Storage(np.ones(10, np.float32), "0")
    tp.write_zip(tmp_path / "view.pt", OrderedDict(a=tp.tensor(s, 4, (3, 3))))
    with pytest.raises(CheckpointFormatError,
                       match=r"holds 10 elements \(40 bytes\).*size \[3, 3\].*offset 4 needs 13"):
        load_state_dict(tmp_path / "view.pt")


def test_truncated_legacy_file(tmp_path):
    root = OrderedDict(a=tp.array_tensor(np.ones(100, np.float32), "5"))
    raw = tp.legacy_blob(root)
    (tmp_path / "cut.pt").write_bytes(raw[:-100])
    with pytest.raises(CheckpointFormatError, match=r"storage 5 is 300 bytes, tensor needs 400"):
        load_state_dict(tmp_path / "cut.pt")
    (tmp_path / "cut2.pt").write_bytes(raw[:40])
    with pytest.raises(CheckpointFormatError, match="corrupt or truncated pickle"):
        load_state_dict(tmp_path / "cut2.pt")


def test_legacy_count_mismatch(tmp_path):
    s = tp.Storage(np.ones(4, np.float32), "1")
    raw = tp.legacy_blob(OrderedDict(a=tp.tensor(s, 0, (4,))), counts=[3])
    (tmp_path / "bad.pt").write_bytes(raw)
    with pytest.raises(CheckpointFormatError, match="recorded with 3 elements.*says 4"):
        load_state_dict(tmp_path / "bad.pt")


def test_truncated_edm_snapshot(tmp_path):
    net = tp.edm_network("EDMPrecond", {}, {"model.w": np.ones(50, np.float32)})
    raw = tp.edm_snapshot(net)
    (tmp_path / "cut.pkl").write_bytes(raw[: len(raw) - 300])
    with pytest.raises(CheckpointFormatError, match="corrupt or truncated"):
        load_edm_pickle(tmp_path / "cut.pkl")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        load_state_dict(tmp_path / "notes.txt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        load_state_dict(tmp_path / "empty.pt")


def test_payloads_would_run_under_plain_pickle(tmp_path):
    """Sanity check of the malicious-file tests: plain pickle does execute such a payload."""
    sentinel = tmp_path / "pwned"
    evil, _ = _evil(sentinel, 1)  # posix.system
    if sys.platform == "win32":
        pytest.skip("posix only")
    pickle.loads(tp.dumps(evil))
    assert sentinel.exists()
