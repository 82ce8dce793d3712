"""Prompts through the tokenizer's chat template (one BOS), Alpaca otherwise; policy and reward model alike."""

from __future__ import annotations

import json

import pytest

from prefgym.data.prompts import format_record, make_prompt_formatter, resolve_prompt_format, user_turn
from prefgym.errors import ConfigError
from prefgym.models.tiny import TINY_CHAT_TEMPLATE, make_tiny_model, make_tiny_tokenizer, set_tiny_chat_template

RECORDS = [{"instruction": "Reverse the word.", "input": "cat"}, {"instruction": "Add 3 and 4.", "input": ""},
           {"instruction": "List two colors."}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    plain = make_tiny_tokenizer(tmp_path_factory.mktemp("plain"))
    chat = make_tiny_tokenizer(tmp_path_factory.mktemp("chat"))
    set_tiny_chat_template(chat)
    # a tokenizer that prepends BOS itself (as Llama's do), with a template that writes BOS too
    bos_dir = tmp_path_factory.mktemp("bos")
    bos = make_tiny_tokenizer(bos_dir)
    from tokenizers.processors import TemplateProcessing

    bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos.bos_token_id)])
    set_tiny_chat_template(bos)
    bos.save_pretrained(bos_dir)
    return plain, chat, AutoTokenizer.from_pretrained(bos_dir)


def test_user_turn_appends_the_input_as_alpacafarm():
    assert [user_turn(r) for r in RECORDS] == ["Reverse the word.\n\ncat", "Add 3 and 4.", "List two colors."]


def test_auto_is_alpaca_without_a_template_and_chat_with_one(tokenizers):
    plain, chat, _ = tokenizers
    assert resolve_prompt_format(plain, "auto") == "alpaca" and resolve_prompt_format(chat, "auto") == "chat"
    fmt = make_prompt_formatter(plain, "auto")
    assert [fmt(r) for r in RECORDS] == [format_record(r) for r in RECORDS]
    assert make_prompt_formatter(chat, "alpaca")(RECORDS[0]) == format_record(RECORDS[0])
    with pytest.raises(ConfigError, match="has no chat template"):
        make_prompt_formatter(plain, "chat")


def test_chat_prompt_is_the_template_with_the_generation_prompt(tokenizers):
    _, chat, _ = tokenizers
    fmt = make_prompt_formatter(chat, "chat")
    for r in RECORDS:
        expected = chat.apply_chat_template([{"role": "user", "content": user_turn(r)}],
                                            add_generation_prompt=True, tokenize=False)
        assert fmt(r) == expected
    assert fmt(RECORDS[0]) == "<s><|user|>\nReverse the word.\n\ncat</s>\n<|assistant|>\n"  # by hand
    ids = chat(fmt(RECORDS[0]))["input_ids"]
    assert ids.count(chat.bos_token_id) == 1


def test_no_double_bos_when_the_tokenizer_adds_one(tokenizers):
    """The tokenizer prepends BOS and the template writes it too: the prompt leaves it out, so the
    tokens prefgym feeds (add_special_tokens=True) are the template's exactly, with one BOS."""
    _, _, bos = tokenizers
    assert bos("a")["input_ids"][0] == bos.bos_token_id  # the tokenizer does add BOS
    fmt = make_prompt_formatter(bos, "auto")
    for r in RECORDS:
        ids = bos(fmt(r))["input_ids"]
        assert ids.count(bos.bos_token_id) == 1
        assert ids == bos(bos.apply_chat_template([{"role": "user", "content": user_turn(r)}],
                                                  add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)["input_ids"]


def test_sft_and_reward_model_use_the_template(tokenizers, tmp_path):
    """SFT trains on chat prompts; the reward model records its format and scores records with it."""
    import torch

    from prefgym.methods import reward_model
    from prefgym.methods.reward_model import RewardScorer
    from prefgym.methods.sft import SFTConfig, train_sft
    from prefgym.models.loading import tokenize_example

    _, chat, _ = tokenizers
    base = tmp_path / "base"
    chat.save_pretrained(base)
    make_tiny_model("llama", chat, base)
    demos = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("cat", "dog", "sun", "red")]
    sft = train_sft(SFTConfig(model_name_or_path=str(base), output_dir=str(tmp_path / "sft"), max_steps=1,
                              per_device_batch_size=2, progress=False), records=demos)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(sft).chat_template == TINY_CHAT_TEMPLATE
    example = tokenize_example(chat, make_prompt_formatter(chat)(demos[0]), "cat", 64)
    assert chat.decode(example["input_ids"]).startswith("<s><|user|>\nSay cat.</s>\n<|assistant|>\ncat")

    pairs = [{"instruction": f"Name {i}.", "input": "", "output_1": "cat", "output_2": "dog", "preference": 1 + i % 2}
             for i in range(8)]
    rm = reward_model.train(reward_model.RewardModelConfig(model_name_or_path=str(sft), output_dir=str(tmp_path / "rm"),
                                                           per_device_batch_size=4, eval_fraction=0.0), records=pairs)
    assert json.loads((rm / reward_model.NORMALIZATION_FILE).read_text())["prompt_format"] == "auto"
    scorer = RewardScorer(rm)
    rec = {"instruction": "Name 1.", "input": "", "output": "cat"}
    by_chat = scorer.score_texts([make_prompt_formatter(chat, "chat")(rec)], ["cat"])
    by_alpaca = scorer.score_texts([format_record(rec)], ["cat"])
    assert scorer.score([rec]) == pytest.approx(by_chat) and by_chat != pytest.approx(by_alpaca)
    scorer.check_prompt_format(chat, "auto", "ppo")
    with pytest.raises(ConfigError, match="trained on chat prompts"):
        scorer.check_prompt_format(chat, "alpaca", "ppo")
    assert torch.isfinite(torch.tensor(by_chat)).all()


def test_hf_judge_sends_the_prompt_through_the_template(tokenizers, tmp_path):
    from prefgym.annotators.config import JudgeConfig
    from prefgym.annotators.hf_backend import HFLogprobBackend

    _, chat, _ = tokenizers
    folder = tmp_path / "judge"
    chat.save_pretrained(folder)
    make_tiny_model("gpt2", chat, folder)
    seen = []

    def judge(fmt):
        cfg = JudgeConfig(name="j", fn_completions="huggingface_logprobs", fn_completion_parser="logprob_parser",
                          completions_kwargs={"model_name": str(folder), "prompt_format": fmt},
                          system_prompt="Be fair.")
        backend = HFLogprobBackend(cfg)
        real = backend.tokenizer.__call__

        def spy(text, **kw):
            seen.append(text)
            return real(text, **kw)

        backend.tokenizer = type("Spy", (), {"__call__": staticmethod(spy),
                                             "__getattr__": lambda self, n: getattr(chat, n)})()
        backend.complete("Which is better?", [])
        return seen[-1]

    assert judge("raw") == "Which is better?"
    assert judge("auto") == "<s><|system|>\nBe fair.</s>\n<|user|>\nWhich is better?</s>\n<|assistant|>\n"
    with pytest.raises(ConfigError, match="prompt_format"):
        judge("vicuna")


def test_a_trained_model_keeps_its_prompt_format(tmp_path, caplog):
    """SFT with alpaca prompts on a model whose tokenizer has a chat template: the trained folder says
    so, and `auto` (every later stage's default: reward model, PPO, generation) prompts it as trained."""
    import logging

    from transformers import AutoTokenizer

    from prefgym.data.prompts import PROMPT_FORMAT_KEY, recorded_prompt_format
    from prefgym.methods.sft import SFTConfig, train_sft
    from prefgym.models.generation import SamplingConfig, generate_outputs

    chat = make_tiny_tokenizer(tmp_path / "base")
    set_tiny_chat_template(chat)
    chat.save_pretrained(tmp_path / "base")
    make_tiny_model("llama", chat, tmp_path / "base")
    untouched = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert recorded_prompt_format(untouched) is None and resolve_prompt_format(untouched, "auto") == "chat"

    demos = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("cat", "dog", "sun", "red")]
    sft = train_sft(SFTConfig(model_name_or_path=str(tmp_path / "base"), output_dir=str(tmp_path / "sft"), max_steps=1,
                              per_device_batch_size=2, progress=False, prompt_format="alpaca"), records=demos)
    assert json.loads((sft / "tokenizer_config.json").read_text())[PROMPT_FORMAT_KEY] == "alpaca"
    trained = AutoTokenizer.from_pretrained(sft)
    assert trained.chat_template and resolve_prompt_format(trained, "auto") == "alpaca"
    assert make_prompt_formatter(trained, "auto")(RECORDS[0]) == format_record(RECORDS[0])

    # generation with the default prompt_format (auto) shows the model the prompts it was trained on
    import prefgym.models.generation as generation

    seen = []
    real_generate = generation.generate
    generation.generate = lambda model, tok, prompts, cfg, **kw: seen.extend(prompts) or real_generate(
        model, tok, prompts, cfg, **kw)
    try:
        generate_outputs(sft, RECORDS[:2], SamplingConfig(max_new_tokens=2, temperature=0.0), progress=False)
    finally:
        generation.generate = real_generate
    assert seen == [format_record(r) for r in RECORDS[:2]]

    # asked for another format than the recorded one: used as asked, with a warning naming both
    with caplog.at_level(logging.WARNING, logger="prefgym"):
        fmt = make_prompt_formatter(AutoTokenizer.from_pretrained(sft), "chat")
    assert fmt(RECORDS[1]).startswith("<s><|user|>") and "trained on alpaca prompts" in caplog.text
