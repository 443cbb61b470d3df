import pytest

from verakit import ConfigError, VeraConfig


def test_defaults_and_roundtrip():
    cfg = VeraConfig(r=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    assert cfg.target_modules == ("query", "value") and cfg.modules_to_save == ("classifier",)
    assert VeraConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(VeraConfig.from_dict(cfg.to_dict()))


def test_frozen():
    cfg = VeraConfig()
    with pytest.raises(AttributeError):
        cfg.r = 3  # type: ignore[misc]
    assert cfg.replace(r=3).r == 3 and cfg.r == 256


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"d_initial": float("nan")}, "d_initial"),
        ({"d_initial": float("inf")}, "d_initial"),
        ({"seed": -1}, "seed"),
        ({"dropout": 1.0}, "dropout"),
        ({"distribution": "gaussian"}, "distribution"),
        ({"projection_sharing": "per-layer"}, "projection_sharing"),
        ({"train_d": False, "train_b": False}, "nothing would be trained"),
        ({"target_modules": "("}, "regex"),
        ({"target_modules": ()}, "target_modules"),
        ({"modules_to_save": ("",)}, "modules_to_save"),
        ({"magnitude": 1}, "magnitude"),
    ],
)
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        VeraConfig(**kwargs)


def test_unknown_field_in_dict():
    with pytest.raises(ConfigError, match="unknown VeraConfig field"):
        VeraConfig.from_dict({"r": 4, "alpha": 2})


def test_magnitude_defaults_off_and_is_recorded_only_when_on():
    """Plain VeRA configs serialize as before (file bytes unchanged); a DVoRA config records and restores it."""
    assert VeraConfig().magnitude is False and "magnitude" not in VeraConfig().to_dict()
    cfg = VeraConfig(r=4, target_modules=("q",), magnitude=True)
    assert cfg.to_dict()["magnitude"] is True
    assert VeraConfig.from_dict(cfg.to_dict()) == cfg
    assert VeraConfig(target_modules="all-linear", magnitude=True).magnitude
