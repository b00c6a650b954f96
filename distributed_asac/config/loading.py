"""Reading a config: dataclass defaults ← a YAML file ← `key=value` overrides, each value checked against its
field's type; and the config.yaml saved beside every run and checkpoint, written and read back."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import UserError, first_line
from .schema import PATH_KEYS, Config, all_keys, flatten, get_key
from .validation import validate


class RepeatedKey(yaml.YAMLError):
    """A key that one mapping of a YAML file holds twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that a key repeated in one mapping is an error: PyYAML keeps the last value
    silently, so a second `finetune:` block would drop every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        places: dict[Any, tuple[int, int]] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges on purpose
                continue
            key, mark = self.construct_object(key_node, deep=True), key_node.start_mark
            place = (mark.line + 1, mark.column + 1)
            try:
                if key in places:
                    (line, column), first = place, places[key]
                    where = (f"line {first[0]} and line {line}" if first[0] != line
                             else f"line {line}, columns {first[1]} and {column}")  # a flow mapping: {a: 1, a: 2}
                    raise RepeatedKey(f"key {key!r} appears twice, at {where}")
                places[key] = place
            except TypeError:  # an unhashable key: the constructor below names it
                continue
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path).expanduser()  # `--config=~/x.yaml` reaches us unexpanded (no shell expands after `=`)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found (pass an existing YAML file to --config)")
        try:
            source = path.read_text()
        except UnicodeDecodeError as err:
            raise UserError(f"config file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); pass "
                            "a YAML file to --config") from None
        # copies: the parse is cached (a sweep loads the same file once per trial) and a list value is assigned
        # into the config as it is
        data, written_data = copy.deepcopy(_parse_config_file(str(path), source))
        data = {} if data is None else data  # an empty file (or only comments) sets nothing
        if not isinstance(data, dict):
            raise UserError(f"config file {str(path)!r} must hold a mapping of keys (e.g. `finetune:` then "
                            f"`  alpha: 0.3`), not a {type(data).__name__} ({data!r:.40})")
        as_written = flatten(written_data) if isinstance(written_data, dict) else {}
        for key, value in flatten(data).items():
            written = as_written.get(key)
            _set(cfg, key, value, written if isinstance(written, str) else None)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. finetune.alpha=0.3)")
        _set_typed(cfg, key.strip(), text)
    validate(cfg)
    return cfg


@functools.lru_cache(maxsize=32)
def _parse_config_file(path: str, source: str) -> tuple[Any, Any]:
    """(the file read as YAML, the file with every scalar as written) of a config file's text; a UserError naming
    `path` where it is not YAML."""
    try:
        data = yaml.load(source, Loader=UniqueKeyLoader)
        # every scalar as written (BaseLoader resolves no types): a name field keeps `experiment: 0x1F` as "0x1F",
        # which the load above reads as 31
        return data, yaml.load(source, Loader=yaml.BaseLoader)
    except RepeatedKey as err:
        raise UserError(f"config file {path!r}: {err}; the second would silently replace the first: "
                        "keep one (merge the two)") from None
    except Exception as err:  # noqa: BLE001 - PyYAML's constructors raise more than YAMLError on bad input
        raise UserError(f"config file {path!r} is not valid YAML: {first_line(err)}") from None


def load_cli_config(path: Optional[str], overrides: list[str]) -> Config:
    """`load_config` of what a command gives, each key given once (`check_given_once`)."""
    check_given_once(overrides)
    return load_config(path, overrides)


def check_given_once(overrides: list[str]) -> None:
    """Refuse a key given twice on a command line (the last would silently win). Programs layer overrides on
    purpose (a sweep's trial adds its own output_dir), so only commands check."""
    given: dict[str, str] = {}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in given:
            raise UserError(f"config key {key!r} is given twice on the command line ({given[key]!r} and {item!r}); "
                            "give it once")
        given[key] = item


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the config.yaml saved beside a checkpoint)."""
    cfg = Config()
    for key, value in flatten(data).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def read_saved_config(path: Path) -> Config:
    """A config.yaml that `save_config` wrote (beside a run or a checkpoint), rebuilt and validated; a damaged one
    is a UserError whose message is the first line of the reason."""
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(first_line(err)) from None
    try:
        data = yaml.safe_load(source)
    except Exception as err:  # noqa: BLE001 - PyYAML's constructors raise more than YAMLError on bad input
        raise UserError(first_line(err)) from None
    if not isinstance(data, dict):
        raise UserError(f"it holds a {type(data).__name__}, not a mapping of keys")
    return config_from_dict(data)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _field(cfg: Config, key: str) -> tuple[Any, str, Any]:
    """(the section object, the field name, the field's type) of a dotted key; an unknown key is a UserError
    naming the nearest valid one."""
    *parents, leaf = key.split(".")
    obj: Any = cfg
    for part in parents:
        child = getattr(obj, part, None) if dataclasses.is_dataclass(obj) else None
        if not dataclasses.is_dataclass(child):
            obj = None
            break
        obj = child
    if obj is None or leaf not in {f.name for f in dataclasses.fields(obj)} or dataclasses.is_dataclass(getattr(obj, leaf)):
        close = difflib.get_close_matches(key, all_keys(cfg), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else " (see distributed_asac/config/schema.py for the keys)"
        raise UserError(f"unknown config key {key!r}{hint}")
    return obj, leaf, _type_hints(type(obj))[leaf]


@functools.cache
def _type_hints(section: type) -> dict[str, Any]:
    """A config section's field types (resolving them costs more than loading a config without the cache)."""
    return typing.get_type_hints(section)


def _set(cfg: Config, key: str, value: Any, written: Optional[str] = None) -> None:
    """Set `key` to `value` as YAML read it, checked against its type; `written` is the scalar as written in the
    file, which a text field keeps (YAML reads `experiment: 0x1F` as 31 and `target: yes` as True)."""
    obj, leaf, hint = _field(cfg, key)
    if written is not None and value is not None and not isinstance(value, str) and _holds_text(hint):
        value = written
    _assign(obj, leaf, key, value, hint)


def _set_typed(cfg: Config, key: str, text: str) -> None:
    """Set `key` from a command line's `key=text`: the text as typed where the key holds text (read as YAML, a
    path would lose what follows ` #`, a newline would become a space and `~` would be null), except `null` for a
    key that may be none and a YAML-quoted string, read as YAML reads it (a sweep quotes its values so); a
    number, switch or list is read as YAML."""
    obj, leaf, hint = _field(cfg, key)
    if not _holds_text(hint):
        try:
            value = copy.deepcopy(_yaml_value(text)) if text else ""  # a copy: a list is assigned as it is
        except yaml.YAMLError:
            value = text  # the type check below names the key and the value
    elif text == "null" and hint is not str:
        value = None
    else:
        value = text
        if text[:1] in ("'", '"'):
            try:
                quoted = yaml.safe_load(text)
            except yaml.YAMLError:
                quoted = None
            value = quoted if isinstance(quoted, str) else text
    _assign(obj, leaf, key, value, hint)


@functools.lru_cache(maxsize=4096)
def _yaml_value(text: str) -> Any:
    """A command line's value read as YAML (cached: a sweep gives every trial the same overrides)."""
    return yaml.safe_load(text)


def _assign(obj: Any, leaf: str, key: str, value: Any, hint: Any) -> None:
    value = _coerce(key, value, hint)
    if key in PATH_KEYS and isinstance(value, str):
        value = os.path.expanduser(value)  # `output_dir=~/runs` is the home folder's, not a folder named `~`
    setattr(obj, leaf, value)


def _holds_text(hint: Any) -> bool:
    """Whether a field's type is str or Optional[str]."""
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and set(typing.get_args(hint)) == {str, type(None)})


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `finetune.eps=0.01` means the one-element list
        if not isinstance(value, list):
            raise UserError(f"config key {key!r}: expected a list like [0.001, 0.01], got {value!r}")
        return [_coerce(key, v, item_type) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string; it is a float to everyone else
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        default = get_key(Config(), key)
        raise UserError(f"config key {key!r}: {value} is not a finite number; give a finite value "
                        f"(default {default})")
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. an experiment named 2024
    if value is None:  # a YAML null where a value is needed: say why, since the file holds a `~` or nothing
        home = f", or quote it ('~') to mean the home folder" if key in PATH_KEYS else ""
        raise UserError(f"config key {key!r}: expected {hint.__name__}, got no value (YAML reads ~, null and an empty "
                        f"value as none); give a value{home}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"config key {key!r}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value

