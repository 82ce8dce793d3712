"""Run folders: the run config is checked whole before any stage, and a folder made with other
settings is never silently reused (each stage records a fingerprint of what determines it)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from prefgym.cli import main
from prefgym.errors import ConfigError
from prefgym.pipeline import Pipeline, Stage, load_run_config, plan_stages, run_stages


# --- the run config, checked whole before the first stage ----------------------------------------

def _config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(f"out_dir: {tmp_path / 'out'}\n" + text)
    return path


@pytest.mark.parametrize("text, message", [
    ("seed: abc\n", "key 'seed' should be int, got 'abc'"),
    ("methods: ppo\n", "key 'methods' should be list[str], got 'ppo'"),
    ("stages: {rlhf: {lr: 1}}\n", "stages: unknown stage 'rlhf'"),
    ("stages: {ppo: 3}\n", "stages.ppo should be a mapping"),
    ("data: {evaluation: x.json}\n", "data: unknown split 'evaluation'"),
    ("stages: {ppo: {steps: many}}\n", "stages.ppo: key 'steps' should be int, got 'many'"),
    ("stages: {quark: {learning_rate: 1e-4}}\n", "stages.quark: unknown key 'learning_rate'"),
    ("stages: {evaluate: {temperature: hot}}\n", "stages.evaluate: key 'temperature' should be float"),
    ("methods: [dpo]\nstages: {ppo: {kl_coef: [1]}}\n", "stages.ppo: key 'kl_coef' should be float"),
])
def test_run_config_is_checked_whole_before_any_stage(tmp_path, capsys, monkeypatch, text, message):
    import prefgym.pipeline

    def no_stage_may_run(*args, **kwargs):
        raise AssertionError("the config error was not found before the first stage")

    monkeypatch.setattr(prefgym.pipeline, "run_stages", no_stage_may_run)
    path = _config(tmp_path, text)
    assert main(["run", "--scale", "quick", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "<class" not in err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_type_names_read_as_written():
    from prefgym.methods.common import type_name
    from prefgym.models.generation import SamplingConfig

    assert type_name(int) == "int"
    assert type_name(int | None) == "int or None"
    assert type_name(list[str]) == "list[str]"
    with pytest.raises(ConfigError, match=r"key 'max_new_tokens' should be int, got 1.5$"):
        Pipeline(load_run_config(None, stages={"evaluate": {"max_new_tokens": 1.5}})).sampling()


# --- stage fingerprints, with stages that only record what ran -------------------------------------

def _stages(calls, lr=1.0, extra=False, evaluate_after=("a", "b")):
    def stage(name, settings, after=(), outputs=()):
        return Stage(name, lambda: calls.append(name), 1, settings=settings, after=after, outputs=outputs)

    plan = [stage("a", {"seed": 0}), stage("b", {"lr": lr, "model": {"layers": 2}}, after=("a",)),
            stage("c", {"k": 1}, after=("b",))]
    if extra:
        plan.append(stage("d", {"n": 4}, after=("a",)))
    plan.append(stage("evaluate", {"annotators": "pool"}, after=evaluate_after))
    return plan


def test_a_stage_done_with_other_settings_stops_the_run_before_anything_runs(tmp_path):
    calls = []
    run_stages(_stages(calls), tmp_path)
    assert calls == ["a", "b", "c", "evaluate"]
    run_stages(_stages(calls), tmp_path)
    assert calls == ["a", "b", "c", "evaluate"]  # same settings: all skipped

    new_stage = Stage("first", lambda: calls.append("first"), 1, settings={})
    with pytest.raises(ConfigError, match=r"stage b was made with other settings \(lr: 1.0 -> 2.0\).*--overwrite"):
        run_stages([new_stage, *_stages(calls, lr=2.0)], tmp_path)
    assert calls == ["a", "b", "c", "evaluate"]  # checked before the first stage: nothing ran


def test_overwrite_redoes_the_stage_and_what_depends_on_it(tmp_path):
    calls = []
    out_b = tmp_path / "b-out"
    stages = _stages(calls)
    stages[1] = dataclasses.replace(stages[1], outputs=(out_b,))
    run_stages(stages, tmp_path)
    out_b.mkdir()
    (out_b / "model.bin").write_text("trained with lr 1")
    calls.clear()
    changed = _stages(calls, lr=2.0)
    changed[1] = dataclasses.replace(changed[1], outputs=(out_b,))
    run_stages(changed, tmp_path, overwrite=True)
    # a does not depend on b; c and evaluate do (through b)
    assert calls == ["b", "c", "evaluate"]
    assert not out_b.exists()  # the old result went before b ran again
    calls.clear()
    run_stages(_stages(calls, lr=2.0), tmp_path)
    assert calls == []  # the new settings are now the recorded ones


def test_adding_and_removing_what_a_stage_reads_reruns_it_without_an_error(tmp_path):
    calls = []
    run_stages(_stages(calls), tmp_path)
    calls.clear()
    # a method added: its stage runs, and the evaluation that reads it runs again
    run_stages(_stages(calls, extra=True, evaluate_after=("a", "b", "d")), tmp_path)
    assert calls == ["d", "evaluate"]
    calls.clear()
    run_stages(_stages(calls, extra=True, evaluate_after=("a", "d")), tmp_path)
    assert calls == ["evaluate"]


def test_a_field_added_to_a_config_at_its_default_is_not_a_change(tmp_path):
    """Run folders survive a prefgym update that adds config fields: a field the record lacks is
    no change while it keeps its default (the stage and those after it are skipped, records
    brought up to date); set to another value it is a change like any other."""
    from prefgym.pipeline import StageSettings

    calls = []
    run_stages(_stages(calls), tmp_path)
    calls.clear()

    def updated(ensemble_size):
        stages = _stages(calls)
        stages[1] = dataclasses.replace(stages[1], settings=StageSettings(
            {**stages[1].settings, "ensemble_size": ensemble_size}, {"ensemble_size": 1, "lr": 0.5}))
        return stages

    plan, _ = plan_stages(updated(1), tmp_path)
    assert plan == {"a": "skip", "b": "upgrade", "c": "upgrade", "evaluate": "upgrade"}
    run_stages(updated(1), tmp_path)
    assert calls == []
    assert plan_stages(updated(1), tmp_path)[0] == {s: "skip" for s in "a b c evaluate".split()}  # records updated
    with pytest.raises(ConfigError, match=r"stage b was made with other settings \(ensemble_size: 1 -> 3\)"):
        plan_stages(updated(3), tmp_path)  # the record now has the field: 3 is a change
    fresh = tmp_path / "fresh"
    run_stages(_stages(calls), fresh)
    with pytest.raises(ConfigError, match=r"ensemble_size: \(absent\) -> 3"):
        plan_stages(updated(3), fresh)  # a new field away from its default is a change
    stages = updated(1)
    stages[0] = dataclasses.replace(stages[0], settings={"seed": 1})
    with pytest.raises(ConfigError, match=r"stage a was made with other settings \(seed: 0 -> 1\)"):
        plan_stages(stages, fresh)


def test_an_upgrade_made_by_an_earlier_invocation_is_remembered_by_the_stages_after_it(tmp_path):
    """Studies run their stages in several invocations: b upgraded in one (only a and b planned),
    c and evaluate, done before the upgrade, are still not run again in the next."""
    from prefgym.pipeline import StageSettings

    calls = []
    run_stages(_stages(calls), tmp_path)
    calls.clear()

    def updated():
        stages = _stages(calls)
        stages[1] = dataclasses.replace(stages[1], settings=StageSettings(
            {**stages[1].settings, "ensemble_size": 1}, {"ensemble_size": 1}))
        return stages

    assert plan_stages(updated()[:2], tmp_path)[0] == {"a": "skip", "b": "upgrade"}
    run_stages(updated()[:2], tmp_path)
    plan, _ = plan_stages(updated(), tmp_path)
    assert plan == {"a": "skip", "b": "skip", "c": "upgrade", "evaluate": "upgrade"}
    run_stages(updated(), tmp_path)
    assert calls == []
    assert plan_stages(updated(), tmp_path)[0] == {s: "skip" for s in "a b c evaluate".split()}


def test_a_field_added_to_a_nested_config_at_its_default_is_not_a_change(tmp_path):
    """As above, one level down: the evaluation's `sampling` settings gained `engine` (default hf)."""
    from prefgym.pipeline import StageSettings

    calls = []

    def with_sampling(sampling, defaults):
        stages = _stages(calls)
        stages[-1] = dataclasses.replace(stages[-1], settings={"annotators": "pool",
                                                               "sampling": StageSettings(sampling, defaults)})
        return stages

    run_stages(with_sampling({"temperature": 0.7}, {"temperature": 0.7}), tmp_path)
    calls.clear()
    now = {"temperature": 0.7, "engine": "hf"}
    plan, _ = plan_stages(with_sampling(now, {"temperature": 0.7, "engine": "hf"}), tmp_path)
    assert plan["evaluate"] == "upgrade"
    run_stages(with_sampling(now, {"temperature": 0.7, "engine": "hf"}), tmp_path)
    assert calls == [] and plan_stages(with_sampling(now, {"engine": "hf"}), tmp_path)[0]["evaluate"] == "skip"
    fresh = tmp_path / "fresh"
    run_stages(with_sampling({"temperature": 0.7}, {}), fresh)
    with pytest.raises(ConfigError, match=r"stage evaluate was made with other settings"):
        plan_stages(with_sampling({"temperature": 0.7, "engine": "vllm"}, {"engine": "hf"}), fresh)
    with pytest.raises(ConfigError, match=r"stage evaluate was made with other settings"):  # not a default: a change
        plan_stages(with_sampling({"temperature": 0.9, "engine": "hf"}, {"engine": "hf"}), fresh)


def test_a_marker_without_settings_is_not_trusted(tmp_path):
    (tmp_path / ".done").mkdir()
    (tmp_path / ".done" / "a").write_text("12.5\n")  # as written before fingerprints
    with pytest.raises(ConfigError, match="stage a was made by an older prefgym"):
        plan_stages(_stages([]), tmp_path)
    plan, _ = plan_stages(_stages([]), tmp_path, overwrite=True)
    assert plan == {"a": "redo", "b": "run", "c": "run", "evaluate": "run"}


# --- the real pipeline's stages, recorded without training -----------------------------------------

def _record(cfg):
    """Run the pipeline's plan with every stage replaced by a no-op: records what a run would."""
    stages = [dataclasses.replace(s, run=lambda: None) for s in Pipeline(cfg).stages()]
    run_stages(stages, tmp_out(cfg))
    return stages


def tmp_out(cfg):
    from pathlib import Path

    return Path(cfg.out_dir)


def _plan(cfg, overwrite=False):
    return plan_stages(Pipeline(cfg).stages(), tmp_out(cfg), overwrite)[0]


def test_pipeline_folder_with_another_seed_scale_or_stage_setting(tmp_path):
    out = str(tmp_path / "run")
    _record(load_run_config(None, scale="quick", out_dir=out))
    assert set(_plan(load_run_config(None, scale="quick", out_dir=out)).values()) == {"skip", "run"}
    with pytest.raises(ConfigError, match=r"stage world was made with other settings \(seed: 0 -> 1\)"):
        _plan(load_run_config(None, scale="quick", seed=1, out_dir=out))
    with pytest.raises(ConfigError, match=r"stage world .*scale: 'quick' -> 'default'"):
        _plan(load_run_config(None, scale="default", out_dir=out))
    with pytest.raises(ConfigError, match=r"stage sim/ppo was made with other settings \(lr: 5e-05 -> 0.001\)"):
        _plan(load_run_config(None, scale="quick", out_dir=out, stages={"ppo": {"lr": 1e-3}}))
    # how the run is shown or checkpointed is not a setting of its result
    assert "redo" not in _plan(load_run_config(None, scale="quick", out_dir=out,
                                               stages={"sft": {"progress": False, "save_steps": 7}})).values()
    # --overwrite: that stage, the evaluation that reads it, the report; nothing else
    plan = _plan(load_run_config(None, scale="quick", out_dir=out, stages={"ppo": {"lr": 1e-3}}), overwrite=True)
    assert {k for k, v in plan.items() if v != "skip"} == {"sim/ppo", "sim/evaluate", "report"}
    assert plan["sim/ppo"] == plan["sim/evaluate"] == "redo"


def test_pipeline_folder_gains_methods_and_validation(tmp_path):
    out = str(tmp_path / "run")
    _record(load_run_config(None, scale="quick", out_dir=out, methods=["dpo"]))
    plan = _plan(load_run_config(None, scale="quick", out_dir=out, methods=["dpo", "ppo"], validate=True))
    assert plan["sim/dpo"] == "skip" and plan["sim/ppo"] == "run"
    assert plan["sim/evaluate"] == "redo"  # runs again to add ppo to the table
    assert plan["human/preference_data"] == plan["human/dpo"] == "run"
    assert plan["sft"] == plan["world"] == "skip"


def test_run_command_refuses_a_folder_made_with_another_seed(tmp_path, capsys):
    out = tmp_path / "run"
    _record(load_run_config(None, scale="quick", out_dir=str(out)))
    (out / "run_config.json").write_text(json.dumps({"seed": 0}))
    assert main(["run", "--scale", "quick", "--seed", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stage world" in err and "seed: 0 -> 3" in err and "--overwrite" in err
    assert json.loads((out / "run_config.json").read_text()) == {"seed": 0}  # not overwritten


def test_cached_eval_outputs_follow_the_model_and_the_decoding(tmp_path, monkeypatch):
    """Outputs generated for the evaluation are reused only for the same model (the fingerprint
    of the stage that trained it) and the same decoding settings."""
    import prefgym.methods.reward_conditioning as rc
    from prefgym.io import write_json

    generated = []

    def fake_generate(model_dir, records, sampling, generator, progress=False):
        generated.append((generator, sampling.temperature))
        return [{"instruction": r["instruction"], "output": f"t={sampling.temperature}", "generator": generator}
                for r in records]

    monkeypatch.setattr(rc, "generate_conditioned_outputs", fake_generate)
    out = tmp_path / "run"
    records = [{"instruction": "q", "input": "", "output": "ref"}]

    def outputs(fingerprint, temperature=0.7, previous=()):
        write_json(out / ".done" / "sim" / "dpo", {"fingerprint": fingerprint, "settings": {},
                                                  "previous": list(previous)})
        cfg = load_run_config(None, scale="quick", out_dir=str(out), stages={"evaluate": {"temperature": temperature}})
        return Pipeline(cfg).outputs("dpo", out / "sim" / "methods" / "dpo", "sim", records)

    assert outputs("f1")[0]["output"] == "t=0.7"
    outputs("f1")
    assert generated == [("dpo", 0.7)]  # cached
    outputs("f2")  # dpo trained again: new outputs
    assert generated == [("dpo", 0.7)] * 2
    assert outputs("f2", temperature=1.0)[0]["output"] == "t=1.0"  # other decoding: new outputs
    assert generated == [("dpo", 0.7)] * 2 + [("dpo", 1.0)]
    # the dpo stage upgraded (a field added to prefgym since, at its default): f3, once f2, is the
    # same model, and its outputs are kept, under the new key
    outputs("f3", temperature=1.0, previous=["f1", "f2"])
    assert generated == [("dpo", 0.7)] * 2 + [("dpo", 1.0)]
    key_file = out / "sim" / "eval" / "dpo" / "outputs_key.json"
    assert json.loads(key_file.read_text())["model"] == "f3"
    outputs("f3", temperature=1.0, previous=["f1", "f2"])
    outputs("f4", temperature=1.0, previous=["f1"])  # f3 is not among its names: another model
    assert generated == [("dpo", 0.7)] * 2 + [("dpo", 1.0)] * 2
