"""Scaled dot-product attention with a memory-efficient forward-mode JVP.

``attention(q, k, v)`` is the one attention op of every attention layer in scmctl. It has two jobs:

* **Primal forward/backward** (an ordinary training or sampling forward): dispatched to xformers'
  memory-efficient attention when it is installed and works on the tensors' device (CUDA), else to
  ``F.scaled_dot_product_attention`` (``backend="auto"``); ``"xformers"``, ``"sdpa"`` and ``"math"``
  force one. These calls carry PyTorch's own autograd, so gradients are exactly those of the backend.

* **Forward-mode AD** (``torch.func.jvp`` or ``torch.autograd.forward_ad``, used by the sCM loss):
  the fused SDPA/xformers kernels have no forward-AD rule, and the plain math JVP materializes about
  a dozen N×N buffers. When any of q, k, v carries a tangent, the call goes through an
  ``autograd.Function`` whose ``jvp`` applies the rule (S = Q·Kᵀ·scale, P = softmax(S), O = P·V)

      tS = (tQ·Kᵀ + Q·tKᵀ)·scale,   H = P ⊙ tS,   tO = P·tV + H·V − rowsum(H) ⊙ O

  with one of (``jvp_impl``):
    - ``"chunked"``: PyTorch, any device; queries (and batch·heads) in chunks, so memory is
      O(chunk·N_k); softmax statistics and all accumulation in fp32 (fp64 for fp64 inputs);
    - ``"fused"``: a Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``), one pass over the
      K/V tiles with online softmax and fp32 accumulators, O(N) memory;
    - ``"math"``: PyTorch's own forward AD through the explicit softmax formula (the naive
      reference: N×N buffers);
    - ``"auto"``: ``"fused"`` on CUDA when triton is importable, else ``"chunked"``.

  The chunked and fused paths compute O and tO *together* (one pass, P computed once): the
  Function's forward only allocates O and its ``jvp`` fills it. This is safe because the Function is
  only entered when a tangent is present, and autograd calls ``jvp`` right after ``forward`` inside
  the same ``apply``. The returned tangent carries no reverse-mode graph (sCM computes it under
  ``no_grad``); the primal output is differentiable (its backward recomputes the primal with the
  selected backend and differentiates that).
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import nullcontext

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from scmctl.errors import UsageError

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")
JVP_IMPLS = ("auto", "chunked", "fused", "math")

# Per chunk the chunked JVP keeps two (batch·heads, rows, N_k) fp32 buffers; this caps each one
# (16 MiB on a CPU; 256 MiB on a GPU, where larger matrix products run more efficiently).
CHUNK_ELEMENTS = 1 << 22
CHUNK_ELEMENTS_CUDA = 1 << 26

__all__ = [
    "ATTENTION_BACKENDS",
    "JVP_IMPLS",
    "attention",
    "attention_jvp",
    "resolve_backend",
    "resolve_jvp_impl",
]


# ---------------------------------------------------------------------------------------------
# availability probes

_xformers_broken: dict = {}  # (device type, dtype, head dims) -> reason the call failed


def _xformers_ops():
    """xformers.ops or None (not installed / import fails)."""
    try:
        import xformers.ops as xops  # noqa: PLC0415
    except Exception:  # ImportError, or a broken build raising on import
        return None
    return xops


def _xformers_unavailable_reason(device: torch.device) -> str | None:
    if _xformers_ops() is None:
        return "xformers is not installed (pip install 'scmctl[xformers]')"
    if device.type != "cuda":
        return f"xformers has no {device.type.upper()} kernels (it needs CUDA tensors)"
    return None


def _triton_unavailable_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401, PLC0415
    except Exception:
        return "triton is not installed (pip install triton)"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not interpreting:
        return f"the fused kernel needs CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to run it on the CPU interpreter)"
    return None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The primal backend that ``backend`` means on ``device`` ("xformers", "sdpa" or "math").

    Raises :class:`UsageError` for an unknown name or a forced backend that is not available.
    """
    device = torch.device(device)
    if backend not in ATTENTION_BACKENDS:
        raise UsageError(f"unknown attention backend {backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        return "xformers" if _xformers_unavailable_reason(device) is None else "sdpa"
    if backend == "xformers":
        reason = _xformers_unavailable_reason(device)
        if reason is not None:
            raise UsageError(f"attention backend 'xformers' is not available: {reason}")
    return backend


def resolve_jvp_impl(jvp_impl: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The JVP implementation that ``jvp_impl`` means for tensors on ``device`` of ``dtype``."""
    device = torch.device(device)
    if jvp_impl not in JVP_IMPLS:
        raise UsageError(f"unknown attention jvp_impl {jvp_impl!r}: choose one of {', '.join(JVP_IMPLS)}")
    fused_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if jvp_impl == "auto":
        if device.type == "cuda" and dtype in fused_dtypes and _triton_unavailable_reason(device) is None:
            return "fused"
        return "chunked"
    if jvp_impl == "fused":
        reason = _triton_unavailable_reason(device)
        if reason is None and dtype not in fused_dtypes:
            reason = f"the fused kernel supports float16, bfloat16 and float32 (got {dtype})"
        if reason is not None:
            raise UsageError(f"attention jvp_impl 'fused' is not available: {reason}")
    return jvp_impl


# ---------------------------------------------------------------------------------------------
# primal backends


def _math_attention(q, k, v, scale):
    """softmax(Q·Kᵀ·scale)·V with explicit ops (differentiable in both modes); fp32 inside for
    16-bit inputs."""
    dt = q.dtype
    if dt in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v).to(dt)


def _sdpa_attention(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _xformers_attention(q, k, v, scale, xops=None):
    """xformers takes (B, N, H, D); transpose in and out (views, no copies)."""
    xops = xops if xops is not None else _xformers_ops()
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)


def _primal(q, k, v, scale, backend, forced):
    """Primal attention with the resolved ``backend``. With ``backend="xformers"`` chosen by "auto",
    a failing xformers call (no operator for this build/device/dtype) falls back to SDPA once per
    (device, dtype, head dims) with a warning; a forced xformers failure is a UsageError."""
    if backend == "math":
        return _math_attention(q, k, v, scale)
    if backend == "xformers":
        key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1])
        if key not in _xformers_broken:
            try:
                return _xformers_attention(q, k, v, scale)
            except Exception as exc:  # xformers raises NotImplementedError/ValueError here
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if forced:
                    raise UsageError(f"attention backend 'xformers' failed on these tensors: {reason}") from exc
                _xformers_broken[key] = reason
                warnings.warn(f"xformers attention unusable here ({reason}); using SDPA", stacklevel=3)
        elif forced:
            raise UsageError(f"attention backend 'xformers' failed on these tensors: {_xformers_broken[key]}")
    return _sdpa_attention(q, k, v, scale)


# ---------------------------------------------------------------------------------------------
# forward-mode rule


def _chunked_attention_jvp(q, k, v, tq, tk, tv, scale, chunk_size=None, out=None, tangent_out=None):
    """O and tO by query chunks (and batch·head groups) in fp32/fp64; writes into out/tangent_out.

    Per chunk: P = softmax(S), O = P·V, H = P ⊙ tS, tO = P·tV + H·V − rowsum(H) ⊙ O.
    Peak extra memory ≈ 2 × bh·rows·N_k elements of the compute dtype (P and H), plus fp32 copies
    of q..tv for 16-bit inputs.
    """
    B, H, n_q, d_qk = q.shape
    n_k, d_v = k.shape[-2], v.shape[-1]
    bh = B * H
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty((B, H, n_q, d_v), device=q.device, dtype=q.dtype)
    if tangent_out is None:
        tangent_out = torch.empty((B, H, n_q, d_v), device=q.device, dtype=q.dtype)
    if n_q == 0 or bh == 0:
        return out, tangent_out

    def flat(t, scaled=False):
        t = t.reshape(bh, t.shape[-2], t.shape[-1]).to(cdt)
        return t * scale if scaled else t

    qs, tqs = flat(q, True), flat(tq, True)  # fold the scale into the queries
    kT, tkT = flat(k).transpose(1, 2), flat(tk).transpose(1, 2)
    vf, tvf = flat(v), flat(tv)
    out3, tout3 = out.view(bh, n_q, d_v), tangent_out.view(bh, n_q, d_v)  # contiguous buffers

    budget = CHUNK_ELEMENTS_CUDA if q.device.type == "cuda" else CHUNK_ELEMENTS
    rows = chunk_size or max(16, budget // max(1, bh * n_k))
    rows = min(rows, n_q)
    group = max(1, budget // max(1, rows * n_k)) if chunk_size is None else bh
    for b0 in range(0, bh, group):
        b1 = min(bh, b0 + group)
        kc, tkc, vc, tvc = kT[b0:b1], tkT[b0:b1], vf[b0:b1], tvf[b0:b1]
        for r0 in range(0, n_q, rows):
            r1 = min(n_q, r0 + rows)
            qc, tqc = qs[b0:b1, r0:r1], tqs[b0:b1, r0:r1]
            p = torch.softmax(torch.bmm(qc, kc), dim=-1)  # P (the S buffer is freed at once)
            o = torch.bmm(p, vc)
            hh = torch.bmm(tqc, kc).baddbmm_(qc, tkc)  # tS
            hh.mul_(p)  # H = P ⊙ tS
            r = hh.sum(dim=-1, keepdim=True)
            t = torch.bmm(p, tvc).baddbmm_(hh, vc).addcmul_(r, o, value=-1.0)
            del p, hh
            out3[b0:b1, r0:r1] = o
            tout3[b0:b1, r0:r1] = t
    return out, tangent_out


def _fused_attention_jvp(q, k, v, tq, tk, tv, scale, out=None, tangent_out=None, **kw):
    from scmctl._attention_triton import fused_attention_jvp  # noqa: PLC0415 (lazy: needs triton)

    return fused_attention_jvp(q, k, v, tq, tk, tv, scale, out=out, tangent_out=tangent_out, **kw)


def attention_jvp(q, k, v, tq, tk, tv, scale=None, impl="chunked", chunk_size=None):
    """``(O, tO)`` of attention at (q, k, v) in the direction (tq, tk, tv), without autograd.

    ``impl`` is "chunked" or "fused" (or "auto"); a helper for benchmarks and tests — networks call
    :func:`attention` inside ``torch.func.jvp`` instead.
    """
    _check_shapes(q, k, v)
    scale = _default_scale(q, scale)
    impl = resolve_jvp_impl(impl, q.device, q.dtype)
    with torch.no_grad():
        if impl == "fused":
            return _fused_attention_jvp(q, k, v, tq, tk, tv, scale)
        if impl == "chunked":
            return _chunked_attention_jvp(q, k, v, tq, tk, tv, scale, chunk_size)
    raise UsageError(f"attention_jvp supports impl 'chunked' or 'fused', got {impl!r}")


class _Slot:
    """Holds the primal output buffer between forward and jvp (a plain object: pytree leaves it)."""

    __slots__ = ("out",)

    def __init__(self):
        self.out = None


def _plain(t):
    """The plain tensor inside functorch's grad/jvp wrappers (the jvp staticmethod receives
    wrapped tensors; Triton and raw writes need the storage)."""
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(t):
        if ft.is_batchedtensor(t):
            raise NotImplementedError("scmctl attention's forward-mode rule does not support torch.vmap")
        t = ft.get_unwrapped(t)
    return t


def _disable_functorch():
    guard = getattr(torch._C, "_DisableFuncTorch", None)
    return guard() if guard is not None else nullcontext()


class _AttentionWithJvp(torch.autograd.Function):
    """Attention whose forward-mode rule is the chunked or fused JVP (see the module docstring)."""

    @staticmethod
    def forward(q, k, v, scale, backend, jvp_impl, chunk_size, slot):
        # O is computed together with tO in jvp(); here only its buffer is allocated
        slot.out = torch.empty(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)
        return slot.out

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, backend, jvp_impl, chunk_size, slot = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)
        ctx.scale, ctx.backend, ctx.jvp_impl, ctx.chunk_size, ctx.slot = (
            scale, backend, jvp_impl, chunk_size, slot)

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v = ctx.saved_tensors
        tq = torch.zeros_like(q) if tq is None else tq
        tk = torch.zeros_like(k) if tk is None else tk
        tv = torch.zeros_like(v) if tv is None else tv
        q, k, v, tq, tk, tv = (_plain(t) for t in (q, k, v, tq, tk, tv))
        out = ctx.slot.out
        ctx.slot.out = None
        # raw writes into the primal buffer: invisible to autograd and to functorch's
        # mutation check (the buffer was created one functorch level below)
        with torch.no_grad(), fwAD._set_fwd_grad_enabled(False), _disable_functorch():
            if ctx.jvp_impl == "fused":
                _, t_out = _fused_attention_jvp(q, k, v, tq, tk, tv, ctx.scale, out=out)
            else:
                _, t_out = _chunked_attention_jvp(q, k, v, tq, tk, tv, ctx.scale, ctx.chunk_size, out=out)
        return t_out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
            o = _primal(*leaves, ctx.scale, ctx.backend, forced=False)
            wrt = [t for t, n in zip(leaves, needs) if n]
            grads = iter(torch.autograd.grad(o, wrt, grad_out))
        return (*(next(grads) if n else None for n in needs), None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# public op


def _check_shapes(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, N, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention dtype mismatch: {q.dtype}, {k.dtype}, {v.dtype}")


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _has_tangent(*ts) -> bool:
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


def attention(q, k, v, scale=None, backend="auto", jvp_impl="auto", chunk_size=None):
    """softmax(q·kᵀ·scale)·v for q (B, H, N_q, D), k (B, H, N_k, D), v (B, H, N_k, D_v).

    Args:
        scale: logit scale, default 1/√D.
        backend: primal forward/backward, one of :data:`ATTENTION_BACKENDS`.
        jvp_impl: forward-mode rule used when q, k or v carries a tangent, one of :data:`JVP_IMPLS`.
        chunk_size: query rows per chunk of the chunked JVP (default: automatic, ≈16 MiB per
            fp32 buffer).

    Raises:
        UsageError: unknown name, or a forced backend / jvp_impl that is not available here.
    """
    _check_shapes(q, k, v)
    scale = _default_scale(q, scale)
    resolved = resolve_backend(backend, q.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise UsageError(f"attention chunk_size must be a positive integer, got {chunk_size!r}")
    if not _has_tangent(q, k, v):
        return _primal(q, k, v, scale, resolved, forced=backend == "xformers")
    impl = resolve_jvp_impl(jvp_impl, q.device, q.dtype)
    if impl == "math":
        return _math_attention(q, k, v, scale)
    return _AttentionWithJvp.apply(q, k, v, scale, resolved, impl, chunk_size, _Slot())
