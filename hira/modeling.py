"""HiraAttention, the drop-in for Llama/Mistral/Qwen2/Gemma 3 attention, and ``convert`` / ``revert``.

``convert`` swaps every supported attention module in place for a ``HiraAttention`` that reuses the module's own
projection (and q/k norm) layers (no copy), and hooks the base model so that a ``HiraCache`` is created when no cache
is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from hira.cache import HiraCache
from hira.compat import CACHE_ARG, CACHE_ARGS
from hira.config import HiraConfig
from hira.parallel import SequenceShard

# model_type -> (its attention module, whether its sliding-window layers are left unconverted). Gemma 3 interleaves
# windowed layers with full ones by design (five to one by default): the windowed layers keep transformers' exact
# attention over their own cache layer (a window of a few hundred keys leaves nothing worth skipping) and Hira serves
# the full ones. In Mistral and Qwen2 a window is a config switch, and HiraAttention still refuses it there.
_FAMILIES = {
    "llama": (LlamaAttention, False),
    "mistral": (MistralAttention, False),
    "qwen2": (Qwen2Attention, False),
    "gemma3_text": (Gemma3Attention, True),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


class HiraAttention(nn.Module):
    """Attention that decodes through Hira's index. Replaces one LlamaAttention (or its Mistral/Qwen2 twin, or a
    full-attention Gemma3Attention).

    Prefill is exact causal SDPA and indexes the prompt; decode steps search the index, build a BlockMask and run
    FlexAttention over the kept blocks. Needs a ``HiraCache`` (created automatically by the converted model).

    Args:
        original: the module it replaces; its q/k/v/o projections (and Gemma 3's q/k norms) are shared, not copied.
        config: the ``HiraConfig``.
        shard: the ``SequenceShard`` the model's caches are sharded by (shown by ``print(model)``), or None.
    """

    def __init__(self, original: nn.Module, config: HiraConfig, shard: SequenceShard | None = None):
        super().__init__()
        # Qwen2 sets sliding_window per module (None for full attention); Mistral reads it from the config.
        source = original if hasattr(original, "sliding_window") else original.config
        window = getattr(source, "sliding_window", None)
        if window is not None:
            raise ValueError(
                f"layer {original.layer_idx} uses sliding-window attention (window {window}), which "
                "Hira does not support; set config.sliding_window = None if your contexts stay below the window"
            )
        # Prefill and the index are causal (EmbeddingGemma sets Gemma 3's use_bidirectional_attention).
        if not getattr(original, "is_causal", True):
            raise ValueError(
                f"layer {original.layer_idx} attends bidirectionally (config.use_bidirectional_attention = "
                f"{getattr(original.config, 'use_bidirectional_attention', None)}); Hira serves causal decoders only"
            )
        # The index's bounds, the search and FlexAttention all work on the raw scaled scores q·k·scale.
        softcap = getattr(original.config, "attn_logit_softcapping", None)
        if softcap is not None:
            raise ValueError(
                f"layer {original.layer_idx}: config.attn_logit_softcapping = {softcap}, which Hira does not support "
                "(it attends over uncapped scores); only a model whose attn_logit_softcapping is None can be converted"
            )
        self.config = original.config
        self.layer_idx = original.layer_idx
        self.head_dim = original.head_dim
        self.scaling = original.scaling
        self.num_heads = original.config.num_attention_heads
        self.num_kv_heads = original.config.num_key_value_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            original.q_proj, original.k_proj, original.v_proj, original.o_proj
        )
        # Gemma 3 RMS-normalises every query and key head before RoPE; an identity elsewhere keeps one forward.
        self.q_norm = getattr(original, "q_norm", nn.Identity())
        self.k_norm = getattr(original, "k_norm", nn.Identity())
        self.hira_config = config
        self.hira_shard = shard
        # Kept for revert(), outside the module tree so that its weights are not counted twice.
        object.__setattr__(self, "_hira_original", original)

    def extra_repr(self) -> str:
        c = self.hira_config
        text = (
            f"layer_idx={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"block_size={c.block_size}, threshold={c.threshold}"
        )
        if self.hira_shard is not None:
            text += f", shard={self.hira_shard.rank}/{self.hira_shard.world_size}"
        return text

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states: [B, S, hidden]; position_embeddings: (cos, sin); attention_mask: the model's 4D mask.

        The cache comes as ``kwargs[hira.CACHE_ARG]`` (``cache`` or ``past_key_values``, by transformers release).
        """
        cache = kwargs.get(CACHE_ARG)
        if kwargs.get("output_attentions"):
            raise ValueError("HiraAttention does not materialise attention weights: call with output_attentions=False")
        B, S, _ = hidden_states.shape
        shape = (B, S, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)  # [B, Hq, S, D]
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is None:
            _check_no_cache_is_full_sequence(kwargs.get("position_ids"), S, self.layer_idx)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None and S > 1, scale=self.scaling,
                enable_gqa=True,
            )
        elif isinstance(cache, HiraCache):
            out = cache.layers[self.layer_idx].attend(q, k, v, attention_mask, self.scaling)
        else:
            raise TypeError(
                f"a Hira-converted model needs a HiraCache, got {type(cache).__name__}: pass "
                f"{CACHE_ARG}=hira.HiraCache(model.config, config) or none at all"
            )
        out = out.transpose(1, 2).reshape(B, S, -1)  # [B, S, Hq*D]
        return self.o_proj(out), None


def _check_no_cache_is_full_sequence(position_ids: torch.Tensor | None, length: int, layer_idx: int) -> None:
    """Without a cache a forward must see its whole sequence: positions at or past its length mean that earlier
    tokens sit in a cache this module was not given (a decode whose cache was lost on the way), which would
    silently attend to the new tokens alone."""
    if position_ids is None or torch.compiler.is_compiling():
        return
    if int(position_ids.max()) >= length:
        raise RuntimeError(
            f"HiraAttention (layer {layer_idx}) got positions up to {int(position_ids.max())} for {length} new "
            f"tokens but no cache under {CACHE_ARG!r}: the HiraCache holding the earlier tokens did not reach the "
            "attention module. Pass the cache as generate/forward's "
            f"{CACHE_ARG}= (the name the installed transformers uses), or report this with your transformers version"
        )


def _base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


def _inject_cache(config: HiraConfig, shard: SequenceShard | None) -> Callable:
    """Forward pre-hook on the base model: a HiraCache where the model would otherwise create a DynamicCache."""

    def hook(module, args, kwargs):
        # A cache given under either name moves to the installed one (no deprecation warning, never dropped).
        given = next((c for c in [kwargs.pop(name, None) for name in CACHE_ARGS] if c is not None), None)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if given is None and use_cache:
            given = HiraCache(module.config, config, shard)
        if given is not None:
            kwargs[CACHE_ARG] = given
        return args, kwargs

    return hook


def _hook_generate(model: nn.Module, config: HiraConfig, shard: SequenceShard | None) -> None:
    """Three instance-level overrides of ``generate``'s internals, each calling the class's own method:

    - ``_prepare_cache_for_generation``: the DynamicCache generate makes when given no cache becomes a HiraCache
      (user caches stay), sized, unless ``HiraConfig.max_cache_len`` says otherwise, as transformers sizes its static
      cache: to the call's prompt plus new tokens, never below an earlier call's size (so that a later, shorter call
      reuses the compiled shapes instead of recompiling);
    - ``_prefill``: a chunked prefill (``prefill_chunk_size``) runs inside ``HiraCache.deferred_recluster`` (one
      re-clustering after the last chunk) and eagerly: transformers would run the chunks through the compiled
      decode forward, but Hira's prefill builds the index with host reads;
    - ``_valid_auto_compile_criteria``: False during that prefill, as transformers' own answer otherwise.
    """
    cls = type(model)
    prepare, prefill, criteria = cls._prepare_cache_for_generation, cls._prefill, cls._valid_auto_compile_criteria

    def prepare_cache(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        result = prepare(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        cache = model_kwargs.get(CACHE_ARG)
        if isinstance(cache, DynamicCache) and not getattr(cache, "_is_user_defined", False):
            sized = config
            if config.max_cache_len == -1:
                self._hira_capacity = max(getattr(self, "_hira_capacity", 0), int(max_cache_length))
                sized = dataclasses.replace(config, max_cache_len=self._hira_capacity)
            model_kwargs[CACHE_ARG] = HiraCache(self.config, sized, shard)
        return result

    def hira_prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        cache = model_kwargs.get(CACHE_ARG)
        deferred = cache.deferred_recluster() if isinstance(cache, HiraCache) else contextlib.nullcontext()
        self._hira_prefilling = True
        try:
            with deferred:
                return prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs)
        finally:
            self._hira_prefilling = False

    def valid_auto_compile_criteria(self, *args, **kwargs):
        return not getattr(self, "_hira_prefilling", False) and criteria(self, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(prepare_cache, model)
    model._prefill = types.MethodType(hira_prefill, model)
    model._valid_auto_compile_criteria = types.MethodType(valid_auto_compile_criteria, model)


_GENERATE_HOOKS = (
    "_prepare_cache_for_generation", "_prefill", "_valid_auto_compile_criteria", "_hira_prefilling", "_hira_capacity"
)


def convert(
    model: nn.Module, config: HiraConfig | None = None, filter_fn=None, *, shard: SequenceShard | None = None
) -> nn.Module:
    """Swap, in place, every attention module of a Llama, Mistral, Qwen2 or Gemma 3 model for ``HiraAttention``.

    Gemma 3's sliding-window layers are left as they are: they attend exactly over their window, through the
    transformers cache layer a ``DynamicCache`` would give them, held in the same ``HiraCache``.

    Args:
        model: a transformers ``*ForCausalLM`` or base model of a supported family (Gemma 3: ``Gemma3ForCausalLM``,
            model type ``gemma3_text``).
        config: the ``HiraConfig`` (default ``HiraConfig()``).
        filter_fn: optional ``(module, fqn) -> bool``; only modules for which it returns True are converted.
        shard: a ``hira.SequenceShard`` for context parallelism: the caches the model creates shard the sequence
            over the shard's process group (run the same model and inputs on every rank; every rank gets the same
            outputs). None: a single-process cache.
    Returns:
        The same model. Converting again replaces the config; ``hira.revert`` restores the original modules.
    """
    config = config or HiraConfig()
    if shard is not None and not isinstance(shard, SequenceShard):
        raise ValueError(f"shard must be a hira.SequenceShard or None, got {type(shard).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"hira.convert supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
            f"({type(model).__name__})"
        )
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    bad = [i for i in config.dense_layers if i >= n_layers]
    if bad:
        raise ValueError(f"HiraConfig.dense_layers {bad} are out of range for a model of {n_layers} layers")
    attention, keeps_sliding = _FAMILIES[model_type]
    swaps = []
    for fqn, module in model.named_modules():
        original = module._hira_original if isinstance(module, HiraAttention) else module
        if not isinstance(original, attention) or (filter_fn is not None and not filter_fn(original, fqn)):
            continue
        if keeps_sliding and original.sliding_window is not None:
            continue
        swaps.append((fqn, HiraAttention(original, config, shard)))
    for fqn, new in swaps:
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    base = _base_model(model)
    old = getattr(base, "_hira_hook", None)
    if old is not None:
        old.remove()
    base._hira_hook = base.register_forward_pre_hook(_inject_cache(config, shard), with_kwargs=True)
    if hasattr(type(model), "_prefill"):
        _hook_generate(model, config, shard)
    model.hira_config = config
    model.hira_shard = shard
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert``: put the original attention modules back and remove the cache hook. In place."""
    for fqn, module in list(model.named_modules()):
        if isinstance(module, HiraAttention):
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module._hira_original)
    base = _base_model(model)
    hook = getattr(base, "_hira_hook", None)
    if hook is not None:
        hook.remove()
        del base._hira_hook
    for name in _GENERATE_HOOKS:
        model.__dict__.pop(name, None)
    model.__dict__.pop("hira_config", None)
    model.__dict__.pop("hira_shard", None)
    return model
