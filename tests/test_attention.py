"""scmctl.attention: primal backends, the forward-mode rule (chunked / fused / math), errors.

Every numeric check compares against an independent float64 computation written here: the
explicit softmax formula, differentiated by PyTorch's own forward/reverse AD, itself checked
against central finite differences. The fused Triton kernel runs under TRITON_INTERPRET=1 in a
subprocess (the interpreter must be chosen before triton is imported, and must not leak into the
other tests); the CUDA tests run the same kernel compiled, when a GPU is present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import scmctl.attention as A
from scmctl.attention import ATTENTION_BACKENDS, JVP_IMPLS, attention, attention_jvp
from scmctl.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- references

def ref_attention(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def ref_jvp(q, k, v, tq, tk, tv, scale=None):
    """float64 (O, tO) by PyTorch's forward AD through the explicit formula."""
    d = [t.detach().double().cpu() for t in (q, k, v, tq, tk, tv)]
    with torch.no_grad():
        return torch.func.jvp(lambda a, b, c: ref_attention(a, b, c, scale), tuple(d[:3]), tuple(d[3:]))


def rel(x, ref):
    x = x.detach().double().cpu()
    return float((x - ref).norm() / ref.norm())


def rand(*shape, dtype=torch.float32, gen=None, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def make(B, H, nq, nk, d, dv=None, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q, tq = rand(B, H, nq, d, dtype=dtype, gen=g, device=device), rand(B, H, nq, d, dtype=dtype, gen=g, device=device)
    k, tk = rand(B, H, nk, d, dtype=dtype, gen=g, device=device), rand(B, H, nk, d, dtype=dtype, gen=g, device=device)
    v, tv = rand(B, H, nk, dv, dtype=dtype, gen=g, device=device), rand(B, H, nk, dv, dtype=dtype, gen=g, device=device)
    return (q, k, v), (tq, tk, tv)


def func_jvp(primals, tangents, **kw):
    with torch.no_grad():
        return torch.func.jvp(lambda a, b, c: attention(a, b, c, **kw), primals, tangents)


# ----------------------------------------------------------------------------- the reference itself

def test_reference_jvp_matches_central_differences():
    (q, k, v), (tq, tk, tv) = make(1, 2, 9, 11, 8, dtype=torch.float64, seed=1)
    _, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    eps = 1e-6
    plus = ref_attention(q + eps * tq, k + eps * tk, v + eps * tv)
    minus = ref_attention(q - eps * tq, k - eps * tk, v - eps * tv)
    assert rel((plus - minus) / (2 * eps), t_ref) < 1e-8


def test_names_exported():
    assert ATTENTION_BACKENDS == ("auto", "xformers", "sdpa", "math")
    assert JVP_IMPLS == ("auto", "chunked", "fused", "math")


# ----------------------------------------------------------------------------- primal

@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_primal_and_gradients_match_float64(backend):
    (q, k, v), _ = make(2, 3, 37, 53, 32, seed=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, backend=backend)
    go = rand(*out.shape, gen=torch.Generator().manual_seed(3))
    out.backward(go)

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = ref_attention(*ref_leaves)
    ref.backward(go.double())
    assert rel(out, ref.detach()) < 1e-6
    for got, want in zip(leaves, ref_leaves):
        assert rel(got.grad, want.grad) < 1e-5


def test_primal_gradients_are_the_backends_own():
    """Without tangents the op is the backend itself: SDPA's output and gradients, bit for bit."""
    (q, k, v), _ = make(1, 2, 40, 40, 16, seed=4)
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    attention(*a, backend="sdpa", scale=0.3).square().sum().backward()
    torch.nn.functional.scaled_dot_product_attention(*b, scale=0.3).square().sum().backward()
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


def test_resolution_on_cpu(monkeypatch):
    assert A.resolve_backend("auto", "cpu") == "sdpa"
    assert A.resolve_jvp_impl("auto", "cpu") == "chunked"
    # even with xformers importable, auto never picks it for CPU tensors
    monkeypatch.setattr(A, "_xformers_ops", lambda: types.SimpleNamespace())
    assert A.resolve_backend("auto", "cpu") == "sdpa"


# ----------------------------------------------------------------------------- chunked jvp

CHUNKED_CASES = [
    # B, H, Nq, Nk, D, Dv, chunk
    (2, 3, 37, 53, 32, 32, 16),     # ragged: neither length a multiple of the chunk
    (1, 2, 20, 77, 16, 16, 7),      # cross-attention, Nq < Nk
    (1, 2, 90, 31, 64, 64, 32),     # cross-attention, Nq > Nk
    (1, 2, 50, 50, 128, 128, None),  # automatic chunking
    (2, 1, 33, 45, 24, 40, 10),     # D_v != D
]


@pytest.mark.parametrize("case", CHUNKED_CASES)
def test_chunked_jvp_matches_float64(case):
    B, H, nq, nk, d, dv, chunk = case
    (q, k, v), (tq, tk, tv) = make(B, H, nq, nk, d, dv, seed=sum(case[:5]))
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    o, t = func_jvp((q, k, v), (tq, tk, tv), jvp_impl="chunked", chunk_size=chunk)
    assert rel(o, o_ref) < 1e-6 and rel(t, t_ref) < 1e-6
    o2, t2 = attention_jvp(q, k, v, tq, tk, tv, impl="chunked", chunk_size=chunk)
    assert rel(o2, o_ref) < 1e-6 and rel(t2, t_ref) < 1e-6


def test_chunked_jvp_batch_head_groups(monkeypatch):
    """A tiny chunk budget forces groups of batch·heads as well as query chunks."""
    monkeypatch.setattr(A, "CHUNK_ELEMENTS", 64 * 29)
    (q, k, v), (tq, tk, tv) = make(3, 2, 41, 29, 16, seed=5)
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    o, t = func_jvp((q, k, v), (tq, tk, tv), jvp_impl="chunked")
    assert rel(o, o_ref) < 1e-6 and rel(t, t_ref) < 1e-6


def test_chunked_jvp_float64_inputs():
    (q, k, v), (tq, tk, tv) = make(1, 2, 30, 41, 32, dtype=torch.float64, seed=6)
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    o, t = func_jvp((q, k, v), (tq, tk, tv), jvp_impl="chunked", chunk_size=8, scale=0.2)
    assert o.dtype == torch.float64
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv, scale=0.2)
    assert rel(o, o_ref) < 1e-12 and rel(t, t_ref) < 1e-12


@pytest.mark.parametrize("impl", ["chunked", "math"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_jvp(impl, dtype):
    (q, k, v), (tq, tk, tv) = make(2, 2, 64, 80, 64, dtype=dtype, seed=7)
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    o, t = func_jvp((q, k, v), (tq, tk, tv), jvp_impl=impl)
    assert o.dtype == dtype and t.dtype == dtype
    assert rel(o, o_ref) < 3e-3 and rel(t, t_ref) < 3e-3


def test_math_jvp_matches_float64():
    (q, k, v), (tq, tk, tv) = make(1, 2, 21, 34, 16, seed=8)
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    o, t = func_jvp((q, k, v), (tq, tk, tv), jvp_impl="math")
    assert rel(o, o_ref) < 1e-6 and rel(t, t_ref) < 1e-6


def test_forward_ad_dual_tensors():
    """The torch.autograd.forward_ad API goes through the same rule."""
    (q, k, v), (tq, tk, tv) = make(1, 3, 25, 19, 16, seed=9)
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    with fwAD.dual_level():
        out = attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv),
                        jvp_impl="chunked", chunk_size=8)
        o, t = fwAD.unpack_dual(out)
    assert rel(o, o_ref) < 1e-6 and rel(t, t_ref) < 1e-6


def test_tangent_on_some_inputs_only():
    (q, k, v), (tq, tk, tv) = make(1, 2, 17, 23, 16, seed=10)
    zq, zk = torch.zeros_like(q), torch.zeros_like(k)
    # tangent on q only (k, v are constants of the function)
    with torch.no_grad():
        o, t = torch.func.jvp(lambda a: attention(a, k, v, jvp_impl="chunked"), (q,), (tq,))
    o_ref, t_ref = ref_jvp(q, k, v, tq, zk, torch.zeros_like(v))
    assert rel(o, o_ref) < 1e-6 and rel(t, t_ref) < 1e-6
    # tangent on v only, through forward_ad (the other inputs are plain tensors)
    with fwAD.dual_level():
        o, t = fwAD.unpack_dual(attention(q, k, fwAD.make_dual(v, tv), jvp_impl="chunked"))
    o_ref, t_ref = ref_jvp(q, k, v, zq, zk, tv)
    assert rel(o, o_ref) < 1e-6 and rel(t, t_ref) < 1e-6


def test_noncontiguous_inputs_from_qkv_projection():
    """q, k, v as the network makes them: strided views of one projection (last dim not unit
    stride), with the tangent flowing from the projection's input."""
    g = torch.Generator().manual_seed(11)
    n, c, heads, hw = 2, 48, 3, 29
    x, tx = rand(n, c, hw, gen=g), rand(n, c, hw, gen=g)
    w = rand(3 * c, c, gen=g) / c ** 0.5

    def block(x, impl):
        qkv = (w @ x).reshape(n, heads, c // heads, 3, hw)
        q, k, v = (a.transpose(-1, -2) for a in qkv.unbind(3))
        assert q.stride(-1) != 1
        return attention(q, k, v, jvp_impl=impl, chunk_size=8)

    def block_ref(x):
        qkv = (w.double() @ x).reshape(n, heads, c // heads, 3, hw)
        q, k, v = (a.transpose(-1, -2) for a in qkv.unbind(3))
        return ref_attention(q, k, v)

    with torch.no_grad():
        o, t = torch.func.jvp(lambda a: block(a, "chunked"), (x,), (tx,))
        o_ref, t_ref = torch.func.jvp(block_ref, (x.double(),), (tx.double(),))
    assert rel(o, o_ref) < 1e-6 and rel(t, t_ref) < 1e-6


def test_primal_gradients_through_the_jvp_function():
    """With grad enabled, the primal output of the jvp is differentiable: its gradients equal the
    float64 reference's (the Function's backward recomputes with the primal backend)."""
    (q, k, v), (tq, tk, tv) = make(1, 2, 26, 31, 16, seed=12)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, t = torch.func.jvp(lambda a, b, c: attention(a, b, c, jvp_impl="chunked", chunk_size=8),
                          tuple(leaves), (tq, tk, tv))
    go = rand(*o.shape, gen=torch.Generator().manual_seed(13))
    o.backward(go)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_attention(*ref_leaves).backward(go.double())
    _, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    assert rel(t, t_ref) < 1e-6
    for got, want in zip(leaves, ref_leaves):
        assert rel(got.grad, want.grad) < 1e-5


# ----------------------------------------------------------------------------- errors and xformers

def test_unknown_names_are_usage_errors():
    (q, k, v), _ = make(1, 1, 4, 4, 8)
    with pytest.raises(UsageError, match="unknown attention backend 'flash'"):
        attention(q, k, v, backend="flash")
    with pytest.raises(UsageError, match="unknown attention jvp_impl 'fast'"):
        with fwAD.dual_level():
            attention(fwAD.make_dual(q, q), k, v, jvp_impl="fast")
    with pytest.raises(UsageError, match="chunk_size"):
        attention(q, k, v, chunk_size=0)


def test_forced_xformers_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    (q, k, v), _ = make(1, 1, 4, 4, 8)
    with pytest.raises(UsageError) as e:
        attention(q, k, v, backend="xformers")
    assert str(e.value) == ("attention backend 'xformers' is not available: "
                            "xformers is not installed (pip install 'scmctl[xformers]')")
    assert A.resolve_backend("auto", "cpu") == "sdpa"


def test_forced_xformers_on_cpu(monkeypatch):
    monkeypatch.setattr(A, "_xformers_ops", lambda: types.SimpleNamespace())
    (q, k, v), _ = make(1, 1, 4, 4, 8)
    with pytest.raises(UsageError, match="'xformers' is not available: xformers has no CPU kernels"):
        attention(q, k, v, backend="xformers")


def _fake_xops(fail=False):
    def memory_efficient_attention(q, k, v, scale=None):  # (B, N, H, D) layout
        if fail:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    return types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)


def test_xformers_layout_and_fallback(monkeypatch):
    (q, k, v), _ = make(2, 3, 13, 17, 8, seed=14)
    ref = ref_attention(q.double(), k.double(), v.double())
    # the (B, H, N, D) <-> (B, N, H, D) transposes around xformers
    assert rel(A._xformers_attention(q, k, v, 8 ** -0.5, xops=_fake_xops()), ref) < 1e-6
    # chosen by "auto" but failing (no operator for this build): warn once, fall back to SDPA
    monkeypatch.setattr(A, "_xformers_ops", lambda: _fake_xops(fail=True))
    monkeypatch.setattr(A, "_xformers_broken", {})
    with pytest.warns(UserWarning, match="using SDPA"):
        out = A._primal(q, k, v, 8 ** -0.5, "xformers", forced=False)
    assert rel(out, ref) < 1e-6
    # forced: a one-line UsageError instead
    monkeypatch.setattr(A, "_xformers_broken", {})
    with pytest.raises(UsageError, match="xformers' failed on these tensors: No operator found"):
        A._primal(q, k, v, 8 ** -0.5, "xformers", forced=True)


def test_forced_fused_without_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (q, k, v), (tq, tk, tv) = make(1, 1, 4, 4, 8)
    with pytest.raises(UsageError, match="jvp_impl 'fused' is not available: the fused kernel needs CUDA"):
        func_jvp((q, k, v), (tq, tk, tv), jvp_impl="fused")
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(UsageError, match="triton is not installed"):
        func_jvp((q, k, v), (tq, tk, tv), jvp_impl="fused")


# ----------------------------------------------------------------------------- fused kernel, interpreted

_INTERPRETED_CHECKS = r"""
import json, os, sys, time
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
sys.path.insert(0, os.getcwd())
from scmctl.attention import attention, attention_jvp
from scmctl._attention_triton import fused_attention_jvp

def ref_jvp(q, k, v, tq, tk, tv):
    d = [t.double() for t in (q, k, v, tq, tk, tv)]
    s = q.shape[-1] ** -0.5
    f = lambda a, b, c: torch.softmax(a @ b.transpose(-1, -2) * s, -1) @ c
    return torch.func.jvp(f, tuple(d[:3]), tuple(d[3:]))

def rel(x, r):
    return float((x.double() - r).norm() / r.norm())

def make(B, H, nq, nk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(dtype)
    return r(nq), r(nk), r(nk), r(nq), r(nk), r(nk)

out = []
cases = [  # B, H, Nq, Nk, D, dtype, block_m, block_n
    (1, 2, 128, 128, 32, "float32", None, None),  # the issue's reference shape, even tiles
    (2, 3, 37, 53, 32, "float32", 16, 16),         # ragged, several tiles and a partial one
    (1, 2, 20, 77, 16, "float32", 16, 32),         # cross-attention, D = 16
    (1, 1, 45, 40, 80, "float32", 16, 16),         # D = 80 (padded to 128 lanes)
    (1, 1, 33, 50, 128, "float32", 32, 16),        # D = 128
    (1, 2, 64, 80, 64, "bfloat16", 16, 32),
    (1, 2, 64, 80, 64, "float16", 32, 16),
]
for i, (B, H, nq, nk, d, dt, bm, bn) in enumerate(cases):
    q, k, v, tq, tk, tv = make(B, H, nq, nk, d, getattr(torch, dt), 100 + i)
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    t0 = time.time()
    o = torch.full((B, H, nq, d), float("nan"), dtype=q.dtype)  # poisoned: every row must be written
    to = torch.full_like(o, float("nan"))
    fused_attention_jvp(q, k, v, tq, tk, tv, d ** -0.5, out=o, tangent_out=to, block_m=bm, block_n=bn)
    out.append({"case": [B, H, nq, nk, d, dt], "err_o": rel(o, o_ref), "err_t": rel(to, t_ref),
                "finite": bool(torch.isfinite(o).all() and torch.isfinite(to).all()),
                "seconds": time.time() - t0})

# through torch.func.jvp, with q/k/v strided views of a qkv projection
g = torch.Generator().manual_seed(7)
n, c, heads, hw = 2, 64, 2, 40
x, tx = torch.randn(n, c, hw, generator=g), torch.randn(n, c, hw, generator=g)
w = torch.randn(3 * c, c, generator=g) / c ** 0.5
def block(x, impl, dtype=torch.float32):
    qkv = (w.to(dtype) @ x).reshape(n, heads, c // heads, 3, hw)
    q, k, v = (a.transpose(-1, -2) for a in qkv.unbind(3))
    if impl is None:
        return torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, -1) @ v
    return attention(q, k, v, jvp_impl=impl)
with torch.no_grad():
    o, t = torch.func.jvp(lambda a: block(a, "fused"), (x,), (tx,))
    o_ref, t_ref = torch.func.jvp(lambda a: block(a, None, torch.float64), (x.double(),), (tx.double(),))
out.append({"case": "func.jvp strided", "err_o": rel(o, o_ref), "err_t": rel(t, t_ref), "finite": True})
print("RESULT " + json.dumps(out))
"""


def test_fused_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED_CHECKS)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=280)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    results = json.loads(lines[0][7:])
    assert len(results) == 8
    for r in results:
        half = isinstance(r["case"], list) and r["case"][-1] != "float32"
        tol = 3e-3 if half else 1e-6
        assert r["finite"], r
        assert r["err_o"] < tol and r["err_t"] < tol, r


# ----------------------------------------------------------------------------- CUDA (compiled kernel)

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the device machine)")

CUDA_CASES = [
    (2, 4, 256, 256, 64, torch.bfloat16),
    (2, 4, 256, 256, 64, torch.float16),
    (1, 4, 300, 517, 64, torch.bfloat16),   # ragged cross-attention
    (2, 2, 129, 129, 128, torch.bfloat16),
    (2, 2, 100, 70, 32, torch.float16),
    (1, 3, 77, 200, 16, torch.bfloat16),
    (2, 2, 190, 130, 64, torch.float32),
    (1, 2, 64, 96, 80, torch.float32),
]


@cuda_only
@pytest.mark.parametrize(
    "case,autotune", [(c, False) for c in CUDA_CASES] + [(c, True) for c in CUDA_CASES[::3]],
    ids=["x".join(map(str, c[:5])) + "-" + str(c[5]).split(".")[1] + ("-tuned" if a else "-fixed")
         for c, a in [(c, False) for c in CUDA_CASES] + [(c, True) for c in CUDA_CASES[::3]]])
def test_fused_kernel_cuda(case, autotune):
    from scmctl._attention_triton import fused_attention_jvp

    B, H, nq, nk, d, dtype = case
    (q, k, v), (tq, tk, tv) = make(B, H, nq, nk, d, dtype=dtype, seed=nq + nk, device="cuda")
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    o = torch.full((B, H, nq, d), float("nan"), dtype=dtype, device="cuda")
    to = torch.full_like(o, float("nan"))
    fused_attention_jvp(q, k, v, tq, tk, tv, d ** -0.5, out=o, tangent_out=to, autotune=autotune)
    torch.cuda.synchronize()
    tol = 1e-6 if dtype == torch.float32 else 3e-3
    assert torch.isfinite(o).all() and torch.isfinite(to).all()
    assert rel(o, o_ref) < tol and rel(to, t_ref) < tol


@cuda_only
@pytest.mark.parametrize("impl", ["auto", "fused", "chunked"])
def test_func_jvp_on_cuda(impl):
    (q, k, v), (tq, tk, tv) = make(2, 4, 200, 333, 64, dtype=torch.bfloat16, seed=21, device="cuda")
    assert A.resolve_jvp_impl("auto", "cuda", torch.bfloat16) == "fused"
    o_ref, t_ref = ref_jvp(q, k, v, tq, tk, tv)
    o, t = func_jvp((q, k, v), (tq, tk, tv), jvp_impl=impl)
    assert rel(o, o_ref) < 3e-3 and rel(t, t_ref) < 3e-3


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_primal_gradients_on_cuda(dtype):
    (q, k, v), _ = make(2, 4, 256, 256, 64, dtype=dtype, seed=22, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    go = rand(*q.shape, gen=torch.Generator().manual_seed(23), dtype=dtype, device="cuda")
    attention(*leaves).backward(go)
    ref_leaves = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    ref_attention(*ref_leaves).backward(go.double().cpu())
    for got, want in zip(leaves, ref_leaves):
        assert rel(got.grad, want.grad) < 1e-2


# ----------------------------------------------------------------------------- whole sCT step

def _sct_step(jvp_impl, device="cpu"):
    """Loss and gradients of one sCT step of a tiny U-Net (attention at 8×8 and 4×4)."""
    from scmctl.config import LossConfig, NetworkConfig
    from scmctl.losses import consistency_loss
    from scmctl.nn.unet import UNet

    cfg = NetworkConfig(resolution=8, channels=1, num_classes=0, model_channels=16,
                        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4], head_channels=8,
                        adaptive_weight_channels=16, attention_jvp=jvp_impl)
    torch.manual_seed(0)
    with torch.device(device):
        net = UNet(cfg)
    with torch.no_grad():
        net.out_gain.fill_(1.0)  # zero at init (EDM2): the output, its tangent and the loss would not see attention
    torch.manual_seed(1)
    x0 = (torch.rand(4, 1, 8, 8) * 2 - 1).to(device)
    out = consistency_loss(net, x0, None, LossConfig(tangent_warmup_steps=0), sigma_data=0.5, step=0)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def _grad_errors(grads, ref):
    """(relative error of all gradients together, worst relative error of one parameter's)."""
    assert grads.keys() == ref.keys() and len(ref) > 10
    num = sum((grads[n] - ref[n]).double().square().sum() for n in ref)
    den = sum(ref[n].double().square().sum() for n in ref)
    worst = max(float((grads[n] - ref[n]).double().norm() / ref[n].double().norm()) for n in ref)
    return float((num / den).sqrt()), worst


def test_sct_step_chunked_equals_math():
    loss_m, grads_m = _sct_step("math")
    loss_c, grads_c = _sct_step("chunked")
    assert torch.isfinite(loss_m) and loss_m.item() != 0
    assert abs(loss_c.item() - loss_m.item()) <= 1e-5 * abs(loss_m.item())
    total, worst = _grad_errors(grads_c, grads_m)
    assert total <= 1e-5 and worst <= 1e-5, (total, worst)


@cuda_only
def test_sct_step_fused_equals_math_on_cuda():
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        loss_m, grads_m = _sct_step("math", "cuda")
        loss_f, grads_f = _sct_step("fused", "cuda")
    assert abs(loss_f.item() - loss_m.item()) <= 1e-5 * abs(loss_m.item())
    total, worst = _grad_errors(grads_f, grads_m)
    assert total <= 1e-5 and worst <= 1e-4, (total, worst)
