"""Profiles as overlays: params.yaml = the default (profiles/default.yaml) with overlays merged on in order.

An overlay (profiles/gta5.yaml, a method's recipe, ...) holds only what differs from the default. The rules:

- mappings merge key by key; a list, a scalar or null replaces the base value whole, and so does a mapping whose
  base value is not a mapping (the default's `data.prepare: null` takes a whole section) or that the schema marks
  as a selection (field metadata `overlay: replace`: `runs.pseudo`, `runs.rounds`, `runs.ensembles`, so an
  overlay that runs fewer variants drops the default's wiring, `{}` for none);
- an overlay key must be a key of the base mapping at that place, or a field the schema (`plca.params.Params`)
  declares there (e.g. `variants.plca.train.options`, which the default leaves out); a key that is neither (a
  typo, a setting that does not exist) is an error naming the overlay file and the dotted key, also inside a
  section the overlay sets whole, a new variant included (its `train` and `show` are checked key by key).
  Free-form mappings (typed `dict` in the schema: `methods` and each method's shared options `methods.<method>`,
  `variants`, a variant's `train.options`, `pretrain.options`, `data.prepare.splits`) take any key: a new
  method section, a new variant, a method option (validation checks the method names and each method's options
  against its options class);
- nothing can be removed, and `profile` is not an overlay's to set: the merge records the applied overlays'
  names there, joined by "+", so the experiment (and `dvc exp show`) shows the choice;
- the merged result is validated as strictly as params.yaml (`plca.params.validate_params`); an error names the
  overlay that set the offending key (or every file merged when none did).

Everything here is pure: files are read and written by the command, `python -m plca.profile`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plca.config import ConfigError
from plca.params import Params, validate_params

#: The key recording which overlays made the params, and what joins their names in it.
PROFILE_KEY = "profile"
SEPARATOR = "+"
#: The command's name for "no overlay": the default itself.
DEFAULT = "default"


@dataclass(frozen=True)
class Overlay:
    """One overlay: its name as the profile key records it, the file it came from (named in errors), its values."""

    name: str
    path: Path
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Merged:
    """The merged params (plain YAML values, ready to write) and their validated form."""

    raw: dict[str, Any]
    params: Params


# ------------------------------------------------------------------------------------------------ names


def overlay_file(arg: str, profiles_dir: Path) -> tuple[str, Path]:
    """A command-line overlay -> (its name in the profile key, its file).

    A bare name (`gta5`) is `<profiles_dir>/gta5.yaml`; anything with a `/` or a .yaml/.yml suffix is a path, named
    by its stem when it is a file of profiles_dir (so `profiles/gta5.yaml` and `gta5` record the same name) and as
    written otherwise.
    """
    if not arg or SEPARATOR in arg or arg != arg.strip():
        raise ConfigError(f"overlay '{arg}': a name or a path without '{SEPARATOR}' or surrounding spaces (the "
                          f"{PROFILE_KEY} key joins the names with '{SEPARATOR}')")
    is_path = "/" in arg or arg.endswith((".yaml", ".yml"))
    path = Path(arg) if is_path else profiles_dir / f"{arg}.yaml"
    in_dir = is_path and path.suffix == ".yaml" and path.resolve().parent == profiles_dir.resolve()
    name = path.stem if in_dir else Path(arg).as_posix() if is_path else arg
    if name == DEFAULT:
        raise ConfigError(f"'{arg}' is the default itself, not an overlay: select it alone ('{DEFAULT}')")
    return name, path


def profile_names(profile: str) -> list[str]:
    """The overlay names a profile key records, in the order they were applied (the command's arguments)."""
    return [n for n in profile.split(SEPARATOR) if n]


def profile_value(base: Mapping[str, Any], overlays: Sequence[Overlay]) -> str:
    """What the profile key says: the overlays' names joined by "+", or the base's own when there is none."""
    if not overlays:
        return str(base.get(PROFILE_KEY, DEFAULT))
    return SEPARATOR.join(o.name for o in overlays)


# ------------------------------------------------------------------------------------------------ merging


def _unwrap(tp: Any) -> Any:
    """The schema type that describes a mapping at this place: Optional[X] -> X; Any for anything unknown."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        structured = [a for a in args if dataclasses.is_dataclass(a) or typing.get_origin(a) is dict]
        return structured[0] if len(structured) == 1 else Any
    return tp


def _child(tp: Any, key: str) -> tuple[Any, bool]:
    """(schema type of `key` inside a mapping of type tp, whether tp declares or freely accepts the key)."""
    tp = _unwrap(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        return (hints[key], True) if key in names else (Any, False)
    if typing.get_origin(tp) is dict:
        args = typing.get_args(tp)
        return (args[1] if args else Any), True
    return Any, True  # Any: a free-form value (e.g. method options given as a plain mapping)


def _replaced_whole(tp: Any, key: str) -> bool:
    """Whether the schema marks field `key` of a mapping of type tp as a selection an overlay replaces whole."""
    tp = _unwrap(tp)
    if not dataclasses.is_dataclass(tp):
        return False
    return any(f.name == key and f.metadata.get("overlay") == "replace" for f in dataclasses.fields(tp))


def _dotted_keys(value: Any, prefix: str) -> set[str]:
    """prefix and every dotted key below it (what an overlay's value sets, for naming it in errors)."""
    out = {prefix}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out |= _dotted_keys(v, f"{prefix}.{k}")
    return out


def merge(base: Mapping[str, Any], overlay: Overlay, schema: Any = Params) -> tuple[dict[str, Any], set[str]]:
    """Merge one overlay onto base (neither is modified): (the merged mapping, the dotted keys the overlay set).

    Raises ConfigError naming the overlay file and the dotted key for a key that is neither in base nor declared
    by the schema there, and for a `profile` key (the merge records the profile itself).
    """
    if PROFILE_KEY in overlay.values:
        raise ConfigError(f"{overlay.path}: '{PROFILE_KEY}' is not an overlay's to set: the command records the "
                          f"applied overlays' names in it")
    touched: set[str] = set()

    def walk(b: Mapping[str, Any], o: Mapping[str, Any], tp: Any, path: str) -> dict[str, Any]:
        out = copy.deepcopy(dict(b))
        for key, value in o.items():
            dotted = f"{path}{key}"
            child_tp, declared = _child(tp, key)
            if key not in b and not declared:
                raise ConfigError(f"{overlay.path}: unknown key '{dotted}': not in the base params nor a setting "
                                  f"of this section (a typo?)")
            if isinstance(value, Mapping):
                whole = not isinstance(b.get(key), Mapping) or _replaced_whole(tp, key)
                # a mapping over a non-mapping replaces it, but its keys are still checked against the schema
                out[key] = walk({} if whole else b[key], value, child_tp, f"{dotted}.")
                if whole:
                    touched.add(dotted)
            else:  # lists, scalars and null replace whole
                out[key] = copy.deepcopy(value)
                touched.update(_dotted_keys(value, dotted))
        return out

    return walk(base, overlay.values, schema, ""), touched


_DOTTED = re.compile(r"[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)+")


def _culprits(message: str, touched: Sequence[tuple[Overlay, set[str]]]) -> list[Overlay]:
    """The overlays to blame for an error: for the first dotted key of the message that overlays touched, those that
    set it (or a key around it), less those whose value there a later one replaced whole, and, as a rule across keys
    (runs' groups) may fail on a key beside it, the later ones that set a key beside it."""

    def near(key: str, keys: set[str]) -> bool:
        return any(k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.") for k in keys)

    def replaced(key: str, keys: set[str]) -> bool:  # a touched key is a value set whole: a leaf, or a mapping
        return any(k == key or key.startswith(f"{k}.") for k in keys)  # over a non-mapping

    for token in _DOTTED.findall(message):
        key = token.removeprefix("params.")
        parent = key.rpartition(".")[0]
        hits = [i for i, (_, keys) in enumerate(touched) if near(key, keys)]
        # an overlay whose value at `key` a later one replaced (set `key` or a key above it) did not cause it
        hits = [i for i in hits if not any(replaced(key, touched[j][1]) for j in hits if j > i)]
        later = [i for i, (_, keys) in enumerate(touched)
                 if parent and i > (hits[-1] if hits else -1) and near(parent, keys)]
        if hits or later:
            return [touched[i][0] for i in hits + later]
    return []


def compose(base: Mapping[str, Any], overlays: Sequence[Overlay], base_path: Path | str) -> Merged:
    """The base with the overlays merged on in order (later ones win), its profile key recording them, validated.

    Errors (ConfigError) name the overlay file and the dotted key; a validation error that no overlay's key
    explains names the base and every overlay.
    """
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    touched: list[tuple[Overlay, set[str]]] = []
    for overlay in overlays:
        merged, keys = merge(merged, overlay)
        touched.append((overlay, keys))
    merged[PROFILE_KEY] = profile_value(base, overlays)
    files = " + ".join(str(p) for p in (base_path, *(o.path for o in overlays)))
    try:
        params = validate_params(merged, "merged")
    except ConfigError as exc:
        message = str(exc).removeprefix("merged: ")
        culprits = _culprits(message, touched)
        where = ", ".join(str(o.path) for o in culprits) if culprits else files
        raise ConfigError(f"{where}: {message}" + (f" (merged: {files})" if culprits else "")) from None
    return Merged(merged, params)


# ------------------------------------------------------------------------------------------------ writing


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow lists of scalars ([760, 988]): reads like the hand-written files."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(x, dict | list) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def render(raw: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """Merged params as YAML text, in the base's key order, under `header` as comment lines."""
    body = yaml.dump(dict(raw), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120,
                     allow_unicode=True)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + body
