"""The catalogue: every pluggable method, declared once with the facts the rest of the house reads.

Torch-free, so the gateway checks a spec with the same facts the worker runs by. Each entry has
one implementation in the core under the same name (``worker/compression``: ``criteria/``,
``quantization/``, ``loading.py``, ``passes/``, ``exporters/``); ``tests/test_catalogue.py``
asserts the spec's literals, this catalogue and the core's registries name the same things.

Rules that depend on what a method *is* (needs data, rebuilds the architecture, runs the
upload's code) read these facts, never a method's name: a new method states its facts here and
every check, confinement decision and progress plan follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, TypeVar, get_args

from compactor.jobs import Stage
from compactor.spec import ArtifactName


class _HasName(Protocol):
    @property
    def name(self) -> str: ...


_Named = TypeVar("_Named", bound=_HasName)


@dataclass(frozen=True)
class CriterionFacts:
    """An importance criterion (``prune.criterion``)."""

    name: str
    # Scores come from gradients over real batches: random inputs cannot score a model.
    needs_data: bool
    summary: str


@dataclass(frozen=True)
class QuantModeFacts:
    """A quantization mode (``quantize.mode``)."""

    name: str
    # Devices its INT8 kernels exist for; the quantized model is evaluated and benchmarked there.
    runs_on: tuple[str, ...]
    summary: str


@dataclass(frozen=True)
class ModelFormatFacts:
    """A model upload's format, as detected from its bytes (``model.format``)."""

    name: str
    # The file holds weights only: the architecture comes from ``spec.model.arch``.
    needs_arch: bool
    # Loading or calling it runs code from the upload: only inside a confined child process.
    runs_uploaded_code: bool
    summary: str


@dataclass(frozen=True)
class StageFacts:
    """A stage of a job as the job document reports it (``Job.stage``)."""

    stage: Stage
    # Relative cost, used only to spread the progress bar (per epoch for fine-tuning).
    progress_weight: float


@dataclass(frozen=True)
class ExporterFacts:
    """A deployable artifact the core writes (``GET /v1/jobs/{id}/artifacts/{name}``)."""

    name: str
    artifact: str
    # Written only while the float architecture is the original's (a state_dict needs the
    # builder the user already has).
    needs_original_architecture: bool
    summary: str
    # The runtime the benchmark runs it in (the report's ``runtimes`` table); None: not runnable alone.
    runtime: str | None = None
    # "fp32", "int8", or "as_quantized" (INT8 where the job quantizes, else float).
    precision: str = "fp32"
    # Written only when the job quantizes (an INT8 form of its own).
    needs_quantization: bool = False
    # Always written, whatever spec.artifacts lists: the reference artifact every job hands back.
    always: bool = False


def _index(*entries: _Named) -> Mapping[str, _Named]:
    table: dict[str, _Named] = {}
    for entry in entries:
        name = entry.name
        if name in table:
            raise ValueError(f"the catalogue declares {name!r} twice")
        table[name] = entry
    return MappingProxyType(table)


CRITERIA: Mapping[str, CriterionFacts] = _index(
    CriterionFacts("magnitude", needs_data=False, summary="|w|, the L1 norm of weights or channels"),
    CriterionFacts("gradient", needs_data=True, summary="|∂L/∂w| summed over scoring batches"),
    CriterionFacts("taylor", needs_data=True, summary="|w·∂L/∂w|, first-order Taylor estimate of the loss change"),
    CriterionFacts("hessian", needs_data=True, summary="½·w²·F, the diagonal Fisher (second-order) estimate"),
    CriterionFacts("random", needs_data=False, summary="seeded random scores, a baseline"),
)

QUANT_MODES: Mapping[str, QuantModeFacts] = _index(
    QuantModeFacts("static", runs_on=("cpu",), summary="INT8 weights and activations, calibrated on data"),
    QuantModeFacts("dynamic", runs_on=("cpu",), summary="INT8 Linear/RNN weights, activations per batch"),
)

MODEL_FORMATS: Mapping[str, ModelFormatFacts] = _index(
    ModelFormatFacts(
        "torchscript",
        needs_arch=False,
        runs_uploaded_code=True,
        summary="a torch.jit.save archive: a program, checked op by op, run only confined and converted to a graph",
    ),
    ModelFormatFacts(
        "state_dict",
        needs_arch=True,
        runs_uploaded_code=False,
        summary="a torch.save state_dict, loaded with weights_only=True into spec.model.arch",
    ),
    ModelFormatFacts(
        "safetensors",
        needs_arch=True,
        runs_uploaded_code=False,
        summary="a .safetensors file of weights, loaded into spec.model.arch",
    ),
    ModelFormatFacts(
        "pt2",
        needs_arch=False,
        # Data, not a program: read with torch.load(weights_only=True) only, every op of its
        # graph allowlisted before anything runs (worker/compression/pt2.py).
        runs_uploaded_code=False,
        summary="a torch.export.save archive: an allowlisted ATen graph, rebuilt into real layers",
    ),
)

STAGES: Mapping[Stage, StageFacts] = MappingProxyType(
    {
        facts.stage: facts
        for facts in (
            StageFacts(Stage.load, 1.0),
            StageFacts(Stage.score, 2.0),
            StageFacts(Stage.prune, 1.0),
            StageFacts(Stage.finetune, 10.0),
            StageFacts(Stage.quantize, 3.0),
            StageFacts(Stage.evaluate, 2.0),
            StageFacts(Stage.benchmark, 5.0),
            StageFacts(Stage.export, 2.0),
        )
    }
)

EXPORTERS: Mapping[str, ExporterFacts] = _index(
    ExporterFacts(
        "torchscript",
        artifact="model.ts",
        needs_original_architecture=False,
        summary="the compressed model (INT8 where quantized), loadable with torch.jit.load alone",
        runtime="torchscript",
        precision="as_quantized",
        always=True,
    ),
    ExporterFacts(
        "state_dict",
        artifact="model.pt",
        needs_original_architecture=True,
        summary="the float weights for the user's own builder, when the architecture did not change",
    ),
    ExporterFacts(
        "pt2",
        artifact="model.pt2",
        needs_original_architecture=False,
        summary="the compressed float model as a torch.export program, loadable with torch.export.load alone",
        runtime="torch.export",
    ),
    ExporterFacts(
        "onnx",
        artifact="model.onnx",
        needs_original_architecture=False,
        summary="the compressed float model as ONNX (dynamic batch), for ONNX Runtime and other ONNX runtimes",
        runtime="onnxruntime",
    ),
    ExporterFacts(
        "onnx_int8",
        artifact="model.int8.onnx",
        needs_original_architecture=False,
        summary="the compressed model quantized by ONNX Runtime's own quantizer, on the job's calibration batches",
        runtime="onnxruntime",
        precision="int8",
        needs_quantization=True,
    ),
)

# What a job hands back: the exporters' artifacts and the report.
REPORT_ARTIFACT = "report.json"
ARTIFACT_NAMES: frozenset[str] = frozenset({facts.artifact for facts in EXPORTERS.values()} | {REPORT_ARTIFACT})

if set(get_args(ArtifactName)) != {facts.artifact for facts in EXPORTERS.values()}:  # pragma: no cover
    raise RuntimeError("compactor.spec.ArtifactName and the exporters' artifacts differ")

if set(STAGES) != set(Stage):  # pragma: no cover - a Stage member without facts is a bug here
    raise RuntimeError(f"stages without facts: {sorted(set(Stage) - set(STAGES))}")


def stage_weight(stage: Stage) -> float:
    return STAGES[stage].progress_weight


def runs_uploaded_code(model_format: str | None) -> bool:
    """True when loading an upload of this format runs its code (None: an in-memory module)."""
    facts = MODEL_FORMATS.get(model_format) if model_format is not None else None
    return facts is not None and facts.runs_uploaded_code


__all__ = [
    "ARTIFACT_NAMES",
    "CRITERIA",
    "EXPORTERS",
    "MODEL_FORMATS",
    "QUANT_MODES",
    "REPORT_ARTIFACT",
    "STAGES",
    "CriterionFacts",
    "ExporterFacts",
    "ModelFormatFacts",
    "QuantModeFacts",
    "StageFacts",
    "runs_uploaded_code",
    "stage_weight",
]
