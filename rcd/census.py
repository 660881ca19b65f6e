"""``python -m rcd.census``: the grid's census, every unit × control × schedule cell, runs or refused and why.

Each cell is composed from rcd's ``conf/`` as ``+strategy=once strategy/control=<c> strategy/schedule=<s>
datastore=<u>`` and put through the start-up validation every run goes through
(:func:`rcd.strategy.validate`): a refused cell prints the error a user would get. A cell that runs
but cannot score a fixed text (its control's ``score_refusal``) is marked "generate only". The
summary counts cells per (unit × how family), how = context | inject | logits (``Control.how``).

    python -m rcd.census              # the table, then the unit × how summary
    python -m rcd.census --json out.json
    PYTHONPATH=my_modules python -m rcd.census --config-dir my_conf   # your controls and schedules counted too
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from rcd.paths import conf_dir

CONF = conf_dir()
UNITS = ("chunks", "tokens", "tags", "latent")


def names(group: str, config_dir: Optional[Path] = None) -> list[str]:
    """Options of a config group: rcd's and, with ``config_dir``, that folder's (``--config-dir``)."""
    found = {p.stem for p in (CONF / group).glob("*.yaml")}
    if config_dir is not None:
        found |= {p.stem for p in (Path(config_dir) / group).glob("*.yaml")}
    return sorted(found)


def outside_options(group: str, config_dir: Optional[Path]) -> set[str]:
    """Options of ``group`` that come from ``config_dir`` (a user's folder shadows rcd's option of that name)."""
    return {p.stem for p in (Path(config_dir) / group).glob("*.yaml")} if config_dir is not None else set()


def compose_cell(unit: str, control: str, schedule: str, extra: Optional[list] = None, config_dir=None):
    """The config of one cell; ``config_dir``: a user's config folder searched before rcd's (as ``--config-dir``)."""
    from hydra import compose, initialize_config_dir

    search = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=["+strategy=once", f"strategy/control={control}",
                                                        f"strategy/schedule={schedule}", f"datastore={unit}",
                                                        "strategy.name=census"] + list(extra or []) + search)


def cells(extra: Optional[list] = None, config_dir: Optional[Path] = None) -> list[dict]:
    """Every cell with its verdict: ``{unit, control, schedule, how, runs, scores, why, outside}``; ``outside``:
    the axes (control, schedule) whose option comes from ``config_dir``. A target that cannot be imported is a refused cell."""
    from hydra.utils import get_class

    from rcd import strategy as strategy_mod
    from rcd.errors import RcdError

    out = []
    own_c = outside_options("strategy/control", config_dir)
    own_s = outside_options("strategy/schedule", config_dir)
    for control in names("strategy/control", config_dir):
        for schedule in names("strategy/schedule", config_dir):
            for unit in UNITS:
                cfg = compose_cell(unit, control, schedule, extra, config_dir)
                rec = {"unit": unit, "control": control, "schedule": schedule, "how": "?", "runs": True,
                       "scores": True, "why": "",
                       "outside": [a for a, mine in (("control", control in own_c), ("schedule", schedule in own_s))
                                   if mine]}
                try:
                    cls = get_class(cfg.strategy.control._target_)
                except Exception as e:  # not importable: refused with the reason a run would give
                    rec.update(runs=False, scores=False, why=f"strategy.control._target_="
                               f"{cfg.strategy.control._target_} cannot be imported ({type(e).__name__}): put its "
                               "folder on PYTHONPATH")
                    out.append(rec)
                    continue
                rec["how"] = getattr(cls, "how", "?")
                try:
                    strategy_mod.validate(cfg)
                    from rcd.validate import check_strategy

                    check_strategy(cfg)  # builds the control and the schedule from config: imports, parameters
                except RcdError as e:
                    rec.update(runs=False, scores=False, why=str(e))
                except Exception as e:  # an outside schedule that cannot be imported or built
                    rec.update(runs=False, scores=False, why=f"{type(e).__name__}: {e}")
                else:
                    refusal = getattr(cls, "score_refusal", None)
                    if refusal:
                        rec.update(scores=False, why=f"generate only: {refusal}")
                out.append(rec)
    return out


def summary(rows: list[dict]) -> dict:
    fam: dict[tuple, int] = {}
    for r in rows:
        key = (r["unit"], r["how"])
        fam.setdefault(key, 0)
        fam[key] += int(r["runs"])
    hows = sorted({r["how"] for r in rows})
    return {"cells": len(rows), "runs": sum(r["runs"] for r in rows),
            "outside_cells": sum(bool(r.get("outside")) for r in rows),
            "outside_runs": sum(bool(r.get("outside")) and r["runs"] for r in rows),
            "outside_controls": sorted({r["control"] for r in rows if "control" in (r.get("outside") or [])}),
            "outside_schedules": sorted({r["schedule"] for r in rows if "schedule" in (r.get("outside") or [])}),
            "generate_only": sum(r["runs"] and not r["scores"] for r in rows),
            "families": {f"{u} x {h}": fam.get((u, h), 0) for u in UNITS for h in hows},
            "families_covered": sum(1 for u in UNITS for h in hows if fam.get((u, h), 0) > 0),
            "families_total": len(UNITS) * len(hows)}


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the cells and the summary to this file")
    ap.add_argument("--refused", action="store_true", help="print only the refused cells (with why)")
    ap.add_argument("--config-dir", type=Path, help="a folder of your own configs (as rcd-run --config-dir): its "
                    "controls and schedules join the census (their modules on PYTHONPATH)")
    args = ap.parse_args(argv)
    rows = cells(config_dir=args.config_dir)
    w = max(len(r["control"]) for r in rows)
    for r in rows:
        if args.refused and r["runs"]:
            continue
        verdict = "runs" if r["runs"] and r["scores"] else ("runs*" if r["runs"] else "refused")
        why = r["why"].split(". ")[0] if r["why"] else ""
        print(f"{r['unit']:<7} {r['control']:<{w}} {r['schedule']:<12} {r['how']:<8} {verdict:<8} {why}")
    s = summary(rows)
    print(f"\n{s['runs']} of {s['cells']} cells run ({s['generate_only']} generate only, marked *); "
          f"unit x how families covered: {s['families_covered']} of {s['families_total']}")
    if args.config_dir is not None:
        print(f"from {args.config_dir}: controls {s['outside_controls']}, schedules {s['outside_schedules']}; "
              f"{s['outside_runs']} of {s['outside_cells']} cells with one of them run")
    for k, v in s["families"].items():
        print(f"  {k:<18} {v} cells")
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": rows, "summary": s}, indent=1))


if __name__ == "__main__":
    main()
