"""``python -m rcd.census``: the grid's census, every unit × control × schedule cell, runs or refused and why.

Each cell is composed from ``rcd/conf`` as ``+strategy=once strategy/control=<c> strategy/schedule=<s>
datastore=<u>`` and put through the start-up validation every run goes through
(:func:`rcd.strategy.validate`): a refused cell prints the error a user would get. A cell that runs
but cannot score a fixed text (its control's ``score_refusal``) is marked "generate only". The
summary counts cells per (unit × how family), how = context | inject | logits (``Control.how``).

    python -m rcd.census              # the table, then the unit × how summary
    python -m rcd.census --json out.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

CONF = Path(__file__).resolve().parent / "conf"
UNITS = ("chunks", "tokens", "tags", "latent")


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cell(unit: str, control: str, schedule: str, extra: Optional[list] = None, config_dir=None):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir or CONF), version_base=None):
        return compose(config_name="config", overrides=["+strategy=once", f"strategy/control={control}",
                                                        f"strategy/schedule={schedule}", f"datastore={unit}",
                                                        "strategy.name=census"] + list(extra or []))


def cells(extra: Optional[list] = None) -> list[dict]:
    """Every cell with its verdict: ``{unit, control, schedule, how, runs, scores, why}``."""
    from hydra.utils import get_class

    from rcd import strategy as strategy_mod
    from rcd.errors import RcdError

    out = []
    for control in names("strategy/control"):
        for schedule in names("strategy/schedule"):
            for unit in UNITS:
                cfg = compose_cell(unit, control, schedule, extra)
                cls = get_class(cfg.strategy.control._target_)
                rec = {"unit": unit, "control": control, "schedule": schedule, "how": getattr(cls, "how", "?"),
                       "runs": True, "scores": True, "why": ""}
                try:
                    strategy_mod.validate(cfg)
                except RcdError as e:
                    rec.update(runs=False, scores=False, why=str(e))
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
            "generate_only": sum(r["runs"] and not r["scores"] for r in rows),
            "families": {f"{u} x {h}": fam.get((u, h), 0) for u in UNITS for h in hows},
            "families_covered": sum(1 for u in UNITS for h in hows if fam.get((u, h), 0) > 0),
            "families_total": len(UNITS) * len(hows)}


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the cells and the summary to this file")
    ap.add_argument("--refused", action="store_true", help="print only the refused cells (with why)")
    args = ap.parse_args(argv)
    rows = cells()
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
    for k, v in s["families"].items():
        print(f"  {k:<18} {v} cells")
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": rows, "summary": s}, indent=1))


if __name__ == "__main__":
    main()
