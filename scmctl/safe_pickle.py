"""The one restricted unpickler: rebuilds a pickle's object graph as inert data, runs nothing.

Plain ``pickle.load`` calls whatever callable a file names (``os.system``, ``eval``, a class's
``__reduce__``); EDM/EDM2 network snapshots even carry their modules' Python source and execute
it. This unpickler resolves every global through an allow-list in ``find_class`` — *before* any
callable could be reached — and maps each allowed name to a function of ours that only builds data:

- builtin containers, numbers, strings, bytes (``_codecs.encode`` only as protocol-2 pickles use it
  for bytes), ``collections.OrderedDict``, sets;
- numpy arrays and scalars of plain dtypes (object dtypes are refused, also inside structured ones);
- with ``torch_tensors=True``: tensors and parameters as plain pickle stores them
  (``torch._utils._rebuild_tensor_v2`` over a storage serialized by ``torch.storage._load_from_bytes``;
  those bytes are read with ``torch.load(weights_only=True)``, itself restricted), and torch dtypes;
- with ``snapshots=True``: the persistent objects of EDM/EDM2 pickles
  (``torch_utils.persistence._reconstruct_persistent_obj(meta)``) as :class:`PersistentObject`
  records (class name + state; the embedded ``module_src`` is kept only as its sha256 and is never
  executed, compiled or imported), ``dnnlib.util.EasyDict`` as a plain dict, and torch's module
  containers (``ModuleDict``, ``ModuleList``, ``Sequential``) as :class:`InertObject` records.

Everything else is refused with :class:`RefusedPickle` naming the global. Callers turn that into
their own one-line ``UsageError``.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import io
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names something outside the allow-list (nothing in it was run)."""


@dataclass
class PersistentObject:
    """An EDM/EDM2 ``persistent_class`` instance, as data: its class name, the sha256 of the module
    source it carried (never run) and its ``__dict__``/state (parameters, buffers, submodules)."""
    class_name: str
    module_sha256: str
    state: dict
    version: int = 0


class InertObject:
    """An instance of an allowed plain class (e.g. ``torch.nn.ModuleDict``) as data: the dotted
    class name and the state its pickle set. Subclassed per name by :func:`_inert_class`."""
    type_name = "?"

    def __init__(self):
        self.state: Any = None

    def __setstate__(self, state):          # BUILD stores the state; it sets no attributes
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.type_name}>"


class EasyDict(dict):
    """``dnnlib.util.EasyDict`` as a plain dict (attribute access is not restored)."""

    def __setstate__(self, state):          # a dict subclass's (empty) __dict__: ignored
        pass


# Plain torch classes that EDM/EDM2 networks hold as submodules; rebuilt as InertObject records.
INERT_CLASSES = ("torch.nn.modules.container.ModuleDict", "torch.nn.modules.container.ModuleList",
                 "torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Identity")
PERSISTENT_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
EASYDICT_NAMES = (("dnnlib.util", "EasyDict"), ("dnnlib", "EasyDict"))


def _inert_class(dotted: str) -> type:
    return type(dotted.rsplit(".", 1)[-1], (InertObject,), {"type_name": dotted})


# --- numpy ----------------------------------------------------------------------------------------

def _plain_dtype(d) -> np.dtype:
    d = np.dtype(d)
    if d.hasobject:
        raise RefusedPickle("refusing to load a numpy object array (it can hold arbitrary objects)")
    return d


def _dtype(spec, align=False, copy=False):
    return _plain_dtype(np.dtype(spec, align, copy))


def _numpy_attr(name: str, modules: tuple[str, ...]):
    for m in modules:                      # numpy 2 moved numpy.core to numpy._core
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    return None


def _reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise RefusedPickle("refusing to load an ndarray subclass")
    return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(dtype_code))


def _scalar(dtype, data=None):
    _plain_dtype(dtype)
    return _numpy_attr("scalar", ("numpy._core.multiarray", "numpy.core.multiarray"))(dtype, data)


def _frombuffer(buf, dtype, shape, order):
    return np.frombuffer(buf, dtype=_plain_dtype(dtype)).reshape(shape, order=order)


def _latin1(obj, encoding="latin1"):
    # Protocol <= 2 pickles store bytes as _codecs.encode(str, "latin1"): allow exactly that.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle("refusing to load _codecs.encode with other than a latin1 string")
    return obj.encode("latin1")


# --- torch ----------------------------------------------------------------------------------------

def _load_storage(blob):
    """``torch.storage._load_from_bytes``: the bytes are a torch.save of one storage; read them with
    torch's own restricted loader (weights_only), which refuses any code they might hide."""
    import torch

    if not isinstance(blob, (bytes, bytearray)):
        raise RefusedPickle("refusing to load a torch storage that is not bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(blob)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise RefusedPickle(f"refusing to load a torch storage holding other than tensor data ({first})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise RefusedPickle(f"refusing to load a malformed torch storage ({e.__class__.__name__})") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise RefusedPickle(f"refusing to load a torch storage that holds a {type(storage).__name__}")
    return storage


def _no_hooks(hooks) -> None:
    if hooks:                                # an (Ordered)dict of callables would be code
        raise RefusedPickle("refusing to load a tensor with backward hooks")


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    import torch

    if not isinstance(storage, torch.storage.TypedStorage):
        raise RefusedPickle("refusing to rebuild a tensor from other than a torch storage")
    _no_hooks(backward_hooks)
    ints = (storage_offset, *size, *stride)
    if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
        raise RefusedPickle("refusing to rebuild a tensor with a malformed size or stride")
    need = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
    itemsize = torch.empty(0, dtype=storage.dtype).element_size()
    if need > storage._untyped_storage.nbytes() // itemsize:
        raise RefusedPickle("refusing to rebuild a tensor that reaches past its storage")
    t = torch.empty(0, dtype=storage.dtype)
    return t.set_(storage._untyped_storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    import torch

    if not isinstance(data, torch.Tensor):
        raise RefusedPickle("refusing to rebuild a parameter from other than a tensor")
    _no_hooks(backward_hooks)
    return data                              # parameters come back as plain tensors


def _torch_dtype(name: str):
    import torch

    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise RefusedPickle(f"refusing to load torch.{name}")
    return d


# --- persistent objects and plain classes ---------------------------------------------------------

def _persistent(meta):
    """``_reconstruct_persistent_obj(meta)`` as an inert record; meta['module_src'] is hashed only."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise RefusedPickle("refusing to load a persistent object that is not a class instance")
    name, src, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if not isinstance(name, str) or not isinstance(src, str) or not isinstance(state, dict):
        raise RefusedPickle("refusing to load a malformed persistent object")
    return PersistentObject(class_name=name, module_sha256=hashlib.sha256(src.encode()).hexdigest(),
                            state=dict(state), version=int(meta.get("version", 0) or 0))


def _reconstructor(cls, base, state=None):
    """``copyreg._reconstructor`` (protocol 0/1 objects), for our inert classes only."""
    if isinstance(cls, type) and issubclass(cls, EasyDict) and base is dict and isinstance(state, (dict, type(None))):
        return cls(state or {})
    if not (isinstance(cls, type) and issubclass(cls, InertObject)) or base is not object or state is not None:
        raise RefusedPickle("refusing to reconstruct an instance of a class outside the allow-list")
    return cls.__new__(cls)


def _bytearray(data=b"", *args):
    # protocol 2-4 pickles bytearray(b"...") as a call; only that form (no bytearray(10**12))
    if isinstance(data, str) and args:
        return bytearray(_latin1(data, *args))
    if not isinstance(data, bytes):
        raise RefusedPickle("refusing to load bytearray of other than bytes")
    return bytearray(data)


def _allowed(torch_tensors: bool, snapshots: bool) -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("_codecs", "encode"): _latin1,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex, ("builtins", "bytearray"): _bytearray,
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = _reconstruct
        table[(mod, "scalar")] = _scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = _frombuffer
    if torch_tensors or snapshots:
        table[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor
        table[("torch._utils", "_rebuild_parameter")] = _rebuild_parameter
        table[("torch._utils", "_rebuild_parameter_with_state")] = _rebuild_parameter
        table[("torch.storage", "_load_from_bytes")] = _load_storage
    if snapshots:
        table[PERSISTENT_RECONSTRUCT] = _persistent
        for key in EASYDICT_NAMES:
            table[key] = EasyDict
        for dotted in INERT_CLASSES:
            table[tuple(dotted.rsplit(".", 1))] = _inert_class(dotted)
        table[("copyreg", "_reconstructor")] = _reconstructor
        table[("builtins", "object")] = object
        table[("builtins", "dict")] = dict          # the base named by protocol-0 dict subclasses
    return table


PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, table: dict, torch_tensors: bool, **kwargs):
        super().__init__(f, **kwargs)
        self._table, self._torch = table, torch_tensors

    def find_class(self, module: str, name: str):
        module = PY2_MODULES.get(module, module)      # protocol <= 2 names (fix_imports)
        obj = self._table.get((module, name))
        if obj is None and self._torch and module == "torch":
            return _torch_dtype(name)
        if obj is None:
            raise RefusedPickle(f"refusing to load {module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise RefusedPickle("refusing to load a persistent id")


def _check_arrays(obj, seen: set) -> None:
    """No object arrays anywhere in the result (also built by a path the dtype check missed)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        _plain_dtype(obj.dtype)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_arrays(k, seen)
            _check_arrays(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_arrays(v, seen)
    elif isinstance(obj, PersistentObject):
        _check_arrays(obj.state, seen)
    elif isinstance(obj, InertObject):
        _check_arrays(obj.state, seen)


def loads(blob: bytes, *, torch_tensors: bool = False, snapshots: bool = False,
          encoding: str = "ASCII") -> Any:
    """Unpickle `blob` as inert data (see the module docstring for what is allowed).

    Raises :class:`RefusedPickle` for anything outside the allow-list, and the usual
    ``EOFError``/``ValueError``/... for a malformed stream. `encoding`: how protocol-2 pickles of
    Python 2 ``str`` are decoded ('bytes' keeps them as bytes, as the CIFAR-10 archive needs).
    """
    table = _allowed(torch_tensors, snapshots)
    obj = _Unpickler(io.BytesIO(blob), table, torch_tensors or snapshots, encoding=encoding).load()
    _check_arrays(obj, set())
    return obj


# Exceptions a malformed (not malicious) stream raises while being read.
MALFORMED = (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
             OverflowError, UnicodeDecodeError, RecursionError)
