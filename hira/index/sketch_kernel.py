"""A Triton kernel for the key sketch on CUDA: per block and query row, the max and the log-sum-exp of q·k̃.

The tensor program (``hira.index.sketch.key_scores``) produces q·k̃ for every key, [B, H, R, C], and then reduces it
per block; the unpacked codes or the per-key scores make it read several times the sketch's bytes. Here a program
takes several blocks of one (batch, KV head): it reads each block's codes once, as int32 words (byte loads ran at
0.3 TB/s), unpacks each nibble plane once for all query rows, accumulates the rows' products in one
[rows, keys, words] tile, and writes only the per-block results.

Only imported on CUDA (``hira.index.sketch``); the CPU path stays the tensor program, which the tests compare with.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_stats_kernel(
    q_ptr, words_ptr, lo_ptr, step_ptr, valid_ptr, max_ptr, lse_ptr,
    H, NB, C,
    R, R_TILE: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCKS: tl.constexpr,
):
    """One program per (b, h, group of BLOCKS blocks, group of R_TILE rows). Nibble t of word i is channel 8i + t."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    r = tl.program_id(2) * R_TILE + tl.arange(0, R_TILE)
    s = tl.arange(0, BS)
    i = tl.arange(0, BLOCK_W)
    rmask = r < R
    for j in range(BLOCKS):
        n = tl.program_id(1) * BLOCKS + j
        if n < NB:
            words = tl.load(words_ptr + (bh * C + n * BS + s)[:, None] * W + i[None, :], mask=(i < W)[None, :],
                            other=0)
            plane = (bh * NB + n) * D
            base = tl.zeros([R_TILE, BLOCK_W], dtype=tl.float32)
            acc = tl.zeros([R_TILE, BS, BLOCK_W], dtype=tl.float32)  # reduced once per block, not per nibble
            for t in tl.static_range(8):
                ch = 8 * i + t
                inside = ch < D
                qc = tl.load(q_ptr + (bh * R + r)[:, None] * D + ch[None, :], mask=rmask[:, None] & inside[None, :],
                             other=0.0)  # [R_TILE, BLOCK_W]
                lo = tl.load(lo_ptr + plane + ch, mask=inside, other=0.0).to(tl.float32)
                st = tl.load(step_ptr + plane + ch, mask=inside, other=0.0).to(tl.float32)
                base += qc * lo[None, :]
                code = ((words >> (4 * t)) & 15).to(tl.float32)  # [BS, BLOCK_W], unpacked once for every row
                acc += code[None, :, :] * (qc * st[None, :])[:, None, :]
            real = tl.load(valid_ptr + b * C + n * BS + s) != 0
            est = tl.where(real[None, :], tl.sum(base, axis=1)[:, None] + tl.sum(acc, axis=2), float("-inf"))
            m = tl.max(est, axis=1)  # [R_TILE]
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            lse = m_safe + tl.log(tl.sum(tl.exp(est - m_safe[:, None]), axis=1))
            out = (bh * R + r) * NB + n
            tl.store(max_ptr + out, m, mask=rmask)
            tl.store(lse_ptr + out, lse, mask=rmask)


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
    blocks = 4  # blocks per program
    r_tile = min(8, triton.next_power_of_2(R))  # rows per program: the [rows, keys, words] tile stays in registers
    _block_stats_kernel[(B * H, triton.cdiv(NB, blocks), triton.cdiv(R, r_tile))](
        q.contiguous(), words, lo.contiguous(), step.contiguous(), valid.contiguous(),
        out_max, out_lse, H, NB, C, R,
        R_TILE=r_tile, D=D, W=W, BS=C // NB, BLOCK_W=triton.next_power_of_2(W), BLOCKS=blocks,
        num_warps=4 if r_tile <= 4 else 8,
    )
    return out_max, out_lse


@sketch_block_stats.register_fake
def _(q, codes, lo, step, valid):
    B, H, R, _ = q.shape
    out = q.new_empty(B, H, R, lo.shape[2])
    return out, torch.empty_like(out)
