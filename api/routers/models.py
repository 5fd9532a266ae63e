"""Base models a job can name."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import TenantDep
from api.schemas import ModelList, ModelPublic, error_responses
from core.catalog import list_models

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", responses=error_responses(401))
def get_models(_principal: TenantDep) -> ModelList:
    """The catalog: built-in models and models derived on this deployment."""
    return ModelList(data=[ModelPublic.from_spec(spec) for spec in list_models()])
