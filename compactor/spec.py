"""The job spec: what a client asks Compactor to do with a model.

Shared by the gateway (validation at submission) and the compression core
(what to run). Imports no torch. Every section is optional; a missing stage is
skipped. Unknown fields are rejected (``extra="forbid"``) so a typo never
silently turns a stage off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

ModelFormat = Literal["auto", "torchscript", "state_dict", "safetensors", "pt2"]
Criterion = Literal["magnitude", "gradient", "taylor", "hessian", "random"]
Granularity = Literal["unstructured", "channel"]
Scope = Literal["global", "layer"]
OptimizerName = Literal["sgd", "adam", "adamw"]
QuantMode = Literal["static", "dynamic"]
QuantBackend = Literal["x86", "qnnpack"]
DeviceName = Literal["auto", "cpu", "cuda"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Builder arguments that fetch or read weights (torchvision's weights, timm's pretrained,
# pretrained_cfg, checkpoint_path, cache_dir ...): a builder only ever builds here.
# Whole names, not substrings: torchvision's init_weights / transform_input only build.
_FETCHING_KWARG = re.compile(r"weights|pretrained\w*|checkpoint\w*|cache_dir|\w*_path|\w*_file|file\w*|\w*url|hub\w*", re.IGNORECASE)


def fetching_arch_kwargs(arch_kwargs: Mapping[str, Any]) -> list[str]:
    """The builder arguments that would fetch or read weights rather than build."""
    return sorted(key for key in arch_kwargs if _FETCHING_KWARG.fullmatch(key))


class ModelSpec(_Section):
    format: ModelFormat = "auto"
    arch: str | None = Field(
        default=None,
        description=(
            "the architecture of a weights-only upload (state_dict, safetensors): a torchvision classification "
            "builder (e.g. resnet18) or a timm model as timm/<name> (e.g. timm/resnet18d)."
        ),
        max_length=64,
        pattern=r"^(timm/)?[a-z][a-z0-9_]*$",
    )
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 3, 32, 32],
        min_length=2,
        max_length=5,
        description="Shape of one input batch, batch dimension first. Used for MACs, latency and export.",
    )

    @field_validator("arch_kwargs")
    @classmethod
    def _plain_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed = (int, float, bool, str, type(None))
        for key, item in value.items():
            if not isinstance(item, allowed):
                raise ValueError(f"arch_kwargs[{key!r}] must be a number, string, boolean or null")
        fetching = fetching_arch_kwargs(value)
        if fetching:
            raise ValueError(f"weights are uploaded, never downloaded or read from a path: drop {', '.join(map(repr, fetching))} from arch_kwargs")
        return value


class DataSpec(_Section):
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    batch_size: int = Field(default=64, ge=1, le=4096)
    seed: int = 0


class PruneSpec(_Section):
    criterion: Criterion = "magnitude"
    granularity: Granularity = "channel"
    scope: Scope = "global"
    amount: float = Field(default=0.5, ge=0.0, lt=1.0, description="Fraction of weights (unstructured) or channels (channel) to remove.")
    steps: int = Field(default=1, ge=1, le=20)
    exclude: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=list,
        max_length=100,
        description="fnmatch patterns of module names never pruned, e.g. 'layer1.*'.",
    )
    score_batches: int = Field(default=8, ge=1, le=1000, description="Data batches used by gradient-based criteria.")


class DistillSpec(_Section):
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="Weight of the distillation loss; 1-alpha weights the label loss.")
    temperature: float = Field(default=4.0, gt=0.0, le=100.0)


class FinetuneSpec(_Section):
    epochs: int = Field(default=2, ge=0, le=1000)
    lr: float = Field(default=0.01, gt=0.0, le=10.0)
    optimizer: OptimizerName = "sgd"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)
    distill: DistillSpec | None = Field(default_factory=DistillSpec)


class StaticQuantizeSpec(_Section):
    """INT8 weights and activations; activation ranges calibrated on data batches."""

    mode: Literal["static"] = "static"
    backend: QuantBackend = "x86"
    calibration_batches: int = Field(default=8, ge=1, le=10000)
    per_channel: bool = True


class DynamicQuantizeSpec(_Section):
    """INT8 Linear/RNN weights; activations quantized per batch at run time (no calibration)."""

    mode: Literal["dynamic"]
    backend: QuantBackend = "x86"
    per_channel: bool = True


def _default_quant_mode(value: Any) -> Any:
    # {"quantize": {}} has always meant static INT8; the union needs its tag to pick a member.
    if isinstance(value, dict) and "mode" not in value:
        return {**value, "mode": "static"}
    return value


# One section type per mode (the worker's passes are keyed by it); the wire form is unchanged:
# {"mode": "static", ...} or {"mode": "dynamic", ...}, mode defaulting to static.
QuantizeSpec = Annotated[
    StaticQuantizeSpec | DynamicQuantizeSpec,
    Field(discriminator="mode"),
    BeforeValidator(_default_quant_mode),
]


# The exporters' artifacts (compactor/catalogue.py EXPORTERS); report.json always comes too.
ArtifactName = Literal["model.ts", "model.pt", "model.pt2", "model.onnx", "model.int8.onnx"]


class TargetSpec(_Section):
    max_accuracy_drop: float = Field(ge=0.0, le=1.0, description="Largest allowed drop of validation top-1, as a fraction (0.01 = 1 point).")
    max_trials: int = Field(default=6, ge=2, le=20)


class NotifySpec(_Section):
    url: str = Field(
        max_length=2048,
        description="http(s) URL POSTed (signed, see Compactor-Signature) when the job ends; its host must be on the server's webhook allowlist.",
        examples=["https://hooks.example.com/compactor"],
    )

    @field_validator("url")
    @classmethod
    def _plain_http_url(cls, value: str) -> str:
        # Syntax only; the gateway checks the host against the operator's allowlist. What is
        # refused here is what lets two URL parsers disagree about the host (userinfo, '#',
        # backslashes, whitespace), so the host a reader sees is the host that is contacted.
        if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value) or "\\" in value:
            raise ValueError("the URL must not contain whitespace, control characters or backslashes")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("only http and https URLs are allowed")
        if "@" in parts.netloc:
            raise ValueError("the URL must not carry credentials (user:password@host)")
        if "#" in value:
            raise ValueError("the URL must not have a fragment ('#')")
        if not parts.hostname:
            raise ValueError("the URL has no host")
        try:
            port = parts.port  # raises ValueError for a port out of range or not a number
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("the URL's port must be a number from 1 to 65535")
        return value


class JobSpec(_Section):
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    prune: PruneSpec | None = None
    finetune: FinetuneSpec | None = None
    quantize: QuantizeSpec | None = None
    target: TargetSpec | None = None
    device: DeviceName = "auto"
    notify: NotifySpec | None = None
    artifacts: list[ArtifactName] | None = Field(
        default=None,
        max_length=8,
        description=(
            "Which artifacts to write; omitted: every one that applies. model.ts and report.json are always "
            "written (model.ts is the reference every figure is checked against)."
        ),
        examples=[["model.ts", "model.onnx", "model.int8.onnx"]],
    )

    @model_validator(mode="after")
    def _target_needs_prune(self) -> JobSpec:
        if self.target is not None and self.prune is None:
            raise ValueError("target.max_accuracy_drop searches a prune amount: add a 'prune' section (its amount is the upper bound)")
        return self


# Sections that are a union tagged by a field: pydantic names the member in an error's location
# (quantize.dynamic.per_channel), which is not a field the client wrote.
_TAGGED_SECTIONS: dict[str, frozenset[str]] = {"quantize": frozenset(get_args(QuantMode))}


def error_location(error: Mapping[str, Any]) -> list[int | str]:
    """A pydantic error's location as the client wrote the spec: a union's tag is not a field the
    client wrote (quantize.dynamic.per_channel → quantize.per_channel), and an unknown tag is
    the tag field's fault (quantize → quantize.mode)."""
    parts = list(error.get("loc", ()))
    if len(parts) > 1 and parts[1] in _TAGGED_SECTIONS.get(str(parts[0]), frozenset()):
        del parts[1]
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = str((error.get("ctx") or {}).get("discriminator", "")).strip("'\"")
        if discriminator:
            parts.append(discriminator)
    return parts


def parse_spec(data: dict[str, Any] | str | bytes | None) -> JobSpec:
    """Validate a spec given as a dict or JSON text; raises pydantic.ValidationError."""
    if data is None or data == "" or data == b"":
        return JobSpec()
    if isinstance(data, (str, bytes)):
        return JobSpec.model_validate_json(data)
    return JobSpec.model_validate(data)
