"""Triton kernels for the 3D rotary embedding (optionally with fused RMS QK-norm) and its backward.

One program owns BLOCK_T consecutive tokens. It computes the cos / sin of every channel of those
tokens once (a (BLOCK_T, BLOCK_D) tile: channel c turns by pos[axis(c)] * freq(c)) and applies them
to every head of q and then of k. Channel c's pair partner, its sign in the rotation
(y_c = x_c cos + sign_c x_partner sin) and its frequency come from a small per-channel table built
on the host in float64 (the reference's rounding), so one compiled kernel serves every axis split;
pass-through channels have frequency 0, sign 0 and themselves as partner. Index math follows
csrc/rope/math.h. Math in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vdit._memory import new_output
from vdit.kernels import MAX_GPU_HEAD_DIM

# What only a GPU can verify (quoted by the static report): speed, and the in-place ordering that
# tl.debug_barrier gives (the interpreter runs a tile as one array, so it cannot show the race the
# barrier prevents; tests/ops/test_rope.py has the cuda-marked test that would).
GPU_ONLY = ("speed; the in-place ordering of loads before stores when a token row spans warps "
            "(cuda-marked test at head dims 72, 120 and fp32 192)")

# Tokens per program by padded head dim (BLOCK_D): 1024 elements per tile, the size at which the
# cos / sin tiles that live across the head loop fit in registers with no spills. Every shipped
# configuration is compiled ahead of time for sm_80 and sm_90 (``aot_specs``, the static GPU check).
BLOCK_T = {16: 64, 32: 32, 64: 16, 128: 8, 256: 4}
# The backward keeps more tiles alive (gradient, input, weight-gradient sums): half the tokens.
BLOCK_T_BWD = {16: 16, 32: 16, 64: 8, 128: 4, 256: 2}
NUM_WARPS = 4
NUM_STAGES = 2  # no software-pipelined loop; stated so the launch and the AOT specs compile the same kernel
# The d256 backward with 4 warps keeps an 8-byte stack frame (spill) in fp32 on sm_80; 8 warps do not.
BWD_WARPS = {256: 8}


@triton.jit
def _sincos(x):
    """sin and cos of an fp32 tile: the same reduction and polynomials as rope_sincos in
    csrc/rope/math.h (error <= 1e-6 for |x| < 1e5, see there). Plain arithmetic, so it runs the same in the
    interpreter, and it avoids libdevice sinf's slow-path stack frame and call spills."""
    q = tl.floor(x * 0.6366197723675814 + 0.5)
    r = x - q * 1.5703125 - q * 4.837512969970703125e-4 - q * 7.54978995489188216e-8
    r2 = r * r
    s = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    c = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    j = q.to(tl.int32)
    sin = tl.where((j & 1) != 0, c, s)
    cos = tl.where((j & 1) != 0, s, c)
    sin = tl.where((j & 2) != 0, -sin, sin)
    cos = tl.where(((j + 1) & 2) != 0, -cos, cos)
    return sin, cos


@triton.jit
def _rotate_tensor(in_ptr, out_ptr, w_ptr, in_sb, in_sl, in_sh, out_sb, out_sl, out_sh, H, b, l, tmask,
                   c, partner, sgn, cos, sin, D, eps, NORM: tl.constexpr):
    """Rotate every head of one tensor for a token tile: (BLOCK_T,) b, l; (BLOCK_D,) channel tables."""
    cmask = c < D
    mask = tmask[:, None] & cmask[None, :]
    in_rows = in_ptr + (b * in_sb + l * in_sl)[:, None]
    out_rows = out_ptr + (b * out_sb + l * out_sl)[:, None]
    if NORM:
        w = tl.load(w_ptr + c, mask=cmask, other=0.0)
        wp = tl.load(w_ptr + partner, mask=cmask, other=0.0)
    for h in range(H):
        row = in_rows + h * in_sh
        x = tl.load(row + c[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        # In place (out_ptr == in_ptr, the rope_3d_qk_ op) a token row may be split across warps (head
        # dims that are not a multiple of 16 or unaligned views, and fp32 above 128), so another warp's
        # partner channel could be stored before this warp has read it. The barrier orders every load
        # of this head's rows before any store of them; programs own disjoint tokens, so no other
        # program touches these rows, and the next head's rows are other addresses.
        tl.debug_barrier()
        if NORM:
            r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
            x = x * r[:, None] * w[None, :]
            xp = xp * r[:, None] * wp[None, :]
        y = x * cos + sgn[None, :] * xp * sin
        tl.store(out_rows + h * out_sh + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_setup(pos_ptr, table_ptr, L, total, pos_sb, pos_sl, pos_sa, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token indices, channel tables and the cos / sin tile of this program's tokens."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = n < total
    b = n // L
    l = n % L
    c = tl.arange(0, BLOCK_D)
    freq = tl.load(table_ptr + c)
    partner = tl.load(table_ptr + BLOCK_D + c).to(tl.int32)
    sgn = tl.load(table_ptr + 2 * BLOCK_D + c)
    axis = tl.load(table_ptr + 3 * BLOCK_D + c).to(tl.int32)
    pos = pos_ptr + b * pos_sb + l * pos_sl
    p0 = tl.load(pos, mask=tmask, other=0).to(tl.float32)
    p1 = tl.load(pos + pos_sa, mask=tmask, other=0).to(tl.float32)
    p2 = tl.load(pos + 2 * pos_sa, mask=tmask, other=0).to(tl.float32)
    p = tl.where(axis[None, :] == 0, p0[:, None], tl.where(axis[None, :] == 1, p1[:, None], p2[:, None]))
    sin, cos = _sincos(p * freq[None, :])
    return n, tmask, b, l, c, partner, sgn, cos, sin


@triton.jit
def rope_fwd_kernel(
    pos_ptr, table_ptr, q_ptr, q_out_ptr, qw_ptr, k_ptr, k_out_ptr, kw_ptr,
    L, total, D, Hq, Hk, pos_sb, pos_sl, pos_sa,
    q_sb, q_sl, q_sh, qo_sb, qo_sl, qo_sh, k_sb, k_sl, k_sh, ko_sb, ko_sl, ko_sh,
    sin_sign, eps,
    HAS_K: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, tmask, b, l, c, partner, sgn, cos, sin = _tile_setup(pos_ptr, table_ptr, L, total, pos_sb, pos_sl, pos_sa,
                                                            BLOCK_T, BLOCK_D)
    sgn = sgn * sin_sign
    _rotate_tensor(q_ptr, q_out_ptr, qw_ptr, q_sb, q_sl, q_sh, qo_sb, qo_sl, qo_sh, Hq, b, l, tmask,
                   c, partner, sgn, cos, sin, D, eps, Q_NORM)
    if HAS_K:
        _rotate_tensor(k_ptr, k_out_ptr, kw_ptr, k_sb, k_sl, k_sh, ko_sb, ko_sl, ko_sh, Hk, b, l, tmask,
                       c, partner, sgn, cos, sin, D, eps, K_NORM)


@triton.jit
def _backward_tensor(g_ptr, x_ptr, out_ptr, w_ptr, gw_ptr, g_sb, g_sl, g_sh, x_sb, x_sl, x_sh, o_sb, o_sl, o_sh,
                     H, b, l, tmask, c, partner, sgn, cos, sin, D, eps, NORM: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_x of y = rotate(rms_norm(x) * w) for every head of a token tile; weight-gradient partial."""
    cmask = c < D
    mask = tmask[:, None] & cmask[None, :]
    g_rows = g_ptr + (b * g_sb + l * g_sl)[:, None]
    x_rows = x_ptr + (b * x_sb + l * x_sl)[:, None]
    o_rows = out_ptr + (b * o_sb + l * o_sl)[:, None]
    if NORM:
        w = tl.load(w_ptr + c, mask=cmask, other=0.0)
    gw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for h in range(H):
        gy = tl.load(g_rows + h * g_sh + c[None, :], mask=mask, other=0.0).to(tl.float32)
        gyp = tl.load(g_rows + h * g_sh + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        g = gy * cos - sgn[None, :] * gyp * sin  # inverse rotation
        if NORM:
            x = tl.load(x_rows + h * x_sh + c[None, :], mask=mask, other=0.0).to(tl.float32)
            r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
            xh = x * r[:, None]
            gw += tl.sum(g * xh, axis=0)
            gxh = g * w[None, :]
            dot = tl.sum(gxh * xh, axis=1) / D
            g = r[:, None] * (gxh - xh * dot[:, None])
        tl.store(o_rows + h * o_sh + c[None, :], g.to(out_ptr.dtype.element_ty), mask=mask)
    if NORM:
        tl.store(gw_ptr + tl.program_id(0).to(tl.int64) * BLOCK_D + c, gw)


@triton.jit
def rope_bwd_kernel(
    pos_ptr, table_ptr,
    gq_ptr, q_ptr, gq_out_ptr, qw_ptr, gqw_ptr, gk_ptr, k_ptr, gk_out_ptr, kw_ptr, gkw_ptr,
    L, total, D, Hq, Hk, pos_sb, pos_sl, pos_sa,
    gq_sb, gq_sl, gq_sh, q_sb, q_sl, q_sh, gqo_sb, gqo_sl, gqo_sh,
    gk_sb, gk_sl, gk_sh, k_sb, k_sl, k_sh, gko_sb, gko_sl, gko_sh,
    eps,
    HAS_K: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, tmask, b, l, c, partner, sgn, cos, sin = _tile_setup(pos_ptr, table_ptr, L, total, pos_sb, pos_sl, pos_sa,
                                                            BLOCK_T, BLOCK_D)
    _backward_tensor(gq_ptr, q_ptr, gq_out_ptr, qw_ptr, gqw_ptr, gq_sb, gq_sl, gq_sh, q_sb, q_sl, q_sh,
                     gqo_sb, gqo_sl, gqo_sh, Hq, b, l, tmask, c, partner, sgn, cos, sin, D, eps, Q_NORM, BLOCK_D)
    if HAS_K:
        _backward_tensor(gk_ptr, k_ptr, gk_out_ptr, kw_ptr, gkw_ptr, gk_sb, gk_sl, gk_sh, k_sb, k_sl, k_sh,
                         gko_sb, gko_sl, gko_sh, Hk, b, l, tmask, c, partner, sgn, cos, sin, D, eps, K_NORM, BLOCK_D)


# ---- launchers -------------------------------------------------------------------------------

_tables: dict = {}


def channel_table(dims, theta: float, interleaved: bool, head_dim: int, block_d: int, device) -> torch.Tensor:
    """(4, BLOCK_D) float32: frequency, partner channel, rotation sign, axis of every channel.

    Built in float64 like the reference's frequencies and cached per (dims, theta, pairing, head dim, block) and device.
    """
    key = (tuple(dims), float(theta), bool(interleaved), head_dim, block_d, str(device))
    table = _tables.get(key)
    if table is None:
        t = torch.zeros(4, block_d, dtype=torch.float64)
        t[1] = torch.arange(block_d, dtype=torch.float64)  # pass-through: own partner, sign 0, freq 0
        start = 0
        for axis, d in enumerate(dims):
            half = d // 2
            for j in range(half):
                freq = theta ** (-2.0 * j / d)
                a, b = (start + 2 * j, start + 2 * j + 1) if interleaved else (start + j, start + j + half)
                t[0, a] = t[0, b] = freq
                t[1, a], t[1, b] = b, a
                t[2, a], t[2, b] = -1.0, 1.0
                t[3, a] = t[3, b] = axis
            start += d
        table = _tables[key] = t.to(torch.float32).to(device)
    return table


def _strides(t: torch.Tensor):
    """(sb, sl, sh) strides of a (total, H, D) or (B, L, H, D) tensor."""
    return (0, *t.stride()[:2]) if t.dim() == 3 else tuple(t.stride()[:3])


def _positions_strides(positions: torch.Tensor):
    return (0, positions.stride(0), positions.stride(1)) if positions.dim() == 2 else tuple(positions.stride())


def _weight(w, device):
    return None if w is None else w.to(device=device, dtype=torch.float32).contiguous()


def _common(x: torch.Tensor, positions: torch.Tensor, dims, theta, interleaved):
    D = x.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    if block_d not in BLOCK_T:
        raise ValueError(f"the triton rope kernel supports head dims up to {MAX_GPU_HEAD_DIM}, got {D}")
    B, L = (1, x.shape[0]) if x.dim() == 3 else x.shape[:2]
    table = channel_table(dims, theta, interleaved, D, block_d, x.device)
    return D, block_d, L, B * L, table


def rope_forward(xs, positions, dims, theta, interleaved, inverse, weights, eps, outputs=None):
    """Rotate 1 or 2 tensors (q[, k]) with shared positions; returns the outputs (new, or ``outputs``).

    xs: list of (total, H, D) / (B, L, H, D) tensors, unit stride along D; positions (L, 3) or
    (B, L, 3); weights: list of (D,) RMSNorm weights or None. Inputs validated by ``vdit.ops``.
    """
    D, block_d, L, total, table = _common(xs[0], positions, dims, theta, interleaved)
    if outputs is None:
        outputs = [new_output(x.shape, dtype=x.dtype, device=x.device) for x in xs]
    ws = [_weight(w, xs[0].device) for w in weights]
    has_k = len(xs) == 2
    q, k = xs[0], xs[-1]
    qo, ko = outputs[0], outputs[-1]
    qw, kw = ws[0], ws[-1]
    block_t = BLOCK_T[block_d]
    grid = (triton.cdiv(total, block_t),)
    if total > 0:
        rope_fwd_kernel[grid](
            positions, table, q, qo, qw if qw is not None else table, k, ko, kw if kw is not None else table,
            L, total, D, q.shape[-2], k.shape[-2], *_positions_strides(positions),
            *_strides(q), *_strides(qo), *_strides(k), *_strides(ko),
            -1.0 if inverse else 1.0, float(eps),
            HAS_K=has_k, Q_NORM=qw is not None, K_NORM=has_k and kw is not None,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return outputs


def rope_backward(grads, xs, positions, dims, theta, interleaved, weights, eps):
    """Gradients of :func:`rope_forward` (not inverse): returns ([grad_x...], [grad_weight...]).

    grad_weight is in the weight's dtype, or an empty tensor where the weight is None.
    """
    D, block_d, L, total, table = _common(xs[0], positions, dims, theta, interleaved)
    device = xs[0].device
    outs = [new_output(x.shape, dtype=x.dtype, device=device) for x in xs]
    ws = [_weight(w, device) for w in weights]
    block_t = BLOCK_T_BWD[block_d]
    programs = triton.cdiv(total, block_t)
    partials = [torch.zeros(max(programs, 1), block_d, dtype=torch.float32, device=device) if w is not None else None
                for w in ws]
    has_k = len(xs) == 2
    (gq, gk), (q, k), (gqo, gko) = (grads[0], grads[-1]), (xs[0], xs[-1]), (outs[0], outs[-1])
    (qw, kw), (pq, pk) = (ws[0], ws[-1]), (partials[0], partials[-1])
    if total > 0:
        rope_bwd_kernel[(programs,)](
            positions, table,
            gq, q, gqo, qw if qw is not None else table, pq if pq is not None else table,
            gk, k, gko, kw if kw is not None else table, pk if pk is not None else table,
            L, total, D, q.shape[-2], k.shape[-2], *_positions_strides(positions),
            *_strides(gq), *_strides(q), *_strides(gqo), *_strides(gk), *_strides(k), *_strides(gko),
            float(eps),
            HAS_K=has_k, Q_NORM=qw is not None, K_NORM=has_k and kw is not None,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=BWD_WARPS.get(block_d, NUM_WARPS),
            num_stages=NUM_STAGES)
    grad_ws = []
    for w, p, x in zip(weights, partials, xs):
        grad_ws.append(p.sum(0)[:D].to(w.dtype) if w is not None else x.new_empty((0,)))
    return outs, grad_ws


def aot_specs() -> list:
    """Every shipped tile (BLOCK_D) of the forward and backward in its most register-hungry variant
    (fused RMS norm on q and k), per dtype, for the static GPU check. Both alignment variants ship:
    q and k may be unaligned views (slices of a fused qkv projection)."""
    from vdit.kernels.triton.aot import KernelSpec, signature

    floats = dict(table_ptr="*fp32", qw_ptr="*fp32", kw_ptr="*fp32", eps="fp32")
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        fwd = signature(rope_fwd_kernel, dtype, pos_ptr="*i32", sin_sign="fp32", **floats)
        bwd = signature(rope_bwd_kernel, dtype, pos_ptr="*i32", gqw_ptr="*fp32", gkw_ptr="*fp32", **floats)
        for kind, kernel, sig, tiles in (("fwd", rope_fwd_kernel, fwd, BLOCK_T),
                                         ("bwd", rope_bwd_kernel, bwd, BLOCK_T_BWD)):
            for block_d, block_t in sorted(tiles.items()):
                constexprs = dict(HAS_K=True, Q_NORM=True, K_NORM=True, BLOCK_T=block_t, BLOCK_D=block_d)
                warps = BWD_WARPS.get(block_d, NUM_WARPS) if kind == "bwd" else NUM_WARPS
                for aligned in (True, False):
                    label = f"{kind} d{block_d} {dtype} norm"
                    specs.append(KernelSpec(kernel, sig, constexprs, warps, NUM_STAGES, label, aligned=aligned))
    return specs


# ---- entry points with the signatures of the vdit::rope_3d*_triton operators -----------------------
# (vdit.ops.rope registers them; the arguments are those of vdit/kernels/schemas.py, in order.)

def rope_3d(x, positions, dims, theta, interleaved, inverse, weight, eps):
    """``vdit::rope_3d_triton``: x rotated (a new tensor)."""
    (out,) = rope_forward([x], positions, dims, theta, interleaved, inverse, [weight], eps)
    return out


def rope_3d_qk(q, k, positions, dims, theta, interleaved, inverse, q_weight, k_weight, eps):
    """``vdit::rope_3d_qk_triton``: (q, k) rotated in one launch (new tensors)."""
    q_out, k_out = rope_forward([q, k], positions, dims, theta, interleaved, inverse, [q_weight, k_weight], eps)
    return q_out, k_out


def rope_3d_qk_(q, k, positions, dims, theta, interleaved, q_weight, k_weight, eps):
    """``vdit::rope_3d_qk__triton``: q and k rotated in place."""
    rope_forward([q, k], positions, dims, theta, interleaved, False, [q_weight, k_weight], eps, outputs=[q, k])


def rope_3d_backward(grad, x, positions, dims, theta, interleaved, weight, eps):
    """``vdit::rope_3d_backward_triton``: (grad_x, grad_weight)."""
    (gx,), (gw,) = rope_backward([grad], [x], positions, dims, theta, interleaved, [weight], eps)
    return gx, gw


def rope_3d_qk_backward(grad_q, grad_k, q, k, positions, dims, theta, interleaved, q_weight, k_weight, eps):
    """``vdit::rope_3d_qk_backward_triton``: (grad_q, grad_k, grad_q_weight, grad_k_weight)."""
    (gq, gk), (gqw, gkw) = rope_backward([grad_q, grad_k], [q, k], positions, dims, theta, interleaved,
                                         [q_weight, k_weight], eps)
    return gq, gk, gqw, gkw
