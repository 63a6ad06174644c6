"""An int4 sketch of the keys: per-key score intervals a few units wide, with an exact error term.

Each block quantises its members per channel: lo (rounded down to bfloat16) and step (rounded up to bfloat16,
lo + 15·step ≥ the channel's max), codes c = round((k − lo) / step) in 0..15, two per byte. The sketch key
k̃ = lo + c·step is within step/2 of k in every channel, so for any query

    |q·k − q·k̃| ≤ e = Σ_i |q_i|·step_i·(1/2 + 2^-12)       (the 2^-12 covers float32 rounding of c)

and [q·k̃ − e, q·k̃ + e], widened by the float32 (or TF32) rounding margin of computing q·k̃, holds q·k for every
key. ``e`` is one number per block and row. On real keys (SmolLM2, 16–64-key blocks) it is 0.9–1.3 score units
where ball and box bounds overshoot by 12–18 (benchmarks/bounds_results_8k.md).

The codes of a key lie in the order the tensor-core kernel unpacks them (``nibble_channels``): each int32 word holds
eight channels, its bits 4u–4u+3 and 16+4u–16+4u+3 channels 8i+2u and 8i+2u+1, so that one mask turns a word into
a pair of float16 codes adjacent in the kernel's product.

Bytes: D/2 per key plus 4·D per block (lo and step in bfloat16): 1/8 of K and V in 16-bit types, plus 1/BS of it
for the scales (3.1% at 32-key blocks, 1.6% at 64).

Shapes: B batch, H KV heads, C capacity in slots, NB = C / BS blocks, R query rows, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hira.index.bounds import rounding_margin
from hira.kernels import cuda_kernels

LEVELS = 15  # codes 0..15: 4 bits
# Quantisation error per channel, in steps: 1/2, plus a float32 allowance for the code's rounding.
HALF_STEP = 0.5 + 2.0**-12


@dataclass
class KeySketch:
    """The int4 sketch of one layer's key storage.

    Attributes:
        codes: [B, H, C, ceil(D/2)] uint8, nibble n (the low nibble of byte n // 2 for even n, the high one for odd
            n) holding channel ``nibble_channels(D)[n]``.
        lo: [B, H, NB, D] bfloat16 per-block channel minimum, rounded down (0 in empty blocks).
        step: [B, H, NB, D] bfloat16 per-block channel step, rounded up (0 in empty blocks).
    """

    codes: torch.Tensor
    lo: torch.Tensor
    step: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.lo, self.step)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


# The channels of one int32 word's eight nibbles (bytes 0–3, low nibble first), relative to 8i: bits 4u and 16 + 4u
# hold channels 2u and 2u + 1.
_WORD_CHANNELS = (0, 2, 4, 6, 1, 3, 5, 7)


def nibble_channels(D: int, device=None) -> torch.Tensor:
    """[2·ceil(D/2)] int64: the channel each nibble of a key's codes holds; every full group of 8 channels in the
    order ``_WORD_CHANNELS``, a last partial group (and the padding channel D of an odd D) in channel order."""
    order = torch.arange(2 * ((D + 1) // 2), device=device)
    full = D - D % 8
    group = torch.tensor(_WORD_CHANNELS, device=device)
    order[:full] = (torch.arange(0, full, 8, device=device)[:, None] + group).flatten()
    return order


def _to_bf16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 -> bfloat16 rounded toward +inf (up) or -inf (down): the bfloat16 value is ≥ (≤) x."""
    bits = x.float().contiguous().view(torch.int32)
    trunc = bits & -65536  # drop the low 16 bits: rounds toward zero
    toward_zero = trunc.view(torch.float32)
    away = (trunc + 65536).view(torch.float32)  # one bfloat16 ulp further from zero
    need = (toward_zero < x) if up else (toward_zero > x)
    return torch.where(need, away, toward_zero).to(torch.bfloat16)


def quantize_blocks(keys: torch.Tensor, valid: torch.Tensor) -> KeySketch:
    """Sketch of whole blocks.

    Args:
        keys: [B, H, M, BS, D] members of M blocks (any float dtype).
        valid: [B, 1 or H, M, BS] bool real members; the others get code 0 and do not widen lo/step.
    Returns:
        KeySketch with codes [B, H, M·BS, ceil(D/2)], lo and step [B, H, M, D].
    """
    B, H, M, BS, D = keys.shape
    x = keys.float()
    v = valid.expand(B, H, M, BS)[..., None]
    lo = x.masked_fill(~v, math.inf).amin(3)  # [B, H, M, D]
    hi = x.masked_fill(~v, -math.inf).amax(3)
    empty = ~v.any(3)  # [B, H, M, 1]
    lo = lo.masked_fill(empty, 0.0)
    hi = hi.masked_fill(empty, 0.0)
    lo_q = _to_bf16(lo, up=False)
    # (1 + 2^-20) covers the float32 rounding of hi − lo and of the division: lo + 15·step ≥ hi holds exactly.
    step_q = _to_bf16((hi - lo_q.float()) / LEVELS * (1 + 2.0**-20), up=True)
    lo_f, step_f = lo_q.float()[:, :, :, None, :], step_q.float()[:, :, :, None, :]
    c = ((x - lo_f) / step_f.clamp_min(torch.finfo(torch.float32).tiny)).round().clamp(0, LEVELS)
    c = torch.where(v & (step_f > 0), c, 0.0).to(torch.uint8).view(B, H, M * BS, D)
    if D % 2:
        c = torch.cat([c, torch.zeros_like(c[..., :1])], dim=-1)
    c = c[..., nibble_channels(D, c.device)]  # nibble order
    codes = c[..., 0::2] | (c[..., 1::2] << 4)
    return KeySketch(codes, lo_q, step_q)


def build_sketch(keys: torch.Tensor, valid: torch.Tensor, block_size: int) -> KeySketch:
    """Sketch of a whole storage: keys [B, H, C, D], valid [B, C] real slots."""
    B, H, C, D = keys.shape
    NB = C // block_size
    return quantize_blocks(keys.view(B, H, NB, block_size, D), valid.view(B, 1, NB, block_size))


def write_blocks(sketch: KeySketch, blocks: torch.Tensor, fresh: KeySketch, block_size: int) -> None:
    """In place: replace the sketch of the given blocks [n] by ``fresh`` (from ``quantize_blocks`` of them)."""
    slots = (blocks[:, None] * block_size + torch.arange(block_size, device=blocks.device)).flatten()
    sketch.codes.index_copy_(2, slots, fresh.codes)
    sketch.lo.index_copy_(2, blocks, fresh.lo)
    sketch.step.index_copy_(2, blocks, fresh.step)


def _unpack(codes: torch.Tensor, D: int) -> torch.Tensor:
    """[..., ceil(D/2)] uint8 -> [..., D] float32 codes in channel order."""
    c = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)  # nibble order
    return c[..., torch.argsort(nibble_channels(D, codes.device))[:D]].float()


def half_width(q: torch.Tensor, sketch: KeySketch) -> torch.Tensor:
    """[B, H, R, NB]: the quantisation error Σ|q_i|·step_i·(1/2 + 2^-12) plus the rounding margin of computing q·k̃."""
    D = q.shape[-1]
    lo, step = sketch.lo.float(), sketch.step.float()  # [B, H, NB, D]
    err = HALF_STEP * (q.abs() @ step.transpose(-1, -2))  # [B, H, R, NB]
    magnitude = lo.norm(dim=-1) + LEVELS * step.norm(dim=-1)  # [B, H, NB] bounds ‖k̃‖ and each term's size
    qn = q.norm(dim=-1, keepdim=True)  # [B, H, R, 1]
    return err + rounding_margin(qn, magnitude[:, :, None, :], D, q.is_cuda)


def key_scores(q: torch.Tensor, sketch: KeySketch, valid: torch.Tensor) -> torch.Tensor:
    """q·k̃ for every key: [B, H, R, NB, BS] float32, -inf in invalid slots (the tensor program)."""
    B, H, R, D = q.shape
    NB = sketch.lo.shape[2]
    BS = sketch.codes.shape[2] // NB
    lo, step = sketch.lo.float(), sketch.step.float()  # [B, H, NB, D]
    base = q @ lo.transpose(-1, -2)  # [B, H, R, NB]
    w = q[:, :, :, None, :] * step[:, :, None, :, :]  # [B, H, R, NB, D]
    if torch.compiler.is_compiling():
        # As a broadcast product summed over channels, inductor fuses the unpacking into one reduction that reads
        # the codes as bytes; eagerly that product would be materialised (R·C·D floats), so eager code unpacks once.
        Dp = sketch.codes.shape[-1]
        w = torch.nn.functional.pad(w, (0, 2 * Dp - D))[..., nibble_channels(D, w.device)]  # nibble order
        w = w.view(B, H, R, NB, 1, Dp, 2)
        codes = sketch.codes.view(B, H, 1, NB, BS, Dp)
        dot = (w[..., 0] * (codes & 15) + w[..., 1] * (codes >> 4)).sum(-1)  # [B, H, R, NB, BS]
    else:
        dot = torch.einsum("bhrnd,bhnsd->bhrns", w, _unpack(sketch.codes, D).view(B, H, NB, BS, D))
    real = valid.view(B, 1, 1, NB, BS)
    return (base[..., None] + dot).masked_fill(~real, -math.inf)


def key_score_bounds(q: torch.Tensor, sketch: KeySketch, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-key score intervals from the sketch.

    Args:
        q: [B, H, R, D] float32 scaled query rows.
        sketch: the layer's sketch; valid: [B, C] real slots.
    Returns:
        (estimate, half_width): estimate [B, H, R, NB, BS] float32 q·k̃ (-inf in invalid slots) and
        half_width [B, H, R, NB] such that |q·k − estimate| ≤ half_width for every real key.
    """
    return key_scores(q, sketch, valid), half_width(q, sketch)


def block_score_stats(
    q: torch.Tensor, sketch: KeySketch, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block and row: (max, log-sum-exp) of q·k̃ over the block's real keys and the half-width, each
    [B, H, R, NB] float32 (-inf for blocks without a real key). Every key's score lies within half-width of q·k̃.

    On CUDA a Triton kernel reads each block's codes once (``hira.index.sketch_kernel``): on the tensor cores for
    head dims that are a power of two of at least 64, writing the half-width too, its float16 rounding added; else
    with FMAs for multiples of 8. Elsewhere the tensor program of ``key_scores``.
    """
    if q.is_cuda and _KERNELS is not None and _KERNELS.dot_applies(q.shape[-1]):
        return _KERNELS.sketch_block_stats_dot(q, sketch.codes, sketch.lo, sketch.step, valid)
    if q.is_cuda and _KERNELS is not None and q.shape[-1] % 8 == 0:
        top, lse = _KERNELS.sketch_block_stats(q, sketch.codes, sketch.lo, sketch.step, valid)
    else:
        est = key_scores(q, sketch, valid)
        top, lse = est.amax(-1), est.logsumexp(-1)
    return top, lse, half_width(q, sketch)


_KERNELS = cuda_kernels("hira.index.sketch_kernel")
