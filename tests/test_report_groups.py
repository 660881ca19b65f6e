"""Experiment specs: per-group row overrides and rows limited to some groups."""
from rcd.paper.experiments import entries

SPEC = {
    "name": "t2", "scales": {"small": ["task.n=4"]},
    "groups": [{"key": "wordnet", "overrides": ["task=qa_wordnet"]}, {"key": "mendeleev", "overrides": ["task=qa_mendeleev"]}],
    "rows": [
        {"key": "once", "overrides": ["+strategy=once"]},
        {"key": "latent_kv", "overrides": ["+strategy=latent_kv"],
         "group_overrides": {"wordnet": {"small": ["corpus=wordnet_people", "datastore.max_chunks=null"]}}},
        {"key": "once_people", "overrides": ["+strategy=once", "corpus=wordnet_people"], "only_groups": ["wordnet"]},
    ],
}


def test_group_overrides_and_only_groups():
    got = {(e.group, e.key): e.overrides for e in entries(SPEC, "small")}
    assert list(got) == [("wordnet", "once"), ("wordnet", "latent_kv"), ("wordnet", "once_people"),
                         ("mendeleev", "once"), ("mendeleev", "latent_kv")]
    assert got[("wordnet", "latent_kv")] == ["task.n=4", "task=qa_wordnet", "+strategy=latent_kv",
                                             "corpus=wordnet_people", "datastore.max_chunks=null"]
    assert got[("mendeleev", "latent_kv")] == ["task.n=4", "task=qa_mendeleev", "+strategy=latent_kv"]
    assert got[("wordnet", "once_people")][-1] == "corpus=wordnet_people"
