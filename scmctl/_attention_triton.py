"""Fused Triton kernel: attention output O and its forward-mode tangent tO in one pass.

Imported lazily by :mod:`scmctl.attention` (a CPU install never needs triton). One program handles
BLOCK_M query rows of one (batch, head) and streams over the K/V tiles once (FlashAttention-2 style
online softmax), keeping five fp32 accumulators per row:

    m   running max of S = Q·Kᵀ·scale                l = Σ_j exp(S_ij − m)
    r = Σ_j exp(S_ij − m)·tS_ij  (rowsum of H, unnormalized)
    A = Σ_j exp(S_ij − m)·V_j    (P·V, unnormalized)
    T = Σ_j exp(S_ij − m)·(tV_j + tS_ij·V_j)          (P·tV + H·V, unnormalized)

with tS = (tQ·Kᵀ + Q·tKᵀ)·scale and H = P ⊙ tS. At the end O = A/l and tO = T/l − (r/l)·O, i.e.
tO = P·tV + H·V − rowsum(H) ⊙ O. Memory: the two outputs only (O(N)); FLOPs: 6 matrix products of
the size of Q·Kᵀ against the primal forward's 2.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors with fixed block sizes (the autotuner
needs a GPU driver); on CUDA a small autotuned set of configurations is used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # the interpreter's tl.dot mishandles bfloat16 operands (triton 3.8); products of 16-bit
        # floats are exact in fp32, so upcasting first gives what the GPU computes
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    if RNE_BF16:
        # the interpreter truncates fp32 -> bfloat16 (triton 3.8); round to nearest even first, as
        # the GPU does, so that the interpreted error matches the compiled one
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _attention_jvp_kernel(
    Q, K, V, TQ, TK, TV, O, TO,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    stqb, stqh, stqn, stkb, stkh, stkn, stvb, stvh, stvn,
    sob, soh, son, stob, stoh, ston,
    H, N_Q, N_K, D_QK, D_V,
    sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE_BF16: tl.constexpr,
    N_K_STATIC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    # int64 offsets: B·H·N·D can exceed 2**31 elements
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < N_Q
    dk_mask = offs_dk < D_QK
    dv_mask = offs_dv < D_V

    q_off = b64 * sqb + h64 * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_dk[None, :]
    tq_off = b64 * stqb + h64 * stqh + offs_m[:, None].to(tl.int64) * stqn + offs_dk[None, :]
    q_msk = m_mask[:, None] & dk_mask[None, :]
    q = tl.load(Q + q_off, mask=q_msk, other=0.0)
    tq = tl.load(TQ + tq_off, mask=q_msk, other=0.0)

    # K and tK are read transposed: (BLOCK_DK, BLOCK_N) tiles
    kT_ptrs = K + b64 * skb + h64 * skh + offs_n[None, :].to(tl.int64) * skn + offs_dk[:, None]
    tkT_ptrs = TK + b64 * stkb + h64 * stkh + offs_n[None, :].to(tl.int64) * stkn + offs_dk[:, None]
    v_ptrs = V + b64 * svb + h64 * svh + offs_n[:, None].to(tl.int64) * svn + offs_dv[None, :]
    tv_ptrs = TV + b64 * stvb + h64 * stvh + offs_n[:, None].to(tl.int64) * stvn + offs_dv[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2

    # N_K_STATIC: interpreter only (triton 3.6's interpreter cannot use a run-time scalar as a
    # range bound under numpy 2); 0 when compiled
    for start_n in range(0, N_K_STATIC if N_K_STATIC > 0 else N_K, BLOCK_N):
        # Plain loads (masked on the head dim): a variant with unmasked loads, which triton turns
        # into a cp.async pipeline, plus a scale folded into the queries measured 17 % slower on an
        # H200 (triton 3.6, 4·16·4096·64 bf16), so this simpler form stays.
        if EVEN_N:
            kT = tl.load(kT_ptrs, mask=dk_mask[:, None], other=0.0)
            tkT = tl.load(tkT_ptrs, mask=dk_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=dv_mask[None, :], other=0.0)
            tv = tl.load(tv_ptrs, mask=dv_mask[None, :], other=0.0)
        else:
            n_mask = (start_n + offs_n) < N_K
            kT = tl.load(kT_ptrs, mask=dk_mask[:, None] & n_mask[None, :], other=0.0)
            tkT = tl.load(tkT_ptrs, mask=dk_mask[:, None] & n_mask[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
            tv = tl.load(tv_ptrs, mask=n_mask[:, None] & dv_mask[None, :], other=0.0)

        s = _dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
        ts = _dot(tq, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
        ts = _dot(q, tkT, ts, IEEE, UPCAST)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(((start_n + offs_n) < N_K)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        hh = p * (ts * sm_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        r_i = r_i * alpha + tl.sum(hh, 1)
        acc_o = acc_o * alpha[:, None]
        acc_t = acc_t * alpha[:, None]
        p_c = _cast(p, v.dtype, RNE_BF16)
        acc_o = _dot(p_c, v, acc_o, IEEE, UPCAST)
        acc_t = _dot(p_c, tv, acc_t, IEEE, UPCAST)
        acc_t = _dot(_cast(hh, v.dtype, RNE_BF16), v, acc_t, IEEE, UPCAST)
        m_i = m_new

        kT_ptrs += BLOCK_N * skn
        tkT_ptrs += BLOCK_N * stkn
        v_ptrs += BLOCK_N * svn
        tv_ptrs += BLOCK_N * stvn

    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    t_o = acc_t * inv_l[:, None] - (r_i * inv_l)[:, None] * o

    o_off = b64 * sob + h64 * soh + offs_m[:, None].to(tl.int64) * son + offs_dv[None, :]
    to_off = b64 * stob + h64 * stoh + offs_m[:, None].to(tl.int64) * ston + offs_dv[None, :]
    o_msk = m_mask[:, None] & dv_mask[None, :]
    tl.store(O + o_off, _cast(o, O.dtype.element_ty, RNE_BF16), mask=o_msk)
    tl.store(TO + to_off, _cast(t_o, TO.dtype.element_ty, RNE_BF16), mask=o_msk)


# On CUDA: a few configurations per head-dim class, tuned once per (lengths, head dims, dtype) in
# each process. Checked offline with ptxas for sm_90 (no register spills for 16-bit inputs except a
# few bytes in the D = 128 set); float32 inputs use exact ("ieee") products and one small tile.
def _cfg(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


_CONFIGS_D64 = [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 8, 3), _cfg(64, 64, 4, 3),
                _cfg(64, 32, 4, 2)]
_CONFIGS_D128 = [_cfg(64, 32, 8, 2), _cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2)]
_CONFIGS_FP32 = [_cfg(64, 32, 4, 2)]
_CUDA_CONFIGS = _CONFIGS_D64 + _CONFIGS_D128 + _CONFIGS_FP32


def _config_class(block_dk: int, block_dv: int, ieee: bool) -> list:
    if ieee:
        return _CONFIGS_FP32
    return _CONFIGS_D128 if max(block_dk, block_dv) > 64 else _CONFIGS_D64


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    keep = _config_class(args["BLOCK_DK"], args["BLOCK_DV"], args["IEEE"])
    return [c for c in configs if any(c is k for k in keep)] or keep


_kernel_autotuned = None


def _autotuned_kernel():
    global _kernel_autotuned
    if _kernel_autotuned is None:
        _kernel_autotuned = triton.autotune(
            configs=_CUDA_CONFIGS,
            key=["N_Q", "N_K", "BLOCK_DK", "BLOCK_DV", "IEEE"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_attention_jvp_kernel)
    return _kernel_autotuned


def _heuristic_config(block_dk: int, block_dv: int, ieee: bool) -> dict:
    c = _config_class(block_dk, block_dv, ieee)[0]
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def fused_attention_jvp(q, k, v, tq, tk, tv, scale, out=None, tangent_out=None,
                        block_m=None, block_n=None, autotune=None):
    """O and tO for (B, H, N, D) tensors in one fused pass; returns ``(out, tangent_out)``.

    ``out``/``tangent_out`` (B, H, N_q, D_v), last dim contiguous, may be given to write into. ``block_m``/``block_n``
    fix the tile sizes (default when interpreting: 32×32; on CUDA: autotuned unless
    ``autotune=False`` or ``SCMCTL_ATTN_AUTOTUNE=0``, then a fixed heuristic).
    """
    B, H, n_q, d_qk = q.shape
    n_k, d_v = k.shape[-2], v.shape[-1]

    def last_contig(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v, tq, tk, tv = (last_contig(t) for t in (q, k, v, tq, tk, tv))
    if out is None:
        out = torch.empty((B, H, n_q, d_v), device=q.device, dtype=q.dtype)
    if tangent_out is None:
        tangent_out = torch.empty((B, H, n_q, d_v), device=q.device, dtype=q.dtype)
    assert out.stride(-1) == 1 and tangent_out.stride(-1) == 1
    if n_q == 0 or B * H == 0:
        return out, tangent_out

    strides = []
    for t in (q, k, v, tq, tk, tv, out, tangent_out):
        strides += [t.stride(0), t.stride(1), t.stride(2)]
    common = dict(
        BLOCK_DK=_block_d(d_qk), BLOCK_DV=_block_d(d_v), IEEE=q.dtype == torch.float32,
        UPCAST=INTERPRET and q.dtype != torch.float32,
        RNE_BF16=INTERPRET and q.dtype == torch.bfloat16,
        N_K_STATIC=n_k if INTERPRET else 0,
    )
    args = (q, k, v, tq, tk, tv, out, tangent_out, *strides, H, n_q, n_k, d_qk, d_v, float(scale))

    if autotune is None:
        autotune = os.environ.get("SCMCTL_ATTN_AUTOTUNE", "1") != "0"
    if INTERPRET or block_m is not None or block_n is not None or not autotune:
        if INTERPRET:
            cfg = {"BLOCK_M": 32, "BLOCK_N": 32}
        else:
            cfg = _heuristic_config(common["BLOCK_DK"], common["BLOCK_DV"], common["IEEE"])
        bm = block_m or cfg["BLOCK_M"]
        bn = block_n or cfg["BLOCK_N"]
        launch = {} if INTERPRET else {"num_warps": cfg.get("num_warps", 4),
                                        "num_stages": cfg.get("num_stages", 2)}
        grid = (triton.cdiv(n_q, bm), B * H)
        _attention_jvp_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn,
                                    EVEN_N=n_k % bn == 0, **common, **launch)
    else:
        kernel = _autotuned_kernel()

        def grid(meta):
            return (triton.cdiv(n_q, meta["BLOCK_M"]), B * H)

        # EVEN_N depends on the chosen BLOCK_N; all configs use BLOCK_N in {32, 64}
        kernel[grid](*args, EVEN_N=n_k % 64 == 0, **common)
    return out, tangent_out
