"""rcd from a script: the embedded model, the token datastore `rcd.run +strategy=per_token` builds (found again by
its fingerprint, not rebuilt), kNN-LM inside your own `model.generate`, and the same strategy through rcd's Engine
(generation and perplexity).

    .venv/bin/python examples/api/knn_script.py                  # the defaults of rcd.run (100k entries)
    .venv/bin/python examples/api/knn_script.py --max-tokens 5000
"""
import argparse

import torch
from transformers import LogitsProcessorList

from rcd.control import KNNInterpolation
from rcd.corpus import shakespeare
from rcd.datastore.tokens import build_or_load
from rcd.engine import Engine
from rcd.models import load_model
from rcd.schedule import EveryToken, scheduled
from rcd.strategy import Strategy

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=100000, help="datastore entries (rcd.run's datastore.max_tokens)")
    ap.add_argument("--root", default=None, help="datastore folder (rcd.run's datastore_root; default $RCD_CACHE/datastores)")
    args = ap.parse_args()

    # 1. the model rcd.run loads for model=smollm2 (a LoadedModel: .model, .tokenizer, .fingerprint)
    lm = load_model("smollm2", "cpu", "float32")
    # 2. the datastore of `rcd.run +strategy=per_token datastore.max_tokens=N`: the same corpus, model and parameters
    #    give the same fingerprint, so the folder rcd.run built is loaded, not rebuilt
    corpus = shakespeare(exclude=["macbeth"])
    store = build_or_load(lm, corpus, "shakespeare", args.root, max_tokens=args.max_tokens, progress=False)
    print("datastore:", store.describe()["folder"], f"({len(store):,} entries)")

    # 3. kNN-LM as a transformers LogitsProcessor in your own generate (its hook captures the query hidden states)
    knn = KNNInterpolation(k=64, lmbda=0.25).bind(datastore=store)
    enc = lm.tokenizer(["Fair is foul, and foul is fair:"], return_tensors="pt")
    with torch.no_grad(), knn.attached(lm.model):
        out = lm.model.generate(**enc, logits_processor=LogitsProcessorList([scheduled(knn, EveryToken())]),
                                max_new_tokens=16, do_sample=False)
    mine = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print("model.generate + kNN-LM:", repr(mine))

    # 4. the same strategy through rcd's Engine: generation and perplexity of a text
    engine = Engine(lm, Strategy("per_token", datastore=store, control=KNNInterpolation(k=64, lmbda=0.25),
                                 schedule=EveryToken()), max_new_tokens=16)
    text = engine.generate(["Fair is foul, and foul is fair:"]).texts[0]
    print("Engine.generate:", repr(text))
    ids = lm.tokenizer("When shall we three meet again, in thunder, lightning, or in rain?",
                       return_tensors="pt")["input_ids"][0]
    res = engine.score(ids, window=64, stride=32)
    print(f"perplexity: {res.ppl(res.nll_none):.2f} plain, {res.ppl(res.nll):.2f} with kNN-LM")
    print("same text:", mine == text)
