"""Evaluation and `prefgym generate` load and prompt the policy as told: dtype, attn_implementation
and prompt_format (`SamplingConfig`'s `ModelFields`) from `stages.evaluate`, `--dtype`,
`--attn-implementation` and `--prompt-format`; the vLLM engine takes the dtype; the OpenAI-compatible
backend chooses the prompt format as the local path does; run folders and partial files made
before these fields existed are still used."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import prefgym.models.generation as generation
from prefgym.cli import main
from prefgym.data.prompts import PROMPT_FORMAT_KEY, format_record, resolve_prompt_format, user_turn
from prefgym.errors import ConfigError
from prefgym.models.generation import SamplingConfig, generate_outputs
from prefgym.models.loading import load_model_and_tokenizer, load_tokenizer
from prefgym.models.openai_generation import ServerConfig, generate_outputs_openai
from prefgym.models.tiny import make_tiny_checkpoint, make_tiny_tokenizer, set_tiny_chat_template
from prefgym.pipeline import Pipeline, load_run_config, plan_stages, stable_fingerprint
from prefgym.seeding import stable_hash
from test_openai_generation import fake  # noqa: F401 (fixture)
from test_run_folders import _record
from test_vllm_engine import fake_vllm  # noqa: F401 (fixture)

RECORDS = [{"instruction": "Reverse the word.", "input": "cat"}, {"instruction": "Add 3 and 4.", "input": ""}]
MODEL_FIELDS = ("dtype", "attn_implementation", "prompt_format")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture
def loaded(monkeypatch):
    """What `generate_outputs` sampled from: (parameter dtypes, attention kernel, prompts) per call."""
    seen = []
    real = generation.generate

    def spy(model, tokenizer, prompts, cfg, **kw):
        seen.append(({p.dtype for p in model.parameters()}, model.config._attn_implementation, list(prompts)))
        return real(model, tokenizer, prompts, cfg, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    return seen


# --- the policy is loaded in the dtype and with the attention kernel asked for -----------------------

def test_evaluation_generates_in_bf16_with_the_kernel_of_stages_evaluate(tiny, loaded, tmp_path):
    def eval_outputs(settings, name):
        cfg = load_run_config(None, scale="quick", out_dir=str(tmp_path / name),
                              stages={"evaluate": {"max_new_tokens": 2, **settings}})
        return Pipeline(cfg).outputs("sft", tiny, "sim", RECORDS)

    eval_outputs({"dtype": "bfloat16", "attn_implementation": "eager"}, "bf16")
    assert loaded[-1][:2] == ({torch.bfloat16}, "eager")
    # the defaults load as before these fields existed: load_model_and_tokenizer without a config
    eval_outputs({}, "default")
    before, _ = load_model_and_tokenizer(tiny)
    assert loaded[-1][:2] == ({torch.float32}, before.config._attn_implementation)
    assert {p.dtype for p in before.parameters()} == {torch.float32}
    assert loaded[-1][2] == [format_record(r) for r in RECORDS]  # auto: no chat template, Alpaca prompts
    with pytest.raises(ConfigError, match="has no chat template"):  # the prompt format reaches the prompts
        eval_outputs({"prompt_format": "chat"}, "chat")


def test_generate_command_loads_in_the_dtype_asked_for(tiny, loaded, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "out.json"
    args = ["generate", "--model", str(tiny), "--data", str(data), "--out", str(out), "--max-new-tokens", "2",
            "--no-progress"]
    assert main([*args, "--dtype", "bfloat16", "--attn-implementation", "eager"]) == 0
    assert loaded[-1][:2] == ({torch.bfloat16}, "eager") and len(json.loads(out.read_text())) == 2
    assert main([*args, "--prompt-format", "chat"]) == 2  # the tiny tokenizer has no chat template
    assert main([*args, "--dtype", "bf17"]) == 2


def test_evaluate_command_passes_the_fields_to_the_generation(tiny, tmp_path, monkeypatch, capsys):
    import prefgym.evaluation.winrate as winrate

    given = {}

    def fake_evaluate(model_outputs, reference, *, sampling=None, **kw):
        given["sampling"] = sampling
        return {"generator": "m", "win_rate": 50.0, "standard_error": 0.0, "n_wins": 0, "n_wins_base": 0,
                "n_draws": 0, "n_total": 0, "length_controlled_winrate": 50.0, "avg_length": 0}

    monkeypatch.setattr(winrate, "evaluate", fake_evaluate)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([{**r, "output": "x", "generator": "ref"} for r in RECORDS]))
    assert main(["evaluate", "--model", str(tiny), "--reference", str(ref), "--dtype", "bfloat16",
                 "--attn-implementation", "sdpa", "--prompt-format", "alpaca"]) == 0
    s = given["sampling"]
    assert (s.dtype, s.attn_implementation, s.prompt_format) == ("bfloat16", "sdpa", "alpaca")
    assert main(["evaluate", "--model", str(tiny), "--reference", str(ref)]) == 0
    s = given["sampling"]
    assert (s.dtype, s.attn_implementation, s.prompt_format) == ("float32", None, "auto")
    # with outputs to judge there is nothing to load: the option is an error, not ignored
    assert main(["evaluate", str(ref), "--reference", str(ref), "--dtype", "bfloat16"]) == 2
    assert "--dtype applies to generating with --model" in capsys.readouterr().err


def test_the_vllm_engine_starts_in_the_dtype_asked_for(tiny, fake_vllm):  # noqa: F811
    cfg = SamplingConfig(engine="vllm", dtype="bfloat16", max_new_tokens=2, temperature=0.0)
    generate_outputs(tiny, RECORDS, cfg)
    generate_outputs(tiny, RECORDS, SamplingConfig(engine="vllm", max_new_tokens=2, temperature=0.0))
    assert [llm.dtype for llm in fake_vllm.LLM.instances] == ["bfloat16", "float32"]


# --- stages.evaluate takes the fields; run folders made before them are still used ------------------

def test_stages_evaluate_accepts_the_model_fields_and_still_rejects_unknown_keys(tmp_path):
    def sampling(**settings):
        cfg = load_run_config(None, scale="quick", out_dir=str(tmp_path), stages={"evaluate": settings})
        return Pipeline(cfg).sampling()

    s = sampling(dtype="bfloat16", attn_implementation="sdpa", prompt_format="chat", temperature=0.5)
    assert (s.dtype, s.attn_implementation, s.prompt_format, s.temperature) == ("bfloat16", "sdpa", "chat", 0.5)
    with pytest.raises(ConfigError, match=r"stages.evaluate: unknown key 'dtpye' for SamplingConfig"):
        sampling(dtpye="bfloat16")
    with pytest.raises(ConfigError, match=r"stages.evaluate: key 'dtype' should be one of"):
        sampling(dtype="bf17")
    with pytest.raises(ConfigError, match=r"stages.evaluate: key 'prompt_format' should be one of"):
        sampling(prompt_format="vicuna")
    with pytest.raises(ConfigError, match=r"stages.evaluate: unknown key 'gradient_checkpointing'"):
        sampling(gradient_checkpointing=True)  # a training field: not an inference one


def _as_made_before_the_fields(out, stage="sim/evaluate"):
    """Rewrite a stage record as a prefgym without dtype / attn_implementation / prompt_format in
    SamplingConfig wrote it: the settings without them, the fingerprint of those settings."""
    path = out / ".done" / stage
    record = json.loads(path.read_text())
    record["settings"]["sampling"] = {k: v for k, v in record["settings"]["sampling"].items() if k not in MODEL_FIELDS}
    record["fingerprint"] = stable_fingerprint({"settings": record["settings"], "after": record["after"]})
    path.write_text(json.dumps(record))
    return record


def test_a_run_folder_evaluated_before_the_fields_existed_is_not_evaluated_again(tmp_path):
    out = tmp_path / "run"
    cfg = load_run_config(None, scale="quick", out_dir=str(out))
    stages = _record(cfg)
    assert {k: stages[-2].settings["sampling"][k] for k in MODEL_FIELDS} == {
        "dtype": "float32", "attn_implementation": None, "prompt_format": "auto"}
    old = _as_made_before_the_fields(out)
    plan, fingerprints = plan_stages(Pipeline(cfg).stages(), out)
    assert plan["sim/evaluate"] == "upgrade"
    assert {v for k, v in plan.items() if k not in ("sim/evaluate", "report")} == {"skip"}
    # every other stage's fingerprint is the one it was recorded with
    for name, fp in fingerprints.items():
        if name not in ("sim/evaluate", "report"):
            assert json.loads((out / ".done" / name).read_text())["fingerprint"] == fp
    _record(cfg)  # the upgrade: record brought up to date, its old fingerprint remembered
    record = json.loads((out / ".done" / "sim" / "evaluate").read_text())
    assert record["previous"] == [old["fingerprint"]] and record["settings"]["sampling"]["dtype"] == "float32"
    # a value away from the default is a change like any other
    _as_made_before_the_fields(out)
    bf16 = load_run_config(None, scale="quick", out_dir=str(out), stages={"evaluate": {"dtype": "bfloat16"}})
    with pytest.raises(ConfigError, match=r"stage sim/evaluate was made with other settings \(sampling.dtype: "
                                          r"\(absent\) -> 'bfloat16'\)"):
        plan_stages(Pipeline(bf16).stages(), out)


def test_cached_eval_outputs_made_before_the_fields_are_kept(tmp_path, monkeypatch):
    import prefgym.methods.reward_conditioning as rc
    from prefgym.io import write_json

    generated = []

    def fake_generate(model_dir, records, sampling, generator, progress=False):
        generated.append(sampling.dtype)
        return [{**r, "output": sampling.dtype, "generator": generator} for r in records]

    monkeypatch.setattr(rc, "generate_conditioned_outputs", fake_generate)
    out = tmp_path / "run"

    def outputs(**settings):
        cfg = load_run_config(None, scale="quick", out_dir=str(out), stages={"evaluate": settings})
        return Pipeline(cfg).outputs("sft", out / "sft", "sim", RECORDS)

    outputs()
    key_file = out / "sim" / "eval" / "sft" / "outputs_key.json"
    key = json.loads(key_file.read_text())
    write_json(key_file, {**key, "sampling": {k: v for k, v in key["sampling"].items() if k not in MODEL_FIELDS}})
    assert outputs()[0]["output"] == "float32" and generated == ["float32"]  # kept, not generated again
    assert json.loads(key_file.read_text()) == key  # the key brought up to date
    assert outputs(dtype="bfloat16")[0]["output"] == "bfloat16" and generated == ["float32", "bfloat16"]


def test_partial_files_keep_their_keys_at_the_defaults_and_change_with_the_dtype(tiny, loaded, tmp_path):
    partial = tmp_path / "part.jsonl"
    cfg = SamplingConfig(max_new_tokens=2, batch_size=2, seed=3)
    # the key an earlier prefgym gave these records: the decoding settings alone
    decoding = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 2,
                "num_samples": 1, "batch_size": 2, "seed": 3}
    run_key = stable_hash(str(tiny), json.dumps(decoding, sort_keys=True))
    partial.write_text("".join(json.dumps({"key": str(stable_hash(run_key, i, r["instruction"], r["input"])),
                                           "outputs": [f"kept {i}"]}) + "\n" for i, r in enumerate(RECORDS)))
    assert [r["output"] for r in generate_outputs(tiny, RECORDS, cfg, partial_file=partial)] == ["kept 0", "kept 1"]
    assert loaded == []  # nothing generated
    bf16 = generate_outputs(tiny, RECORDS, SamplingConfig(**{**cfg.__dict__, "dtype": "bfloat16"}),
                            partial_file=partial)
    assert len(loaded) == 1 and loaded[0][0] == {torch.bfloat16} and "kept 0" not in [r["output"] for r in bf16]


# --- the OpenAI-compatible backend prompts as the local path does -----------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tokenizer folders: trained on chat prompts, trained on Alpaca prompts (both with a chat
    template), a template without a record, and no template."""
    made = {}
    for name, recorded, template in (("chat", "chat", True), ("alpaca", "alpaca", True), ("unrecorded", None, True),
                                     ("plain", None, False)):
        folder = tmp_path_factory.mktemp(name)
        tokenizer = make_tiny_tokenizer(folder)
        if template:
            set_tiny_chat_template(tokenizer)
        if recorded:
            tokenizer.init_kwargs[PROMPT_FORMAT_KEY] = recorded  # as a prefgym-trained folder records it
        tokenizer.save_pretrained(folder)
        made[name] = folder
    assert json.loads((made["chat"] / "tokenizer_config.json").read_text())[PROMPT_FORMAT_KEY] == "chat"
    return made


def _sent(fake):
    """(endpoint, prompt) of each request the fake server got, in record order."""
    rows = []
    for r in fake.requests:
        chat = r["path"].endswith("/chat/completions")
        rows.append(("chat" if chat else "completions",
                     r["body"]["messages"][-1]["content"] if chat else r["body"]["prompt"]))
    return sorted(rows, key=lambda row: [rec["instruction"] in row[1] for rec in RECORDS].index(True))


def _ask(fake, **server):  # noqa: F811
    fake.requests.clear()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=4)
    generate_outputs_openai(ServerConfig(base_url=fake.url, served_model="m", retry_backoff=0.0, **server),
                            RECORDS, cfg)
    return _sent(fake)


ALPACA = [("completions", format_record(r)) for r in RECORDS]
CHAT = [("chat", user_turn(r)) for r in RECORDS]


def test_openai_backend_sends_the_format_the_folder_was_trained_on(fake, folders):  # noqa: F811
    for name, expected in (("chat", CHAT), ("alpaca", ALPACA), ("unrecorded", CHAT), ("plain", ALPACA)):
        assert _ask(fake, model_folder=str(folders[name])) == expected, name
        # the local path's choice for the same folder
        local = resolve_prompt_format(load_tokenizer(folders[name]), "auto")
        assert expected == (CHAT if local == "chat" else ALPACA), name
    # `vllm serve FOLDER` serves the model under the folder's path: that folder is read
    fake.requests.clear()
    generate_outputs_openai(ServerConfig(base_url=fake.url, served_model=str(folders["chat"]), retry_backoff=0.0),
                            RECORDS, SamplingConfig(temperature=0.0, max_new_tokens=4))
    assert _sent(fake) == CHAT


def test_an_explicit_prompt_format_wins_over_the_folder(fake, folders, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING, logger="prefgym"):
        assert _ask(fake, model_folder=str(folders["chat"]), prompt_format="alpaca") == ALPACA
    assert "trained on chat prompts" in caplog.text  # used as asked, with a warning naming both
    assert _ask(fake, model_folder=str(folders["alpaca"]), prompt_format="chat") == CHAT
    # the server applies its own chat template (`vllm serve --chat-template`): asked for, chat is sent
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefgym"):
        assert _ask(fake, model_folder=str(folders["plain"]), prompt_format="chat") == CHAT
    assert "has no chat template; sending chat requests as asked" in caplog.text


def test_openai_backend_without_a_folder_sends_alpaca_and_says_so(fake, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING):
        assert _ask(fake) == ALPACA
    assert "no local folder of 'm'" in caplog.text and "--prompt-format chat" in caplog.text
    assert _ask(fake, prompt_format="chat") == CHAT
    with pytest.raises(ConfigError, match="model folder not found"):
        _ask(fake, model_folder="./no/such/folder")


def test_generate_command_openai_reads_model_and_takes_the_override(fake, folders, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))

    def generate(out, *more):
        fake.requests.clear()
        return main(["generate", "--backend", "openai", "--base-url", fake.url, "--served-model", "m", "--model",
                     str(folders["chat"]), "--data", str(data), "--out", str(tmp_path / out), "--temperature", "0",
                     "--no-progress", *more])

    assert generate("chat.json") == 0 and _sent(fake) == CHAT
    assert generate("alpaca.json", "--prompt-format", "alpaca") == 0 and _sent(fake) == ALPACA
    assert generate("bf16.json", "--dtype", "bfloat16") == 2 and fake.requests == []
    assert "--backend openai takes no --dtype" in capsys.readouterr().err
