"""Load a RunConfig from YAML plus `a.b.c=value` overrides, with errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, get_args

import yaml
from pydantic import BaseModel, ValidationError

from common.config import RunConfig


class ConfigError(ValueError):
    """A config file or override that cannot become a valid RunConfig. The message is for people."""


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(data, item)
    return validate_config(data, source=str(path) if path else "<defaults>")


def validate_config(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config ({source}):\n" + _describe(err)) from None


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (policy:, env:, ...), got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value, e.g. rollout.temperature=1.0")
    parts = key.strip().split(".")
    model: type[BaseModel] | None = RunConfig
    node = data
    for depth, name in enumerate(parts):
        if model is not None and name not in model.model_fields:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(
                f"override {item!r}: unknown field {'.'.join(parts[: depth + 1])!r}; "
                f"{where} has: {', '.join(model.model_fields)}"
            )
        if depth == len(parts) - 1:
            try:
                node[name] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                node[name] = raw
            return
        model = _section(model.model_fields[name].annotation) if model is not None else None
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(e["loc"][:-1])
            msg = f"unknown field; allowed here: {', '.join(allowed)}"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for name in loc:
        field = model.model_fields.get(str(name))
        model = _section(field.annotation) if field else None
        if model is None:
            return []
    return list(model.model_fields)


def _section(annotation) -> type[BaseModel] | None:
    """The config section a field holds: `Section` itself or an optional one (`Section | None`)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
