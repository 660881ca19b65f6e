"""Tests of the "when" axis (rcd.schedule) against hand-worked firing patterns."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from rcd.schedule import SCHEDULES, Adaptive, EveryN, EveryToken, Once, Schedule, Sentence, decode_vocab

CONF = Path(__file__).resolve().parents[1] / "conf" / "strategy" / "schedule"


class FakeTok:
    """Minimal HF-like tokenizer: len() and decode(list[int])."""

    vocab = ["hello", " world", ".", " yes!", "\n", " why?", "3.  ", "\n\nx", '?"', " no"]

    def __len__(self) -> int:
        return len(self.vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


class TokensOnlyTok:
    """Tokenizer exposing only convert_ids_to_tokens."""

    vocab = FakeTok.vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]


# ends-of-sentence per id of FakeTok (newline=True), worked by hand:
# "hello" F, " world" F, "." T, " yes!" T, "\n" T, " why?" T, "3.  " T (rstrip -> "3."),
# "\n\nx" T (contains \n), '?"' F (ends with a quote), " no" F
ENDS = [False, False, True, True, True, True, True, True, False, False]
# newline=False: "\n" -> "" F and "\n\nx" -> ends with x F
ENDS_NO_NL = [False, False, True, True, False, True, True, False, False, False]

# scripted stream, B=2 rows, T=8 steps
TOKENS = torch.tensor([[0, 1, 2, 0, 3, 9, 4, 1], [9, 2, 2, 8, 5, 0, 6, 1]])
# Max probs per step (V = 4, p = [m, (1-m)/3, (1-m)/3, (1-m)/3]).
MAXP = torch.tensor([[0.9, 0.3, 0.5, 0.35, 0.95, 0.39, 0.41, 0.25], [0.3, 0.8, 0.26, 0.6, 0.4, 0.7, 0.33, 0.99]])


def probs_with_max(m: torch.Tensor, vocab: int = 4) -> torch.Tensor:
    rest = ((1 - m) / (vocab - 1)).unsqueeze(-1).expand(*m.shape, vocab - 1)
    return torch.cat([m.unsqueeze(-1), rest], dim=-1)


PROBS = probs_with_max(MAXP)  # [2, 8, 4]

T_, F_ = True, False
EXPECTED = {
    "once": [[T_, F_, F_, F_, F_, F_, F_, F_]] * 2,
    "every_n": [[T_, F_, F_, T_, F_, F_, T_, F_]] * 2,  # n = 3: steps 0, 3, 6
    "every_token": [[T_] * 8] * 2,
    # step 0 fires; step t fires iff TOKENS[:, t] ends a sentence
    "sentence": [[T_, F_, T_, F_, T_, F_, T_, F_], [T_, T_, T_, F_, T_, F_, T_, F_]],
    # max prob < 0.4 (0.4 itself does not fire), step 0 forced
    "adaptive": [[T_, T_, F_, T_, F_, T_, F_, T_], [T_, F_, T_, F_, F_, F_, T_, F_]],
}


def make(name: str) -> Schedule:
    return {
        "once": lambda: Once(),
        "every_n": lambda: EveryN(3),
        "every_token": lambda: EveryToken(),
        "sentence": lambda: Sentence().bind(FakeTok()),
        "adaptive": lambda: Adaptive(0.4),
    }[name]()


def step_by_step(s: Schedule, probs, tokens) -> torch.Tensor:
    b, t = tokens.shape
    s.reset(b)
    cols = []
    for step in range(t):
        p = probs[:, step] if (probs is not None and s.needs_probs) else None
        last = tokens[:, step] if step > 0 else None
        cols.append(s.should_fire(step, p, last))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_scripted_firing_pattern_and_rate(name):
    s = make(name)
    got = step_by_step(s, PROBS, TOKENS)
    want = torch.tensor(EXPECTED[name])
    assert got.dtype == torch.bool
    assert torch.equal(got, want)
    assert s.asked == 16
    assert s.fired == int(want.sum())
    assert s.retrieval_rate == pytest.approx(int(want.sum()) / 16)
    st = s.stats()
    assert st["schedule"] == name and st["asked"] == 16 and st["retrieval_rate"] == s.retrieval_rate


def test_hand_rates():
    rates = {}
    for name in EXPECTED:
        s = make(name)
        step_by_step(s, PROBS, TOKENS)
        rates[name] = s.retrieval_rate
    assert rates == {
        "once": 2 / 16,
        "every_n": 6 / 16,
        "every_token": 1.0,
        "sentence": 9 / 16,
        "adaptive": 8 / 16,
    }


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fire_mask_equals_should_fire_scripted(name):
    a, b = make(name), make(name)
    assert torch.equal(b.fire_mask(PROBS if b.needs_probs else None, TOKENS), step_by_step(a, PROBS, TOKENS))
    assert (a.asked, a.fired) == (b.asked, b.fired)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Once(),
        lambda: EveryN(1),
        lambda: EveryN(5),
        lambda: EveryToken(),
        lambda: Sentence().bind(FakeTok()),
        lambda: Sentence(boundary="!", newline=False).bind(FakeTok()),
        lambda: Sentence(min_tokens=3).bind(FakeTok()),
        lambda: Adaptive(0.3),
        lambda: Adaptive(0.3, fire_at_start=False),
        lambda: Adaptive(1.2, mode="entropy"),
        lambda: Adaptive(1.2, mode="entropy", fire_at_start=False),
    ],
)
def test_fire_mask_equals_should_fire_random(factory):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(FakeTok()), (3, 40), generator=g)
    probs = torch.softmax(2 * torch.randn(3, 40, 10, generator=g), dim=-1)
    a, b = factory(), factory()
    assert torch.equal(b.fire_mask(probs, tokens), step_by_step(a, probs, tokens))
    assert (a.asked, a.fired) == (b.asked, b.fired)


def test_fire_mask_valid_positions_not_counted():
    s = EveryToken()
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    m = s.fire_mask(None, torch.zeros(2, 4, dtype=torch.long), valid=valid)
    assert torch.equal(m, valid)
    assert (s.asked, s.fired) == (5, 5)


def test_sentence_min_tokens_skips_boundaries_too_soon_after_the_last_firing():
    # tokens: "." ends a sentence (id 2), "hello" (0) does not; x_{t-1} = tokens[t]
    seq = torch.tensor([[0, 2, 2, 0, 2, 0, 0, 2, 2, 2]])
    every = Sentence().bind(FakeTok()).fire_mask(None, seq)[0].tolist()
    assert [t for t, f in enumerate(every) if f] == [0, 1, 2, 4, 7, 8, 9]
    # min_tokens=3: fire at t only if t - (last firing) >= 3: 0, then 4 (1, 2 too soon), 7, then not 8, 9
    s = Sentence(min_tokens=3).bind(FakeTok())
    assert [t for t, f in enumerate(s.fire_mask(None, seq)[0].tolist()) if f] == [0, 4, 7]
    s.reset(1)  # per call: a new batch starts from its own step 0
    got = [bool(s.should_fire(t, None, seq[:, t] if t else None)[0]) for t in range(seq.shape[1])]
    assert [t for t, f in enumerate(got) if f] == [0, 4, 7]
    with pytest.raises(ValueError, match="min_tokens"):
        Sentence(min_tokens=-1)


def test_sentence_table_and_tokenizer_variants():
    assert Sentence().bind(FakeTok()).ends_sentence.tolist() == ENDS
    assert Sentence(newline=False).bind(FakeTok()).ends_sentence.tolist() == ENDS_NO_NL
    assert Sentence().bind(TokensOnlyTok()).ends_sentence.tolist() == ENDS
    assert decode_vocab(FakeTok()) == FakeTok.vocab
    s = Sentence(newline=False).bind(FakeTok())
    # ids outside the tokenizer (padded model vocab) never end a sentence
    assert s.ends(torch.tensor([2, 10, 57, -1])).tolist() == [True, False, False, False]


def test_sentence_with_hf_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, ".": 2, "world": 3, "!": 4, "why": 5, "?": 6}
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    s = Sentence().bind(hf)
    assert s.ends_sentence.tolist() == [False, False, True, False, True, False, True]
    ids = torch.tensor([hf.encode("hello world . why ?")])
    # position t reads tokens[:, t] as the last emitted token: fire at 0, and at 2 ("." read,
    # predicting "why") and 4 ("?" read)
    assert s.fire_mask(None, ids).tolist() == [[True, False, True, False, True]]


def test_sentence_unbound_raises():
    s = Sentence()
    s.reset(2)
    with pytest.raises(RuntimeError, match="bind"):
        s.should_fire(0, None, None)
    with pytest.raises(RuntimeError, match="bind"):
        s.fire_mask(None, TOKENS)


def test_validation_errors():
    with pytest.raises(ValueError, match="n .*>= 1"):
        EveryN(0)
    with pytest.raises(ValueError, match="integer"):
        EveryN(2.5)
    with pytest.raises(ValueError, match="mode"):
        Adaptive(0.4, mode="margin")
    with pytest.raises(ValueError, match="probability"):
        Adaptive(1.5)
    with pytest.raises(ValueError, match="target_rate"):
        Adaptive(None)
    s = Once()
    with pytest.raises(RuntimeError, match="reset"):
        s.should_fire(0, None, None)
    a = Adaptive(0.4, fire_at_start=False)
    a.reset(1)
    with pytest.raises(ValueError, match="probs"):
        a.should_fire(0, None, None)
    with pytest.raises(ValueError, match="probs"):
        Adaptive(0.4).fire_mask(None, TOKENS)


def test_step0_without_tensors_uses_reset_batch():
    s = Once()
    s.reset(3)
    assert s.should_fire(0, None, None).tolist() == [True, True, True]
    assert s.should_fire(1, None, torch.tensor([1, 2, 3])).tolist() == [False, False, False]
    assert s.retrieval_rate == 0.5
    assert Once().retrieval_rate == 0.0
    s.reset_stats()
    assert (s.asked, s.fired, s.retrieval_rate) == (0, 0, 0.0)


def test_adaptive_entropy_hand_values():
    # uniform over 4: H = ln 4 = 1.386; half/half: ln 2 = 0.693; one-hot: 0
    uni = torch.full((4,), 0.25)
    half = torch.tensor([0.5, 0.5, 0.0, 0.0])
    one = torch.tensor([0.0, 1.0, 0.0, 0.0])
    probs = torch.stack([torch.stack([uni, half, one, uni]), torch.stack([one, one, half, uni])])  # [2, 4, 4]
    a = Adaptive(1.0, mode="entropy", fire_at_start=False)
    conf = a.confidence(probs)
    assert torch.allclose(conf, torch.tensor([[math.log(4), math.log(2), 0, math.log(4)], [0, 0, math.log(2), math.log(4)]]))
    assert a.fire_mask(probs, torch.zeros(2, 4, dtype=torch.long)).tolist() == [
        [True, False, False, True],
        [False, False, False, True],
    ]
    a2 = Adaptive(0.5, mode="entropy")  # ln 2 > 0.5 fires too; step 0 forced
    assert a2.fire_mask(probs, torch.zeros(2, 4, dtype=torch.long)).tolist() == [
        [True, True, False, True],
        [True, False, True, True],
    ]
    assert torch.equal(Adaptive(0.4).confidence(PROBS), MAXP)


def test_adaptive_check_rate_warns_on_degenerate_rate():
    never = Adaptive(0.0, fire_at_start=False)
    never.fire_mask(PROBS, TOKENS)  # 16 asked: too few to judge
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert never.check_rate() is True
    never.fire_mask(PROBS, TOKENS)  # 32 asked, 0 fired
    with pytest.warns(RuntimeWarning, match="fired 0 of 32"):
        assert never.check_rate() is False
    always = Adaptive(1.0)
    always.fire_mask(PROBS, TOKENS)
    always.fire_mask(PROBS, TOKENS)
    with pytest.warns(RuntimeWarning, match="fired 32 of 32"):
        assert always.check_rate() is False
    with pytest.warns(RuntimeWarning, match="degenerate"):
        assert always.log_stats()["retrieval_rate"] == 1.0  # logging the rate also checks it
    healthy = Adaptive(0.4)
    healthy.fire_mask(PROBS, TOKENS)
    healthy.fire_mask(PROBS, TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert healthy.check_rate() is True


def beta_stream(n: int = 1000, vocab: int = 10) -> torch.Tensor:
    with torch.random.fork_rng():  # fixed seed without disturbing the global RNG
        torch.manual_seed(1234)
        x = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(5.0)).sample((n,))
    return 1.0 / vocab + (1.0 - 1.0 / vocab) * x  # max prob of a V=10 distribution lies in [1/V, 1]


def test_calibrate_max_prob_hits_target_rate():
    conf = beta_stream()
    a = Adaptive(0.4, fire_at_start=False)
    theta = a.calibrate(conf, 0.3)
    assert a.threshold == theta and a.target_rate == 0.3
    assert 0.25 <= float((conf < theta).float().mean()) <= 0.35
    # re-run the stream through should_fire, one step per confidence, with the calibrated θ
    probs = probs_with_max(conf, vocab=10)  # [1000, 10], max of each row == conf
    assert torch.equal(a.confidence(probs), conf)
    a.reset(1)
    for step in range(conf.numel()):
        a.should_fire(step, probs[step : step + 1], torch.zeros(1, dtype=torch.long) if step else None)
    assert a.asked == 1000
    assert 0.25 <= a.retrieval_rate <= 0.35
    assert a.retrieval_rate == pytest.approx(0.3, abs=1e-3)  # exact up to ties
    # and the vectorised form agrees
    b = Adaptive(theta, fire_at_start=False)
    b.fire_mask(probs.unsqueeze(0), torch.zeros(1, 1000, dtype=torch.long))
    assert b.fired == a.fired


def test_calibrate_entropy_and_constructor_target():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(3 * torch.randn(1000, 16, generator=g), dim=-1)
    a = Adaptive(None, mode="entropy", target_rate=0.3, fire_at_start=False)
    theta = a.calibrate(a.confidence(probs))  # target from the constructor
    assert theta > 0
    a.reset(1000)
    fire = a.should_fire(1, probs, torch.zeros(1000, dtype=torch.long))
    assert 0.25 <= float(fire.float().mean()) <= 0.35
    assert a.retrieval_rate == pytest.approx(0.3, abs=1e-3)


def test_calibrate_edge_rates():
    conf = beta_stream()
    a = Adaptive(0.4, fire_at_start=False)
    a.calibrate(conf, 1.0)
    assert bool(a.fires_on(conf).all())
    a.calibrate(conf, 0.0)
    assert not bool(a.fires_on(conf).any())
    e = Adaptive(1.0, mode="entropy")
    e.calibrate(conf, 1.0)
    assert bool(e.fires_on(conf).all())
    e.calibrate(conf, 0.0)
    assert not bool(e.fires_on(conf).any())
    with pytest.raises(ValueError, match="target_rate"):
        Adaptive(0.4).calibrate(conf)


def test_registry_and_hydra_configs():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    assert SCHEDULES == {
        "once": Once,
        "every_n": EveryN,
        "sentence": Sentence,
        "adaptive": Adaptive,
        "every_token": EveryToken,
    }
    for name, cls in SCHEDULES.items():
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg._target_ == f"rcd.schedule.{cls.__name__}"
        obj = instantiate(cfg)
        assert type(obj) is cls and obj.name == name
    assert instantiate(OmegaConf.load(CONF / "every_n.yaml")).n == 16
    ad = instantiate(OmegaConf.load(CONF / "adaptive.yaml"))
    assert (ad.threshold, ad.mode, ad.target_rate, ad.fire_at_start) == (0.4, "max_prob", None, True)
    se = instantiate(OmegaConf.load(CONF / "sentence.yaml"))
    assert (se.boundary, se.newline) == (".!?", True)


def test_hydra_group_selection():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF.parents[1]), version_base=None):
        cfg = compose(overrides=["+strategy/schedule=every_n", "strategy.schedule.n=4"])
    s = instantiate(cfg.strategy.schedule)
    assert isinstance(s, EveryN) and s.n == 4


def test_log_stats(caplog):
    s = EveryN(2)
    s.reset(1)
    for t in range(4):
        s.should_fire(t, None, None)
    with caplog.at_level("INFO"):
        st = s.log_stats()
    assert st == {"schedule": "every_n", "asked": 4, "fired": 2, "retrieval_rate": 0.5, "n": 2}
    assert "retrieval rate 0.5000" in caplog.text
    assert repr(s) == "EveryN(n=2)"
