"""The whole pipeline: config validation, resumable stages, and `prefgym run --scale quick` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from prefgym.cli import main
from prefgym.errors import ConfigError
from prefgym.pipeline import ALL_METHODS, DEFAULT_METHODS, Stage, load_run_config, run_stages


def test_run_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("scale: quick\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_run_config(path)
    assert main(["run", "--config", str(path)]) == 2


def test_run_config_rejects_unknown_methods_and_stage_keys(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown method"):
        load_run_config(None, methods=["ppo", "rlhf-magic"])
    path = tmp_path / "run.yaml"
    path.write_text(f"out_dir: {tmp_path / 'out'}\nworld_dir: {tmp_path / 'nowhere'}\n"
                    "base_model: x\ndata: {sft: x.json}\nstages: {sft: {lr: 1.0, epochz: 3}}\n")
    # the bad stage key is reported before any training starts, naming the stage and the key
    assert main(["run", "--config", str(path)]) == 2
    assert "stages.sft" in capsys.readouterr().err


def test_stages_resume_after_a_failure(tmp_path):
    calls = []

    def ok(name):
        return lambda: calls.append(name)

    def boom():
        calls.append("b")
        raise RuntimeError("killed")

    stages = [Stage("a", ok("a"), 1), Stage("b", boom, 1), Stage("c", ok("c"), 1), Stage("r", ok("r"), 0, always=True)]
    with pytest.raises(RuntimeError):
        run_stages(stages, tmp_path)
    assert calls == ["a", "b"]
    stages[1] = Stage("b", ok("b"), 1)
    run_stages(stages, tmp_path)
    # a is not repeated; b (failed) and c run; the always-stage runs every time
    assert calls == ["a", "b", "b", "c", "r"]
    run_stages(stages, tmp_path)
    assert calls == ["a", "b", "b", "c", "r", "r"]
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"a", "b", "c", "r"}


def test_quick_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--scale", "quick", "--out", str(out)]) == 0
    table = pd.read_csv(out / "leaderboard.csv", index_col=0)
    assert set(table.index) == {"reference", "sft", *DEFAULT_METHODS}
    for column in ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total",
                   "human_win_rate", "gold_win_rate", "labels", "label_price"):
        assert column in table.columns
    n_pairs = len(json.loads((out / "sim" / "preference" / "preferences.json").read_text()))
    assert (table.loc[list(DEFAULT_METHODS), "labels"] == n_pairs).all()  # all trained on the run's pairs
    assert table.loc["sft", "labels"] == table.loc["reference", "labels"] == 0
    n_eval = len(json.loads((out / "world" / "data" / "eval.json").read_text()))
    assert (table["n_total"] == n_eval).all()
    # the reference judged against itself is a draw on every example
    assert table.loc["reference", "win_rate"] == pytest.approx(50.0)
    assert ((table["win_rate"] >= 0) & (table["win_rate"] <= 100)).all()
    ranked = [line for line in (out / "leaderboard.md").read_text().splitlines()
              if line.startswith("| ") and not line.startswith("| rank")]
    assert len(ranked) == len(table) - 1 and not any("| reference |" in line for line in ranked)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # win-rates by evaluator, PPO over-optimization, PPO KL
    curve = json.loads((out / "sim" / "eval" / "ppo_curve.json").read_text())
    assert [p["step"] for p in curve] == [0, 3, 6]
    # a second run resumes: every stage but the report is skipped, results unchanged
    timings = json.loads((out / "timings.json").read_text())
    capsys.readouterr()
    assert main(["run", "--scale", "quick", "--out", str(out)]) == 0
    assert "done already, skipped" in capsys.readouterr().err
    assert {k: v for k, v in json.loads((out / "timings.json").read_text()).items() if k != "report"} == \
        {k: v for k, v in timings.items() if k != "report"}
    assert pd.read_csv(out / "leaderboard.csv", index_col=0).equals(table)
    # the same folder with another seed: refused before any stage runs, the folder left as it was
    run_config = (out / "run_config.json").read_text()
    assert main(["run", "--scale", "quick", "--seed", "1", "--out", str(out)]) == 2
    assert "stage world was made with other settings (seed: 0 -> 1)" in capsys.readouterr().err
    assert (out / "run_config.json").read_text() == run_config
    assert pd.read_csv(out / "leaderboard.csv", index_col=0).equals(table)


def test_example_run_config_is_valid_for_every_stage():
    """configs/run_example.yaml (real models) parses, and each stage's overrides fit its config."""
    from pathlib import Path

    from prefgym.pipeline import Pipeline

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "run_example.yaml")
    assert cfg.base_model and cfg.human_annotators is None and set(cfg.methods) == set(DEFAULT_METHODS)
    pipeline = Pipeline(cfg)
    from prefgym.methods import (best_of_n, dpo, expert_iteration, ppo, preference_data, quark,
                                 reward_model, sft)

    for stage, cls in [("sft", sft.SFTConfig), ("preference_data", preference_data.PreferenceDataConfig),
                       ("reward_model", reward_model.RewardModelConfig), ("ppo", ppo.PPOConfig),
                       ("dpo", dpo.DPOConfig), ("best_of_n", best_of_n.BestOfNConfig),
                       ("expert_iteration", expert_iteration.ExpertIterationConfig), ("quark", quark.QuarkConfig)]:
        made = pipeline.make_config(cls, stage)
        for key, value in cfg.stages[stage].items():
            assert getattr(made, key) == value
    assert pipeline.sampling().max_new_tokens == 300
    # on real models the world's tuned scale settings do not leak in: other fields keep the defaults
    assert not pipeline.on_world
    assert pipeline.make_config(ppo.PPOConfig, "ppo").num_mini_batches == ppo.PPOConfig().num_mini_batches
    assert pipeline.make_config(sft.SFTConfig, "sft").save_steps == sft.SFTConfig().save_steps


def test_smollm2_run_config_is_valid_for_every_stage():
    """configs/run_smollm2.yaml (the whole loop on SmolLM2-135M): every stage's section fits its
    config; every training stage trains LoRA adapters with float32 weights in bf16 mixed precision,
    and the sampling-only stages load bf16 weights."""
    from pathlib import Path

    from prefgym.pipeline import Pipeline

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "run_smollm2.yaml")
    pipeline = Pipeline(cfg)
    pipeline.check_stage_sections()
    assert cfg.base_model == "models/smollm2" and cfg.scale == "quick" and not pipeline.on_world
    for name in cfg.methods:
        made = pipeline.method_config(name, "sim")
        trains = hasattr(made, "mixed_precision")
        assert (made.dtype, getattr(made, "mixed_precision", None)) == (("float32", "bf16") if trains else ("bfloat16", None))
        assert getattr(made, "use_lora", True)
        for key, value in cfg.stages[name].items():
            assert getattr(made, key) == value
    for made in (pipeline.sft_config(), pipeline.reward_model_config("sim")):
        assert made.use_lora and (made.dtype, made.mixed_precision) == ("float32", "bf16")


def test_methods_are_chosen_by_name_and_group():
    from prefgym.pipeline import METHOD_GROUPS

    assert load_run_config(None).methods == list(DEFAULT_METHODS) == METHOD_GROUPS["classic"]
    assert METHOD_GROUPS["new"] == ["rloo", "grpo", "kto", "simpo", "online_dpo"]
    assert load_run_config(None, methods=["all"]).methods == list(ALL_METHODS)
    assert load_run_config(None, methods=["dpo", "classic", "online_dpo"]).methods == \
        ["dpo", *[m for m in DEFAULT_METHODS if m != "dpo"], "online_dpo"]
    with pytest.raises(ConfigError, match="unknown method 'newer'.*or a group: classic, new, all"):
        load_run_config(None, methods=["newer"])
    assert main(["run", "--methods", "classic,bogus", "--out", "/nonexistent/x"]) == 2


@pytest.mark.parametrize("scale", ["quick", "default"])
def test_every_method_is_a_stage_with_world_settings_that_fit_its_config(tmp_path, scale):
    """Each registered method's spec builds its config from the run (paths into the run folder) and
    its world-tuned settings at both scales are fields of its config; all are planned and evaluated."""
    from prefgym.methods import registry
    from prefgym.pipeline import Pipeline

    out = tmp_path / "run"
    pipeline = Pipeline(load_run_config(None, scale=scale, out_dir=str(out), methods=["all"], validate=True))
    stages = {s.name: s for s in pipeline.stages()}
    for name in ALL_METHODS:
        spec = registry.spec(name)
        assert set(spec.world_settings) == {"quick", "default"}, name
        config = pipeline.method_config(name, "sim")
        for key, value in spec.world_settings[scale].items():
            assert getattr(config, key) == value, (name, key)
        assert f"sim/{name}" in stages["sim/evaluate"].after and f"human/{name}" in stages
        folder = getattr(config, "output_dir", None) or str(Path(config.output_file).parent)
        assert folder == str(out / "sim" / "methods" / name)
    assert pipeline.method_config("online_dpo", "human").annotators == "world_humans"
    assert pipeline.method_config("online_dpo", "sim").annotators == "world_pool_noisy"


def test_method_times_are_added_per_group_over_both_feedback_sources():
    from prefgym.pipeline import group_times

    timings = {"sim/dpo": 30, "human/dpo": 12.5, "sim/ppo": 61, "sim/online_dpo": 20, "sft": 100, "sim/kto": 5}
    assert group_times(["dpo", "ppo", "online_dpo"], timings) == \
        "classic 1m43s (ppo 1m01s, dpo 42s); new 20s (online_dpo 20s)"  # kto not in this run: not counted


def test_leaderboard_markdown_has_a_labels_column_only_when_rows_have_labels():
    from prefgym.evaluation.report import markdown_leaderboard

    facts = {"n_eval": 2, "scale": "quick", "seed": 0, "columns": {"pool": "world_pool"}}
    rows = [{"generator": "dpo", "win_rate": 40.0, "standard_error": 2.0, "avg_length": 20, "labels": 400,
             "label_price": 2.104},
            {"generator": "sft", "win_rate": 30.0, "standard_error": 2.0, "avg_length": 25, "labels": 0,
             "label_price": 0.0},
            {"generator": "reference", "win_rate": 50.0, "standard_error": 0.0, "avg_length": 9, "labels": 0}]
    text = markdown_leaderboard(rows, facts, [])
    assert "| rank | generator | win-rate (pool) | avg length | labels |" in text
    assert "| 1 | dpo | 40.0 ± 2.0 | 20 | 400 ($2.10) |" in text and "| 2 | sft | 30.0 ± 2.0 | 25 | 0 |" in text
    old = markdown_leaderboard([{k: v for k, v in r.items() if not k.startswith("label")} for r in rows], facts, [])
    assert "labels" not in old  # results made before labels were counted: no empty column


def test_report_html_has_the_labels_column_when_rows_have_labels():
    from prefgym.evaluation.report import render_html

    facts = {"n_eval": 2, "scale": "quick", "seed": 0, "columns": {"pool": "world_pool"}, "data": "the world",
             "generated": "now", "methods": ["dpo"], "run_dir": "run", "stage_times": {}, "total_seconds": 0,
             "train_annotators": "world_pool_noisy", "versions": {"prefgym": "0.1.0"}}
    rows = [{"generator": "dpo", "win_rate": 40.0, "standard_error": 2.0, "avg_length": 20, "n_total": 2,
             "labels": 400, "label_price": 2.104},
            {"generator": "reference", "win_rate": 50.0, "standard_error": 0.0, "avg_length": 9, "n_total": 2}]
    html = render_html(rows, facts, [], {})
    assert "labels (price, annotator time)" in html and "<td>400 ($2.10)</td>" in html
    plain = render_html([{k: v for k, v in r.items() if not k.startswith("label")} for r in rows], facts, [], {})
    assert "labels (price" not in plain
