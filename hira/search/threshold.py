"""Threshold specifications: which blocks a search keeps.

Scores are scaled scores, ``s = scale * q·k`` (the logits of the softmax).

| mode        | keeps                                                            | guarantee                               |
|-------------|------------------------------------------------------------------|-----------------------------------------|
| ``dense``     | every non-empty block                                            | exact attention                         |
| ``fixed``     | blocks whose upper bound on s reaches ``value``                 | no key with s ≥ value is missed         |
| ``certified`` | blocks by mass bound until the rest is provably ≤ ε of the total  | skipped softmax mass ≤ ε                |
| ``topk``      | the ``value`` blocks of largest estimated mass                  | none (budgeted); a posterior bound      |
| ``topp``      | blocks until their estimated mass reaches ``value``             | none (budgeted); a posterior bound      |

The budgeted modes estimate a block's mass as log n + q·c + ½‖q‖²·var (``hira.index.bounds.log_mass_estimate``), or,
with a key sketch (``HiraConfig.key_sketch``), as Σ exp(q·k̃) over its sketched keys. ``certified`` bounds a block's
mass by n·exp(bound on its max score), or with a sketch by Σ exp(top of each key's interval): the sketch is what
makes it selective on real keys.

Every mode reports a bound on the skipped mass that holds for what it kept (``Selection.skip_bound``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("dense", "fixed", "certified", "topk", "topp")


@dataclass(frozen=True)
class Threshold:
    """A threshold mode and its parameter. Build it with the class methods, e.g. ``Threshold.certified(1e-3)``.

    Attributes:
        mode: one of ``dense``, ``fixed``, ``certified``, ``topk``, ``topp``.
        value: τ for ``fixed`` (scaled-score units, may be ``-inf``), ε in (0, 1) for ``certified``, a block count
            ≥ 1 for ``topk``, a mass in (0, 1] for ``topp``; unused (0) for ``dense``.
    """

    mode: str
    value: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Threshold.mode must be one of {MODES}, got {self.mode!r}")
        v = self.value
        if self.mode == "fixed" and (math.isnan(v) or v == math.inf):
            raise ValueError(f"Threshold.fixed needs a finite τ or -inf, got {v}")
        if self.mode == "certified" and not 0.0 < v < 1.0:
            raise ValueError(f"Threshold.certified needs 0 < eps < 1, got {v}")
        if self.mode == "topk" and not (math.isfinite(v) and v >= 1 and v == int(v)):
            raise ValueError(f"Threshold.topk needs an integer k >= 1, got {v}")
        if self.mode == "topp" and not 0.0 < v <= 1.0:
            raise ValueError(f"Threshold.topp needs 0 < p <= 1, got {v}")

    @classmethod
    def dense(cls) -> "Threshold":
        """Keep every block: exact attention through the sparse path."""
        return cls("dense")

    @classmethod
    def fixed(cls, tau: float) -> "Threshold":
        """Keep every block that may hold a key with scaled score ≥ ``tau``."""
        return cls("fixed", float(tau))

    @classmethod
    def certified(cls, eps: float) -> "Threshold":
        """Keep blocks, largest mass bound first, until the mass left out is provably at most ``eps``."""
        return cls("certified", float(eps))

    @classmethod
    def topk(cls, k: int) -> "Threshold":
        """Keep the ``k`` blocks of largest estimated mass (plus sinks and the recent window)."""
        return cls("topk", float(k))

    @classmethod
    def topp(cls, p: float) -> "Threshold":
        """Keep blocks, best bound first, until their estimated softmax mass reaches ``p``."""
        return cls("topp", float(p))

    @property
    def exact(self) -> bool:
        """True for the modes that never miss a key above their threshold."""
        return self.mode in ("dense", "fixed", "certified")
