"""Torch-free checks at submission: refuse a spec the uploaded model or data cannot do.

Everything here runs in the gateway before a job is created, so a client hears at once
(``422``) why a combination cannot work and what would, instead of a job that fails later.
``compress()`` calls the same function for notebook users: one set of rules, not two.
"""

from __future__ import annotations

from dataclasses import dataclass

from compactor.catalogue import CRITERIA, EXPORTERS, MODEL_FORMATS
from compactor.errors import InvalidSpec, UnsupportedCombination
from compactor.spec import JobSpec


@dataclass(frozen=True)
class DatasetFacts:
    """What the gateway knows about the job's dataset without loading it."""

    format: str
    num_samples: int
    has_targets: bool


def check_compatibility(model_format: str | None, spec: JobSpec, dataset: DatasetFacts | None, *, architecture_built: bool = False) -> None:
    """Raise ``InvalidSpec`` / ``UnsupportedCombination`` (with ``field``) for what cannot run.

    ``model_format`` is the format detected from the upload's content
    (``torchscript`` | ``state_dict`` | ``safetensors``), or None for an ``nn.Module`` handed to
    ``compress()`` in memory (its architecture is the object itself). ``architecture_built``: the
    weights were already loaded into their architecture, so ``model.arch`` is no longer needed.
    """
    from compactor.formats import check_declared_format

    if model_format is not None:
        check_declared_format(spec.model.format, model_format)

    facts = MODEL_FORMATS.get(model_format) if model_format is not None else None
    if facts is not None and facts.needs_arch and not spec.model.arch and not architecture_built:
        raise InvalidSpec(
            f"a {model_format} upload holds only weights: name the architecture in spec.model.arch "
            "(a torchvision classification builder such as 'resnet18') with spec.model.arch_kwargs "
            "such as {'num_classes': 10}, or upload a TorchScript archive (torch.jit.save) instead",
            field="model.arch",
        )

    # Every format can lose channels: TorchScript is converted into a graph in the worker, and a
    # program the converter cannot express fails there (its reason is only known after loading).
    prune = spec.prune

    if spec.target is not None and (dataset is None or not dataset.has_targets):
        why = "no dataset was given" if dataset is None else "the dataset has no 'targets'"
        raise UnsupportedCombination(
            f"target.max_accuracy_drop needs validation accuracy, but {why}: upload a dataset with "
            "'inputs' and 'targets', or drop 'target' and set prune.amount directly",
            field="target",
        )

    if dataset is None:
        if prune is not None and CRITERIA[prune.criterion].needs_data:
            raise UnsupportedCombination(
                f"prune.criterion {prune.criterion!r} scores weights by gradients over data, and random "
                "inputs cannot score a model: upload a dataset, or use criterion 'magnitude' (or 'random')",
                field="prune.criterion",
            )
        if spec.finetune is not None:
            raise UnsupportedCombination(
                "fine-tuning needs data (random inputs cannot teach a model): upload a dataset (without "
                "targets it distils from the original model), or drop the 'finetune' section",
                field="finetune",
            )
    # Fine-tuning on a dataset without targets is allowed: the worker distils from the original model.
    _check_artifacts(spec)


def _check_artifacts(spec: JobSpec) -> None:
    """An artifact asked for by name must be one this job can have."""
    by_artifact = {facts.artifact: facts for facts in EXPORTERS.values()}
    for index, artifact in enumerate(spec.artifacts or ()):
        facts = by_artifact[artifact]
        if facts.needs_quantization and spec.quantize is None:
            raise UnsupportedCombination(
                f"{artifact} is the INT8 form of the compressed model, and this spec does not quantize: "
                "add a 'quantize' section, or leave it out of 'artifacts'",
                field=f"artifacts.{index}",
            )
        if facts.needs_original_architecture and spec.prune is not None and spec.prune.granularity == "channel":
            raise UnsupportedCombination(
                f"{artifact} holds weights for the original architecture, and channel pruning changes it: ask for "
                "model.pt2 or model.onnx (they carry the new architecture), or leave it out of 'artifacts'",
                field=f"artifacts.{index}",
            )


def channel_pruning_refused(model_format: str | None) -> str:
    """Why a model still held as a compiled program cannot lose channels, and what can."""
    what = f"a {model_format} model" if model_format else "a compiled (TorchScript) model"
    return (
        f"channel pruning rebuilds the architecture, which {what} not converted into a graph cannot do: use "
        "prune.granularity 'unstructured', or pass the module itself, a torch.export program (.pt2) or a state_dict "
        "with spec.model.arch to prune whole channels"
    )
