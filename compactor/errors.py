"""Compactor's exception tree, shared by the core, the worker and the gateway.

    CompactorError                 code            typical HTTP status
    ├── InvalidModel               invalid_model            422
    │   ├── UnsafeModel            unsafe_model             422
    │   ├── UnsupportedModelFormat unsupported_model_format 415
    │   └── ModelTooLarge          model_too_large          413
    ├── InvalidDataset             invalid_dataset          422
    ├── InvalidSpec                invalid_spec             422
    │   └── UnsupportedCombination unsupported_combination  422
    ├── ConfinementUnavailable     confinement_unavailable  503
    ├── Cancelled                  cancelled                 -
    ├── JobTimeout                 timeout                   -
    └── CompressionFailed          compression_failed        -

``code`` is stable and machine-readable; ``message`` says what went wrong and
what to do instead. ``field`` (optional) names the spec field at fault.
"""

from __future__ import annotations


class CompactorError(Exception):
    code: str = "compactor_error"
    status: int = 422

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class InvalidModel(CompactorError):
    code = "invalid_model"


class UnsafeModel(InvalidModel):
    code = "unsafe_model"


class UnsupportedModelFormat(InvalidModel):
    code = "unsupported_model_format"
    status = 415


class ModelTooLarge(InvalidModel):
    code = "model_too_large"
    status = 413


class InvalidDataset(CompactorError):
    code = "invalid_dataset"


class InvalidSpec(CompactorError):
    code = "invalid_spec"


class UnsupportedCombination(InvalidSpec):
    code = "unsupported_combination"


class ConfinementUnavailable(CompactorError):
    """This worker cannot confine uploaded code (worker/confinement.py), so it will not run it."""

    code = "confinement_unavailable"
    status = 503


class Cancelled(CompactorError):
    code = "cancelled"
    status = 409


class JobTimeout(CompactorError):
    code = "timeout"
    status = 504


class CompressionFailed(CompactorError):
    code = "compression_failed"
    status = 500


SAFE_MODEL_FORMATS_HINT = (
    "upload a TorchScript archive (torch.jit.save), a state_dict saved with torch.save(model.state_dict(), f) "
    "plus spec.model.arch, a .safetensors file plus spec.model.arch, or a torch.export.save archive (.pt2)"
)
