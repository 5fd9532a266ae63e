"""The job spec: what a customer asks for when submitting a fine-tuning job.

Torch-free so the API can validate requests; the worker maps a :class:`JobSpec` onto
``workers.training.TrainingConfig`` (the defaults below match that config's).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The safety presets. The definitions live in ``safety.schedules.PRESETS``; only the names are
#: repeated here because the API may not import ``safety`` (torch). A test checks they agree.
PresetName = Literal["off", "fixed", "paper", "adaptive"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)
DEFAULT_PRESET: PresetName = "adaptive"


class LoraHyperparameters(BaseModel):
    """The LoRA adapter to train."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=256, description="Rank of the update matrices.")
    alpha: float = Field(
        32.0, gt=0, le=4096, description="Scaling numerator: updates are scaled by alpha / r."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (0 keeps step 0 = ref).")


class Hyperparameters(BaseModel):
    """Training hyperparameters of a job."""

    model_config = ConfigDict(extra="forbid")

    lora: LoraHyperparameters = Field(default_factory=LoraHyperparameters)
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak AdamW learning rate.")
    epochs: int = Field(1, ge=1, le=100, description="Passes over the training file.")
    max_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Stop after this many optimizer steps."
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per batch.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of shuffling and init.")


class JobSpec(BaseModel):
    """A fine-tuning job request, validated; stored as JSON on the job row."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512, description="Base model id (see GET /models).")
    training_file: str = Field(
        min_length=1, max_length=64, description="Id of an uploaded training file (file-...)."
    )
    preset: PresetName = Field(DEFAULT_PRESET, description="Safety regularization preset.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)

    @field_validator("training_file")
    @classmethod
    def _check_training_file(cls, value: str) -> str:
        if not value.startswith("file-"):
            raise ValueError(
                f"training_file must be a file id such as 'file-3f2a...', got {value!r}; "
                "upload the file with POST /files first"
            )
        return value
