"""Stages that sample on the vLLM engine (against the stand-in tests/fake_vllm) load the policy once,
on the engine: best-of-n, expert iteration, preference data and evaluation generation load only the
tokenizer, the engine gets the folder in the dtype the HF path loads, the files are the HF path's,
and the engine's memory is given back when the stage ends (`release_engine`)."""

from __future__ import annotations

import copy
import gc
import json
import pickle
import sys
import weakref
from pathlib import Path

import pytest
import torch

from prefgym.errors import ConfigError
from prefgym.io import write_jsonl
from prefgym.models import vllm_engine
from prefgym.models.generation import SamplingConfig, generate_with_eos
from prefgym.models.loading import load_generator
from prefgym.models.vllm_engine import EngineModel
from test_methods_other import RECORDS, make_policy_and_reward_model
from test_vllm_engine import end_engine_groups

FAKE_VLLM = Path(__file__).parent / "fake_vllm"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama policy and a reward model on its backbone."""
    return make_policy_and_reward_model(tmp_path_factory.mktemp("vllm_stages"))


@pytest.fixture
def fake_vllm(monkeypatch):
    """The stand-in `vllm` importable, no engine left from another test; yields the module."""
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    for name in ("vllm", "vllm.distributed"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(vllm_engine, "_engine", None)
    import vllm
    import vllm.distributed

    vllm.LLM.instances.clear()
    yield vllm
    end_engine_groups()


@pytest.fixture
def causal_lm_loads(monkeypatch):
    """Every `AutoModelForCausalLM.from_pretrained` (the fake engine's included), as (folder, dtype)."""
    from transformers import AutoModelForCausalLM

    loads = []
    original = AutoModelForCausalLM.from_pretrained

    def recording(path, *args, **kwargs):
        loads.append((str(path), kwargs.get("dtype")))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    return loads


def released(fake_vllm, cleanups: int = 1) -> bool:
    """No engine kept, and vLLM's cleanup ran `cleanups` times."""
    return vllm_engine._engine is None and fake_vllm.distributed.calls == cleanups


def test_best_of_n_on_the_engine_loads_the_policy_once_in_the_stage_dtype(models, fake_vllm, causal_lm_loads,
                                                                         tmp_path):
    """bfloat16 from the stage's dtype field: the HF path loads the policy in it; the engine path
    leaves the load to the engine, which gets the folder and bfloat16, writes the HF path's file,
    and is released at the end."""
    from prefgym.methods import best_of_n

    policy, rm = models
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    base = dict(policy_model=str(policy), reward_model=str(rm), data=str(tmp_path / "prompts.jsonl"), n=3,
                max_new_tokens=6, chunk_size=2, progress=False, dtype="bfloat16")
    hf = best_of_n.run(best_of_n.BestOfNConfig(**base, output_file=str(tmp_path / "hf.json"), generation_batch_size=1))
    assert causal_lm_loads == [(str(policy), torch.bfloat16)] and not fake_vllm.LLM.instances
    causal_lm_loads.clear()
    vl = best_of_n.run(best_of_n.BestOfNConfig(**base, output_file=str(tmp_path / "vl.json"), generation_batch_size=2,
                                               engine="vllm"))
    (llm,) = fake_vllm.LLM.instances
    assert causal_lm_loads == [(str(policy), torch.bfloat16)]  # the engine's load, and no other
    assert (llm.model_path, llm.dtype) == (str(policy), "bfloat16")
    assert len(llm.generate_calls) == 3  # chunks of 2, 2, 1 on one engine
    rows = json.loads(vl.read_text())
    assert rows == json.loads(hf.read_text()) and len(rows) == len(RECORDS)
    assert set(rows[0]) >= {"output", "outputs", "rewards", "truncated", "best_index"}
    assert released(fake_vllm)


def test_expert_iteration_fine_tunes_after_the_engine_is_released(models, fake_vllm, causal_lm_loads, tmp_path,
                                                                  monkeypatch):
    from prefgym.methods import expert_iteration

    policy, rm = models
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    at_sft = []

    def train_sft(cfg, records):
        at_sft.append((vllm_engine._engine, fake_vllm.distributed.calls, list(causal_lm_loads), len(records)))
        return Path(cfg.output_dir)

    monkeypatch.setattr(expert_iteration, "train_sft", train_sft)
    cfg = expert_iteration.ExpertIterationConfig(model_name_or_path=str(policy), reward_model=str(rm),
                                                 prompts_file=str(tmp_path / "prompts.jsonl"), n=2,
                                                 max_new_tokens=4, output_dir=str(tmp_path / "ei"), engine="vllm")
    expert_iteration.train(cfg)
    assert at_sft == [(None, 1, [(str(policy), torch.float32)], len(RECORDS))]
    assert len(fake_vllm.LLM.instances) == 1


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_preference_data_on_the_engine_loads_the_policy_once(models, fake_vllm, causal_lm_loads, tmp_path, dtype,
                                                             monkeypatch):
    """The engine runs in the dtype the HF path loads (auto: `auto_dtype()`, here made bfloat16
    whatever this machine's CPU does), and samples.jsonl and preferences.json are the HF path's (one
    prompt per batch there)."""
    from prefgym.methods import preference_data
    from prefgym.models import loading

    monkeypatch.setattr(loading, "auto_dtype", lambda device=None: torch.bfloat16)
    policy = str(models[0])
    expected = torch.float32 if dtype == "float32" else torch.bfloat16
    base = dict(policy_model=policy, num_samples=3, max_new_tokens=6, chunk_size=3, annotators="world_pool",
                dtype=dtype)
    hf = preference_data.run(preference_data.PreferenceDataConfig(**base, output_dir=str(tmp_path / "hf"),
                                                                  batch_size=1), records=RECORDS)
    assert causal_lm_loads == [(policy, expected)] and not fake_vllm.LLM.instances
    causal_lm_loads.clear()
    vl = preference_data.run(preference_data.PreferenceDataConfig(**base, output_dir=str(tmp_path / "vl"),
                                                                  batch_size=4, engine="vllm"), records=RECORDS)
    (llm,) = fake_vllm.LLM.instances
    assert causal_lm_loads == [(policy, expected)]  # the engine's
    assert (llm.model_path, llm.dtype) == (policy, vllm_engine.dtype_name(expected))
    assert (tmp_path / "vl" / "samples.jsonl").read_text() == (tmp_path / "hf" / "samples.jsonl").read_text()
    assert json.loads(vl.read_text()) == json.loads(hf.read_text()) and json.loads(vl.read_text())
    assert released(fake_vllm)


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_evaluation_generation_on_the_engine_loads_the_model_once(models, fake_vllm, causal_lm_loads, tmp_path,
                                                                  command, capsys):
    """`prefgym generate --backend vllm` and `prefgym evaluate --model M --engine vllm` (both through
    `generate_outputs`): the engine's float32 load only, and the engine released once they are done."""
    from prefgym.cli import main

    policy = str(models[0])
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps([{**r, "output": "seven", "generator": "reference"} for r in RECORDS]))
    argv = {"generate": ["generate", "--model", policy, "--data", str(reference), "--out", str(tmp_path / "o.json"),
                         "--max-new-tokens", "4", "--no-progress", "--backend", "vllm"],
            "evaluate": ["evaluate", "--model", policy, "--reference", str(reference), "--max-new-tokens", "4",
                         "--annotators", "world_pool", "-o", str(tmp_path / "e"), "--engine", "vllm"]}[command]
    assert main(argv) == 0
    assert causal_lm_loads == [(policy, torch.float32)] and len(fake_vllm.LLM.instances) == 1
    written = tmp_path / ("o.json" if command == "generate" else "e/model_outputs.json")
    assert [r["instruction"] for r in json.loads(written.read_text())] == [r["instruction"] for r in RECORDS]
    assert released(fake_vllm)


def test_generate_outputs_on_hf_loads_the_model_as_before(models, causal_lm_loads, fake_vllm):
    from prefgym.models.generation import generate_outputs

    rows = generate_outputs(models[0], RECORDS[:2], SamplingConfig(max_new_tokens=3))
    assert causal_lm_loads == [(str(models[0]), torch.float32)] and len(rows) == 2
    assert not fake_vllm.LLM.instances and released(fake_vllm, cleanups=0)


def test_release_engine_drops_the_engine(models, fake_vllm):
    """engine_for keeps one engine between calls; release_engine drops it (nothing refers to the
    vLLM object after) and runs vLLM's cleanup; a second release does nothing; the next call starts anew."""
    handle = EngineModel(str(models[0]), torch.float32, torch.device("cpu"))
    cfg = SamplingConfig(engine="vllm")
    engine = vllm_engine.engine_for(handle, cfg)
    assert vllm_engine.engine_for(handle, cfg) is engine
    engine_ref, llm_ref = weakref.ref(engine), weakref.ref(engine.llm)
    del engine
    fake_vllm.LLM.instances.clear()  # the stand-in's own list of what it built
    gc.collect()
    assert llm_ref() is not None  # kept by engine_for until released
    vllm_engine.release_engine()
    assert engine_ref() is None and llm_ref() is None and released(fake_vllm)
    vllm_engine.release_engine()
    assert released(fake_vllm)  # nothing to release: vLLM's cleanup not run again
    assert vllm_engine.engine_for(handle, cfg) is not None and len(fake_vllm.LLM.instances) == 1


def test_engine_for_releases_the_old_engine_before_starting_another(models, fake_vllm):
    cfg = SamplingConfig(engine="vllm")
    first = vllm_engine.engine_for(EngineModel(str(models[0]), torch.float32, torch.device("cpu")), cfg)
    llm_ref = weakref.ref(first.llm)
    del first
    fake_vllm.LLM.instances.clear()
    second = vllm_engine.engine_for(EngineModel(str(models[0]), torch.bfloat16, torch.device("cpu")), cfg)
    assert llm_ref() is None and fake_vllm.distributed.calls == 1
    assert second.llm.dtype == "bfloat16"


def test_training_loop_engine_is_kept_then_released_by_the_next_engine_or_the_pipeline(models, fake_vllm, tmp_path):
    """A training loop's engine (`common.rollout_engine`) lives in the same slot: reused by a loop with
    the same settings, released before a sampling stage's engine starts, and `prefgym run` releases
    whatever engine a stage left after the stage (`run_stages`), on an error too."""
    from prefgym.methods import common
    from prefgym.methods.rloo import RLOOConfig
    from prefgym.models import load_model_and_tokenizer
    from prefgym.pipeline import Stage, run_stages

    policy, tokenizer = load_model_and_tokenizer(models[0], padding_side="left")
    cfg = RLOOConfig(policy_model=str(models[0]), engine="vllm", max_prompt_length=32, max_new_tokens=8)
    rollouts = common.rollout_engine(cfg, policy, tokenizer)
    assert common.rollout_engine(cfg, policy, tokenizer) is rollouts and len(fake_vllm.LLM.instances) == 1
    assert rollouts.llm.engine_args["max_model_len"] == 40
    llm_ref = weakref.ref(rollouts.llm)
    del rollouts
    fake_vllm.LLM.instances.clear()
    vllm_engine.engine_for(EngineModel(str(models[0]), torch.float32, torch.device("cpu")), SamplingConfig(engine="vllm"))
    assert llm_ref() is None and fake_vllm.distributed.calls == 1  # released before the stage's engine started

    def stage_keeping_an_engine():
        common.rollout_engine(cfg, policy, tokenizer)

    def failing_stage():
        common.rollout_engine(cfg, policy, tokenizer)
        raise RuntimeError("stage failed")

    run_stages([Stage("rollouts", stage_keeping_an_engine, 1)], tmp_path / "run")
    assert vllm_engine._engine is None and fake_vllm.distributed.calls == 3  # the old one when the stage started its own, then the stage's
    with pytest.raises(RuntimeError, match="stage failed"):
        run_stages([Stage("failing", failing_stage, 1)], tmp_path / "run")
    assert vllm_engine._engine is None and fake_vllm.distributed.calls == 4


def test_training_loops_on_the_engine_end_cleanly_inside_prefgym_run(models, fake_vllm, tmp_path):
    """The engine joins torch.distributed itself (a world of one, as vLLM's external launcher does)
    and its cleanup ends those groups: a training loop gives its engine back before Accelerate ends
    the process group, so two RLOO stages in one `run_stages` both finish and are recorded; the
    launcher's variables are set only while an engine starts (Accelerate would take a LOCAL_RANK
    left in the environment for a launch)."""
    import os

    import torch.distributed as dist

    from prefgym.methods import rloo
    from prefgym.pipeline import Stage, run_stages
    from test_prefdata_toy import toy_prompts

    policy, reward = models
    seen_during = []
    start = vllm_engine.VLLMEngine.__init__

    def recording_start(self, *args, **kwargs):
        start(self, *args, **kwargs)
        seen_during.append((dist.is_initialized(), "LOCAL_RANK" in os.environ))

    def stage(name, lora):
        cfg = rloo.RLOOConfig(policy_model=str(policy), reward_model=str(reward), output_dir=str(tmp_path / name),
                              steps=1, per_device_prompts=2, k=2, max_new_tokens=4, max_prompt_length=32,
                              engine="vllm", use_lora=lora)
        return Stage(name, lambda: rloo.train(cfg, prompts=toy_prompts(4, seed=1)), 1)

    before = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    vllm_engine.VLLMEngine.__init__ = recording_start
    try:
        run_stages([stage("rloo-a", False), stage("rloo-b", True)], tmp_path / "run")
    finally:
        vllm_engine.VLLMEngine.__init__ = start
    assert (tmp_path / "run" / ".done" / "rloo-a").exists() and (tmp_path / "run" / ".done" / "rloo-b").exists()
    assert seen_during == [(True, False), (True, False)]  # joined while starting; the variables gone after
    assert {k: os.environ.get(k) for k in before} == before and not dist.is_initialized()
    assert vllm_engine._engine is None and fake_vllm.distributed.calls == 2  # each loop's engine, at its end


def test_a_prompt_longer_than_vllm_max_model_len_allows_is_a_config_error(models, fake_vllm):
    from prefgym.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(models[0], padding_side="left")
    prompt = " ".join(["word"] * 40)
    n = len(tokenizer(prompt)["input_ids"])
    with pytest.raises(ConfigError, match=f"vllm_max_model_len' is {n + 7} tokens.*{n} tokens and max_new_tokens 8"):
        generate_with_eos(model, tokenizer, [prompt], SamplingConfig(engine="vllm", max_new_tokens=8,
                                                                     vllm_max_model_len=n + 7))
    texts, _ = generate_with_eos(model, tokenizer, [prompt], SamplingConfig(engine="vllm", max_new_tokens=8,
                                                                            vllm_max_model_len=n + 8))
    assert len(texts) == 1


def test_releasing_engine_releases_on_error(models, fake_vllm):
    handle = EngineModel(str(models[0]), torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="stop"), vllm_engine.releasing_engine():
        vllm_engine.engine_for(handle, SamplingConfig(engine="vllm"))
        raise RuntimeError("stop")
    assert released(fake_vllm)


def test_release_without_an_engine_needs_no_vllm(monkeypatch):
    for name in ("vllm", "vllm.distributed"):
        monkeypatch.setitem(sys.modules, name, None)  # `import vllm` fails
    monkeypatch.setattr(vllm_engine, "_engine", None)
    vllm_engine.release_engine()


def test_load_generator_loads_the_weights_on_hf_only(models, causal_lm_loads, monkeypatch):
    from prefgym.methods.best_of_n import BestOfNConfig

    policy = models[0]
    cfg = BestOfNConfig(dtype="bfloat16")
    model, tokenizer = load_generator(policy, "hf", device="auto", cfg=cfg)
    assert isinstance(model, torch.nn.Module) and model.dtype == torch.bfloat16 and not model.training
    assert causal_lm_loads == [(str(policy), torch.bfloat16)] and tokenizer.padding_side == "left"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    handle, tokenizer = load_generator(policy, "vllm", device="auto", cfg=cfg)
    assert handle == EngineModel(str(policy), torch.bfloat16, torch.device("cpu"))
    assert len(causal_lm_loads) == 1 and tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert load_generator(policy, "vllm")[0].dtype == torch.float32  # no cfg: float32, as load_model_and_tokenizer
    for engine in ("hf", "vllm"):
        with pytest.raises(ConfigError, match="model folder not found: /nowhere/model"):
            load_generator("/nowhere/model", engine)


def test_engine_model_refuses_what_needs_weights(models):
    """A stage that tried a forward pass or HF sampling on the handle gets an error that says why."""
    from prefgym.models.loading import load_tokenizer

    handle = EngineModel(str(models[0]), torch.float32, torch.device("cpu"))
    with pytest.raises(TypeError, match="no forward pass: its weights are on the vLLM engine only"):
        handle(torch.tensor([[1, 2]]))
    with pytest.raises(AttributeError, match="has no 'generate': its weights are on the vLLM engine only"):
        handle.generate
    tokenizer = load_tokenizer(models[0], padding_side="left")
    with pytest.raises(AttributeError, match="vLLM engine only"):
        generate_with_eos(handle, tokenizer, ["Add 3 and 4."], SamplingConfig(engine="hf"))
    assert not hasattr(handle, "get_base_model")
    assert copy.deepcopy(handle) == handle == pickle.loads(pickle.dumps(handle))
