"""What the end-to-end benchmarks share: the Llama-3-8B-shaped model with random weights.

Imported by ``bench_decode.py`` and ``bench_generate.py`` (run from the repository root or from benchmarks/).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json), less the layer count.
LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5)
FULL_LAYERS = 32
# --smoke: the same GQA ratio (4) at a size a CPU decodes in milliseconds.
SMOKE_MODEL = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                   intermediate_size=512, vocab_size=1024, rope_theta=500000.0, rms_norm_eps=1e-5)
DTYPE = torch.bfloat16


def make_model(shape: dict, layers: int, max_positions: int, device: torch.device, seed: int) -> LlamaForCausalLM:
    """A Llama with the given shapes and random weights, built on the meta device and initialised in bf16 in place
    (normal std 0.02; norms 1), so that no float32 copy of the weights is ever made."""
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=max_positions,
        rms_norm_eps=shape["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(DTYPE).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # The rotary frequencies are buffers computed at construction: recompute them, in float32.
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)
    return model.eval()
