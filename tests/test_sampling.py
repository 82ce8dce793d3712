"""Sampling follows prefgym's settings alone, never the model folder's generation_config.json.

The toy model folder here ships a generation_config.json that would bend the distribution
(repetition_penalty=2.0, no_repeat_ngram_size=2, top_k=3, as real models ship such files).
Training rollouts (`common.sample_responses`) must draw each token from exactly
softmax(logits / T), the distribution `token_logprobs` scores; evaluation decoding
(`generation.generate`) must give the same samples as from a folder without the file.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager

import pytest
import torch

from prefgym.errors import ConfigError
from prefgym.methods import common
from prefgym.models import generation
from prefgym.models.generation import SamplingConfig
from test_prefdata_toy import make_toy_model, one_torch_thread, toy_prompts  # noqa: F401 (autouse fixture)

FOLDER_SETTINGS = {"do_sample": True, "repetition_penalty": 2.0, "no_repeat_ngram_size": 2, "top_k": 3,
                   "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(plain folder, the same weights with a distribution-changing generation_config.json)."""
    root = tmp_path_factory.mktemp("sampling")
    plain = make_toy_model(root / "plain", seed=3)
    (plain / "generation_config.json").unlink(missing_ok=True)
    shipped = root / "shipped"
    shutil.copytree(plain, shipped)
    (shipped / "generation_config.json").write_text(json.dumps(FOLDER_SETTINGS))
    return plain, shipped


def load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, common.load_tokenizer(path)


def prompts(n=6):
    from prefgym.data.prompts import format_record

    return [format_record(p) for p in toy_prompts(n, seed=2)]


def sample_and_record(model, tokenizer, monkeypatch, temperature):
    """Sample with the PPO sampler; return its inputs (the scores generate handed over) per step."""
    seen = []
    real_call = common.SeededSampler.__call__

    def spy(self, input_ids, scores):
        seen.append(scores.detach().float().clone())
        return real_call(self, input_ids, scores)

    monkeypatch.setattr(common.SeededSampler, "__call__", spy)
    batch = prompts()
    q, qm, r = common.sample_responses(model, tokenizer, batch, seeds=list(range(len(batch))),
                                       temperature=temperature, max_new_tokens=12, max_prompt_length=64)
    return q, qm, r, seen


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_tokens_come_from_softmax_of_logits_over_t(folders, monkeypatch, temperature):
    """At every step, the distribution the sampler draws from equals log_softmax(logits / T) recomputed
    from the policy on the finished sequence, so the sampled tokens' log-probs are `token_logprobs`."""
    _, shipped = folders
    model, tokenizer = load(shipped)
    assert model.generation_config.repetition_penalty == 2.0  # the folder's settings are loaded ...
    q, qm, r, seen = sample_and_record(model, tokenizer, monkeypatch, temperature)
    assert model.generation_config.repetition_penalty == 2.0  # ... and left in place afterwards
    r, r_mask, _ = common.truncate_after_eos(r, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids, mask = torch.cat([q, r], 1), torch.cat([qm, r_mask], 1)
    P, R = q.shape[1], r.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=common.position_ids_from(mask)).logits
    logps = common.token_logprobs(logits, ids, temperature)[:, P:]
    assert len(seen) >= R
    for j in range(R):
        rows = r_mask[:, j].bool()
        expected = torch.log_softmax(logits[rows, P - 1 + j] / temperature, -1)
        drawn_from = torch.log_softmax(seen[j][rows] / temperature, -1)
        torch.testing.assert_close(drawn_from, expected, atol=1e-4, rtol=0)
        chosen = drawn_from.gather(1, r[rows, j:j + 1]).squeeze(1)
        torch.testing.assert_close(chosen, logps[rows, j], atol=1e-4, rtol=0)


def test_rollouts_ignore_the_folder_generation_config(folders):
    """Same weights, with and without the folder's generation_config.json: the same rollouts."""
    plain, shipped = folders
    outs = []
    for folder in (plain, shipped):
        model, tokenizer = load(folder)
        outs.append(common.sample_responses(model, tokenizer, prompts(), seeds=[7] * 6, temperature=1.0,
                                            max_new_tokens=12, max_prompt_length=64)[2])
    assert torch.equal(outs[0], outs[1])


def test_rollout_sampler_refuses_altered_logits(folders, monkeypatch):
    """If something still altered the logits (here: the folder's settings let through), sampling stops."""
    _, shipped = folders
    model, tokenizer = load(shipped)

    @contextmanager
    def let_through(m):
        yield m.generation_config

    monkeypatch.setattr(generation, "folder_generation_defaults_ignored", let_through)
    with pytest.raises(ConfigError, match="altered the model's logits"):
        common.sample_responses(model, tokenizer, prompts(), seeds=list(range(6)), temperature=1.0,
                                max_new_tokens=12, max_prompt_length=64)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_eval_decoding_is_stated_by_sampling_config_not_the_folder(folders, caplog, temperature):
    plain, shipped = folders
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=10, num_samples=2, batch_size=3, seed=4)
    (m1, t1), (m2, t2) = load(plain), load(shipped)
    with caplog.at_level(logging.WARNING, logger="prefgym.models.generation"):
        a = generation.generate(m1, t1, prompts(), cfg)
        b = generation.generate(m2, t2, prompts(), cfg)
    assert a == b
    assert "repetition_penalty=2.0" in caplog.text and "no_repeat_ngram_size=2" in caplog.text
    # an explicit setting in the config is used
    c = generation.generate(m1, t1, prompts(), SamplingConfig(**{**cfg.__dict__, "repetition_penalty": 3.0}))
    assert c != a


def test_sampling_config_values_out_of_range_are_rejected(folders):
    plain, _ = folders
    model, tokenizer = load(plain)
    for bad in ({"top_k": -1}, {"top_p": 0.0}, {"repetition_penalty": 0.0}, {"temperature": -0.1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            generation.generate(model, tokenizer, prompts(1), SamplingConfig(**bad))
