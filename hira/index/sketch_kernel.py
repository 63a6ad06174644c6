"""A Triton kernel for the key sketch on CUDA: per block and query row, the max and the log-sum-exp of q·k̃.

The tensor program (``hira.index.sketch.key_scores``) produces q·k̃ for every key, [B, H, R, C], and then reduces it
per block; the unpacked codes or the per-key scores make it read several times the sketch's bytes (0.51 ms at 128K
on an H100). Here a program reads its blocks' codes once, as int32 words (byte loads ran at 0.3 TB/s), unpacks them
in registers, and writes only the per-block results: one block per program on the CUDA cores, up to four
consecutive blocks per program on the tensor cores.

Registered as an opaque custom operator: inductor does not analyse the kernel (as a ``triton_op`` inside the compiled
step, the search's kernels were read with wrong dependencies, benchmarks/NOTES.md §17). Imported on CUDA
(``hira.index.sketch``); the CPU path stays the tensor program, which the tests compare with, also with this kernel
in triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hira.index.bounds import margin_factor
from hira.index.sketch import HALF_STEP


@triton.jit
def _block_stats_kernel(
    q_ptr, words_ptr, lo_ptr, step_ptr, valid_ptr, max_ptr, lse_ptr,
    H, NB, C,
    R: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program per (b, h, block). The codes are read as int32 words: nibble t of word i is channel 8i + t."""
    pid = tl.program_id(0)  # (b, h, n) flattened
    n = pid % NB
    bh = pid // NB
    b = bh // H
    s = tl.arange(0, BS)
    i = tl.arange(0, BLOCK_W)
    words = tl.load(words_ptr + (bh * C + n * BS + s)[:, None] * W + i[None, :], mask=(i < W)[None, :], other=0)
    plane = (bh * NB + n) * D
    real = tl.load(valid_ptr + b * C + n * BS + s) != 0
    for r in range(R):
        qrow = q_ptr + (bh * R + r) * D
        base = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc = tl.zeros([BS, BLOCK_W], dtype=tl.float32)  # reduced once per row, not once per nibble
        for t in tl.static_range(8):
            ch = 8 * i + t
            inside = ch < D
            qc = tl.load(qrow + ch, mask=inside, other=0.0)
            lo = tl.load(lo_ptr + plane + ch, mask=inside, other=0.0).to(tl.float32)
            st = tl.load(step_ptr + plane + ch, mask=inside, other=0.0).to(tl.float32)
            base += qc * lo
            acc += ((words >> (4 * t)) & 15).to(tl.float32) * (qc * st)[None, :]
        est = tl.where(real, tl.sum(base, axis=0) + tl.sum(acc, axis=1), float("-inf"))
        m = tl.max(est, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        lse = m_safe + tl.log(tl.sum(tl.exp(est - m_safe), axis=0))
        out = (bh * R + r) * NB + n
        tl.store(max_ptr + out, m)
        tl.store(lse_ptr + out, lse)


# The tensor-core kernel's rounding of q·step to float16, per unit of Σ|c|·|q·step| (c ≤ 15): half an ulp of float16
# (2^-11) plus the float32 division before it (2^-22 with slack), and per unit of max|q·step| and channel, the
# subnormal floor (2^-25).
DOT_REL_ERROR = 2.0**-11 + 2.0**-22
DOT_ABS_ERROR = 2.0**-25


@triton.jit
def _code_pair(x):
    """The codes in bits 0–3 and 16–19 of int32 words x, as two float16 tensors (exact: 0..15)."""
    h = (x & 0x000F000F) | 0x64006400  # halves 0x640c: the float16 1024 + c
    lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo - 1024.0, hi - 1024.0


@triton.jit
def _block_words(words_ptr, bh, C, n, NB, BS: tl.constexpr, W: tl.constexpr):
    """Block n's codes as [BS, W] int32 words (0 past the last block)."""
    s = tl.arange(0, BS)
    i = tl.arange(0, W)
    return tl.load(words_ptr + (bh * C + n * BS + s)[:, None] * W + i[None, :], mask=n < NB, other=0)


@triton.jit
def _block_product(words, wn, block_of_col, j: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    """[BS, N] float32: the codes of the program's j-th block (its int32 words [BS, W]) times the columns of the
    weights wn [N, D] float16 that belong to that block (the others multiplied by 0).

    Nibble t of word i is channel 8i + t. Nibbles t and t + 4 (bits 4t and 16 + 4t) become the two halves of one word
    (x & 0x000F000F) | 0x64006400: the float16 values 1024 + code, made exact codes by subtracting 1024 (an
    int-to-float conversion per code ran at a quarter of the arithmetic rate). join adds a last dimension: joining
    planes 4 apart first, then 2, then 1 puts plane t at the flat position 4·a + 2·b + c = t of the last three
    dimensions."""
    p0, p4 = _code_pair(words)
    p1, p5 = _code_pair(words >> 4)
    p2, p6 = _code_pair(words >> 8)
    p3, p7 = _code_pair(words >> 12)
    codes = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    w_j = tl.where((block_of_col == j)[:, None], wn, 0.0)
    return tl.dot(tl.reshape(codes, (BS, D)), tl.trans(w_j))


@triton.jit
def _block_stats_dot_kernel(
    q_ptr, words_ptr, lo_ptr, step_ptr, valid_ptr, max_ptr, lse_ptr, half_ptr,
    H, NB, C, NG, per_step, per_lo, per_max,
    R: tl.constexpr, R_PAD: tl.constexpr, G: tl.constexpr, N: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
    BS: tl.constexpr,
):
    """One program per (b, h, group of G ≤ 4 consecutive blocks), every row at once. Column c of the product is row
    c % R_PAD of block c // R_PAD: each block's codes, unpacked once into a [BS, D] float16 tile (exact: 0..15), are
    multiplied on the tensor cores by its own columns of q·step (each scaled to max 1 and rounded to float16; the
    other blocks' columns 0), and the G products add into one [BS, N] tile, so that the epilogue (the scale, the
    validity, max and log-sum-exp over the keys) runs once for G blocks with every column real where G·R_PAD = 16
    (one block per program kept 4 of 16 columns at R = 4, and the epilogue was a third of its instructions).

    Each column's half-width comes from the same tiles (``half_width_terms``): per_step·Σ|q·step| + per_lo·Σ|q·lo| +
    per_max·max|q·step|.

    Every load comes first, the G blocks' codes at once: a layout change or a reduction is a barrier, and a load
    written after one waits for everything before it."""
    pid = tl.program_id(0)
    g = pid % NG
    bh = pid // NG
    b = bh // H
    n0 = g * G
    words0 = _block_words(words_ptr, bh, C, n0, NB, BS, W)
    if G > 1:
        words1 = _block_words(words_ptr, bh, C, n0 + 1, NB, BS, W)
    if G > 2:
        words2 = _block_words(words_ptr, bh, C, n0 + 2, NB, BS, W)
        words3 = _block_words(words_ptr, bh, C, n0 + 3, NB, BS, W)
    c = tl.arange(0, N)
    r = c % R_PAD
    block_of_col = c // R_PAD
    n = n0 + block_of_col  # [N]
    real_col = (r < R) & (block_of_col < G) & (n < NB)
    d = tl.arange(0, D)
    s = tl.arange(0, BS)
    plane = (bh * NB + n)[:, None] * D + d[None, :]  # [N, D]
    lo = tl.load(lo_ptr + plane, mask=real_col[:, None], other=0.0).to(tl.float32)
    step = tl.load(step_ptr + plane, mask=real_col[:, None], other=0.0).to(tl.float32)
    q = tl.load(q_ptr + (bh * R + r)[:, None] * D + d[None, :], mask=real_col[:, None], other=0.0)
    real = tl.load(valid_ptr + b * C + n[None, :] * BS + s[:, None], mask=real_col[None, :], other=0) != 0  # [BS, N]
    base = tl.sum(q * lo, axis=1)  # [N]
    w = q * step
    scale = tl.max(tl.abs(w), axis=1)
    half = per_step * tl.sum(tl.abs(w), axis=1) + per_lo * tl.sum(tl.abs(q * lo), axis=1) + per_max * scale
    out = (bh * R + r) * NB + n
    # Stored at once: live across the products, it took the kernel from 172 to 242 registers (with the norms of an
    # earlier form) and from 55 to 67 µs at 128K on the H200 (benchmarks/NOTES.md §33).
    tl.store(half_ptr + out, half, mask=real_col)
    scale = tl.where(scale > 0, scale, 1.0)
    wn = (w / scale[:, None]).to(tl.float16)
    dot = _block_product(words0, wn, block_of_col, 0, BS, D)
    if G > 1:
        dot += _block_product(words1, wn, block_of_col, 1, BS, D)
    if G > 2:
        dot += _block_product(words2, wn, block_of_col, 2, BS, D)
        dot += _block_product(words3, wn, block_of_col, 3, BS, D)
    est = tl.where(real, base[None, :] + dot * scale[None, :], float("-inf"))
    m = tl.max(est, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(tl.sum(tl.exp(est - m_safe[None, :]), axis=0))
    tl.store(max_ptr + out, m, mask=real_col)
    tl.store(lse_ptr + out, lse, mask=real_col)


def dot_launch(R: int, G: int | None = None) -> dict:
    """``_block_stats_dot_kernel``'s launch for R rows: G consecutive blocks per program (default 16 columns' worth
    of rows: R ≤ 4 takes 4 blocks, 8 takes 2, 1 to 4), the product's N columns, 4 warps. At 128K (R 4, H200) a copy
    of the kernel took 75.8 / 64.5 / 62.1 µs at 1 / 2 / 4 blocks per program, and this kernel 55.6 µs at 4
    (1.29 TB/s; benchmarks/NOTES.md §30; ``benchmarks/bench_search_kernel.py --parts sketch`` sweeps it)."""
    r_pad = triton.next_power_of_2(R)
    if G is None:
        G = max(1, min(4, 16 // r_pad))
    return dict(R_PAD=r_pad, G=G, N=max(16, G * r_pad), num_warps=4)


def dot_applies(D: int) -> bool:
    """Whether ``sketch_block_stats_dot`` takes head dim D: a power of two of at least 16."""
    return D >= 16 and D & (D - 1) == 0


@torch.library.custom_op("hira::sketch_block_stats_dot", mutates_args=())
def sketch_block_stats_dot(
    q: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sketch_block_stats`` on the tensor cores (``dot_applies(D)``): the same max and log-sum-exp up to
    ``dot_error``, and a half-width that covers both, at most ``hira.index.sketch.half_width`` plus ``dot_error``
    (``half_width_terms``), each [B, H, R, NB] float32."""
    B, H, R, D = q.shape
    NB = lo.shape[2]
    C = codes.shape[2]
    words = codes.contiguous().view(torch.int32)
    out_max = torch.empty(B, H, R, NB, device=q.device, dtype=torch.float32)
    out_lse = torch.empty_like(out_max)
    out_half = torch.empty_like(out_max)
    launch = dot_launch(R)
    NG = triton.cdiv(NB, launch["G"])
    _block_stats_dot_kernel[(B * H * NG,)](
        q.contiguous(), words, lo.contiguous(), step.contiguous(), valid.contiguous(),
        out_max, out_lse, out_half, H, NB, C, NG, *half_width_terms(D),
        R=R, D=D, W=D // 8, BS=C // NB, **launch,
    )
    return out_max, out_lse, out_half


def half_width_terms(D: int) -> tuple[float, float, float]:
    """The tensor-core kernel's half-width, as factors of Σ|q·step|, Σ|q·lo| and max|q·step| per block and row:

    - the quantisation error, HALF_STEP·Σ|q·step| (as in ``hira.index.sketch.half_width``);
    - the float32 rounding of computing q·k̃ = q·lo + Σ c·(q·step) with c ≤ 15: ``margin_factor``'s ulps per term
      times Σ|q·lo| + 15·Σ|q·step|, which is at most ``half_width``'s ‖q‖·(‖lo‖ + 15‖step‖) (Cauchy–Schwarz); the
      kernel's products are float32 FMAs and exact products of float16 inputs, so no TF32 allowance;
    - the float16 rounding of q·step: ``dot_error``'s terms, its subnormal floor per unit of max|q·step| itself
      rather than of max|q|·max step (the larger).

    So it is at most ``half_width`` plus ``dot_error``, and needs no norm: two sums more per column than the scan
    already takes."""
    rounding = margin_factor(D, False)
    return (HALF_STEP + 15 * DOT_REL_ERROR + 15 * rounding, rounding, 15 * DOT_ABS_ERROR * D)


def dot_error(q: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B, H, R, NB]: a bound on |q·k̃ from ``sketch_block_stats_dot`` − q·k̃| for q [B, H, R, D] float32 and the
    sketch's step [B, H, NB, D]: the float16 rounding of q·step times codes up to 15."""
    qa, st = q.abs(), step.float()
    D = q.shape[-1]
    return 15 * (DOT_REL_ERROR * (qa @ st.transpose(-1, -2))
                 + DOT_ABS_ERROR * D * qa.amax(-1)[..., None] * st.amax(-1)[:, :, None, :])


@torch.library.custom_op("hira::sketch_block_stats", mutates_args=())
def sketch_block_stats(
    q: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block and row: max and log-sum-exp of the sketch scores q·k̃ over the block's real keys (-inf if none).

    Args:
        q: [B, H, R, D] float32, D a multiple of 8; codes: [B, H, C, D/2] uint8; lo, step: [B, H, NB, D] bfloat16;
            valid: [B, C] bool.
    Returns:
        (max, lse), each [B, H, R, NB] float32.
    """
    B, H, R, D = q.shape
    NB = lo.shape[2]
    C = codes.shape[2]
    words = codes.contiguous().view(torch.int32)  # [B, H, C, D / 8]: the caller ensures D % 8 == 0
    W = words.shape[3]
    out_max = torch.empty(B, H, R, NB, device=q.device, dtype=torch.float32)
    out_lse = torch.empty_like(out_max)
    _block_stats_kernel[(B * H * NB,)](
        q.contiguous(), words, lo.contiguous(), step.contiguous(), valid.contiguous(),
        out_max, out_lse, H, NB, C,
        R=R, D=D, W=W, BS=C // NB, BLOCK_W=triton.next_power_of_2(W), num_warps=2,
    )
    return out_max, out_lse


@sketch_block_stats.register_fake
def _(q, codes, lo, step, valid):
    out = q.new_empty(q.shape[:3] + lo.shape[2:3])
    return out, torch.empty_like(out)


@sketch_block_stats_dot.register_fake
def _(q, codes, lo, step, valid):
    out = q.new_empty(q.shape[:3] + lo.shape[2:3])
    return out, torch.empty_like(out), torch.empty_like(out)
