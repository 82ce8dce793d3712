"""The vLLM engine, against a stand-in of vLLM's offline API (tests/fake_vllm: real HF sampling, seeded
per request) since vLLM itself needs a CUDA GPU: same records and texts as the HF path, per-request
seeding, greedy decoding, errors and fallbacks, and PPO's weight sync before each rollout."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from prefgym.data import format_prompt
from prefgym.errors import ConfigError
from prefgym.models import load_model_and_tokenizer, vllm_engine
from prefgym.models.generation import SamplingConfig, generate_outputs, generate_with_eos
from prefgym.models.tiny import make_tiny_checkpoint

FAKE_VLLM = Path(__file__).parent / "fake_vllm"
PROMPTS = [format_prompt("Add 3 and 4."), format_prompt("Sort these numbers.", "9 3 7 1"), "x",
           format_prompt("List two colors of the rainbow."), format_prompt("Reverse the word.", "cat")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
    return path, *load_model_and_tokenizer(path, padding_side="left")


@pytest.fixture
def fake_vllm(monkeypatch):
    """The stand-in `vllm` importable (and no engine left from another test); yields the module."""
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(vllm_engine, "_engine", None)
    vllm_engine.auto_engine.cache_clear()
    import vllm

    vllm.LLM.instances.clear()
    yield vllm
    vllm_engine.auto_engine.cache_clear()
    end_engine_groups()


def end_engine_groups() -> None:
    """What a test left of the stand-in engines' process groups goes, as vLLM's cleanup ends them
    (the next test starts with no torch.distributed group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        sys.modules["vllm.distributed"].cleanup_dist_env_and_memory()


@pytest.fixture
def no_vllm(monkeypatch):
    """`import vllm` fails, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr(vllm_engine, "_engine", None)
    vllm_engine.auto_engine.cache_clear()
    yield
    vllm_engine.auto_engine.cache_clear()


def sampling(**kw) -> SamplingConfig:
    base = dict(temperature=1.0, max_new_tokens=12, num_samples=3, batch_size=2, seed=7)
    return SamplingConfig(**{**base, **kw})


def test_vllm_samples_equal_hf_samples_of_one_prompt_batches(tiny, fake_vllm):
    """A request is seeded as the HF path seeds a batch of that one prompt: same texts and EOS flags."""
    path, model, tokenizer = tiny
    hf = generate_with_eos(model, tokenizer, PROMPTS, sampling(batch_size=1), first_index=4)
    vl = generate_with_eos(model, tokenizer, PROMPTS, sampling(engine="vllm", batch_size=2), first_index=4)
    assert vl == hf
    texts, ended = vl
    assert [len(t) for t in texts] == [3] * len(PROMPTS) and any(len(set(t)) > 1 for t in texts)
    assert any(not e for row in ended for e in row)  # some cut off at max_new_tokens: flags carried over
    (llm,) = fake_vllm.LLM.instances
    assert llm.model_path == str(path) and llm.dtype == "float32"
    assert llm.engine_args["distributed_executor_backend"] == "external_launcher"
    assert llm.engine_args["generation_config"] == "vllm" and llm.engine_args["gpu_memory_utilization"] == 0.3
    assert llm.engine_args["max_model_len"] is None  # the model's context length unless set
    params = llm.generate_calls[0]["params"]
    assert [p.n for p in params] == [3] * len(PROMPTS) and {p.max_tokens for p in params} == {12}
    assert {tuple(p.stop_token_ids) for p in params} == {(tokenizer.eos_token_id,)}
    assert len({p.seed for p in params}) == len(PROMPTS)  # one seed per request


def test_responses_end_at_the_tokenizers_eos_only_as_on_the_hf_path(tiny, fake_vllm, tmp_path):
    """A folder whose generation_config.json lists more eos_token_ids (Llama-3 / Qwen instruct
    folders do): vLLM would also stop at those unless a request sets ignore_eos; the HF path stops
    at the tokenizer's EOS alone, and so must the engine (generation and PPO's rollouts)."""
    import shutil

    path, _, tokenizer = tiny
    folder = shutil.copytree(path, tmp_path / "more-eos")
    greedy = sampling(temperature=0.0, num_samples=1, max_new_tokens=8)
    model, _ = load_model_and_tokenizer(folder, padding_side="left")
    hf_texts, hf_ended = generate_with_eos(model, tokenizer, PROMPTS, greedy)
    first = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():  # the greedy path's third token of the first prompt becomes another "eos"
        ids = model.generate(torch.tensor([first]), do_sample=False, max_new_tokens=3)[0, len(first):].tolist()
    extra = ids[2]
    assert extra != tokenizer.eos_token_id and extra not in ids[:2]
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [tokenizer.eos_token_id,
                                                                                          extra]}))
    vl_texts, vl_ended = generate_with_eos(model, tokenizer, PROMPTS, SamplingConfig(**{**greedy.__dict__,
                                                                                        "engine": "vllm"}))
    assert (vl_texts, vl_ended) == (hf_texts, hf_ended)
    assert fake_vllm.LLM.instances[0].eos_token_ids == {tokenizer.eos_token_id, extra}  # the stand-in would stop
    engine = vllm_engine.VLLMEngine(folder, tokenizer=tokenizer)
    (rollout,) = engine.sample_token_ids([first], [3], temperature=1e-6, max_new_tokens=3)
    assert rollout == ids  # not cut after `extra` (nor given an EOS after it)


def test_vllm_max_model_len_reaches_the_engine_and_a_new_length_a_new_engine(tiny, fake_vllm):
    path, model, tokenizer = tiny
    for length in (64, 64, 96):
        generate_with_eos(model, tokenizer, PROMPTS[:1], sampling(engine="vllm", vllm_max_model_len=length))
    assert [llm.engine_args["max_model_len"] for llm in fake_vllm.LLM.instances] == [64, 96]


def test_samples_do_not_depend_on_batching(tiny, fake_vllm):
    path, model, tokenizer = tiny
    cfg = sampling(engine="vllm")
    whole = generate_with_eos(model, tokenizer, PROMPTS, cfg)
    pieces = [generate_with_eos(model, tokenizer, PROMPTS[s:s + 2], cfg, first_index=s) for s in (0, 2, 4)]
    assert [t for p in pieces for t in p[0]] == whole[0]
    assert [f for p in pieces for f in p[1]] == whole[1]
    assert len(fake_vllm.LLM.instances) == 1  # one engine, kept between calls


def test_greedy_at_temperature_zero(tiny, fake_vllm):
    """Temperature 0: one greedy request per prompt, its response repeated; equals HF greedy decoding."""
    path, model, tokenizer = tiny
    cfg = sampling(temperature=0.0, num_samples=2, batch_size=8)
    vl = generate_with_eos(model, tokenizer, PROMPTS, SamplingConfig(**{**cfg.__dict__, "engine": "vllm"}))
    assert vl == generate_with_eos(model, tokenizer, PROMPTS, cfg)
    assert all(t[0] == t[1] for t in vl[0])
    params = fake_vllm.LLM.instances[0].generate_calls[0]["params"]
    assert {(p.n, p.temperature) for p in params} == {(1, 0.0)}


def test_generate_outputs_records_equal_the_hf_path(tiny, fake_vllm, tmp_path):
    path, model, tokenizer = tiny
    records = [{"instruction": "Add 3 and 4.", "input": ""}, {"instruction": "Sort.", "input": "3 1 2", "id": 5}]
    hf = generate_outputs(path, records, sampling(batch_size=1, num_samples=2), prompt_format="alpaca")
    partial = tmp_path / "part.jsonl"
    vl = generate_outputs(path, records, sampling(engine="vllm", batch_size=2, num_samples=2),
                          prompt_format="alpaca", partial_file=partial)
    assert vl == hf and set(vl[1]) == {"instruction", "input", "id", "output", "outputs", "generator"}
    # a rerun reads the partial file and asks the engine for nothing more
    calls = len(fake_vllm.LLM.instances[0].generate_calls)
    assert generate_outputs(path, records, sampling(engine="vllm", batch_size=2, num_samples=2),
                            prompt_format="alpaca", partial_file=partial) == vl
    assert len(fake_vllm.LLM.instances[0].generate_calls) == calls


def test_engine_vllm_without_vllm_names_the_extra(tiny, no_vllm):
    path, model, tokenizer = tiny
    with pytest.raises(ConfigError, match=r"pip install 'prefgym\[vllm\]'"):
        generate_with_eos(model, tokenizer, PROMPTS[:1], sampling(engine="vllm"))


def test_auto_without_vllm_runs_hf_and_says_so(tiny, no_vllm, caplog):
    path, model, tokenizer = tiny
    with caplog.at_level(logging.INFO, logger="prefgym.models.vllm_engine"):
        auto = generate_with_eos(model, tokenizer, PROMPTS, sampling(engine="auto"))
    assert auto == generate_with_eos(model, tokenizer, PROMPTS, sampling())
    assert [r.getMessage() for r in caplog.records] == ["generation engine: hf (engine=auto: vllm is not installed)"]


def test_auto_needs_a_cuda_device(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_engine.resolve_engine("auto") == "hf"
    vllm_engine.auto_engine.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_engine.resolve_engine("auto") == "vllm"


@pytest.mark.parametrize("version", ["0.16.2", "0.32.0", "0.8.5"])
def test_vllm_outside_the_supported_range_is_refused(fake_vllm, monkeypatch, version, tiny):
    monkeypatch.setattr(fake_vllm, "__version__", version)
    with pytest.raises(ConfigError, match=rf"vllm {version} is installed.*0\.17\.0 to 0\.31\.0"):
        vllm_engine.VLLMEngine(tiny[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_engine.resolve_engine("auto") == "hf"  # auto falls back


@pytest.mark.parametrize("version", ["0.17.0", "0.25.1", "0.26.0", "0.31.0", "0.31.0+cu129", "0.20.1"])
def test_vllm_inside_the_range_is_accepted(version):
    vllm_engine.check_vllm_version(version)


def test_pyproject_extra_states_the_same_range():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    low, high = vllm_engine.VLLM_VERSIONS
    assert f'vllm = ["vllm>={low},<={high}"]' in text


def test_engine_field_is_checked_in_every_generating_config():
    from prefgym.methods import best_of_n, expert_iteration, ppo, preference_data, quark

    for config in (SamplingConfig, best_of_n.BestOfNConfig, expert_iteration.ExpertIterationConfig,
                   preference_data.PreferenceDataConfig, quark.QuarkConfig, ppo.PPOConfig):
        assert config(engine="auto").engine == "auto"
        with pytest.raises(ConfigError, match="key 'engine'"):
            config(engine="vllm ")
        with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
            config(vllm_gpu_memory_utilization=1.5)
        with pytest.raises(ConfigError, match="vllm_max_model_len"):
            config(vllm_max_model_len=0)


# ---------------------------------------------------------------------------------------------
# PPO: rollouts on the engine, which gets the policy's weights after each update

from safetensors.torch import load_file  # noqa: E402

from prefgym.methods import ppo  # noqa: E402
from test_ppo import read_metrics, small_cfg, toy_rm  # noqa: E402,F401 (module fixture)
from test_prefdata_toy import one_torch_thread, toy_prompts  # noqa: E402,F401 (autouse fixture)


def test_ppo_rollouts_sample_from_the_policy_after_each_update(toy_rm, fake_vllm):
    """Rollout k runs on the weights update k-1 left (the SFT model's for the first), as snapshot
    step-(k-1) saved them; the log-probs are the policy's own, so the first update's ratio is 1."""
    root, sft, rm = toy_rm
    cfg = small_cfg(root, sft, rm, "vllm_ppo", steps=3, snapshot_steps=1, save_steps=10, ppo_epochs=1,
                    num_mini_batches=1, engine="vllm")
    out = ppo.train(cfg, prompts=toy_prompts(16, seed=5))
    (llm,) = fake_vllm.LLM.instances
    assert llm.model_path == str(sft) and llm.engine_args["max_model_len"] == 64 + 5
    assert len(llm.generate_calls) == 3 and len(llm.model.loads) == 3 and llm.prefix_cache_resets == 3
    policies = [load_file(sft / "model.safetensors")] + [
        load_file(out / "snapshots" / f"step-{s}" / "model.safetensors") for s in (1, 2)]
    assert any(not torch.equal(policies[1][k], policies[0][k]) for k in policies[0])  # the updates moved it
    for call, loaded, policy in zip(llm.generate_calls, llm.model.loads, policies):
        assert loaded.keys() == policy.keys()
        for name, weight in policy.items():
            assert torch.equal(loaded[name], weight) and torch.equal(call["weights"][name], weight), name
    params = llm.generate_calls[0]["params"]
    assert {(p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) for p in params} == {(1, 1.0, 1.0, 0, 5)}
    m = read_metrics(out)
    assert m[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and m[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < m[0]["response_length"] <= 5


def test_ppo_rollout_tensors_match_the_engine_responses(toy_rm, fake_vllm, tmp_path):
    """`common.sample_rollout` on the engine lays out its token ids as the HF sampler does: prompts left-padded
    and cut to max_prompt_length from the left, responses padded after EOS."""
    root, sft, rm = toy_rm
    from prefgym.methods import common

    tokenizer = common.load_tokenizer(sft)
    cfg = small_cfg(root, sft, rm, "unused", engine="vllm", max_prompt_length=6, max_new_tokens=4)
    engine = vllm_engine.VLLMEngine(sft, tokenizer=tokenizer)
    policy = load_model_and_tokenizer(sft)[0]
    prompts = ["a", "a much longer prompt than the others"]
    q_ids, q_mask, r_ids = common.sample_rollout(engine, policy, tokenizer, prompts, seeds=[1, 2], temperature=1.0,
                                                 max_new_tokens=cfg.max_new_tokens, max_prompt_length=cfg.max_prompt_length)
    assert q_mask.tolist()[0][:-1] == [0] * (q_ids.shape[1] - 1) and q_mask[1].all() and q_ids.shape[1] == 6
    sent = [p["prompt_token_ids"] for p in fake_vllm.LLM.instances[0].generate_calls[0]["prompts"]]
    assert sent == [tokenizer("a")["input_ids"], tokenizer(prompts[1])["input_ids"][-6:]]
    got = [o.outputs[0].token_ids for o in (fake_vllm.LLM.instances[0]._request(
        {"prompt_token_ids": ids}, p) for ids, p in zip(sent, fake_vllm.LLM.instances[0].generate_calls[0]["params"]))]
    width = max(map(len, got))
    assert r_ids.tolist() == [ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in got]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft on transformers 5
@pytest.mark.parametrize("trainable_tokens", [False, True])
def test_full_weights_merge_lora_without_touching_the_model(tiny, trainable_tokens):
    """A LoRA policy's weights for the engine are those `merge_and_unload` gives (with Quark's
    trainable token rows too), and the model (whose base weights are PPO's reference) keeps its own."""
    import copy

    from peft import LoraConfig, get_peft_model

    path, model, tokenizer = tiny
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                      trainable_token_indices=[3, 5] if trainable_tokens else None)
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_()
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    weights = dict(vllm_engine.full_weights(peft_model))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    expected = dict(merged.named_parameters())
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(weights[name], tensor, atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(weights[q], dict(model.named_parameters())[q])  # the adapters count
    assert all(torch.equal(v, peft_model.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft on transformers 5
def test_weight_sync_streams_one_merged_tensor_at_a_time(tiny):
    """A sync holds one fp32 merge beside the model, not all of them (a 7B model's would be ~26 GB):
    `full_weights` makes each when asked and keeps none, leaves grad mode as the caller has it,
    and `update_weights` hands the stream to vLLM's `load_weights` without listing it first."""
    import copy
    import types
    import weakref

    from peft import LoraConfig, get_peft_model

    path, model, tokenizer = tiny
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    refs, merged = [], 0
    for name, tensor in vllm_engine.full_weights(peft_model):
        assert torch.is_grad_enabled(), name  # the stream does not switch gradients off around its caller
        merged += tensor.dtype == torch.float32 and name.endswith("proj.weight")
        refs.append(weakref.ref(tensor))
        del tensor
        assert sum(r() is not None for r in refs) <= 1, name
    assert merged >= 4 and len(refs) == len(dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters()))

    received = []
    engine = types.SimpleNamespace(reset_prefix_cache=lambda: None)
    engine.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(
        model_runner=types.SimpleNamespace(model=types.SimpleNamespace(load_weights=received.append)))))
    vllm_engine.VLLMEngine.update_weights(types.SimpleNamespace(llm=engine), vllm_engine.full_weights(peft_model))
    (stream,) = received
    assert not isinstance(stream, (list, tuple))
    assert [name for name, _ in stream] == [name for name, _ in vllm_engine.full_weights(peft_model)]


def test_ppo_lora_on_the_engine_sends_merged_weights(toy_rm, fake_vllm):
    root, sft, rm = toy_rm
    cfg = small_cfg(root, sft, rm, "vllm_lora", steps=2, use_lora=True, lora_r=4, lr=5e-2, engine="vllm")
    ppo.train(cfg, prompts=toy_prompts(8, seed=8))
    loads = fake_vllm.LLM.instances[0].model.loads
    sft_weights = load_file(sft / "model.safetensors")
    assert len(loads) == 2 and loads[0].keys() == sft_weights.keys()
    assert all(torch.equal(loads[0][k], w) for k, w in sft_weights.items())  # fresh adapters: B = 0
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(loads[1][q], sft_weights[q])  # after one update the adapters are merged in


def test_quark_rollouts_sample_from_the_policy_after_each_iteration(fake_vllm, tmp_path, monkeypatch):
    """Quark on the engine: it starts from the SFT model with the reward tokens, and rollout k runs on
    the weights iteration k-1's training left (recorded when its checkpoint is written)."""
    from prefgym.io import write_jsonl
    from prefgym.methods import common, quark
    from test_methods_other import RECORDS, make_policy_and_reward_model

    policy, rm = make_policy_and_reward_model(tmp_path / "models")
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    trained = []
    save_checkpoint = common.save_checkpoint

    def recording(accelerator, *args):
        policy = accelerator.unwrap_model(accelerator._models[0])
        trained.append({k: v.clone() for k, v in vllm_engine.full_weights(policy)})
        return save_checkpoint(accelerator, *args)

    monkeypatch.setattr(common, "save_checkpoint", recording)
    cfg = quark.QuarkConfig(policy_model=str(policy), reward_model=str(rm), prompts_file=str(tmp_path / "prompts.jsonl"),
                            output_dir=str(tmp_path / "q"), num_quantiles=3, iterations=3, rollout_batch_size=4,
                            steps_per_iteration=1, per_device_batch_size=2, lr=1e-2, max_new_tokens=5, max_length=128,
                            progress=False, engine="vllm")
    out = quark.train(cfg)
    (llm,) = fake_vllm.LLM.instances
    assert llm.model_path == str(out / quark.ENGINE_START) and not (out / quark.ENGINE_START).exists()
    assert len(llm.tokenizer) == len(common.load_tokenizer(policy)) + 3  # the reward tokens are there
    assert len(llm.generate_calls) == 3 and len(trained) == 3
    start = llm.generate_calls[0]["weights"]
    for earlier, later in zip([start] + trained[:2], [c["weights"] for c in llm.generate_calls]):
        assert earlier.keys() == later.keys()
        assert [k for k in earlier if not torch.equal(earlier[k], later[k])] == []
    assert any(not torch.equal(trained[0][k], start[k]) for k in start)  # training moved the policy


def test_generate_cli_backend_vllm(tiny, fake_vllm, tmp_path, capsys):
    """`prefgym generate --backend vllm` writes what `--backend hf --batch-size 1` writes."""
    from prefgym.cli import main

    path = tiny[0]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": i}) + "\n" for i in ("Add 3 and 4.", "List two colors.", "x")))
    common = ["--model", str(path), "--data", str(data), "--max-new-tokens", "6", "--num-samples", "2", "--no-progress"]
    assert main(["generate", *common, "--out", str(tmp_path / "hf.json"), "--batch-size", "1"]) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "vllm.json"), "--backend", "vllm"]) == 0
    written = json.loads((tmp_path / "vllm.json").read_text())
    assert written == json.loads((tmp_path / "hf.json").read_text()) and len(written) == 3
    assert len(fake_vllm.LLM.instances) == 1


def test_generate_cli_backend_vllm_without_vllm_exits_2(tiny, no_vllm, tmp_path, capsys):
    from prefgym.cli import main

    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"instruction": "Add 3 and 4."}) + "\n")
    out = tmp_path / "o.json"
    argv = ["generate", "--model", str(tiny[0]), "--data", str(data), "--out", str(out), "--backend", "vllm"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install 'prefgym[vllm]'" in err and "Traceback" not in err
    assert not out.exists() and not out.with_name(out.name + ".partial.jsonl").exists()


def test_best_of_n_on_the_engine_writes_the_hf_path_records(fake_vllm, tmp_path):
    """Best-of-n with engine vllm: the same file as the HF path with one prompt per generate call
    (samples, rewards, chosen output), whatever its generation_batch_size."""
    from prefgym.io import write_jsonl
    from prefgym.methods import best_of_n
    from test_methods_other import RECORDS, make_policy_and_reward_model

    policy, rm = make_policy_and_reward_model(tmp_path / "models")
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    base = dict(policy_model=str(policy), reward_model=str(rm), data=str(tmp_path / "prompts.jsonl"), n=3,
                max_new_tokens=6, chunk_size=4, progress=False)
    hf = best_of_n.run(best_of_n.BestOfNConfig(**base, output_file=str(tmp_path / "hf.json"), generation_batch_size=1))
    vl = best_of_n.run(best_of_n.BestOfNConfig(**base, output_file=str(tmp_path / "vl.json"), generation_batch_size=3,
                                               engine="vllm"))
    rows = json.loads(vl.read_text())
    assert rows == json.loads(hf.read_text()) and len(rows) == len(RECORDS)
    assert all(len(set(r["outputs"])) > 1 for r in rows)
    assert len(fake_vllm.LLM.instances) == 1


def test_expert_iteration_passes_the_engine_to_best_of_n(monkeypatch):
    from prefgym.methods import expert_iteration

    seen = []

    def best_of_n_run(cfg):
        seen.append(cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr(expert_iteration, "run_best_of_n", best_of_n_run)
    cfg = expert_iteration.ExpertIterationConfig(model_name_or_path="m", reward_model="r", prompts_file="p",
                                                 engine="auto", vllm_gpu_memory_utilization=0.5)
    with pytest.raises(RuntimeError, match="stop here"):
        expert_iteration.train(cfg)
    assert (seen[0].engine, seen[0].vllm_gpu_memory_utilization) == ("auto", 0.5)
    # the SFT model samples the prompts split; the output goes into the expert iteration's folder
    assert (seen[0].policy_model, seen[0].reward_model, seen[0].data, seen[0].split) == ("m", "r", "p", "unlabeled")
    assert seen[0].output_file == str(Path(cfg.output_dir) / expert_iteration.BEST_OF_N_FILE)


def test_preference_data_samples_with_its_engine(tiny, tmp_path, monkeypatch):
    from prefgym.methods import preference_data
    from prefgym.models import generation

    seen = []

    def generate_sharded(model, tokenizer, prompts, cfg, first_index=0):
        seen.append(cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr(generation, "generate_sharded", generate_sharded)
    cfg = preference_data.PreferenceDataConfig(policy_model=str(tiny[0]), output_dir=str(tmp_path / "p"),
                                               engine="vllm", vllm_gpu_memory_utilization=0.6)
    with pytest.raises(RuntimeError, match="stop here"):
        preference_data.run(cfg, records=[{"instruction": "Add 3 and 4."}])
    assert (seen[0].engine, seen[0].vllm_gpu_memory_utilization) == ("vllm", 0.6)


def test_evaluate_cli_engine(tiny, fake_vllm, tmp_path, capsys):
    """`prefgym evaluate --model M --engine vllm` judges the outputs the engine wrote: those of the
    HF path with one prompt per batch (the same records, so the same win-rate)."""
    from prefgym.cli import main

    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps([{"instruction": i, "input": "", "output": "seven", "generator": "reference"}
                                     for i in ("Add 3 and 4.", "List two colors.", "Name a tool.")]))
    common = ["--model", str(tiny[0]), "--reference", str(reference), "--max-new-tokens", "5",
              "--annotators", "world_pool"]
    assert main(["evaluate", *common, "--engine", "vllm", "-o", str(tmp_path / "v")]) == 0
    assert len(fake_vllm.LLM.instances) == 1
    engine_rows = json.loads((tmp_path / "v" / "model_outputs.json").read_text())
    from prefgym.models.generation import SamplingConfig, generate_outputs

    hf_rows = generate_outputs(tiny[0], json.loads(reference.read_text()),
                               SamplingConfig(max_new_tokens=5, seed=0, batch_size=1), generator=tiny[0].name)
    assert [r["output"] for r in engine_rows] == [r["output"] for r in hf_rows]
    capsys.readouterr()
    assert main(["evaluate", *common, "--engine", "nope"]) == 2
    assert "engine" in capsys.readouterr().err
