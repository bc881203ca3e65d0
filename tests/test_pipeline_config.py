"""CompressConfig: defaults, validation, versioned round trip."""

from __future__ import annotations

import pytest

from qmoe.config import CONFIG_VERSION, CompressConfig
from qmoe.errors import ConfigError


def test_defaults_and_grid_per_width() -> None:
    c = CompressConfig()
    assert (c.bits, c.method, c.grid, c.token_cap) == ("ternary", "gptq", "ternary", 4.0)
    assert CompressConfig(bits="2").grid == "int2"
    assert CompressConfig(grid="ternary-opt").grid == "ternary-opt"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(bits="3"), "bits must be one of"),
        (dict(method="awq"), "method must be one of"),
        (dict(bits="2", grid="ternary"), "does not fit bits=2"),
        (dict(calib_samples=0), "calib_samples must be an integer >= 1"),
        (dict(token_cap=0.5), "token_cap must be 0"),
        (dict(damp=-1.0), "damp must lie in"),
        (dict(eval_data=()), "eval_data is empty"),
        (dict(seed=True), "seed must be an integer"),
    ],
)
def test_invalid_values(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CompressConfig(**kw)


def test_round_trip_and_version() -> None:
    c = CompressConfig(bits="2", method="rtn", eval_data=("validation", "pydoc"), calib_samples=64)
    d = c.to_dict()
    assert d["config_version"] == CONFIG_VERSION and d["eval_data"] == ["validation", "pydoc"]
    assert CompressConfig.from_dict(d) == c
    assert c.replace(seed=3).seed == 3 and c.replace(seed=3).bits == "2"
    with pytest.raises(ConfigError, match="version 99 is not supported"):
        CompressConfig.from_dict({**d, "config_version": 99})
    with pytest.raises(ConfigError, match="unknown compress config fields"):
        CompressConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(dataclasses_error()):
        c.bits = "2"  # type: ignore[misc]


def dataclasses_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError
