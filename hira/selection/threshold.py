"""Threshold modes: which blocks a search keeps, one class per mode.

Scores are scaled scores, ``s = scale * q·k`` (the logits of the softmax).

| mode               | keeps                                                            | guarantee                          |
|--------------------|------------------------------------------------------------------|------------------------------------|
| ``Dense()``        | every non-empty block                                            | exact attention                    |
| ``Fixed(tau)``     | blocks whose upper bound on s reaches τ                          | no key with s ≥ τ is missed        |
| ``Certified(eps)`` | blocks by mass bound until the rest is provably ≤ ε of the total | skipped softmax mass ≤ ε           |
| ``TopK(k)``        | the k blocks of largest estimated mass                           | none (budgeted); a posterior bound |
| ``TopP(p)``        | blocks until their estimated mass reaches p                      | none (budgeted); a posterior bound |

The budgeted modes estimate a block's mass as log n + q·c + ½‖q‖²·var·w (``hira.index.bounds.bound_and_estimate``, w
chosen per head at prefill by ``hira.selection.calibrate``), or, with a key sketch (``HiraConfig.key_sketch``), as
Σ exp(q·k̃) over its sketched keys. ``Certified`` bounds a block's
mass by n·exp(bound on its max score), or with a sketch by Σ exp(top of each key's interval): the sketch is what
makes it selective on real keys.

Every mode reports a bound on the skipped mass that holds for what it kept (``Selection.skip_bound``).

Each mode's ``keep`` is its step of ``hira.selection.search.select_leaves``. ``THRESHOLDS`` maps each mode's short
name to its class: a custom operator takes primitive arguments only, so a threshold crosses one as its name and
value (``name_and_value``, back through ``from_name``).

Shapes: B batch, H KV heads, R query rows, NB leaves.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from hira.flex.mask import MAX_SCAN_BLOCKS

if TYPE_CHECKING:
    from hira.selection.search import LeafBounds


class Threshold(ABC):
    """A threshold mode: ``Dense``, ``Fixed``, ``Certified``, ``TopK`` or ``TopP``. Its ``str`` is its short name
    and parameter, e.g. ``topk(2)``.

    Class attributes:
        name: the short name, a key of ``THRESHOLDS``.
        exact: the mode never misses a key with a scaled score at or above its τ (``Selection.tau``).
        per_leaf: the mode keeps a leaf by that leaf's own bound alone, not by ranking it against the others, so a
            sharded search (``hira.parallel``) needs no agreement between the ranks.
        uneven: the KV heads may keep very different numbers of blocks, so the attention splits each head's list
            over more programs (``Selection.uneven``; measured for ``Certified``, benchmarks/NOTES.md §34).
    """

    name: ClassVar[str]
    exact: ClassVar[bool] = False
    per_leaf: ClassVar[bool] = False
    uneven: ClassVar[bool] = False

    @abstractmethod
    def keep(
        self, bounds: LeafBounds, top_leaf: torch.Tensor, forced: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mode's choice of leaves: (keep [B, H, NB] bool, tau [B, H, R] float32); ``select_leaves`` then keeps
        the live ones of it and adds the forced ones.

        Args:
            bounds: [B, H, R, NB] per leaf, the exact score of ``top_leaf`` folded in (``fold_exact_score``).
            top_leaf: [B, H, R, 1] each row's leaf of largest bound.
            forced: [B, H, NB] leaves always kept (sinks, window); live: [B, H, NB] non-empty leaves.
        """

    def __str__(self) -> str:
        return f"{self.name}({', '.join(f'{v:g}' for v in astuple(self))})"


def _check(mode: Threshold, field: str, ok, needs: str, cast=float) -> None:
    """Validates the parameter ``field`` of a mode being made: ``ok(value)`` on its value as a float (NaN if it is
    not a real number), else a ValueError saying what the mode ``needs``; stores the value as ``cast``."""
    given = getattr(mode, field)
    value = float(given) if isinstance(given, numbers.Real) and not isinstance(given, bool) else math.nan
    if not ok(value):
        raise ValueError(f"{type(mode).__name__} needs {needs}, got {given!r}")
    object.__setattr__(mode, field, cast(value))


def _no_tau(bounds: LeafBounds) -> torch.Tensor:
    """[B, H, R] -inf: no score above which every key is known to be kept."""
    return torch.full_like(bounds.ub[..., 0], -math.inf)


@dataclass(frozen=True)
class Dense(Threshold):
    """Keep every block: exact attention. A layer below ``HiraConfig.min_context`` decodes with it, and its search
    reads no bound (``hira.selection.search.every_leaf``)."""

    name = "dense"
    exact = True
    per_leaf = True

    def keep(self, bounds, top_leaf, forced, live):
        return live, _no_tau(bounds)


@dataclass(frozen=True)
class Fixed(Threshold):
    """Keep every block that may hold a key with scaled score ≥ ``tau`` (finite, or -inf: every non-empty block)."""

    tau: float
    name = "fixed"
    exact = True
    per_leaf = True

    def __post_init__(self):
        _check(self, "tau", lambda tau: not math.isnan(tau) and tau != math.inf, "a finite τ or -inf")

    def keep(self, bounds, top_leaf, forced, live):
        tau = torch.full_like(bounds.ub[..., 0], self.tau)
        return (bounds.ub >= tau[..., None]).any(dim=2), tau


@dataclass(frozen=True)
class Certified(Threshold):
    """Keep blocks, largest mass bound first, until the mass left out is provably at most ``eps`` of the total
    (0 < eps < 1)."""

    eps: float
    name = "certified"
    exact = True
    uneven = True

    def __post_init__(self):
        _check(self, "eps", lambda eps: 0.0 < eps < 1.0, "0 < eps < 1")

    def keep(self, bounds, top_leaf, forced, live):
        """Each row lists the forced leaves and its top-bound leaf first. The keep is final (live, forced added),
        since τ is just above the largest bound of a leaf it skips: every real key above that was kept."""
        first = forced[:, :, None, :] | (torch.arange(live.shape[-1], device=live.device) == top_leaf)
        keep = (_certified_keep(bounds.log_mass_ub, bounds.log_mass_lb, first, self.eps) & live) | forced
        top_skipped = bounds.ub.masked_fill(~(live & ~keep)[:, :, None, :], -math.inf).amax(-1)  # [B, H, R]
        above = torch.nextafter(top_skipped, torch.full_like(top_skipped, math.inf))
        return keep, torch.where(top_skipped > -math.inf, above, top_skipped)


@dataclass(frozen=True)
class TopK(Threshold):
    """Keep the ``k`` blocks (an integer ≥ 1) of largest estimated mass, plus sinks and the recent window."""

    k: int
    name = "topk"

    def __post_init__(self):
        _check(self, "k", lambda k: math.isfinite(k) and k >= 1 and k == int(k), "an integer k >= 1", int)

    def keep(self, bounds, top_leaf, forced, live):
        """Ranks the leaves by the group's estimated share of mass: Σ over rows of each row's estimated fraction."""
        k = min(self.k, live.shape[-1])
        share = bounds.est.softmax(-1).nan_to_num(nan=0.0).sum(dim=2)  # [B, H, NB]
        top = share.masked_fill(~live, -1.0).topk(k, dim=-1, sorted=False).indices
        return torch.zeros_like(live).scatter_(-1, top, True), _no_tau(bounds)


@dataclass(frozen=True)
class TopP(Threshold):
    """Keep blocks, best estimate first, until their estimated softmax mass reaches ``p`` (0 < p ≤ 1)."""

    p: float
    name = "topp"

    def __post_init__(self):
        _check(self, "p", lambda p: 0.0 < p <= 1.0, "0 < p <= 1")

    def keep(self, bounds, top_leaf, forced, live):
        return _topp_keep(bounds.est, forced, self.p), _no_tau(bounds)


THRESHOLDS: dict[str, type[Threshold]] = {cls.name: cls for cls in (Dense, Fixed, Certified, TopK, TopP)}


def name_and_value(threshold: Threshold) -> tuple[str, float]:
    """``threshold`` as its short name and its parameter as a float (0 for ``Dense``); ``from_name`` inverts it."""
    return threshold.name, float(next(iter(astuple(threshold)), 0.0))


def from_name(name: str, value: float = 0.0) -> Threshold:
    """The mode of short name ``name`` (a key of ``THRESHOLDS``) with parameter ``value`` (``Dense`` takes none)."""
    if name not in THRESHOLDS:
        raise ValueError(f"unknown threshold mode {name!r}: expected one of {tuple(THRESHOLDS)}")
    cls = THRESHOLDS[name]
    return cls() if cls is Dense else cls(value)


def _topp_keep(est: torch.Tensor, forced: torch.Tensor, p: float) -> torch.Tensor:
    """Per row, the fewest leaves (forced first, then by estimated mass) whose estimated mass reaches p; union
    over the rows of a KV head. est: [B, H, R, NB] log-mass estimates; forced: [B, H, NB].

    Past ``MAX_SCAN_BLOCKS`` leaves, an opaque operator running the same code eagerly (not compiled by inductor)."""
    if est.shape[-1] > MAX_SCAN_BLOCKS:
        return _topp_keep_op(est, forced, p)
    return _topp_keep_program(est, forced, p)


def _topp_keep_program(est: torch.Tensor, forced: torch.Tensor, p: float) -> torch.Tensor:
    frac = est.softmax(-1).nan_to_num(nan=0.0)  # [B, H, R, NB] estimated share of each leaf
    order = est.masked_fill(forced[:, :, None, :], math.inf).argsort(dim=-1, descending=True)
    sorted_frac = torch.gather(frac, -1, order)
    before = sorted_frac.cumsum(-1) - sorted_frac  # share of the leaves ranked above
    keep_rows = torch.zeros_like(before, dtype=torch.bool).scatter_(-1, order, before < p)
    return keep_rows.any(dim=2)


# The certified rule's search for its cut: per row, passes over thresholds between a bound known to be enough and
# the largest bound, each pass trying CUT_WAYS evenly spaced ones and narrowing to the gap where "enough" begins.
CUT_WAYS = 32
CUT_PASSES = 3


def _certified_keep(log_mass_ub: torch.Tensor, log_mass_lb: torch.Tensor, first: torch.Tensor, eps: float):
    """Per row, the ``first`` leaves and every other leaf whose mass bound reaches a cut θ, the highest cut found
    after which the mass bound of the rest is at most ε of the total: U_rest / (U_rest + L_kept) ≤ ε; union over the
    rows of a KV head.

    Lowering θ only lowers U_rest and raises L_kept, so the union keeps every row within ε. The cut is searched, not
    taken from a sort (a sort and two log-cumulative scans were 55 µs of a 128K certified step on the H200, its
    search 21 µs, benchmarks/NOTES.md §33): ``_certified_cut``.

    Args:
        log_mass_ub, log_mass_lb: [B, H, R, NB] log mass bounds (-inf: empty leaf, or nothing known from below).
        first: [B, H, R, NB] bool leaves always listed (forced leaves, each row's top-bound leaf).
    Returns:
        [B, H, NB] bool.
    """
    cut = _certified_cut(log_mass_ub, log_mass_lb, first, eps)
    return (first | (log_mass_ub.masked_fill(first, -math.inf) >= cut)).any(dim=2)


def _certified_cut(log_mass_ub: torch.Tensor, log_mass_lb: torch.Tensor, first: torch.Tensor, eps: float
                   ) -> torch.Tensor:
    """[B, H, R, 1] each row's cut for ``_certified_keep`` (+inf where the ``first`` leaves alone are enough).

    ``CUT_PASSES`` passes of ``CUT_WAYS`` thresholds each, from the largest bound of the other leaves down to one
    below which the rest cannot outweigh the first leaves' kept mass (n leaves of mass below e^θ each), each pass
    narrowing to the gap where "enough" begins. The cut is within (largest − lowest) / ``CUT_WAYS``^``CUT_PASSES``
    of the highest one that is enough, so the leaves kept beyond the shortest list are those with bounds in that
    sliver above it, or tied with the last one listed.

    Sums are float32, shifted by each row's largest bound: an upper mass term's exponent is clamped at -80 rather
    than flushed to 0, a lower one may flush (both err on the side of keeping more).
    """
    c = eps / (1 - eps)
    other = log_mass_ub.masked_fill(first, -math.inf)  # [B, H, R, NB] the other leaves' bounds
    real = other > -math.inf
    shift = log_mass_ub.amax(-1, keepdim=True)
    shift = torch.where(shift > -math.inf, shift, 0.0)  # [B, H, R, 1]
    upper = torch.where(real, (other - shift).clamp_min(-80.0).exp(), 0.0)  # ≥ e^(u − shift)
    lower = (log_mass_lb - shift).exp()  # ≤ e^(l − shift)
    kept_first = torch.where(first, lower, 0.0).sum(-1, keepdim=True)  # [B, H, R, 1]
    lower = torch.where(first, 0.0, lower)

    def enough(theta: torch.Tensor) -> torch.Tensor:  # [B, H, R, T] thresholds -> bool: the cut θ is enough
        below = other[..., None, :] < theta[..., None]  # [B, H, R, T, NB]
        rest = torch.where(below, upper[..., None, :], 0.0).sum(-1)
        kept = kept_first + torch.where(below, 0.0, lower[..., None, :]).sum(-1)
        return rest <= c * kept

    top = other.amax(-1, keepdim=True)  # [B, H, R, 1] (-inf: no other leaf)
    lowest = other.masked_fill(~real, math.inf).amin(-1, keepdim=True)
    n = real.sum(-1, keepdim=True).clamp_min(1).float()
    # Below this cut the rest is at most n·e^(θ − shift) ≤ c·kept_first: enough (0.001 of slack for rounding).
    sure = shift + torch.log(c * kept_first / n) - 1e-3
    some = top > -math.inf  # (rows without another leaf search between 0 and 0: the first leaves are enough)
    hi = torch.where(some, top, 0.0)
    lo = torch.where(some, torch.maximum(lowest, sure), 0.0)  # enough: every other leaf, or the sure cut
    steps = torch.arange(CUT_WAYS, device=top.device, dtype=top.dtype)
    for _ in range(CUT_PASSES):
        theta = hi - (hi - lo) / CUT_WAYS * steps  # [B, H, R, T]: hi first, lo not tried (known enough)
        ok = enough(theta)
        s = torch.where(ok.any(-1, keepdim=True), ok.to(torch.int32).argmax(-1, keepdim=True), CUT_WAYS)
        new_lo = torch.where(s < CUT_WAYS, theta.gather(-1, s.clamp_max(CUT_WAYS - 1)), lo)
        hi = torch.where(s > 0, theta.gather(-1, (s - 1).clamp_min(0)), hi)
        lo = new_lo
    return torch.where(upper.sum(-1, keepdim=True) <= c * kept_first, math.inf, lo)


@torch.library.custom_op("hira::topp_keep", mutates_args=())
def _topp_keep_op(est: torch.Tensor, forced: torch.Tensor, p: float) -> torch.Tensor:
    return _topp_keep_program(est, forced, p)


@_topp_keep_op.register_fake
def _(est, forced, p):
    return torch.empty_like(forced)

