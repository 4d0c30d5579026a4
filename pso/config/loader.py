"""Load typed configs: YAML file < environment variables < command-line overrides, with sourced errors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for config models: unknown keys are errors and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem, one per line."""


class _Loader(yaml.SafeLoader):
    """Safe loader that also reads exponent-form numbers without a dot ("1e-5") as floats."""


class _Dumper(yaml.SafeDumper):
    """Safe dumper that quotes strings `_Loader` would read as floats."""


_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+.0123456789"))

_NULLS = ("null", "Null", "NULL", "~")
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
}

_KeyPath = tuple[Any, ...]


def load_config(
    schema: type[M],
    path: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    env_prefix: str = "PSO__",
) -> M:
    """Build `schema` from a YAML file (None: all defaults), then `env_prefix` variables, then "a.b=value"."""
    data = read_config_file(Path(path), schema=schema) if path is not None else {}
    sources: dict[_KeyPath, str] = {(key,): f"file {path}" for key in data}
    env = os.environ if env is None else env
    for name in sorted(env):
        if name.upper().startswith(env_prefix.upper()):
            keys = name[len(env_prefix) :].lower().split("__")
            _set(data, keys, _parse_value(env[name]), f"environment variable {name}", sources)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"malformed command line override {item!r}: expected key.path=value")
        _set(data, key.strip().split("."), _parse_value(value), f"command line override {item}", sources)
    _fill_tags(schema, data)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        file_source = f"file {path}" if path is not None else None
        lines = [_describe(err, data, sources, file_source) for err in e.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)) from None


def _fill_tags(schema: type[BaseModel], data: dict[str, Any]) -> None:
    """A section whose kind is chosen by a tag (`loss.name`, `finetune.mode`), given in part without it
    (`--set loss.beta=10`, `PSO__FINETUNE__RANK=4`), is of the default's kind: write in the default's tag
    (pydantic cannot pick a union member without it). Recurses into plain sub-models."""
    for name, field in schema.model_fields.items():
        value = data.get(name)
        if not isinstance(value, dict):
            continue
        tag = field.discriminator
        if isinstance(tag, str):
            default = field.get_default(call_default_factory=True)
            if tag not in value and isinstance(default, BaseModel):
                value[tag] = getattr(default, tag)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            _fill_tags(field.annotation, value)


def dump_config(model: BaseModel) -> str:
    """Serialize `model` to YAML that `load_config` reads back to an equal model."""
    return yaml.dump(model.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def read_config_file(path: Path, _seen: tuple[Path, ...] = (), schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """A config file's mapping; `extends: other.yaml` (relative to the file) is read first and this
    file's keys are merged over it, mappings key by key, everything else replaced. With the `schema`, a
    section of another kind than the base's (`loss.name`, `finetune.mode`) replaces it whole: the base's
    settings of its kind mean nothing to the new one."""
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    chain = (*_seen, path.resolve())
    if base_path in chain:
        raise ConfigError(f"{path}: extends {base}, a cycle: {' -> '.join(str(p) for p in (*chain, base_path))}")
    return _merge(read_config_file(base_path, chain, schema), data, schema)


def _merge(base: dict[str, Any], over: dict[str, Any], schema: type[BaseModel] | None = None) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if not (isinstance(value, dict) and isinstance(old, dict)):
            out[key] = value
            continue
        field = schema.model_fields.get(key) if schema is not None else None
        tag = field.discriminator if field is not None else None
        if isinstance(tag, str) and tag in value and value[tag] != old.get(tag, value[tag]):
            out[key] = value  # another kind of section (`loss.name`): nothing of the base's carries over
            continue
        sub = field.annotation if field is not None else None
        out[key] = _merge(old, value, sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML in {where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar or flow collection; anything else stays a string."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("[", "{")):
        return text  # block collections such as "a: b" are meant literally
    if value is None and text.strip() not in _NULLS:
        return text  # empty or comment-only values
    return value


def _set(data: dict[str, Any], keys: list[str], value: Any, source: str, sources: dict[_KeyPath, str]) -> None:
    """Set the nested key `keys` to `value`, creating mappings on the way, and record its source."""
    if not all(keys):
        raise ConfigError(f"empty key in {source}")
    node = data
    for i, key in enumerate(keys[:-1]):
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)} ({source}): {'.'.join(keys[: i + 1])} is not a mapping")
    node[keys[-1]] = value
    path = tuple(keys)
    for shadowed in [p for p in sources if p[: len(path)] == path]:
        del sources[shadowed]
    sources[path] = source


def _describe(err: ErrorDetails, data: dict[str, Any], sources: dict[_KeyPath, str], file_source: str | None) -> str:
    """One line per error: dotted key path, the problem in plain words, where the value came from."""
    path = _data_path(err["loc"], data, missing=err["type"] == "missing")
    if err["type"].startswith("union_tag_"):
        path += (err["ctx"]["discriminator"].strip("'"),)
    # the nearest source at or above the key, plus the sources of overrides below it
    found = [sources[path[:n]] for n in range(len(path), 0, -1) if path[:n] in sources][:1]
    found += [s for p, s in sources.items() if len(p) > len(path) and p[: len(path)] == path]
    source = ", ".join(dict.fromkeys(found)) or file_source
    where = f" ({source})" if source else ""
    return f"{'.'.join(map(str, path)) or '(top level)'}: {_problem(err)}{where}"


def _data_path(loc: tuple[int | str, ...], data: Any, missing: bool) -> _KeyPath:
    """Follow an error location through the input data, dropping union tags and member names."""
    path: list[Any] = []
    for part in loc:
        if (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        ):
            data = data[part]
            path.append(part)
    if missing:
        path.append(loc[-1])
    return tuple(path)


def _problem(err: ErrorDetails) -> str:
    """Describe a pydantic error in plain words."""
    etype, ctx, got = err["type"], err.get("ctx", {}), repr(err["input"])
    if etype in ("missing", "union_tag_not_found"):
        return "missing required key"
    if etype == "extra_forbidden":
        return "unknown key"
    if etype == "union_tag_invalid":
        return f"expected one of {ctx['expected_tags']}, got {ctx['tag']!r}"
    if etype in ("literal_error", "enum"):
        return f"expected {ctx['expected']}, got {got}"
    kind = etype.removesuffix("_type").removesuffix("_parsing")
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    return err["msg"][0].lower() + err["msg"][1:]
