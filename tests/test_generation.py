"""Batched sampling with left padding, EOS stops, seeds, and AlpacaEval-format outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefgym.cli import main
from prefgym.data import format_prompt
from prefgym.models import load_model_and_tokenizer
from prefgym.models.generation import SamplingConfig, generate, generate_outputs
from prefgym.models.tiny import make_tiny_checkpoint

PROMPTS = [
    format_prompt("Add 3 and 4."),
    format_prompt("Sort these numbers.", "9 3 7 1 2 8 5 4"),
    "x",
    format_prompt("List two colors of the rainbow, please, in alphabetical order."),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return path, *load_model_and_tokenizer(path)


def test_batched_left_padded_greedy_equals_one_by_one(tiny):
    _, model, tokenizer = tiny
    cfg = SamplingConfig(temperature=0, max_new_tokens=24, batch_size=4)
    batched = generate(model, tokenizer, PROMPTS, cfg)
    one_by_one = [generate(model, tokenizer, [p], cfg)[0] for p in PROMPTS]
    assert batched == one_by_one
    assert all(len(outs) == 1 and outs[0] for outs in batched)
    assert tokenizer.padding_side == "right"  # restored after generating


def test_greedy_equals_argmax_decoding_by_hand(tiny):
    """Independent reference: a plain loop of full forward passes, no KV cache, no padding."""
    import torch

    _, model, tokenizer = tiny
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(12):
            next_id = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits[0, -1].argmax().item()
            if next_id == tokenizer.eos_token_id:
                break
            new.append(next_id)
    expected = tokenizer.decode(new, skip_special_tokens=True)
    cfg = SamplingConfig(temperature=0, max_new_tokens=12, batch_size=4)
    assert generate(model, tokenizer, PROMPTS, cfg)[1] == [expected]


def test_sampling_is_seeded_and_gives_n_samples(tiny):
    _, model, tokenizer = tiny
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=10, num_samples=3, batch_size=2, seed=1)
    first = generate(model, tokenizer, PROMPTS, cfg)
    assert [len(outs) for outs in first] == [3] * len(PROMPTS)
    assert generate(model, tokenizer, PROMPTS, cfg) == first
    other = generate(model, tokenizer, PROMPTS, SamplingConfig(**{**cfg.__dict__, "seed": 2}))
    assert other != first
    assert len({s for outs in first for s in outs}) > len(PROMPTS)  # samples differ from each other

    import torch

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generate(model, tokenizer, PROMPTS, cfg)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is untouched

    greedy = generate(model, tokenizer, PROMPTS, SamplingConfig(temperature=0, max_new_tokens=10, num_samples=3))
    assert all(len(set(outs)) == 1 and len(outs) == 3 for outs in greedy)


def test_generation_stops_at_eos(tmp_path):
    """A model trained to answer 'yes' then EOS stops there, well before max_new_tokens."""
    import torch

    from prefgym.methods.sft import SFTConfig, train_sft

    base = make_tiny_checkpoint(tmp_path / "base", "llama")
    records = [{"instruction": f"Is {i} a number?", "input": "", "output": "yes"} for i in range(8)]
    out = train_sft(SFTConfig(model_name_or_path=str(base), output_dir=str(tmp_path / "sft"), epochs=40,
                              lr=1e-2, warmup_ratio=0.0, per_device_batch_size=8, progress=False), records)
    model, tokenizer = load_model_and_tokenizer(out)
    prompts = [format_prompt(r["instruction"]) for r in records[:3]] + [format_prompt("Is a cat a number? " * 3)]
    outs = generate(model, tokenizer, prompts, SamplingConfig(temperature=0, max_new_tokens=40, batch_size=4))
    assert [o[0] for o in outs[:3]] == ["yes"] * 3

    # The raw sequence: EOS right after "yes", then only padding (the row stopped).
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    seq = model.generate(**batch, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = seq[0, batch.input_ids.shape[1]:].tolist()
    yes = tokenizer("yes", add_special_tokens=False).input_ids
    assert new[:len(yes) + 1] == yes + [tokenizer.eos_token_id]
    assert seq.shape[1] - batch.input_ids.shape[1] < 40
    assert torch.all(seq[0, batch.input_ids.shape[1] + len(yes) + 1:] == tokenizer.pad_token_id)


def test_pad_token_is_added_when_missing(tmp_path):
    from prefgym.models.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(tmp_path, pad_token=False)
    assert tokenizer.pad_token is None
    make_tiny_model("gpt2", tokenizer, tmp_path)
    model, tokenizer = load_model_and_tokenizer(tmp_path, padding_side="left")
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    cfg = SamplingConfig(temperature=0, max_new_tokens=8)
    assert generate(model, tokenizer, PROMPTS, cfg) == [generate(model, tokenizer, [p], cfg)[0] for p in PROMPTS]


def test_generate_outputs_and_cli_write_alpaca_eval_format(tiny, tmp_path, capsys):
    path, _, _ = tiny
    records = [{"instruction": "Add 3 and 4.", "input": "", "dataset": "arith"},
               {"instruction": "Reverse the word.", "input": "cat"}]
    cfg = SamplingConfig(temperature=0.7, max_new_tokens=6, num_samples=2)
    rows = generate_outputs(path, records, cfg)
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in records]
    assert all(r["generator"] == path.name and r["output"] == r["outputs"][0] and len(r["outputs"]) == 2 for r in rows)
    assert rows[0]["dataset"] == "arith" and rows[1]["input"] == "cat"

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "run" / "model_outputs.json"
    argv = ["generate", "--model", str(path), "--data", str(data), "--out", str(out), "--temperature", "0",
            "--max-new-tokens", "6", "--generator", "tiny-sft", "--no-progress"]
    assert main(argv) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    assert [set(r) for r in written] == [{"instruction", "input", "output", "generator", "dataset"},
                                         {"instruction", "input", "output", "generator"}]
    assert all(r["generator"] == "tiny-sft" for r in written)
    model, tokenizer = load_model_and_tokenizer(path)
    expected = generate(model, tokenizer, [format_prompt("Add 3 and 4.")], SamplingConfig(temperature=0, max_new_tokens=6))
    assert written[0]["output"] == expected[0][0]
    assert list(out.parent.iterdir()) == [out]  # no temporary files left behind


def test_generate_cli_rejects_bad_data(tiny, tmp_path, capsys):
    path, _, _ = tiny
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "ok"}, {"input": "no instruction"}]), encoding="utf-8")
    assert main(["generate", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "o.json")]) == 2
    assert "row 1, field 'instruction'" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_generate_outputs_resumes_from_the_partial_file(tiny, tmp_path):
    path, model, tokenizer = tiny
    records = [{"instruction": f"Name {i} animals.", "input": ""} for i in range(5)]
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=6, batch_size=2, seed=3)
    partial = tmp_path / "out.partial.jsonl"
    whole = generate_outputs(path, records, cfg, partial_file=partial)
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert len(lines) == 5
    # Piece by piece gives what one call over all prompts gives.
    assert [r["output"] for r in whole] == [o[0] for o in generate(model, tokenizer, [format_prompt(r["instruction"]) for r in records], cfg)]
    assert generate_outputs(path, records, cfg) == whole

    # A run killed after its first batch: those rows are read back, not generated again.
    partial.write_text("".join(json.dumps({**row, "outputs": ["CACHED"]}) + "\n" for row in lines[:2])
                       + '{"key": "cut sh', encoding="utf-8")
    resumed = generate_outputs(path, records, cfg, partial_file=partial)
    assert [r["output"] for r in resumed] == ["CACHED", "CACHED"] + [r["output"] for r in whole[2:]]
    # Other settings do not reuse those rows.
    other = generate_outputs(path, records, SamplingConfig(**{**cfg.__dict__, "seed": 4}), partial_file=partial)
    assert "CACHED" not in [r["output"] for r in other]


def test_missing_model_folder_is_a_config_error(tmp_path, capsys):
    from prefgym.errors import ConfigError

    with pytest.raises(ConfigError, match="model folder not found"):
        load_model_and_tokenizer(tmp_path / "nope")
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"instruction": "Hi."}]), encoding="utf-8")
    assert main(["generate", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "o.json")]) == 2
    assert "model folder not found" in capsys.readouterr().err


def _greedy_finished_by_hand(model, tokenizer, max_new_tokens: int) -> list[bool]:
    import torch

    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            finished = False
            for _ in range(max_new_tokens):
                next_id = model(ids).logits[0, -1].argmax().item()
                if next_id == tokenizer.eos_token_id:
                    finished = True
                    break
                ids = torch.cat([ids, torch.tensor([[next_id]])], 1)
            out.append(finished)
    return out


def test_eos_flags_say_which_responses_were_cut_off(tiny):
    """Independent reference: greedy decoding by hand; a response is finished iff it reached EOS
    within max_new_tokens. The tiny random models rarely emit EOS, so its logit is raised (along
    the prompts' mean last hidden state) until some responses finish and others do not."""
    import torch

    from prefgym.models.generation import generate_with_eos

    _, model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    head = model.get_output_embeddings()
    saved = head.weight[eos].clone()
    with torch.no_grad():
        hidden = torch.stack([model(**tokenizer(p, return_tensors="pt"), output_hidden_states=True)
                              .hidden_states[-1][0, -1] for p in PROMPTS]).mean(0)
    try:
        for alpha in np.linspace(0.0, 40.0, 81):
            with torch.no_grad():
                head.weight[eos] = saved + alpha * hidden / hidden.norm() ** 2
            expected = _greedy_finished_by_hand(model, tokenizer, 6)
            if len(set(expected)) == 2:
                break
        assert len(set(expected)) == 2, "the test needs finished and cut-off responses"
        texts, flags = generate_with_eos(model, tokenizer, PROMPTS, SamplingConfig(temperature=0, max_new_tokens=6,
                                                                                   num_samples=2))
    finally:
        with torch.no_grad():
            head.weight[eos] = saved
    assert flags == [[f, f] for f in expected]
