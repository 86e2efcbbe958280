"""Recipes in and out: a TOML file plus `--section.key value` overrides -> a validated Config.

This module owns the one override parser (`split_overrides`: what on a command line is a
`--section.key`), the one "did you mean" (`unknown_key`), every error that names the file (or
"command line") and the key, and `to_toml`, which writes a resolved config back out (for
`--dry-run` and the run folder). The schema itself is config.py's.
"""

from __future__ import annotations

import difflib
import json
import tomllib
import types
import typing
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from swarmrl.base.config import Config, ConfigError

DEFAULT_RECIPE = "arithmetic"
Override = tuple[str, str]  # ("trainer.learning_rate", "2e-5"): the key path and the raw text


def recipe_path(recipe: str | None) -> Path:
    """A recipe argument as a file: a path, or the name of a recipe shipped with swarmrl."""
    recipe = recipe or DEFAULT_RECIPE
    path = Path(recipe)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{recipe}: recipe file not found")
        return path
    shipped = resources.files("swarmrl.recipes") / f"{recipe}.toml"
    if not shipped.is_file():
        known = sorted(
            p.name[:-5]
            for p in resources.files("swarmrl.recipes").iterdir()
            if p.name.endswith(".toml")
        )
        raise ConfigError(f"{recipe}: no such recipe file or shipped recipe (shipped: {known})")
    return Path(str(shipped))


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML recipe, apply `--section.key value` overrides, and validate the whole tree."""
    path = recipe_path(recipe)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    _check_keys(data, Config, str(path))
    files = data.get("data", {}).get("data_files")
    if isinstance(files, dict):  # relative to the recipe, so shipped recipes carry their data
        data["data"]["data_files"] = {
            split: str(path.parent / name) if isinstance(name, str) else name
            for split, name in files.items()
        }
    swarm = data.get("swarm", {})
    for key in ("allow_keys", "trainer_key"):  # key files, relative to the recipe as well
        if isinstance(swarm.get(key), str):
            swarm[key] = str(path.parent / Path(swarm[key]).expanduser())
    pairs = parse_overrides(overrides or [])
    for key, raw in pairs:
        _assign(data, key, _typed_value(key, raw))
    data["recipe"] = str(path)
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, str(path), {key for key, _ in pairs})) from None


def is_override(argument: str) -> bool:
    """`--trainer.learning_rate` or `--eval.before=false`; not `--resume=runs/a.b`."""
    return argument.startswith("--") and "." in argument.split("=", 1)[0]


def split_overrides(arguments: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the `--section.key VALUE` / `--section.key=VALUE` tokens)."""
    rest, found = _scan(arguments)
    return rest, [token for _, tokens in found for token in tokens]


def parse_overrides(arguments: list[str]) -> list[Override]:
    """`['--trainer.learning_rate', '1e-5', '--eval.before=false']` -> [(key, raw text)]."""
    rest, found = _scan(arguments)
    if rest:
        raise ConfigError(f"command line: expected --section.key VALUE, got {rest[0]!r}")
    return [pair for pair, _ in found]


def _scan(arguments: list[str]) -> tuple[list[str], list[tuple[Override, list[str]]]]:
    """The one reading of a command line: other arguments, and each override with its tokens."""
    rest: list[str] = []
    found: list[tuple[Override, list[str]]] = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if not is_override(argument):
            rest.append(argument)
            index += 1
        elif "=" in argument:
            key, raw = argument[2:].split("=", 1)
            found.append(((key, raw), [argument]))
            index += 1
        elif index + 1 < len(arguments):
            found.append(((argument[2:], arguments[index + 1]), arguments[index : index + 2]))
            index += 2
        else:
            raise ConfigError(f"command line: {argument} needs a value")
    return rest, found


def unknown_key(
    source: str, shown: str, name: str, known: Iterable[str], prefix: str = ""
) -> ConfigError:
    """The error for key `shown`, whose part `name` is not among `known`, with a suggestion
    (`prefix` + the closest known name) when it looks like a typo."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown key {shown!r}{hint}")


def _typed_value(key: str, raw: str) -> Any:
    """Check the key path against the config tree; read the value as TOML unless it is a string.

    A string field keeps the text as typed (`--logging.run_name 2024` stays "2024"); other
    fields get TOML literals (numbers, booleans, arrays) and pydantic validates them.
    """
    model: type[BaseModel] = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = "".join(f"{p}." for p in parts[:depth])
            raise unknown_key("command line", key, part, fields, prefix)
        annotation = fields[part].annotation
        if depth == len(parts) - 1:
            if annotation in (str, str | None):
                return raw
            try:
                return tomllib.loads(f"value = {raw}")["value"]
            except tomllib.TOMLDecodeError:
                return raw
        section = _section(annotation)
        if section is None:
            path = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"command line: {key!r}: {path!r} is not a section; "
                "set lists such as [[rewards]] in the recipe file"
            )
        model = section
    raise AssertionError("unreachable")


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (`X` or an optional `X | None`), or None."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in (annotation, *(typing.get_args(annotation) if optional else ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _assign(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def _check_keys(
    data: dict[str, Any], model: type[BaseModel], source: str, prefix: str = ""
) -> None:
    """Reject unknown keys early with a 'did you mean' hint (pydantic's message lacks one)."""
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            raise unknown_key(source, prefix + key, key, fields, prefix)
        section = _section(fields[key].annotation)
        if isinstance(value, dict) and section is not None:
            _check_keys(value, section, source, f"{prefix}{key}.")


def _describe(error: ValidationError, path: str, override_keys: set[str]) -> str:
    """One line per problem, each naming where the bad value came from."""
    lines = [f"{path}: invalid config"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        source = " [from the command line]" if location in override_keys else ""
        lines.append(f"  {location}: {item['msg']} (got {item.get('input')!r}){source}")
    return "\n".join(lines)


def to_toml(config: Config) -> str:
    """The resolved config as TOML text (for --dry-run and the run folder)."""
    return _toml_table(config.model_dump(mode="json", exclude={"recipe"}))


def _toml_table(data: dict[str, Any], prefix: str = "") -> str:
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        elif value is not None:
            scalars.append(f"{key} = {_toml_value(value)}")
    text = "\n".join(scalars) + ("\n" if scalars else "")
    for key, value in tables:
        text += f"\n[{prefix}{key}]\n" + _toml_table(value, f"{prefix}{key}.")
    for key, items in arrays:
        for item in items:
            text += f"\n[[{prefix}{key}]]\n" + _toml_table(item, f"{prefix}{key}.")
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A JSON string literal (non-ASCII kept as is) is a valid TOML basic string.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
