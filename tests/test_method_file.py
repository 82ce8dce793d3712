"""Your own method (`prefgym run --method-file`): loading the file, its context (labels counted), the
example examples/my_method.py trained on the tiny world and through the pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from prefgym.cli import main
from prefgym.errors import ConfigError, DataError
from prefgym.io import read_records, write_json
from prefgym.methods import registry
from prefgym.methods.method_file import MethodContext, load_method_file, pairs_account, run_method_file
from prefgym.pipeline import DATA_SPLITS, Pipeline, load_run_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_method.py"


@pytest.mark.parametrize("code, message", [
    ("x = 1\n", "defines no function train(ctx)"),
    ("def train(ctx):\n    return 1\nNAME = 'my method'\n", "NAME should be a name"),
    ("def train(ctx) return 1\n", "could not be loaded: SyntaxError"),
])
def test_a_bad_method_file_is_named_in_a_config_error(tmp_path, code, message):
    path = tmp_path / "mine.py"
    path.write_text(code)
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_method_file(path)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="method file not found"):
        load_method_file(tmp_path / "missing.py")


def test_the_example_declares_its_name_and_train():
    name, train = load_method_file(EXAMPLE)
    assert name == "judge_best_of_2" and callable(train)


def _context(world: Path, out: Path, pairs_file: Path, scale: str = "tiny") -> MethodContext:
    feedme = registry.spec("feedme").world_settings["quick"]
    return MethodContext(sft_model=str(world / "base_model"), reward_model_dir=str(world / "no_reward_model"),
                         pairs_file=str(pairs_file), splits={s: str(world / "data" / f"{s}.json") for s in DATA_SPLITS},
                         annotators="world_pool_noisy", output_dir=out, seed=0, scale=scale,
                         stage_settings=lambda stage: {**feedme, "epochs": 1} if stage == "feedme" else {})


def _pair(i: int, same: bool = False) -> dict:
    return {"instruction": f"Name a colour ({i}).", "input": "", "output_1": "Red.",
            "output_2": "Red." if same else "Blue."}


def test_labels_are_counted_once_per_distinct_pair_and_run_pairs_once(tiny_world, tmp_path):
    pairs_file = tmp_path / "run_pairs.json"
    write_json(pairs_file, [{**_pair(i), "preference": 1, "price_per_example": 0.5, "time_per_example": 2.0}
                            for i in range(3)] + [{**_pair(9), "preference": None}])
    ctx = _context(tiny_world, tmp_path / "m", pairs_file)
    rows = ctx.annotate([_pair(0), _pair(1), _pair(2, same=True)])
    assert len(rows) == 3 and all(r["preference"] is not None for r in rows)
    ctx.annotate([_pair(1), _pair(3)])  # one already labelled (free, from the cache), one new
    price = sum(r["price_per_example"] for r in rows[:2])
    assert ctx.account.labels == 3 and ctx.account.price > price > 0
    ctx.preference_pairs()
    ctx.preference_pairs()  # the run's pairs count once, however often they are read
    _ = ctx.reward_model
    used = ctx.account.as_dict()
    assert used["labels"] == 3 + 3 and used["run_pairs"] == 3
    assert used["price"] == pytest.approx(ctx.account.price + 1.5) and used["seconds"] == pytest.approx(
        ctx.account.seconds + 6.0)
    assert pairs_account(pairs_file) == {"labels": 3, "price": 1.5, "seconds": 6.0}
    with pytest.raises(DataError, match="reference outputs are not for training"):
        ctx.records("eval")
    assert set(ctx.eval_instructions()[0]) == {"instruction", "input"}


def test_the_example_trains_a_policy_on_the_tiny_world(tiny_world, tmp_path):
    """examples/my_method.py end to end on the tiny world: samples, labels (counted), SFT on the winners."""
    from transformers import AutoModelForCausalLM

    ctx = _context(tiny_world, tmp_path / "mine", tmp_path / "unused.json")
    result = run_method_file(EXAMPLE, ctx)
    policy = Path(result["policy"])
    AutoModelForCausalLM.from_pretrained(policy)
    used = json.loads((tmp_path / "mine" / "labels_used.json").read_text())
    # 32 prompts at scale tiny, 2 samples each: at most 32 labels, and the run's pairs were not used
    assert 0 < used["labels"] <= 32 and used["run_pairs"] == 0 and used["price"] > 0
    trained_on = read_records(policy / "metrics.jsonl") if (policy / "metrics.jsonl").exists() else []
    assert trained_on, "the SFT on the winners took no step"
    assert json.loads((tmp_path / "mine" / "method_result.json").read_text()) == result


def test_a_method_returning_outputs_is_checked(tiny_world, tmp_path):
    path = tmp_path / "echo.py"
    path.write_text("def train(ctx):\n"
                    "    return [{'output': r['instruction']} for r in ctx.eval_instructions()][:-1]\n")
    with pytest.raises(DataError, match="outputs for .* eval instructions"):
        run_method_file(path, _context(tiny_world, tmp_path / "e", tmp_path / "p.json"))
    path.write_text("def train(ctx):\n    return [{'output': r['instruction']} for r in ctx.eval_instructions()]\n")
    assert run_method_file(path, _context(tiny_world, tmp_path / "e", tmp_path / "p.json")) == \
        {"outputs": "model_outputs.json"}
    assert len(read_records(tmp_path / "e" / "model_outputs.json")) == len(
        read_records(tiny_world / "data" / "eval.json"))


def test_the_method_file_is_a_stage_of_the_plan(tmp_path):
    cfg = load_run_config(None, scale="quick", out_dir=str(tmp_path / "run"), methods=["dpo"],
                          method_file=str(EXAMPLE), validate=True)
    stages = {s.name: s for s in Pipeline(cfg).stages()}
    assert "sim/judge_best_of_2" in stages and "human/judge_best_of_2" in stages
    assert "sim/judge_best_of_2" in stages["sim/evaluate"].after
    assert stages["human/judge_best_of_2"].settings["annotators"] == "world_humans"
    clash = tmp_path / "dpo_again.py"
    clash.write_text("NAME = 'dpo'\ndef train(ctx):\n    return ''\n")
    with pytest.raises(ConfigError, match="NAME 'dpo' is taken"):
        Pipeline(load_run_config(None, out_dir=str(tmp_path / "r2"), method_file=str(clash)))


def _tiny_run(tmp_path, world) -> list[str]:
    """`prefgym run` on the tiny world with its stages cut down: SFT, pairs, reward model in seconds."""
    config = tmp_path / "tiny.yaml"
    config.write_text(f"out_dir: {tmp_path / 'run'}\nworld_dir: {world}\nscale: tiny\nhuman_annotators: null\n"
                      "stages:\n  sft: {epochs: 1}\n  preference_data: {max_instructions: 64}\n"
                      "  reward_model: {epochs: 1}\n  dpo: {epochs: 1}\n")
    return ["run", "--config", str(config), "--methods", "dpo", "--method-file", str(EXAMPLE)]


def test_prefgym_run_with_the_example_method_file(tmp_path, tiny_world, capsys):
    """The README's custom-method example through `prefgym run`, beside DPO, its labels in the leaderboard."""
    assert main(_tiny_run(tmp_path, tiny_world)) == 0
    out = tmp_path / "run"
    table = pd.read_csv(out / "leaderboard.csv", index_col=0)
    assert set(table.index) == {"reference", "sft", "dpo", "judge_best_of_2"}
    used = json.loads((out / "sim" / "methods" / "judge_best_of_2" / "labels_used.json").read_text())
    assert table.loc["judge_best_of_2", "labels"] == used["labels"] > 0
    assert table.loc["dpo", "labels"] == len(read_records(out / "sim" / "preference" / "preferences.json"))
    assert table.loc["sft", "labels"] == table.loc["reference", "labels"] == 0
    assert "| labels |" in (out / "leaderboard.md").read_text()
    err = capsys.readouterr().err
    assert "stage sim/judge_best_of_2:" in err and "method times: classic" in err  # times printed


@pytest.mark.slow
def test_quick_pipeline_with_the_example_method_file(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--scale", "quick", "--methods", "dpo,online_dpo", "--method-file", str(EXAMPLE),
                 "--out", str(out)]) == 0
    table = pd.read_csv(out / "leaderboard.csv", index_col=0)
    assert {"dpo", "online_dpo", "judge_best_of_2"} <= set(table.index)
    assert (table.loc[["dpo", "online_dpo", "judge_best_of_2"], "labels"] > 0).all()


def test_ctx_generate_loads_and_prompts_the_model_as_the_evaluation_does(tmp_path, monkeypatch):
    """ctx.generate takes the evaluation's dtype, attention, prompt format, engine and batch size,
    and its own decoding (temperature, samples, seed); not the evaluation's top_p."""
    from prefgym.models import generation

    seen = []
    monkeypatch.setattr(generation, "generate_outputs",
                        lambda model, records, cfg: seen.append((model, cfg)) or [{"output": "x"} for _ in records])
    ctx = MethodContext(sft_model="sft", reward_model_dir="rm", pairs_file="p", splits={}, annotators="a",
                        output_dir=tmp_path, seed=5,
                        eval_sampling=generation.SamplingConfig(dtype="bfloat16", attn_implementation="eager",
                                                                prompt_format="alpaca", batch_size=3, top_p=0.5,
                                                                max_new_tokens=7))
    assert ctx.generate([{"instruction": "a", "input": ""}], num_samples=1, temperature=0.3) == [["x"]]
    model, cfg = seen[0]
    assert model == "sft"
    assert (cfg.dtype, cfg.attn_implementation, cfg.prompt_format, cfg.batch_size) == ("bfloat16", "eager", "alpaca", 3)
    assert (cfg.temperature, cfg.max_new_tokens, cfg.seed, cfg.top_p) == (0.3, 7, 5, 1.0)
