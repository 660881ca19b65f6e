"""QA data builders: WordNet people questions and Mendeleev element questions."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rcd.data_qa import (
    LifeSpan,
    build_mendeleev,
    build_wordnet,
    parse_life_span,
    parse_wordnet_data,
    person_name,
    read_jsonl,
    wordnet_people_questions,
)

ROOT = Path(__file__).resolve().parents[1]
REAL_WORDNET = Path("/usr/share/wordnet")

HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  \n"
)
# offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [pointers] | gloss
SNIPPET = HEADER + "\n".join(
    [
        "00001740 03 n 01 entity 0 000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  ",
        "01280055 04 n 02 Guadalcanal 0 Battle_of_Guadalcanal 0 000 | a battle in World War II in the Pacific (1942-1943)  ",
        "11295196 18 n 05 Shakespeare 0 William_Shakespeare 0 Shakspere 0 William_Shakspere 0 Bard_of_Avon 0 004 @i 10030277 n 0000 @i 10444194 n 0000 + 03027336 a 0101 + 03027336 a 0102 | English poet and dramatist considered one of the greatest English writers (1564-1616)  ",
        "10000001 18 n 02 Nobody 0 John_Nobody 0 000 | an English poet without any dates in the gloss  ",
        "10000002 18 n 02 Living 0 Ann_Living 0 000 | United States writer (born 1932)  ",
        "10000003 18 n 01 Aristotle 0 000 | one of the greatest of the ancient Athenian philosophers (384-322 BC)  ",
        "10000004 18 n 02 Chaucer 0 Geoffrey_Chaucer 0 000 | English poet (1340?-1400)  ",
        "10000005 18 n 01 Confucius 0 000 | Chinese philosopher (circa 551-478 BC)  ",
        "10000006 18 n 02 Harding 0 Warren_Harding 0 000 | a typo in the source (1865-1823)  ",
        "10000007 18 n 02 Dashman 0 Eve_Dashman 0 000 | a poet with an en dash and spaces (1801 \u2013 1872)  ",
        "10000008 18 n 02 Augustus 0 Gaius_Octavianus 0 000 | first Roman emperor (63 BC - AD 14)  ",
        "10000009 18 n 03 Pitt 0 William_Pitt 0 Pitt_the_Elder 0 000 | English statesman (1708-1778)  ",
        "10000010 18 n 03 Pitt 0 William_Pitt 0 Pitt_the_Younger 0 000 | English statesman; son of Pitt the Elder (1759-1806)  ",
        "10000011 18 n 02 Butler 0 Samuel_Butler 0 000 | English poet (1612-1680)  ",
        "10000012 18 n 02 Butler 0 Samuel_Butler 0 000 | English novelist (1835-1902)  ",
    ]
) + "\n"


@pytest.fixture
def wn_dir(tmp_path: Path) -> Path:
    d = tmp_path / "wordnet"
    d.mkdir()
    (d / "data.noun").write_text(SNIPPET, encoding="utf-8")
    return d


def _by_id(questions):
    return {q["id"]: q for q in questions}


def test_parse_wordnet_data(wn_dir):
    syns = list(parse_wordnet_data(wn_dir / "data.noun"))
    assert len(syns) == 15  # header lines skipped
    shak = [s for s in syns if s.offset == "11295196"][0]
    assert shak.lex_filenum == 18 and shak.pos == "n"
    assert shak.lemmas == ("Shakespeare", "William Shakespeare", "Shakspere", "William Shakspere", "Bard of Avon")
    assert shak.gloss == "English poet and dramatist considered one of the greatest English writers (1564-1616)"


def test_life_span_parsing():
    assert parse_life_span("poet (1564-1616)") == LifeSpan(1564, 1616)
    assert parse_life_span("poet (1564 \u2013 1616)") == LifeSpan(1564, 1616)
    assert parse_life_span("philosopher (384-322 BC)") == LifeSpan(-384, -322)
    assert parse_life_span("emperor (63 BC - AD 14)") == LifeSpan(-63, 14)
    assert parse_life_span("emperor (63 BC to AD 14)") == LifeSpan(-63, 14)
    assert parse_life_span("poet (1340?-1400)") == LifeSpan(None, 1400)
    assert parse_life_span("poet (1150?-1220?)") is None
    assert parse_life_span("writer (born 1932)") is None
    assert parse_life_span("writer (1932-)") is None
    assert parse_life_span("philosopher (circa 551-478 BC)") is None
    assert parse_life_span("typo (1865-1823)") is None
    assert parse_life_span("too long (1618-1857)") is None
    assert parse_life_span("no years at all") is None


def test_person_name():
    assert person_name(("Shakespeare", "William Shakespeare", "Shakspere", "William Shakspere", "Bard of Avon")) == "William Shakespeare"
    assert person_name(("Montez", "Lola Montez", "Marie Dolores Eliza Rosanna Gilbert")) == "Lola Montez"
    assert person_name(("Roosevelt", "Theodore Roosevelt", "President Roosevelt", "President Theodore Roosevelt")) == "Theodore Roosevelt"
    assert person_name(("George", "George IV")) == "George IV"
    assert person_name(("Khama", "Sir Seretse Khama")) == "Sir Seretse Khama"
    assert person_name(("Aristotle",)) == "Aristotle"


def test_people_questions(wn_dir):
    passages, questions, n_people = build_wordnet(wn_dir)
    qs = _by_id(questions)

    # Shakespeare: both questions, fields as documented
    born, died = qs["wnqa-11295196-born"], qs["wnqa-11295196-died"]
    assert born == {
        "id": "wnqa-11295196-born",
        "question": "In what year was William Shakespeare born?",
        "answers": ["1564"],
        "gold_id": "wn-11295196",
        "kind": "born",
        "name": "William Shakespeare",
        "aliases": ["Shakespeare", "William Shakespeare", "Shakspere", "William Shakspere", "Bard of Avon"],
    }
    assert died["question"] == "In what year did William Shakespeare die?" and died["answers"] == ["1616"]

    # no years, "(born ...)", circa, implausible span, non-person: nothing
    for off in ("10000001", "10000002", "10000005", "10000006", "01280055", "00001740"):
        assert f"wnqa-{off}-born" not in qs and f"wnqa-{off}-died" not in qs

    # BC and cross-era spans
    assert qs["wnqa-10000003-born"]["answers"] == ["384 BC", "384 BCE"]
    assert qs["wnqa-10000003-died"]["answers"] == ["322 BC", "322 BCE"]
    assert qs["wnqa-10000008-born"]["answers"] == ["63 BC", "63 BCE"]
    assert qs["wnqa-10000008-died"]["answers"] == ["14", "AD 14"]
    # uncertain birth year: only the death question
    assert "wnqa-10000004-born" not in qs and qs["wnqa-10000004-died"]["answers"] == ["1400"]
    # en dash with spaces
    assert qs["wnqa-10000007-born"]["answers"] == ["1801"]
    # two William Pitts are renamed apart; two indistinguishable Samuel Butlers are dropped
    assert qs["wnqa-10000009-born"]["name"] == "Pitt the Elder"
    assert qs["wnqa-10000010-born"]["name"] == "Pitt the Younger"
    assert not any(k.startswith(("wnqa-10000011", "wnqa-10000012")) for k in qs)

    assert n_people == 7  # Shakespeare, Aristotle, Chaucer, Dashman, Augustus, two Pitts
    assert len(questions) == 13  # Chaucer has no born-in question
    # every question points at a passage
    ids = {p["id"] for p in passages}
    assert all(q["gold_id"] in ids for q in questions)
    assert len(questions) == len(qs)


def test_passages(wn_dir):
    passages, _, _ = build_wordnet(wn_dir)
    assert len(passages) == 15
    assert [p["id"] for p in passages] == sorted(p["id"] for p in passages)  # file was unsorted
    shak = [p for p in passages if p["id"] == "wn-11295196"][0]
    assert shak["title"] == "Shakespeare"
    assert shak["text"].startswith("Shakespeare, William Shakespeare, Shakspere, William Shakspere, Bard of Avon: English poet")
    assert passages[0] == {
        "id": "wn-00001740",
        "title": "entity",
        "text": "entity: that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
    }


def test_other_parts_of_speech(wn_dir):
    (wn_dir / "data.adj").write_text(
        HEADER + "00001740 00 a 01 able(a) 0 000 | (usually followed by `to') having the necessary means  \n",
        encoding="utf-8",
    )
    passages, _, _ = build_wordnet(wn_dir, pos=["noun", "adj"])
    assert passages[-1] == {"id": "wn-a-00001740", "title": "able", "text": "able: (usually followed by `to') having the necessary means"}
    assert len({p["id"] for p in passages}) == len(passages)  # same offset, distinct ids
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        build_wordnet(wn_dir, pos=["verb"])
    with pytest.raises(ValueError, match="part of speech"):
        build_wordnet(wn_dir, pos=["pronoun"])


def test_deterministic(wn_dir):
    assert build_wordnet(wn_dir) == build_wordnet(wn_dir)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wordnet_script(wn_dir, tmp_path, capsys):
    script = _load_script("make_wordnet_qa")
    out = tmp_path / "out"
    assert script.main(["--wordnet-dir", str(wn_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "people: 7, questions: 13" in printed and "passages: 15" in printed
    qa = read_jsonl(out / "wordnet_qa.jsonl")
    assert len(qa) == 13 and qa[0]["id"] == "wnqa-10000003-born"
    assert len(read_jsonl(out / "wordnet_passages.jsonl")) == 15
    people = read_jsonl(out / "wordnet_people.jsonl")  # the gold passages, one per person
    assert len(people) == 7 and {p["id"] for p in people} == {q["gold_id"] for q in qa}
    # JSON lines are plain UTF-8 objects
    first = (out / "wordnet_qa.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert json.loads(first)["kind"] == "born"


def test_wordnet_script_missing(tmp_path, capsys):
    script = _load_script("make_wordnet_qa")
    assert script.main(["--wordnet-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 1
    assert "apt-get install wordnet-base" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        build_wordnet(tmp_path / "nowhere")


@pytest.mark.skipif(not (REAL_WORDNET / "data.noun").is_file(), reason="WordNet (wordnet-base) not installed")
def test_real_wordnet():
    passages, questions, n_people = build_wordnet(REAL_WORDNET)
    assert n_people > 2000
    assert len(passages) > 80000
    ids = [p["id"] for p in passages]
    assert len(set(ids)) == len(ids)
    idset = set(ids)
    assert all(q["gold_id"] in idset for q in questions)
    assert len({q["id"] for q in questions}) == len(questions)
    assert len({(q["name"].lower(), q["kind"]) for q in questions}) == len(questions)  # unambiguous
    qs = _by_id(questions)
    assert qs["wnqa-11295196-born"]["answers"] == ["1564"]
    assert qs["wnqa-11295196-died"]["name"] == "William Shakespeare"
    assert all(q["answers"] and all(a for a in q["answers"]) for q in questions)


def test_real_wordnet_people_subset_matches():
    # wordnet_people_questions on an explicit synset list equals the build_wordnet output
    if not (REAL_WORDNET / "data.noun").is_file():
        pytest.skip("WordNet (wordnet-base) not installed")
    syns = list(parse_wordnet_data(REAL_WORDNET / "data.noun"))
    questions, n = wordnet_people_questions(syns)
    _, questions2, n2 = build_wordnet(REAL_WORDNET)
    assert (questions, n) == (questions2, n2)


def test_mendeleev():
    pytest.importorskip("mendeleev")
    passages, questions = build_mendeleev()
    assert len(passages) == 118
    assert [p["id"] for p in passages[:2]] == ["el-1", "el-2"]
    qs = _by_id(questions)
    assert qs["elqa-26-number"]["answers"] == ["26"]
    assert qs["elqa-26-number"]["question"] == "What is the atomic number of iron?"
    assert qs["elqa-26-number"]["gold_id"] == "el-26"
    assert qs["elqa-26-symbol"]["answers"] == ["Fe"]
    assert qs["elqa-26-name_from_symbol"]["answers"] == ["Iron"]
    assert "elqa-26-discovered" not in qs  # known since antiquity: no year
    assert qs["elqa-1-discovered"]["answers"] == ["1766"]
    assert qs["elqa-13-name_from_number"]["answers"] == ["Aluminum", "Aluminium"]
    iron = passages[25]
    assert iron["id"] == "el-26" and iron["title"] == "Iron"
    for fact in ("Iron", "Fe", "26", "55.845", "group 8", "period 4", "ancient"):
        assert fact in iron["text"]
    ids = {p["id"] for p in passages}
    assert all(q["gold_id"] in ids for q in questions)
    assert len(qs) == len(questions)
    assert build_mendeleev() == (passages, questions)  # deterministic


def test_mendeleev_script(tmp_path, capsys):
    pytest.importorskip("mendeleev")
    script = _load_script("make_mendeleev_qa")
    assert script.main(["--out", str(tmp_path)]) == 0
    assert "elements/passages: 118" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "mendeleev_passages.jsonl")) == 118
    qa = read_jsonl(tmp_path / "mendeleev_qa.jsonl")
    assert {"id", "question", "answers", "gold_id", "kind", "name"} <= set(qa[0])
