"""Command-line composition checked before Hydra runs: its errors in rcd's one form.

Hydra reports a mistyped key ("Key 'kk' is not in struct", or "use +key=value to append", which would add
a key the control then refuses), an unknown preset and other composition errors as its own text with
exit code 1. :func:`check_argv` composes the command line's config first (each sweep at its first value,
``hydra.*`` settings left to Hydra) and turns such an error into ``[rcd] error: <key>: <what is wrong and
what to do>`` with :data:`rcd.errors.EXIT_CODE`: the known keys or options of that node, the closest ones
first. A command line that composes goes on to Hydra unchanged.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Optional

from rcd.errors import EXIT_CODE, ConfigError, RcdError

from rcd.paths import conf_dir

CONF = conf_dir()

#: Hydra flags that take a value (``--flag value`` or ``--flag=value``)
_VALUED = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--info", "-i",
           "--experimental-rerun", "--package", "-p", "--cfg", "-c")


def split_argv(argv: list[str]) -> tuple[list[str], list[str], Optional[str]]:
    """(overrides, flags, the --config-dir folder) of a Hydra command line."""
    overrides, flags, config_dir = [], [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if a.startswith("-"):
            flags.append(a)
            if name in _VALUED and "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                flags.append(argv[i])
                value = argv[i]
            else:
                value = a.split("=", 1)[1] if "=" in a else None
            if name in ("--config-dir", "-cd") and value:
                config_dir = value
        else:
            overrides.append(a)
        i += 1
    return overrides, flags, config_dir


def first_values(overrides: list[str]) -> list[str]:
    """The overrides with each sweep at its first value and ``hydra`` settings dropped (Hydra checks those)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    out = []
    parser = OverridesParser.create()
    for line in overrides:
        try:
            (o,) = parser.parse_overrides([line])
        except OverrideParseException as e:
            raise RcdError(f"{line}: not a valid override ({str(e).splitlines()[0]}): write key=value, "
                           "+key=value to add a key, ~key to delete one") from None
        if o.key_or_group.split("/")[0].split(".")[0] == "hydra":
            continue
        if o.is_sweep_override():
            try:
                value = next(iter(o.sweep_string_iterator()))
            except (StopIteration, Exception):  # an interval sweep: nothing to pick, leave it to Hydra
                continue
            line = f"{o.get_key_element()}={value}"
        out.append(line)
    return out


def sweeps(overrides: list[str]) -> list[str]:
    """The overrides of a command line that sweep (``key=a,b``, ``range(...)``, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for line in overrides:
        try:
            (o,) = parser.parse_overrides([line])
        except Exception:  # noqa: BLE001 - first_values reports a malformed override
            continue
        if o.is_sweep_override():
            out.append(line)
    return out


def _closest(word: str, options) -> str:
    """"did you mean a or b? choices: a, b, c, ..." (the closest first)."""
    options = sorted(str(o) for o in options)
    near = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    shown = near + [o for o in options if o not in near]
    listing = ", ".join(shown[:30]) + (", ..." if len(shown) > 30 else "")
    return (f"did you mean {' or '.join(near)}? " if near else "") + f"choices: {listing}"


def _known(config_dir: Optional[str], overrides: list[str], key: str) -> tuple[str, str, list[str]]:
    """(deepest existing node of ``key``, the first missing part, that node's keys), with the other
    overrides composed (("", part, []) when they do not compose)."""
    from omegaconf import DictConfig, OmegaConf

    others = [o for o in overrides if not re.match(rf"^[+~]*{re.escape(key)}(@[^=]*)?(=|$)", o)]
    try:
        cfg = _compose(config_dir, others)
    except Exception:
        return "", key.split(".")[0], []
    parts = key.split(".")
    for n in range(len(parts) - 1, -1, -1):
        node = OmegaConf.select(cfg, ".".join(parts[:n])) if n else cfg
        if isinstance(node, DictConfig):
            return ".".join(parts[:n]), parts[n], [str(k) for k in node.keys()]
    return "", parts[0], []


def _compose(config_dir: Optional[str], overrides: list[str], config_name: str = "config"):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            return compose(config_name=config_name, overrides=overrides + extra)
    finally:
        GlobalHydra.instance().clear()


def explain(e: BaseException, config_dir: Optional[str], overrides: list[str]) -> RcdError:
    """A Hydra composition error as an :class:`RcdError` that names the key and the fix."""
    from hydra.errors import MissingConfigException

    text = str(e)
    if isinstance(e, MissingConfigException) and getattr(e, "options", None) is not None:
        m = re.search(r"Could not find '([^']+)'", text)
        group, _, choice = (m.group(1) if m else "").rpartition("/")
        if group:
            hint = "" if config_dir else f"; a preset of your own goes in <dir>/{group}/<name>.yaml with --config-dir <dir>"
            return ConfigError(group, f"no option {choice!r}; {_closest(choice, e.options)}{hint}")
    m = re.search(r"full_key: (\S+)", text) or re.search(r"Could not override '([^']+)'", text) or \
        re.search(r"Could not append to config\. An item is already at '([^']+)'", text) or \
        re.search(r"Could not delete from config\. '([^']+)' does not exist", text)
    if m:
        key = m.group(1)
        if "already at" in text:
            return ConfigError(key, f"already exists: set it without '+' ({key}=<value>)")
        node, missing, known = _known(config_dir, overrides, key)
        where = node or "the top level"
        if "Could not delete" in text:
            return ConfigError(key, f"cannot be deleted: {where} has no {missing!r}; {_closest(missing, known)}")
        if known:
            hint = (f". A parameter the class takes but its YAML leaves out is added with +{key}=<value> (refused "
                    "if the class does not take it)") if node and "_target_" in known else ""
            return ConfigError(key, f"no such key: {where} has no {missing!r}; {_closest(missing, known)}{hint}")
        return ConfigError(key, f"no such key ({text.splitlines()[0]})")
    return RcdError(f"{' '.join(overrides) or 'the command line'}: {text.splitlines()[0]}")


def check_argv(argv: list[str], config_name: str = "config") -> None:
    """Compose ``argv``'s config as Hydra will; print a composition error in rcd's form and exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides, flags, config_dir = split_argv(argv)
    if any(f in ("--help", "-h", "--hydra-help", "--shell-completion", "-sc") for f in flags):
        return
    try:
        chosen = first_values(overrides)
        try:
            _compose(config_dir, chosen, config_name)
        except (HydraException, OmegaConfBaseException) as e:
            raise explain(e, config_dir, chosen) from None
        swept = sweeps(overrides)
        if swept and any(f in ("--multirun", "-m") for f in flags):
            # Hydra's multirun composes the command line once without its sweeps before it sweeps them
            fixed = [o for o in first_values([x for x in overrides if x not in swept])]
            try:
                _compose(config_dir, fixed, config_name)
            except (HydraException, OmegaConfBaseException) as e:
                err = explain(e, config_dir, fixed)
                key = getattr(err, "key", None) or "the command line"
                raise ConfigError(key, f"a --multirun first composes the command line without its sweeps "
                                       f"({' '.join(swept)}), and {key} is there only once a swept option is "
                                       "chosen: choose the group it belongs to on the command line too (e.g. "
                                       "datastore=chunks when sweeping chunk presets), or list each job in full "
                                       "with hydra/sweeper=rcd_list") from None
    except RcdError as e:
        print(f"[rcd] error: {e}", file=sys.stderr)
        sys.exit(EXIT_CODE)
