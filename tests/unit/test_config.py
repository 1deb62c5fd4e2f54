import pytest

from lora_core import AdapterConfig, TrainConfig


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (AdapterConfig, {"rank": 0}, r"rank=0 is out of range; allowed: \[1, 1024\]"),
        (AdapterConfig, {"rank": 2.5}, r"rank=2.5 must be an integer"),
        (AdapterConfig, {"alpha": -1.0}, r"alpha=-1.0 is out of range; allowed: \(0, "),
        (AdapterConfig, {"dropout": 1.0}, r"dropout=1.0 is out of range; allowed: \[0, 1\)"),
        (AdapterConfig, {"algorithm": "loha"}, r"algorithm='loha' is not allowed; choose one of: lora, locon"),
        (AdapterConfig, {"unet_targets": "attention"}, r"unet_targets='attention' is not a preset"),
        (TrainConfig, {"learning_rate": 0.0}, r"learning_rate=0.0 is out of range"),
        (TrainConfig, {"optimizer": "adam"}, r"optimizer='adam' is not allowed; choose one of: adamw"),
        (TrainConfig, {"batch_size": 0}, r"batch_size=0 is out of range; allowed: \[1, 4096\]"),
        (TrainConfig, {"precision": "fp8"}, r"precision='fp8' is not allowed"),
        (TrainConfig, {"min_timestep": 500, "max_timestep": 400}, r"min_timestep=500 must be below max_timestep=400"),
        (TrainConfig, {"noise_offset": float("nan")}, r"noise_offset=nan must be a finite number"),
    ],
)
def test_bad_values_name_the_value_and_the_allowed_range(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="unknown TrainConfig keys: lerning_rate"):
        TrainConfig.from_dict({"lerning_rate": 1e-4})


def test_round_trip_through_dict():
    cfg = AdapterConfig(rank=8, alpha=4, unet_targets=("to_q", "to_v"), algorithm="locon")
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    tc = TrainConfig(betas=[0.8, 0.99])
    assert tc.betas == (0.8, 0.99)
    assert TrainConfig.from_dict(tc.to_dict()) == tc
