"""Reading a JobConfig: defaults, then a TOML file, then dotted `--section.key=value` overrides
(CLI > TOML > defaults), each key resolved against the sections and parsed to its field's type,
with errors that name the key and, for a typo, the closest known one."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

from fp8lab.config.sections import JobConfig
from fp8lab.errors import FP8LabError

SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _unknown(kind: str, name: str, known: list[str]) -> FP8LabError:
    # Compare the last part only: the shared "section." prefix makes every key look close.
    last = lambda s: s.rsplit(".", 1)[-1]  # noqa: E731
    by_last = {last(k): k for k in known}
    close = difflib.get_close_matches(last(name), list(by_last), n=1)
    hint = f" (did you mean {by_last[close[0]]!r}?)" if close else ""
    return FP8LabError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}")


def _resolve(key: str) -> dataclasses.Field:
    if "." not in key:
        raise FP8LabError(f"config key {key!r} must be section.key, e.g. train.steps")
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise _unknown("config section", section, list(SECTIONS))
    fields = _section_fields(section)
    if name not in fields:
        raise _unknown("config key", key, [f"{section}.{n}" for n in fields])
    return fields[name]


def _field_type(key: str) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a `section.key`."""
    section, name = key.split(".", 1)
    tp = typing.get_type_hints(SECTIONS[section])[name]  # resolves `from __future__` strings
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union:
        return args[0], True
    return (typing.get_origin(tp) or tp), False


INT_LIMIT = 2**63  # what torch and numpy take as a count or a seed (int64)


def _typed(key: str, value: Any, *, from_text: bool) -> Any:
    """Check (TOML) or parse (CLI text) a value against the field's type."""
    value = _parsed(key, value, from_text=from_text)
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT < value < INT_LIMIT:
        raise FP8LabError(f"{key}={value} is out of range: at most {INT_LIMIT - 1:,}")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise FP8LabError(f"{key} must be a list of non-empty names (strings), got {value!r}")
    return value


def _parsed(key: str, value: Any, *, from_text: bool) -> Any:
    _resolve(key)
    tp, optional = _field_type(key)
    if from_text:
        text = value.strip()
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            if tp is bool:
                low = text.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if tp is list:
                return [s.strip() for s in text.split(",") if s.strip()]
            return tp(text)
        except ValueError:
            raise FP8LabError(f"{key}={value!r} is not a valid {tp.__name__}") from None
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (tp is list and isinstance(value, list))
    )
    if not ok:
        raise FP8LabError(f"{key}={value!r} has type {type(value).__name__}; expected {tp.__name__}")
    try:
        return float(value) if tp is float else value
    except OverflowError:
        raise FP8LabError(f"{key}={value} is too large for a float") from None


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--train.steps=40', '--precision.recipe', 'bf16'] -> {'train.steps': '40', ...}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise FP8LabError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise FP8LabError(f"{arg} needs a value: {arg}=VALUE")
            key, value = arg[2:], args[i + 1]
            i += 1
        _resolve(key)
        out[key] = value
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> JobConfig:
    """Defaults, then the TOML file, then the `section.key -> text` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise FP8LabError(f"config file {path} {what}; pass -c with a TOML file such as configs/demo.toml")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise FP8LabError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise FP8LabError(f"config file {path} is not valid TOML: {e}") from None
    return config_from_dict(raw, origin=str(path) if path else "defaults", overrides=overrides)


def config_from_dict(raw: dict[str, Any], *, origin: str, overrides: dict[str, str] | None = None) -> JobConfig:
    """Build a JobConfig from TOML-shaped data (checked key by key) plus text overrides."""
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, table in raw.items():
        if section not in SECTIONS:
            raise _unknown(f"config section (in {origin})", section, list(SECTIONS))
        if not isinstance(table, dict):
            raise FP8LabError(f"{origin}: [{section}] must be a table of keys")
        for name, value in table.items():
            key = f"{section}.{name}"
            try:
                values[section][name] = _typed(key, value, from_text=False)
            except FP8LabError as e:
                raise FP8LabError(f"{origin}: {e}") from None
    for key, text in (overrides or {}).items():
        section, name = key.split(".", 1)
        values[section][name] = _typed(key, text, from_text=True)
    return JobConfig(**{s: SECTIONS[s](**kw) for s, kw in values.items()})


def describe_fields() -> str:
    """Every key with its default, choices and documentation, for --help-config."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            extra = f" ({' | '.join(map(str, choices))})" if choices else ""
            lines.append(f"  {section}.{f.name} = {default!r}{extra}\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)
