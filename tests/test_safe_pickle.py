"""scmctl.safe_pickle: every code-execution payload kind is refused (or rebuilt inert) and never
runs; plain data, numpy arrays and torch tensors round-trip exactly."""

import io
import os
import pickle
import subprocess
from collections import OrderedDict

import numpy as np
import pytest
import torch

from _cli import Payload
from edm_snapshots import Persistent, dump, marker_source, plain_load
from scmctl import safe_pickle
from scmctl.safe_pickle import PersistentObject, RefusedPickle


class _StorageWithPayload:
    """Pickles as torch.storage._load_from_bytes(bytes) whose bytes are a torch.save'd payload."""

    def __init__(self, blob):
        self.blob = blob

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


def _payloads(marker):
    m = str(marker).encode()
    torch_blob = io.BytesIO()
    torch.save(Payload(os.system, f"touch {marker}"), torch_blob, _use_new_zipfile_serialization=False)
    return {
        "os.system": pickle.dumps(Payload(os.system, f"touch {marker}")),
        "eval": pickle.dumps(Payload(eval, f"open({str(marker)!r}, 'w')")),
        "exec": pickle.dumps(Payload(exec, f"open({str(marker)!r}, 'w')")),
        # getattr(__import__('os'), 'system')('touch MARKER'), written by hand (protocol 0)
        "getattr chain": b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch " + m + b"'\ntR.",
        "subprocess": pickle.dumps(Payload(subprocess.call, ["touch", str(marker)])),
        "open via nested dict": pickle.dumps({"a": [1, {"b": Payload(open, str(marker), "w")}]}, protocol=2),
        "numpy object array": pickle.dumps({"x": np.array([{"a": 1}, None], dtype=object)}),
        "torch storage hiding a payload": pickle.dumps(_StorageWithPayload(torch_blob.getvalue())),
        "persistent id": b"\x80\x04P0\n.",
    }


@pytest.mark.parametrize("kind", list(_payloads("M")))
def test_every_payload_kind_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "ran"
    blob = _payloads(marker)[kind]
    for opts in ({}, {"torch_tensors": True}, {"snapshots": True}):
        with pytest.raises(RefusedPickle, match="refusing to"):
            safe_pickle.loads(blob, **opts)
        assert not marker.exists()
    if kind not in ("numpy object array", "persistent id"):   # the payload is live under plain pickle
        try:
            pickle.loads(blob)
        except Exception:       # noqa: BLE001 - some payloads fail after having run
            pass
        assert marker.exists(), kind


class _Module(Persistent):
    pass


def test_persistent_object_is_an_inert_record_and_its_source_never_runs(tmp_path):
    marker = tmp_path / "ran"
    _Module.module_src = marker_source(marker)
    obj = _Module()
    obj.weight, obj.note = torch.arange(6.0).reshape(2, 3), "kept"
    blob = dump({"ema": obj})
    rec = safe_pickle.loads(blob, snapshots=True)["ema"]
    assert isinstance(rec, PersistentObject) and rec.class_name == "_Module"
    assert torch.equal(rec.state["weight"], obj.weight) and rec.state["note"] == "kept"
    assert not marker.exists()
    with pytest.raises(RefusedPickle, match="torch_utils.persistence._reconstruct_persistent_obj"):
        safe_pickle.loads(blob, torch_tensors=True)      # only the snapshot reader accepts them
    plain_load(blob)                                     # EDM's own unpickling runs the source
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_arrays_and_tensors_round_trip_exactly(protocol):
    p = torch.nn.Parameter(torch.randn(3, 4).half())
    strided = torch.arange(24.0).reshape(4, 6)[:, 1::2]           # a view: offset and strides
    data = {"n": [1, 2.5, "s", b"b", None, True, (1, 2), {3}, complex(1, 2)],
            "a": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.float64(2.5),
            "rec": np.zeros(2, dtype=[("x", "<f4"), ("y", "<i8")]),
            "od": OrderedDict(k=1)}
    out = safe_pickle.loads(pickle.dumps(data, protocol=protocol))
    assert out["n"] == data["n"] and out["s"] == 2.5 and out["od"] == data["od"]
    assert np.array_equal(out["a"], data["a"]) and out["a"].dtype == np.float32
    assert out["rec"].dtype == data["rec"].dtype
    tens = {"p": p, "v": strided, "b": torch.tensor(True), "i": torch.arange(5)}
    blob = pickle.dumps(tens, protocol=protocol)
    with pytest.raises(RefusedPickle, match="torch._utils._rebuild"):
        safe_pickle.loads(blob)                                       # arrays-only readers refuse tensors
    got = safe_pickle.loads(blob, torch_tensors=True)
    for k, v in tens.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.detach()), k
    assert type(got["p"]) is torch.Tensor                              # parameters come back inert


def test_structured_dtype_with_an_object_field_is_refused():
    arr = np.zeros(2, dtype=[("x", "<f4"), ("o", "O")])
    with pytest.raises(RefusedPickle, match="object array"):
        safe_pickle.loads(pickle.dumps(arr))


def test_tensor_reaching_past_its_storage_is_refused():
    class Evil:
        def __reduce__(self):
            st = torch.zeros(4).storage()
            return torch._utils._rebuild_tensor_v2, (st, 0, (100,), (1,), False, OrderedDict())
    with pytest.raises(RefusedPickle, match="past its storage"):
        safe_pickle.loads(pickle.dumps(Evil()), torch_tensors=True)
