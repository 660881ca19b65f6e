"""Selective recompute of spliced chunk KV (CacheBlend): r = 1 is the text path, r = 0 plain injection,
selection by KV deviation, the start-up check, and the knob through the config."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_gemma3
from rcd.compat import cache_layers, output_cache
from rcd.control import blend
from rcd.control.inject import InjectError, KVInjection
from rcd.engine.cache import forward_padded

CHUNKS = [[5, 9, 12, 7, 3, 8], [11, 4, 6, 10, 2], [13, 3, 9, 5]]
PROMPT = [7, 8, 9, 10]


class ChunkSource:
    """A latent-datastore stand-in: each chunk's KV computed alone at positions 0..L-1 by ``model``."""

    def __init__(self, model, chunks):
        self.model, self.chunks = model, chunks

    def tokens(self, i):
        return torch.tensor(self.chunks[int(i)])

    def length(self, i):
        return len(self.chunks[int(i)])

    def kv(self, ids, dtype=None):
        parts = []
        for i in ids:
            with torch.no_grad():
                out = self.model(input_ids=self.tokens(i).view(1, -1), use_cache=True)
            parts.append(cache_layers(output_cache(out)))
        return [(torch.cat([p[layer][0] for p in parts], 2), torch.cat([p[layer][1] for p in parts], 2))
                for layer in range(len(parts[0]))]


def control(model, **kw):
    ctl = KVInjection(positions="shift", **kw)
    ctl.datastore = ChunkSource(model, CHUNKS)
    return ctl


def prompt_logits(lm, prefix):
    """Next-token log-probs of every prompt position after the injected ``prefix``."""
    cost = {"model_s": 0.0}
    with torch.no_grad():
        out, _, _ = forward_padded(lm.model, 0, lm.device, [PROMPT], cost, prefix=prefix, keep=len(PROMPT))
    return torch.log_softmax(out.logits[0].float(), -1)


def fresh_logits(lm, ids):
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]))
    return torch.log_softmax(out.logits[0, -len(PROMPT):].float(), -1)


def test_full_recompute_is_the_text_path(tiny_lm):
    """r = 1: the prompt after the blended prefix reads exactly what it reads after the chunks' text."""
    ctl = control(tiny_lm.model, recompute=1.0)
    ctl.prepare(tiny_lm, [])
    prefix = ctl.prefix(tiny_lm, [[0, 1, 2]])
    text = [t for c in CHUNKS for t in c] + PROMPT
    assert torch.allclose(prompt_logits(tiny_lm, prefix), fresh_logits(tiny_lm, text), atol=1e-4)
    plain = control(tiny_lm.model).prefix(tiny_lm, [[0, 1, 2]])  # without recompute it is not the text
    assert not torch.allclose(prompt_logits(tiny_lm, plain), fresh_logits(tiny_lm, text), atol=1e-3)


def test_no_recompute_is_plain_injection_and_partial_recompute_moves_only_selected_slots(tiny_lm):
    plain = control(tiny_lm.model).prefix(tiny_lm, [[0, 1, 2]])
    zero = control(tiny_lm.model, recompute=0.0).prefix(tiny_lm, [[0, 1, 2]])
    assert all(torch.equal(a, b) for a, b in zip(plain.keys + plain.values, zero.keys + zero.values))
    part = control(tiny_lm.model, recompute=0.2).prefix(tiny_lm, [[0, 1, 2]])
    changed = ((part.keys[-1] - plain.keys[-1]).abs().sum((0, 1, 3)) > 0).nonzero().view(-1).tolist()
    L = sum(map(len, CHUNKS))
    assert len(changed) == -(-2 * L // 10)  # ⌈0.2·L⌉ slots recomputed
    assert min(changed) >= len(CHUNKS[0])  # the first chunk's cache already is its full prefill
    # closer to the text path than plain injection at the last layer
    src = ChunkSource(tiny_lm.model, CHUNKS)
    with torch.no_grad():
        full = cache_layers(output_cache(tiny_lm.model(input_ids=torch.tensor([[t for c in CHUNKS for t in c]]),
                                                       use_cache=True)))
    err = lambda kv: float((kv.keys[-1] - full[-1][0]).abs().sum())  # noqa: E731
    assert err(part) < err(plain)
    assert src.length(0) == len(CHUNKS[0])


def test_selection_by_kv_deviation_hand_computed(tiny_lm):
    assert blend.select(torch.tensor([0.0, 3.0, 1.0, 3.0]), 0.5).tolist() == [1, 3]  # ties by position
    assert blend.select(torch.tensor([0.0, 3.0, 1.0]), 0.0).tolist() == []
    assert blend.select(torch.tensor([0.0, 3.0, 1.0]), 0.34).tolist() == [1, 2]  # ⌈0.34·3⌉ = 2
    pad = float("-inf")  # left padding of a shorter row: never selected, not counted in L
    assert blend.select(torch.tensor([pad, pad, 0.0, 3.0, 1.0, 3.0]), 0.5).tolist() == [3, 5]
    ctl = control(tiny_lm.model)
    tokens = blend.token_ids(ctl.datastore, [0, 1])
    kv = ctl.prefix(tiny_lm, [[0, 1]])
    spliced = [(k, v) for k, v in zip(kv.keys, kv.values)]
    x = tokens.view(1, -1)
    d = blend.deviation_batch(tiny_lm.model, x, kv.keys, kv.values, torch.ones_like(x), layer=1)[0]
    k_full, v_full = blend.layer_kv_batch(tiny_lm.model, x, torch.ones_like(x), 1)
    want = ((k_full - spliced[1][0]) ** 2).sum((0, 1, 3)) + ((v_full - spliced[1][1]) ** 2).sum((0, 1, 3))
    assert torch.allclose(d, want) and float(d[:len(CHUNKS[0])].max()) < 1e-8 < float(d[len(CHUNKS[0]):].min())
    with torch.no_grad():  # the stopped forward's layer-1 KV is the full forward's
        full = cache_layers(output_cache(tiny_lm.model(input_ids=tokens.view(1, -1), use_cache=True)))
    assert torch.allclose(k_full, full[1][0], atol=1e-6) and torch.allclose(v_full, full[1][1], atol=1e-6)


def test_gemma3_full_recompute_is_the_text_path():
    model, tok = tiny_gemma3()
    from conftest import as_loaded

    lm = as_loaded(model, tok, "tiny-gemma3")
    ctl = control(model, recompute=1.0)
    ctl.prepare(lm, [])
    prefix = ctl.prefix(lm, [[0, 1]])
    text = CHUNKS[0] + CHUNKS[1] + PROMPT
    assert torch.allclose(prompt_logits(lm, prefix), fresh_logits(lm, text), atol=1e-4)


def test_a_model_that_ignores_the_recompute_mask_is_refused(tiny_lm, monkeypatch):
    def wrong(model, tokens, kv, positions):
        return kv  # as if the 4D mask had been ignored: nothing matches a full prefill
    monkeypatch.setattr(blend, "recompute", wrong)
    with pytest.raises(InjectError, match="4D attention mask"):
        control(tiny_lm.model, recompute=0.5).prepare(tiny_lm, [])


def test_recompute_settings_are_checked():
    with pytest.raises(InjectError, match=r"in \[0, 1\]"):
        KVInjection(recompute=1.5)
    with pytest.raises(InjectError, match="positions=shift"):
        KVInjection(positions="independent", recompute=0.1)


def test_recompute_knob_from_the_cli_changes_the_run(tmp_path):
    """strategy.control.recompute reaches the control: a refused value stops the run at start-up."""
    from conftest import tiny_run_files
    from rcd.errors import RcdError
    from rcd.paper.experiments import compose
    from rcd.run import execute

    files = tiny_run_files(tmp_path)
    common = ["+strategy=cacheblend", "datastore.retriever=dense", "datastore.chunking=sentence",
              "datastore.chunk_size=8", "datastore.overlap=0", "strategy/schedule=every_n", "strategy.schedule.n=4",
              "strategy.retrieval.k=2", "task.generate=false", f"runs_root={tmp_path / 'runs'}"] + files["lm"] + [
              "task.window=256", "task.stride=128"]
    with pytest.raises(RcdError, match="recompute"):
        execute(compose(common + ["strategy.control.recompute=2"]))
    plain = execute(compose(common + ["strategy.control.recompute=0"]))
    full = execute(compose(common + ["strategy.control.recompute=1"]))
    assert plain["metrics"]["perplexity"]["perplexity"] != full["metrics"]["perplexity"]["perplexity"]


def test_batched_recompute_equals_each_row_alone(tiny_lm):
    """Rows of different prefix lengths blend in one selection and one recompute forward, as if alone."""
    ctl = control(tiny_lm.model, recompute=0.3)
    both = ctl.prefix(tiny_lm, [[0, 1, 2], [2, 1], [0]])
    for r, ids in enumerate([[0, 1, 2], [2, 1], [0]]):
        alone = ctl.prefix(tiny_lm, [ids])
        n = int(alone.mask.sum())
        for a, b in zip(both.keys + both.values, alone.keys + alone.values):
            assert torch.allclose(a[r, :, -n:], b[0, :, -n:], atol=1e-5)
        assert int(both.mask[r].sum()) == n and int(both.next_pos[r]) == int(alone.next_pos[0])
