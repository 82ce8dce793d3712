"""A learnable toy for the preference-learning tests, plus the shared pieces' own tests.

The toy: a word-level tokenizer and a tiny random Llama saved in HF format (the "SFT policy"),
and preference pairs where the better response has more "good" words than "bad" words.
Other test files import `make_toy_model`, `toy_pairs`, `toy_prompts` from here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from prefgym.data.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt
from prefgym.errors import ConfigError, DataError
from prefgym.methods import common

SUBJECTS = ["cats", "dogs", "rain", "tea", "books", "music", "trains", "snow"]
WORDS = ["good", "bad", "fine", "ok", "the", "is", "very"]


def make_toy_model(out_dir: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random Llama + word-level tokenizer (eos, pad, unk, bos) under out_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = " ".join([PROMPT_NO_INPUT, PROMPT_WITH_INPUT, "Say something about", *SUBJECTS, *WORDS])
    words = sorted(set(pre_tokenizers.Whitespace().pre_tokenize_str(text)[i][0]
                       for i in range(len(pre_tokenizers.Whitespace().pre_tokenize_str(text)))))
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def toy_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"Say something about {rng.choice(SUBJECTS)}", "input": ""} for _ in range(n)]


def toy_response(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))


def toy_quality(text: str) -> int:
    return text.split().count("good") - text.split().count("bad")


def toy_pairs(n: int, seed: int = 0, ties: bool = False) -> list[dict]:
    """Pairs with preference 1/2 by toy_quality (1.5 on equal quality when `ties`, else skipped)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p = toy_prompts(1, seed=rng.randint(0, 10**9))[0]
        o1, o2 = toy_response(rng), toy_response(rng)
        q1, q2 = toy_quality(o1), toy_quality(o2)
        if q1 == q2 and not ties:
            continue
        pref = 1.5 if q1 == q2 else (1 if q1 > q2 else 2)
        out.append({**p, "output_1": o1, "output_2": o2, "preference": pref})
    return out


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    return make_toy_model(tmp_path_factory.mktemp("toy") / "sft")


# ------------------------------------------------------------------------------- common.py tests


def test_tokenize_prompt_response_masks(toy_model):
    tok = common.load_tokenizer(toy_model)
    batch = common.tokenize_prompt_response(tok, ["Say something about cats", "Say"], ["good good", "bad"], 64)
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    assert ids.shape == att.shape == resp.shape
    good = tok.convert_tokens_to_ids("good")
    # row 0: response is 'good good </s>' right after the prompt, then nothing
    r0 = ids[0][resp[0].bool()].tolist()
    assert r0 == [good, good, tok.eos_token_id]
    assert att[1].sum() < att[0].sum() and ids[1, att[1].sum():].eq(tok.pad_token_id).all()
    # truncation keeps the response's start and at least one response token
    short = common.tokenize_prompt_response(tok, ["Say something about cats"], ["good bad good"], 3)
    assert short["input_ids"].shape[1] == 3 and short["response_mask"][0].tolist() == [0, 1, 1]


def test_token_logprobs_match_manual_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    T = 0.7
    got = common.token_logprobs(logits, ids, temperature=T)
    for b in range(2):
        assert got[b, 0] == 0
        for t in range(1, 5):
            p = torch.softmax(logits[b, t - 1] / T, -1)[ids[b, t]]
            assert torch.isclose(got[b, t], p.log(), atol=1e-6)
    ent = common.token_entropy(logits, T)
    p = torch.softmax(logits[1, 2] / T, -1)
    assert torch.isclose(ent[1, 3], -(p * p.log()).sum(), atol=1e-6)


def test_response_logprobs_with_response_mask_skips_only_prompt_positions(toy_model):
    from transformers import AutoModelForCausalLM

    tok = common.load_tokenizer(toy_model)
    model = AutoModelForCausalLM.from_pretrained(toy_model)
    batch = common.tokenize_prompt_response(tok, ["Say something about cats", "Say something about cats and dogs"],
                                            ["good good", "bad is ok"], 64)
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        full = common.response_logprobs(model, ids, att, temperature=0.8)
        fast = common.response_logprobs(model, ids, att, temperature=0.8, response_mask=resp)
    torch.testing.assert_close(fast[resp.bool()], full[resp.bool()], atol=1e-5, rtol=0)
    # both prompts have >= 4 tokens: the LM head skipped positions 0..2 (columns 1..3 of the result)
    assert torch.all(fast[:, :4] == 0) and torch.all(full[:, 1:4] != 0)


def test_masked_whiten_equals_numpy_on_masked_entries():
    import numpy as np

    torch.manual_seed(1)
    x = torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    x_nan = x.clone()
    x_nan[0, 4] = float("nan")  # masked-out NaN must not leak
    w = common.masked_whiten(x_nan, mask)
    vals = x[mask.bool()].numpy()
    expect = (vals - vals.mean()) / vals.std(ddof=1)
    np.testing.assert_allclose(w[mask.bool()].numpy(), expect, atol=1e-5)
    assert torch.all(w[~mask.bool()] == 0)
    w2 = common.masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(w2[mask.bool()].numpy(), expect + vals.mean(), atol=1e-5)
    assert torch.isclose(common.masked_mean(x, mask), torch.tensor(vals.mean()), atol=1e-6)


def test_truncate_after_eos():
    ids = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8], [2, 4, 2, 4]])
    out, mask, has_eos = common.truncate_after_eos(ids, eos_token_id=2, pad_token_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_seeded_sampling_is_per_row_and_matches_distribution(toy_model):
    from transformers import AutoModelForCausalLM

    tok = common.load_tokenizer(toy_model)
    model = AutoModelForCausalLM.from_pretrained(toy_model)
    prompts = [format_prompt(p["instruction"]) for p in toy_prompts(3, seed=4)]
    _, _, both = common.sample_responses(model, tok, prompts, seeds=[11, 12, 13], temperature=1.0,
                                         max_new_tokens=6, max_prompt_length=64)
    _, _, alone = common.sample_responses(model, tok, prompts[1:2], seeds=[12], temperature=1.0,
                                          max_new_tokens=6, max_prompt_length=64)
    n = alone.shape[1]
    assert both[1, :n].tolist() == alone[0].tolist()  # batch composition does not change a sample
    # one-step samples follow softmax(logits / T): chi-square-free check on the most likely token
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    counts = torch.zeros(3)
    for s in range(3000):
        counts[common.SeededSampler([s], 0.5)(None, logits).argmax()] += 1
    expect = torch.softmax(logits[0] / 0.5, -1) * 3000
    assert torch.all((counts - expect).abs() < 4 * expect.sqrt() + 5)


def test_load_config_rejects_unknown_key_and_bad_type(tmp_path):
    from prefgym.methods.reward_model import RewardModelConfig

    (tmp_path / "c.yaml").write_text("lr: 3e-4\nepochs: 2\n")
    cfg = common.load_config(RewardModelConfig, tmp_path / "c.yaml", {"seed": 5})
    assert cfg.lr == 3e-4 and cfg.epochs == 2 and cfg.seed == 5
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        common.load_config(RewardModelConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="epochs"):
        common.load_config(RewardModelConfig, None, {"epochs": "many"})
    cfg = common.load_config(RewardModelConfig, None, common.parse_overrides(["use_lora=true", "lr=1e-3"]))
    assert cfg.use_lora is True and cfg.lr == 1e-3


def test_preference_target():
    assert common.preference_target(1) == 1.0 and common.preference_target(2) == 0.0
    assert common.preference_target(1.5) == 0.5 and common.preference_target(0) == 0.5
    with pytest.raises(DataError, match="preference"):
        common.preference_target("x", row=3)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and the machine is shared); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_set_key_null_sets_none_and_unset_options_do_not():
    from prefgym.methods.best_of_n import BestOfNConfig

    assert BestOfNConfig().missing_eos_penalty == -1.0
    for text in ("missing_eos_penalty=null", "missing_eos_penalty=~", "missing-eos-penalty=Null"):
        cfg = common.load_config(BestOfNConfig, None, common.set_then_flags([text], {"n": None}))
        assert cfg.missing_eos_penalty is None and cfg.n == BestOfNConfig().n, text
    # an option left unset (None) neither clears the field nor cancels a --set of the same key
    cfg = common.load_config(BestOfNConfig, None, common.set_then_flags(["n=3"], {"n": None, "missing_eos_penalty": None}))
    assert cfg.n == 3 and cfg.missing_eos_penalty == -1.0
    with pytest.raises(ConfigError, match="'n' should be"):  # a field that cannot be None says so
        common.load_config(BestOfNConfig, None, common.parse_overrides(["n=null"]))


def test_run_config_stage_null_sets_none(tmp_path):
    from prefgym.methods.best_of_n import BestOfNConfig
    from prefgym.pipeline import Pipeline, load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("scale: tiny\nstages:\n  best_of_n: {missing_eos_penalty: null, n: 3}\n")
    pipe = Pipeline(load_run_config(path, out_dir=str(tmp_path / "out")))
    cfg = pipe.make_config(BestOfNConfig, "best_of_n")
    assert cfg.missing_eos_penalty is None and cfg.n == 3
    path.write_text("scale: tiny\nstages:\n  best_of_n: {n: null}\n")
    with pytest.raises(ConfigError, match="stages.best_of_n: key 'n'"):
        Pipeline(load_run_config(path, out_dir=str(tmp_path / "out"))).make_config(BestOfNConfig, "best_of_n")
