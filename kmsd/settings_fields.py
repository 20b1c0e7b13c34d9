"""How a setting is declared, and its value read: the converters from a TOML
value, a ``KMSD_*`` string or a flag's value to a typed one, each naming the
setting in its ConfigError. ``kmsd.config`` declares the settings with them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "Option",
    "as_bool",
    "as_choice",
    "as_float",
    "as_int",
    "as_int_list",
    "as_mode",
    "as_str",
    "as_str_list",
    "parse_duration",
]


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be a boolean")


def as_choice(value: Any, name: str, choices: tuple[str, ...], *, empty: str | None = None) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be one of {', '.join(choices)}")
    text = value.strip().lower() or (empty or "")
    if text not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}")
    return text


def as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer") from None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any, name: str) -> float | None:
    """Seconds from a number or "90d", "12h", "30m", "45s"; "off", "" and 0: None."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "off", "none", "0"):
            return None
        unit = _DURATION_UNITS.get(text[-1])
        try:
            seconds = float(text[:-1]) * unit if unit else float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a duration like 90d, 12h, 30m or seconds") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(f"{name} must be a duration like 90d, 12h, 30m or seconds")
    if seconds < 0:
        raise ConfigError(f"{name} must not be negative")
    return seconds or None


def as_int_list(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list of integers")
    return tuple(as_int(v, name) for v in value)


def as_str_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{name} must be a list of strings")


def as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string")
    return value


def as_float(value: Any, name: str) -> float:
    return float(value)


def as_mode(value: Any, name: str) -> int:
    return int(value, 8) if isinstance(value, str) else as_int(value, name)


T = TypeVar("T")


@dataclass(frozen=True)
class Option(Generic[T]):
    """One setting, as the TOML file, the environment and the flags name it.

    ``key`` is its TOML key; its environment variable is ``KMSD_<KEY>``.
    ``convert`` turns a TOML value, an environment string or a flag's value
    into the typed one; ``valid`` then bounds it, "<key> <rule>" being the
    error when it does not hold."""

    key: str
    convert: Callable[[Any, str], T]
    valid: Callable[[T], bool] | None = None
    rule: str = ""
    # The Settings field it sets: "" for the one named like the key; None for
    # a file that load_settings reads itself (a secret, the root key), so
    # that only what the file holds reaches the settings, never its path.
    attr: str | None = ""
    # The argparse dest of the flag that overrides it (settings_from_args).
    flag: str | None = None

    @property
    def env(self) -> str:
        return "KMSD_" + self.key.upper()

    @property
    def target(self) -> str | None:
        return self.key if self.attr == "" else self.attr

    def parse(self, value: Any) -> T:
        try:
            return self.convert(value, self.key)
        except ConfigError:
            raise
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value for {self.key}") from None

    def check(self, settings: object) -> None:
        if self.valid is not None and self.target and not self.valid(getattr(settings, self.target)):
            raise ConfigError(f"{self.key} {self.rule}")
