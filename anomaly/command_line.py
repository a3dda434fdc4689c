"""The `key=value` arguments of the inference commands (`anomaly.predict`, `anomaly.export`)."""

from __future__ import annotations

from anomaly.errors import ConfigError


def key_values(
    arguments: list[str], known: tuple[str, ...], required: tuple[str, ...], usage: str
) -> dict[str, str]:
    """The arguments as {key: value}; a ConfigError names an unknown or missing key."""
    values: dict[str, str] = {}
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if not equals or key not in known:
            raise ConfigError(f"unknown argument {argument!r} (keys: {', '.join(known)}); {usage}")
        values[key] = value
    missing = [key for key in required if key not in values]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; {usage}")
    return values


def one_of(values: dict[str, str], key: str, choices: tuple[str, ...], default: str) -> str:
    """values[key] (or the default), which must be one of `choices`."""
    value = values.get(key, default)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is out of range: one of {', '.join(choices)}")
    return value
