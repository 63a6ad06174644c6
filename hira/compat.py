"""What differs between the transformers releases Hira supports (see ``pyproject.toml`` for the tested range).

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache`` in ``generate``, the base models'
``forward``, the decoder layers and the attention modules (huggingface/transformers, "Rename past_key_values to
cache"); the old name survives only at the outer entry points, with a FutureWarning, and is dropped when both are
given. The name is read once from the installed ``LlamaModel.forward`` signature, never from a version string.
"""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

CACHE_ARGS = ("cache", "past_key_values")


def _installed_cache_arg() -> str:
    # inspect.signature follows the __wrapped__ of transformers' deprecate_kwarg decorator to the real parameters.
    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


CACHE_ARG = _installed_cache_arg()
"""The keyword under which the installed transformers passes a cache: ``"cache"`` (≥ 5.24) or ``"past_key_values"``.

Pass a cache portably with ``model.generate(ids, **{hira.CACHE_ARG: cache})``."""
