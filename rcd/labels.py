"""What a run is called: its preset's name, or its composition when an axis was overridden.

``+strategy=cad strategy/schedule=every_n`` is not the ``cad`` preset any more: :func:`cell_label` reads
the preset's own choices (``<config dir>/strategy/<name>.yaml``: its ``defaults`` or an inline
``_target_``) and compares them with the composed control, schedule and datastore unit. A run whose
axes are the preset's keeps the name (parameter overrides such as ``strategy.control.k=16`` do not
rename it); otherwise it is labelled ``<control> x <schedule>`` (``<unit> x ...`` first when the datastore
changed), each part the config name of the chosen option (``strategy/control/<name>.yaml``). The label
names result rows and the run folder (:func:`folder_slug`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from rcd.paths import conf_dir

CONF = conf_dir()


def search_dirs() -> list[Path]:
    """Config folders in Hydra's order of precedence: ``--config-dir`` folders (when Hydra runs), then rcd's."""
    dirs: list[Path] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            for src in HydraConfig.get().runtime.config_sources:
                path = str(src.get("path", ""))
                if src.get("schema") == "file" and src.get("provider") != "main" and path:
                    dirs.append(Path(path[len("file://"):] if path.startswith("file://") else path))
    except Exception:  # no Hydra run: rcd's configs only
        pass
    return dirs + [CONF]


def _yaml(dirs: list[Path], rel: str) -> Optional[dict]:
    for d in dirs:
        f = d / rel
        if f.is_file():
            node = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
            return node if isinstance(node, dict) else {}
    return None


def _choices(defaults) -> dict[str, str]:
    """``control`` / ``schedule`` / ``datastore`` chosen by a preset's defaults list."""
    out = {}
    for entry in defaults or []:
        if not isinstance(entry, dict):
            continue
        for k, v in entry.items():
            key = k.replace("override ", "").strip().lstrip("/")
            key = key.split("@")[0]
            if key in ("control", "schedule", "datastore") and isinstance(v, str):
                out[key] = v
    return out


def _target(dirs, group: str, option: Optional[str]) -> Optional[str]:
    node = _yaml(dirs, f"{group}/{option}.yaml") if option else None
    return node.get("_target_") if node else None


def _option_name(dirs, group: str, target: str, hydra_choice: Optional[str]) -> str:
    """The config name of the option whose ``_target_`` is ``target`` (Hydra's own choice when it ran)."""
    if hydra_choice and _target(dirs, group, hydra_choice) == target:
        return hydra_choice
    for d in dirs:
        for f in sorted((d / group).glob("*.yaml")) if (d / group).is_dir() else []:
            if _target(dirs, group, f.stem) == target:
                return f.stem
    return target.rsplit(".", 1)[-1]


def _hydra_choices() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    except Exception:
        return {}


def cell_label(cfg: DictConfig, dirs: Optional[list[Path]] = None) -> str:
    """The preset's name if the run's axes are the preset's, else its composition (module doc)."""
    name = str(OmegaConf.select(cfg, "strategy.name") or "unnamed")
    dirs = search_dirs() if dirs is None else dirs
    preset = _yaml(dirs, f"strategy/{name}.yaml")
    if preset is None:  # not a preset file (a strategy built in Python): its name
        return name
    chosen = _choices(preset.get("defaults"))
    hydra = _hydra_choices()
    parts, changed = [], False
    ds = OmegaConf.select(cfg, "datastore")
    unit = ds.get("unit") if isinstance(ds, DictConfig) else None
    want_unit = chosen.get("datastore")
    if want_unit is not None:
        want_unit = (_yaml(dirs, f"datastore/{want_unit}.yaml") or {}).get("unit", want_unit)
    if unit != want_unit and (unit or want_unit):
        parts.append(str(unit or "no datastore"))
        changed = True
    for axis in ("control", "schedule"):
        node = OmegaConf.select(cfg, f"strategy.{axis}")
        have = node.get("_target_") if isinstance(node, DictConfig) else None
        inline = preset.get(axis) if isinstance(preset.get(axis), dict) else {}
        want = inline.get("_target_") or _target(dirs, f"strategy/{axis}", chosen.get(axis))
        changed |= have != want
        if have:
            parts.append(_option_name(dirs, f"strategy/{axis}", have, hydra.get(f"strategy/{axis}")))
    return " x ".join(parts) if changed and parts else name


def folder_slug(label: str) -> str:
    """A label as a folder name part (``cad x every_n`` -> ``cad+every_n``)."""
    return "".join(c if c.isalnum() or c in "._+" else "_" for c in label.replace(" x ", "+"))
