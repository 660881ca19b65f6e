"""Tags × context: the retrieved labels go into the prompt as keywords (a passage of tags).

When the schedule fires, the tags pooled from the nearest entries of a tag datastore (sorted by
weight, at most ``max_tags``) are written as one passage, ``format.format(tags=", ".join(tags))``,
and the row is re-prefilled with it, exactly like passages of text (:class:`ContextControl`, whose
template fields and scoring it shares). Scoring a text puts the keyword passage retrieved at each
firing position before the text that follows it.
"""
from __future__ import annotations

from typing import Optional

from rcd.control.context import ContextControl, Passage


class TagContext(ContextControl):
    """prompt = template([Passage(format(tags))], prompt) + tokens so far."""

    name = "tag_context"
    accepts_units: tuple[str, ...] = ("tags",)

    def __init__(self, template: Optional[dict] = None, format: str = "Keywords: {tags}",
                 max_tags: Optional[int] = 8) -> None:
        super().__init__(template=template, max_passages=None)
        if "{tags}" not in format:
            raise ValueError(f"TagContext: format must contain {{tags}}, got {format!r}")
        if max_tags is not None and int(max_tags) < 1:
            raise ValueError(f"TagContext: max_tags must be >= 1 or null, got {max_tags}")
        self.format = format
        self.max_tags = None if max_tags is None else int(max_tags)

    def passages(self, run, hits, j: int) -> list[Passage]:
        tags = [str(t) for t in hits.tags[j]][: self.max_tags]
        if not tags:
            return []
        weight = float(hits.weights[j][0]) if len(hits.weights[j]) else 0.0
        return [Passage(text=self.format.format(tags=", ".join(tags)), doc_id="tags", score=weight, rank=1)]

    def __repr__(self) -> str:
        return f"TagContext(format={self.format!r}, max_tags={self.max_tags})"
