import pytest
from pydantic import ValidationError

from compactor.spec import JobSpec, error_location, parse_spec


def test_empty_spec_skips_every_stage() -> None:
    spec = parse_spec(None)
    assert spec.prune is None and spec.finetune is None and spec.quantize is None
    assert spec.model.input_shape == [1, 3, 32, 32]


def test_contract_example_parses_with_defaults_filled() -> None:
    spec = parse_spec(
        {
            "model": {"format": "auto", "arch": "resnet18", "arch_kwargs": {"num_classes": 10}, "input_shape": [1, 3, 32, 32]},
            "data": {"val_fraction": 0.2, "batch_size": 64, "seed": 0},
            "prune": {"criterion": "magnitude", "granularity": "channel", "scope": "global", "amount": 0.5, "steps": 1, "exclude": []},
            "finetune": {"epochs": 2, "lr": 0.01, "optimizer": "sgd", "distill": {"alpha": 0.5, "temperature": 4.0}},
            "quantize": {"mode": "static", "backend": "x86", "calibration_batches": 8, "per_channel": True},
            "target": {"max_accuracy_drop": 0.01},
            "device": "auto",
        }
    )
    assert spec.prune is not None and spec.prune.amount == 0.5
    assert spec.target is not None and spec.target.max_accuracy_drop == 0.01


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"prune": {"amount": 1.5}}, ("prune", "amount")),
        ({"prune": {"criterion": "vibes"}}, ("prune", "criterion")),
        ({"quantize": {"mode": "int4"}}, ("quantize", "mode")),
        ({"quantize": {"mode": "dynamic", "calibration_batches": 8}}, ("quantize", "calibration_batches")),
        ({"quantize": {"calibration_batches": 0}}, ("quantize", "calibration_batches")),
        ({"prnue": {}}, ("prnue",)),
        ({"finetune": {"epochs": 1, "lr": 0.1, "extra": 1}}, ("finetune", "extra")),
        ({"model": {"arch_kwargs": {"weights": "IMAGENET1K_V1"}}}, ("model", "arch_kwargs")),
    ],
)
def test_bad_specs_name_the_field(bad: dict, where: tuple) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(bad)
    # As the gateway reports it (compactor.spec.error_location: union tags are not client fields).
    locs = [tuple(str(part) for part in error_location(error)) for error in info.value.errors()]
    assert any(loc[: len(where)] == where for loc in locs), locs


def test_target_without_prune_is_refused() -> None:
    with pytest.raises(ValidationError, match="prune"):
        JobSpec.model_validate({"target": {"max_accuracy_drop": 0.01}})
