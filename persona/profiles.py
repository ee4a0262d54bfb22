"""Ready parameter sets for the machines users have: `python -m persona profile kaggle-2xt4`.

A profile (`profiles/<name>.yaml`) lists only what differs from the defaults (or, with
`extends: <profile>`, from that profile), each value with the reason it was chosen. The
defaults are the dataclass defaults of persona/config.py, which the committed params.yaml
spells out (that is the `cpu-quick` profile, an empty overlay).
Applying a profile sets *every* key of params.yaml to the profile's value or the default, so
profiles do not stack by accident, and it edits values in place so params.yaml keeps its
comments. Then `dvc repro` reruns exactly the stages whose params changed.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import yaml

from persona.config import ConfigError, Params, from_dict
from persona.paths import DEFAULT

log = logging.getLogger(__name__)
PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
HEADER = "# profile: "
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)(?P<gap> *)(?P<comment>#.*)?$")


def available(folder: Path = PROFILES_DIR) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.yaml"))


def _profile_path(name: str, folder: Path) -> Path:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no profile {name!r}; available: {', '.join(available(folder))}")
    return path


def root(name: str, folder: Path = PROFILES_DIR) -> str:
    """The profile at the top of `name`'s `extends` chain (`name` itself when it extends none): runs of profiles
    with one root share a worktree in scripts/profile_run.sh."""
    parent = (yaml.safe_load(_profile_path(name, folder).read_text()) or {}).get("extends")
    return root(parent, folder) if parent else name


def profile_values(name: str, folder: Path = PROFILES_DIR) -> dict:
    """Defaults overlaid with the profile, checked like params.yaml itself (the file named on error)."""
    path = _profile_path(name, folder)
    overlay = yaml.safe_load(path.read_text()) or {}
    parent = overlay.pop("extends", None)  # another profile's values first, then this one's on top
    try:
        values = _overlay(profile_values(parent, folder) if parent else dataclasses.asdict(Params()), overlay)
        from_dict(Params, values, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return values


def apply_profile(name: str, params_path: Path = DEFAULT.params, folder: Path = PROFILES_DIR
                  ) -> tuple[Params, list[str]]:
    """Rewrite params.yaml's values for profile `name`; return the params and the changes as
    'key: old -> new' lines."""
    values = profile_values(name, folder)
    params = from_dict(Params, values, "")
    params.validate(params_path.resolve().parent)
    text, changes = set_values(params_path.read_text(), _leaves(values), params_path)
    if _reads_as(text) != params:  # a layout set_values does not handle (a block list, say): touch nothing
        raise ConfigError(f"{params_path}: cannot edit its layout in place; restore it from git and apply again")
    lines = text.splitlines(keepends=True)
    header = f"{HEADER}{name} (python -m persona profile NAME applies another; see profiles/)\n"
    if lines and lines[0].startswith(HEADER):
        lines[0] = header
    else:
        lines.insert(0, header)
    params_path.write_text("".join(lines))
    return params, changes


def set_values(text: str, leaves: dict[str, object], source: Path) -> tuple[str, list[str]]:
    """Set each dotted key's value in YAML `text` (one key per line, 2-space nesting), keeping comments."""
    out, changes, seen, path = [], [], set(), []
    for line in text.splitlines(keepends=True):
        match = _LINE.match(line.rstrip("\n"))
        if not match:
            out.append(line)
            continue
        depth = len(match["indent"]) // 2
        path = path[:depth] + [match["key"]]
        key = ".".join(path)
        if key not in leaves:
            out.append(line)
            continue
        seen.add(key)
        old, new = yaml.safe_load(match["value"] or "null"), leaves[key]
        if _same(old, new):
            out.append(line)
            continue
        changes.append(f"{key}: {old!r} -> {new!r}")
        head = f"{match['indent']}{match['key']}: {_dump(new)}"
        if match["comment"]:  # keep the comment in its column when the new value fits
            head = head.ljust(match.start("comment") - 1) + " " + match["comment"]
        out.append(head + "\n")
    missing = sorted(set(leaves) - seen)
    if missing:
        raise ConfigError(f"{source}: no line for {missing[0]}; restore the file from git and apply again")
    return "".join(out), changes


def _reads_as(text: str) -> Params | None:
    try:
        return from_dict(Params, yaml.safe_load(text), "")
    except (ConfigError, yaml.YAMLError):
        return None


def _overlay(defaults: dict, overlay: dict, prefix: str = "") -> dict:
    merged = dict(defaults)
    for key, value in overlay.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"unknown key {name!r}")
        is_section = isinstance(defaults[key], dict)
        merged[key] = _overlay(defaults[key], value, f"{name}.") if is_section and isinstance(value, dict) else value
    return merged


def _leaves(values: dict, prefix: str = "") -> dict[str, object]:
    leaves = {}
    for key, value in values.items():
        if isinstance(value, dict):
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def _same(old, new) -> bool:
    """YAML reads `1` for 1.0 and `2e-4` (no dot) as a string: compare as the params loader would."""
    if isinstance(old, str) and isinstance(new, float):
        try:
            old = float(old)
        except ValueError:
            return False
    if isinstance(old, bool) or isinstance(new, bool):
        return old is new
    return old == new


def _dump(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()
