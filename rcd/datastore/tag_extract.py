"""Rule-based tag extraction: the labels :func:`extract_tags` finds in a passage's text.

The tag datastore (:mod:`rcd.datastore.tags`) uses these rules when the corpus has no tag column.
Bump :data:`EXTRACTOR_VERSION` when a rule changes: it is part of the tag datastore's fingerprint.

1. *Head lemmas* — when the entry starts at the start of its row and the row reads
   ``lemma[, lemma…]: gloss`` (the WordNet passage layout: one head line without sentence
   punctuation that contains the row's title, or — without a title column — lemmas of at most
   4 words none of which opens with a function word), each lemma is a tag ("Aalto",
   "Alvar Aalto", …). The row's ``title_field`` column (default ``title``), when present, is a
   tag too.
2. *Speaker lines* — a line that is only an upper-case name ending in a full stop
   (``MACBETH.``, ``FIRST WITCH.``, ``MRS. FORD.``) gives that name.
3. *Upper-case runs* — runs of upper-case words of ≥ 2 letters elsewhere (stage directions
   ``[Enter BERTRAM, the COUNTESS OF ROUSILLON]``) give the run ("COUNTESS OF ROUSILLON"),
   possessive 's dropped; headings and stop words (ACT, SCENE, THE, OF, roman numerals, …)
   are trimmed from the ends, and runs made only of them are dropped.
4. *Proper nouns* — runs of capitalised words ("Alvar Aalto", "Winchester College"; "of"
   may join two of them: "Thane of Cawdor") that do not open a sentence or a line (verse
   capitalises every line). A sentence-opening capitalised word still counts when the same
   word occurs mid-sentence in the entry or is an upper-case tag of the entry ("Macbeth" and
   "MACBETH"). Interjections and pronouns (I, O, Ay, Alas, Enter, Exit, …) are not names.
5. *Years* — four-digit numbers 1000–2099, and every number of a life span in parentheses
   ("(1898-1976)", "(427-347 BC)").

A tag's count is its number of occurrences in the entry (1 for head lemmas and the title).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional

EXTRACTOR_VERSION = "rules-2"  # in the tag datastore fingerprint: bump it when a rule changes

_CAPS_STOP = {
    "ACT", "SCENE", "THE", "OF", "AND", "A", "AN", "TO", "IN", "ON", "AT", "BY", "FOR", "WITH", "END", "EPILOGUE",
    "PROLOGUE", "CHORUS", "EXIT", "EXEUNT", "ENTER", "FINIS", "PERSONS", "REPRESENTED", "DRAMATIS", "PERSONAE",
    "SONNET", "SONNETS", "BC", "AD", "THAT", "ALL", "IS", "OR", "BUT", "NOT", "NO", "SO", "AS", "IT", "HIS", "HER", "MY",
}
_ROMAN = re.compile(r"^[IVXLC]+$")
_NAME_STOP = {
    "I", "I'll", "I'm", "I'd", "I've", "O", "Oh", "Ah", "Ay", "Aye", "Alas", "Enter", "Exit", "Exeunt", "Re-enter",
    "Scene", "Act", "Thou", "Thee", "Thy", "Ha", "Ho", "Fie", "Tut", "Nay", "Yea", "Amen", "Finis", "Mr", "Mrs",
}
_SPEAKER = re.compile(r"^[ \t]*([A-Z][A-Z'\-]*(?:\.?[ \t]+[A-Z][A-Z'\-]*)*)[ \t]*\.[ \t]*$", re.M)
_CAPS_RUN = re.compile(r"(?<![A-Za-z'])[A-Z][A-Z'\-]+(?:\.?[ \t]+[A-Z][A-Z'\-]+)*(?![A-Za-z])")
_TITLE_WORD = r"[A-Z][a-z]+(?:['\-][A-Za-z]+)*"
_NAME_RUN = re.compile(rf"(?<![A-Za-z'\-]){_TITLE_WORD}(?:(?:[ \t]+|[ \t]+of[ \t]+){_TITLE_WORD})*(?![A-Za-z])")
_YEAR = re.compile(r"(?<!\d)(1\d{3}|20\d{2})(?!\d)")
_SPAN = re.compile(r"\(([^()]*?\d{1,4}\s*-\s*\d{1,4}[^()]*)\)")
_NUM = re.compile(r"(?<!\d)\d{1,4}(?!\d)")
_HEAD = re.compile(r"^\s*([^:\n]{1,200}?)\s*:\s")
_HEAD_OPENERS = {"to", "or", "and", "but", "if", "that", "the", "a", "an", "when", "what", "who", "how", "why", "o",
                 "i", "my", "thy", "this", "so", "then", "now", "nor", "yet", "for", "as", "in", "of", "with"}


def _strip_possessive(w: str) -> str:
    return re.sub(r"['’][sS]$", "", w)


def _trim_caps(words: list[str]) -> list[str]:
    while words and (words[0] in _CAPS_STOP or _ROMAN.match(words[0])):
        words = words[1:]
    while words and (words[-1] in _CAPS_STOP or _ROMAN.match(words[-1])):
        words = words[:-1]
    return words


def _sentence_initial(text: str, pos: int) -> bool:
    """Whether position ``pos`` opens a sentence or a line (ignoring quotes/brackets/spaces)."""
    j = pos - 1
    while j >= 0 and text[j] in " \t\"'([‘“":
        j -= 1
    return j < 0 or text[j] in ".!?\n[" or text[j - 1:j + 1] == "--"


def head_lemmas(text: str, title: Optional[str] = None) -> list[str]:
    """Lemmas of a ``lemma[, lemma…]: gloss`` entry (the WordNet passage layout), else [].

    The head is one line without sentence punctuation. With a ``title`` it must be one of the
    lemmas; without, every lemma has at most 4 words and none opens with a function word (so a
    verse line ending in a colon is not taken for a head).
    """
    m = _HEAD.match(text)
    if not m:
        return []
    head = m.group(1)
    if re.search(r"[.!?;\"()\[\]]", head):
        return []
    lemmas = [h.strip() for h in head.split(",") if h.strip()]
    if title is not None:
        return lemmas if title.strip().lower() in {x.lower() for x in lemmas} else []
    if any(len(x.split()) > 4 or x.split()[0].lower() in _HEAD_OPENERS for x in lemmas):
        return []
    return lemmas


def extract_tags(text: str, at_row_start: bool = True, title: Optional[str] = None) -> Counter:
    """Tags of one entry with their counts (rules 1-5 of the module docstring; the title itself is
    added by the caller)."""
    tags: Counter = Counter()
    body_start = 0
    if at_row_start:
        lemmas = head_lemmas(text, title)
        if lemmas:
            for lemma in lemmas:
                tags[lemma] += 1
            body_start = _HEAD.match(text).end()
    body = text  # scanned from body_start, so the head's colon does not open a sentence
    speaker_spans = []
    for m in _SPEAKER.finditer(body, body_start):
        words = _trim_caps([_strip_possessive(w) for w in m.group(1).split()])
        speaker_spans.append(m.span(1))
        if words and any(len(w) >= 2 for w in words):
            tags[" ".join(words)] += 1
    for m in _CAPS_RUN.finditer(body, body_start):
        if any(s <= m.start() < e for s, e in speaker_spans):
            continue
        words = _trim_caps([_strip_possessive(w) for w in m.group(0).split()])
        if words and sum(len(w) for w in words) >= 2 and not (len(words) == 1 and len(words[0]) < 2):
            tags[" ".join(words)] += 1
    upper = {t.upper() for t in tags}
    runs = [(m.start(), m.group(0)) for m in _NAME_RUN.finditer(body, body_start)]
    mid_words = {w for pos, run in runs if not _sentence_initial(body, pos) for w in run.split()}
    for pos, run in runs:
        words = [_strip_possessive(w) for w in re.split(r"[ \t]+", run)]
        if _sentence_initial(body, pos):
            # drop the opening word unless it is known as a name in this entry
            if words[0] not in mid_words and words[0].upper() not in upper:
                words = words[1:]
                while words and words[0] == "of":
                    words = words[1:]
        while words and words[0] in _NAME_STOP:
            words = words[1:]
        while words and words[-1] == "of":
            words = words[:-1]
        if not words or (len(words) == 1 and words[0] in _NAME_STOP):
            continue
        tags[" ".join(words)] += 1
    years = [m.group(1) for m in _YEAR.finditer(body, body_start)]
    for m in _SPAN.finditer(body, body_start):
        for num in _NUM.findall(m.group(1)):
            if num not in years:
                years.append(num)
    for y in years:
        tags[y] += 1
    return tags
