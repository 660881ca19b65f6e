"""Build the two small closed-book QA sets that rcd evaluates on, with their passage stores.

* **WordNet people** — every noun synset becomes a passage ("wn-<offset>"); every person
  (lexicographer file ``noun.person``) whose gloss carries a life span such as ``(1564-1616)``
  yields a born-in and a died-in question whose gold passage is that synset.
* **Mendeleev elements** — one passage per chemical element ("el-<Z>") with its basic facts, and
  short-answer questions (atomic number, symbol, name from symbol / number, period, group,
  year of discovery) whose gold passage is the element's.

Everything here is deterministic (sorted by offset / atomic number, no randomness) and pure
Python; the command-line wrappers are ``scripts/make_wordnet_qa.py`` and
``scripts/make_mendeleev_qa.py``.

Record shapes (one JSON object per line)::

    passage:  {"id", "title", "text"}
    question: {"id", "question", "answers": [str, ...], "gold_id", "kind", "name"}

WordNet questions also carry ``"aliases"`` (all lemmas of the person's synset).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

WORDNET_HINT = "install Debian package wordnet-base: apt-get install wordnet-base"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")

# lexicographer file number of noun.person (see lexnames(5WN))
LEX_NOUN_PERSON = 18

# WordNet data file per part of speech, and the id prefix used for its passages.  Offsets are
# unique only within one file, so non-noun passages get a part-of-speech tag in their id.
POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
POS_ID_PREFIX = {"noun": "wn-", "verb": "wn-v-", "adj": "wn-a-", "adv": "wn-r-"}


# --------------------------------------------------------------------------- jsonl helpers
def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write ``records`` to ``path`` (one JSON object a line, UTF-8); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- WordNet parsing
@dataclass(frozen=True)
class Synset:
    offset: str  # 8-digit byte offset, as written in the data file
    lex_filenum: int
    pos: str  # ss_type: n, v, a, s, r
    lemmas: tuple[str, ...]  # with "_" replaced by " " and adjective markers removed
    gloss: str


_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def parse_wordnet_data(path: str | Path) -> Iterator[Synset]:
    """Yield the synsets of one WordNet ``data.*`` file, in file (= offset) order.

    Line format (wndb(5WN)): ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id...]
    p_cnt [ptr...] [frames...] | gloss``; ``w_cnt`` is hexadecimal.  License header lines start
    with spaces and are skipped.
    """
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line or line[0] == " " or not line[0].isdigit():
                continue
            head, sep, gloss = line.rstrip("\n").partition(" | ")
            fields = head.split()
            if len(fields) < 6:
                raise ValueError(f"{path}: malformed WordNet line: {line[:80]!r}")
            w_cnt = int(fields[3], 16)
            words = fields[4 : 4 + 2 * w_cnt : 2]
            lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
            yield Synset(
                offset=fields[0],
                lex_filenum=int(fields[1]),
                pos=fields[2],
                lemmas=lemmas,
                gloss=gloss.strip() if sep else "",
            )


def synset_passage(syn: Synset, id_prefix: str = "wn-") -> dict:
    """Passage for a synset: title = first lemma, text = all lemmas then the gloss."""
    return {
        "id": f"{id_prefix}{syn.offset}",
        "title": syn.lemmas[0],
        "text": f"{', '.join(syn.lemmas)}: {syn.gloss}",
    }


# Life spans.  A span is "(A-B)" with an optional "?" after either year (uncertain: that year is
# not asked), an optional era ("BC" after the span applies to both years; "A BC - AD B" or
# "A BC to AD B" crosses the era).  Spans qualified by circa/ca./c. are skipped as uncertain,
# and so are open spans "(1932-)" and "(born 1932)".
_YEAR = r"(\d{1,4})(\?)?"
_SPAN_SAME_ERA = re.compile(
    rf"\(\s*(?:AD\s+)?{_YEAR}\s*[-\u2013\u2014]\s*{_YEAR}\s*(BC|B\.C\.|BCE|AD|A\.D\.|CE)?\s*\)"
)
_SPAN_CROSS_ERA = re.compile(
    rf"\(\s*{_YEAR}\s*(?:BC|B\.C\.|BCE)\s*(?:[-\u2013\u2014]|to)\s*(?:AD|A\.D\.|CE)\s*{_YEAR}\s*\)"
)
MAX_LIFESPAN = 110


@dataclass(frozen=True)
class LifeSpan:
    born: int | None  # signed year: negative = BC; None = uncertain
    died: int | None


def parse_life_span(gloss: str) -> LifeSpan | None:
    """The first plausible life span in a gloss, or None.

    Years are signed (551 BC -> -551).  A span is plausible when death follows birth by at most
    ``MAX_LIFESPAN`` years; that filters out non-life ranges.
    """
    candidates: list[tuple[int, LifeSpan]] = []
    for m in _SPAN_CROSS_ERA.finditer(gloss):
        a, qa, b, qb = m.groups()
        candidates.append((m.start(), _span(-int(a), qa, int(b), qb)))
    for m in _SPAN_SAME_ERA.finditer(gloss):
        a, qa, b, qb, era = m.groups()
        sign = -1 if era and era.startswith("B") else 1
        candidates.append((m.start(), _span(sign * int(a), qa, sign * int(b), qb)))
    for _, span in sorted(candidates, key=lambda c: c[0]):
        if span is not None:
            return span
    return None


def _span(a: int, qa: str | None, b: int, qb: str | None) -> LifeSpan | None:
    if a == 0 or b == 0:  # there is no year 0
        return None
    age = b - a - (1 if a < 0 < b else 0)
    if not 0 < age <= MAX_LIFESPAN:
        return None
    span = LifeSpan(born=None if qa else a, died=None if qb else b)
    return span if (span.born is not None or span.died is not None) else None


def year_answers(year: int, bc_context: bool = False) -> list[str]:
    """Accepted answer strings for a signed year: BC years as "551 BC" / "551 BCE"; AD years as
    the bare number, plus "AD 14" when the span is ancient (crossed the era boundary)."""
    if year < 0:
        return [f"{-year} BC", f"{-year} BCE"]
    return [str(year), f"AD {year}"] if bc_context else [str(year)]


_TITLES = {
    "sir", "dame", "lady", "lord", "saint", "st.", "st", "king", "queen", "prince", "princess",
    "president", "general", "captain", "admiral", "pope", "emperor", "empress", "cardinal",
    "earl", "duke", "duchess", "baron", "count", "countess", "rabbi", "dr.", "dr", "mr.", "mrs.",
    "commodore", "colonel", "marshal", "czar", "tsar", "sultan", "shah", "chief", "bishop",
    "archbishop", "reverend", "father", "brother", "sister",
}


def person_name(lemmas: tuple[str, ...] | list[str]) -> str:
    """The name to ask about: the first multi-word lemma that ends with the synset's headword
    (its surname) and does not start with a title; else the first multi-word lemma without a
    title; else the first multi-word lemma; else the headword.

    WordNet lists person lemmas as ``Shakespeare, William_Shakespeare, Shakspere, ...``: the
    headword is the surname and the first full name after it is the common one.  (The longest
    lemma is often a birth or baptismal name nobody asks about, e.g. Lola Montez ->
    "Marie Dolores Eliza Rosanna Gilbert", so length is not the criterion.)
    """
    head = lemmas[0]
    multi = [l for l in lemmas if " " in l]
    untitled = [l for l in multi if l.split()[0].lower() not in _TITLES]
    for l in untitled:
        if l.endswith(" " + head):
            return l
    if untitled:
        return untitled[0]
    if multi:
        return multi[0]
    return head


def wordnet_people_questions(synsets: Iterable[Synset], id_prefix: str = "wn-") -> tuple[list[dict], int]:
    """Born-in / died-in questions for the ``noun.person`` synsets with a life span.

    Returns ``(questions, n_people)``.  Each question names its person unambiguously among these
    people (see the renaming rule inside); people who cannot be named so are left out.
    """
    people = []
    for syn in synsets:
        if syn.lex_filenum != LEX_NOUN_PERSON or syn.pos != "n":
            continue
        span = parse_life_span(syn.gloss)
        if span is None:
            continue
        people.append((syn, span))

    # A name is ambiguous when it is a lemma of another person with a life span (two Samuel
    # Butlers; "Charles II" is also a lemma of Charles the Bald).  Such a person is renamed to
    # the first of its lemmas (multi-word first) that no other person has, e.g. the Pitts become
    # "First Earl of Chatham" / "Second Earl of Chatham"; with no such lemma it is left out.
    owners: dict[str, set[str]] = {}
    for syn, _ in people:
        for lemma in syn.lemmas:
            owners.setdefault(lemma.lower(), set()).add(syn.offset)
    named = []
    for syn, span in people:
        options = [person_name(syn.lemmas)] + sorted(syn.lemmas, key=lambda l: " " not in l)
        name = next((o for o in options if owners[o.lower()] == {syn.offset}), None)
        if name is not None:
            named.append((syn, span, name))

    questions: list[dict] = []
    asked_people = set()
    for syn, span, name in named:
        bc_context = (span.born or 0) < 0 or (span.died or 0) < 0
        for kind, year, template in (
            ("born", span.born, "In what year was {} born?"),
            ("died", span.died, "In what year did {} die?"),
        ):
            if year is None:
                continue
            questions.append(
                {
                    "id": f"wnqa-{syn.offset}-{kind}",
                    "question": template.format(name),
                    "answers": year_answers(year, bc_context),
                    "gold_id": f"{id_prefix}{syn.offset}",
                    "kind": kind,
                    "name": name,
                    "aliases": list(syn.lemmas),
                }
            )
            asked_people.add(syn.offset)
    return questions, len(asked_people)


def build_wordnet(
    wordnet_dir: str | Path = DEFAULT_WORDNET_DIR, pos: Iterable[str] = ("noun",)
) -> tuple[list[dict], list[dict], int]:
    """Passages (for ``pos``, nouns first) and people questions from a WordNet ``dict`` folder.

    Returns ``(passages, questions, n_people)``; raises FileNotFoundError with an install hint
    when the folder or ``data.noun`` is missing.
    """
    wordnet_dir = Path(wordnet_dir)
    pos = list(dict.fromkeys(["noun", *pos]))  # nouns always, first, no repeats
    for p in pos:
        if p not in POS_FILES:
            raise ValueError(f"unknown part of speech {p!r}; choose from {sorted(POS_FILES)}")
    noun_file = wordnet_dir / POS_FILES["noun"]
    if not noun_file.is_file():
        raise FileNotFoundError(f"WordNet data not found at {noun_file}; {WORDNET_HINT}")

    nouns = sorted(parse_wordnet_data(noun_file), key=lambda s: s.offset)
    passages = [synset_passage(s, POS_ID_PREFIX["noun"]) for s in nouns]
    for p in pos[1:]:
        f = wordnet_dir / POS_FILES[p]
        if not f.is_file():
            raise FileNotFoundError(f"WordNet data not found at {f}; {WORDNET_HINT}")
        syns = sorted(parse_wordnet_data(f), key=lambda s: s.offset)
        passages.extend(synset_passage(s, POS_ID_PREFIX[p]) for s in syns)
    questions, n_people = wordnet_people_questions(nouns, POS_ID_PREFIX["noun"])
    return passages, questions, n_people


# --------------------------------------------------------------------------- Mendeleev
# Other accepted spellings of element names (IUPAC / British vs the package's US spelling).
ELEMENT_NAME_VARIANTS = {
    "Aluminum": ["Aluminium"],
    "Cesium": ["Caesium"],
    "Sulfur": ["Sulphur"],
}


def _fmt_weight(w: float) -> str:
    s = f"{round(float(w), 3):.3f}".rstrip("0").rstrip(".")
    return s


def _is_missing(v) -> bool:
    if v is None:
        return True
    try:
        return v != v  # NaN
    except Exception:
        return False


def element_records(table) -> tuple[list[dict], list[dict]]:
    """Passages and questions from the mendeleev ``elements`` table (a pandas DataFrame with
    columns atomic_number, symbol, name, atomic_weight, group_id, period, block, series_id,
    discovery_year, discoverers, discovery_location; ``series_name`` optional)."""
    rows = table.sort_values("atomic_number").to_dict("records")
    passages: list[dict] = []
    questions: list[dict] = []
    for r in rows:
        z = int(r["atomic_number"])
        name, sym = str(r["name"]), str(r["symbol"])
        pid = f"el-{z}"
        period = None if _is_missing(r.get("period")) else int(r["period"])
        group = None if _is_missing(r.get("group_id")) else int(r["group_id"])
        year = None if _is_missing(r.get("discovery_year")) else int(r["discovery_year"])
        discoverers = None if _is_missing(r.get("discoverers")) else str(r["discoverers"]).strip().rstrip(".")
        location = None if _is_missing(r.get("discovery_location")) else str(r["discovery_location"]).strip()
        series = None if _is_missing(r.get("series_name")) else str(r["series_name"])
        block = None if _is_missing(r.get("block")) else str(r["block"])

        parts = [f"{name} (chemical symbol {sym}) is the chemical element with atomic number {z}"]
        if not _is_missing(r.get("atomic_weight")):
            parts[0] += f" and a standard atomic weight of {_fmt_weight(r['atomic_weight'])}"
        parts[0] += "."
        place = []
        if group is not None:
            place.append(f"group {group}")
        if period is not None:
            place.append(f"period {period}")
        if place:
            extra = []
            if block:
                extra.append(f"{block}-block")
            if series:
                extra.append(series.lower())
            tail = f" ({', '.join(extra)})" if extra else ""
            parts.append(f"It is in {' and '.join(place)} of the periodic table{tail}.")
        if year is not None:
            s = f"{name} was discovered in {year}"
            if discoverers:
                s += f" by {discoverers}"
            if location:
                s += f" in {location}"
            parts.append(s + ".")
        elif discoverers and "ancient" in discoverers.lower():
            parts.append(f"{name} has been known since ancient times.")
        elif discoverers:
            parts.append(f"{name} was discovered by {discoverers}.")
        passages.append({"id": pid, "title": name, "text": " ".join(parts)})

        names = [name, *ELEMENT_NAME_VARIANTS.get(name, [])]
        lname = name.lower()  # element names are common nouns in running text
        qs = [
            ("number", f"What is the atomic number of {lname}?", [str(z)]),
            ("symbol", f"What is the chemical symbol of {lname}?", [sym]),
            ("name_from_symbol", f"Which chemical element has the symbol {sym}?", names),
            ("name_from_number", f"Which chemical element has atomic number {z}?", names),
        ]
        if period is not None:
            qs.append(("period", f"In which period of the periodic table is {lname}?", [str(period)]))
        if group is not None:
            qs.append(("group", f"In which group of the periodic table is {lname}?", [str(group)]))
        if year is not None:
            qs.append(("discovered", f"In what year was {lname} discovered?", [str(year)]))
        for kind, q, answers in qs:
            questions.append(
                {"id": f"elqa-{z}-{kind}", "question": q, "answers": answers,
                 "gold_id": pid, "kind": kind, "name": name}
            )
    return passages, questions


def build_mendeleev() -> tuple[list[dict], list[dict]]:
    """Passages and questions from the installed ``mendeleev`` package."""
    try:
        from mendeleev.fetch import fetch_table
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the mendeleev package is needed: pip install mendeleev") from e
    table = fetch_table("elements")
    series = fetch_table("series")
    table = table.merge(
        series.rename(columns={"id": "series_id", "name": "series_name"})[["series_id", "series_name"]],
        on="series_id", how="left",
    )
    return element_records(table)
