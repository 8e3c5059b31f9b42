"""POST /v1/models and POST /v1/datasets: upload a file once, reuse it in many jobs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.deps import ResourcesDep, SettingsDep, TenantDep, valid_id
from service.errors import not_found, problem_responses
from service.intake import UploadKind, receive_upload
from service.schemas import DatasetOut, ModelOut
from service.uploads import MULTIPART, check_content_length, media_type, request_budget, unsupported_media_type

router = APIRouter(prefix="/v1", tags=["uploads"])


def _file_form(description: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                MULTIPART: {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary", "description": description}},
                    }
                }
            },
        }
    }


async def _receive(request: Request, kind: UploadKind, settings: SettingsDep, resources: ResourcesDep, tenant: str) -> Any:
    if media_type(request)[0] != MULTIPART:
        raise unsupported_media_type(request, (MULTIPART,))
    check_content_length(request, request_budget(settings.max_upload_bytes))
    return await run_in_threadpool(
        lambda: receive_upload(request, kind, settings=settings, storage=resources.storage, store=resources.store, tenant=tenant)
    )


@router.post(
    "/models",
    status_code=201,
    response_model=ModelOut,
    summary="Upload a model file (TorchScript, state_dict or safetensors)",
    openapi_extra=_file_form("TorchScript archive (torch.jit.save), state_dict (torch.save) or .safetensors"),
    responses=problem_responses(400, 401, 413, 415, 422, 503),
)
async def upload_model(request: Request, settings: SettingsDep, resources: ResourcesDep, tenant: TenantDep) -> ModelOut:
    return ModelOut.of(await _receive(request, "model", settings, resources, tenant))


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload a dataset file (.pt dict of tensors or .npz)",
    openapi_extra=_file_form("torch.save({'inputs': x, 'targets': y}) .pt, or .npz with 'inputs' and optional 'targets'"),
    responses=problem_responses(400, 401, 413, 415, 422, 503),
)
async def upload_dataset(request: Request, settings: SettingsDep, resources: ResourcesDep, tenant: TenantDep) -> DatasetOut:
    return DatasetOut.of(await _receive(request, "dataset", settings, resources, tenant))


@router.get("/models/{model_id}", response_model=ModelOut, summary="An uploaded model", responses=problem_responses(401, 404))
def get_model(model_id: str, resources: ResourcesDep, tenant: TenantDep) -> ModelOut:
    upload = resources.store.get_upload(valid_id(model_id, "model"), tenant)
    if upload is None or upload.kind != "model":
        raise not_found("model")
    return ModelOut.of(upload)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, summary="An uploaded dataset", responses=problem_responses(401, 404))
def get_dataset(dataset_id: str, resources: ResourcesDep, tenant: TenantDep) -> DatasetOut:
    upload = resources.store.get_upload(valid_id(dataset_id, "dataset"), tenant)
    if upload is None or upload.kind != "dataset":
        raise not_found("dataset")
    return DatasetOut.of(upload)
