"""The evaluation commands: leaderboard, elo, compare, evaluate; malformed files exit 2 with a clear message."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from prefgym.cli import main


def _write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def test_leaderboard_command_writes_csv(alpaca_eval_dir, tmp_path, capsys):
    files = sorted(str(p) for p in alpaca_eval_dir.glob("*/annotations_alpaca_eval_gpt4.json"))
    out = tmp_path / "lb.csv"
    assert main(["leaderboard", *files, "--output", str(out), "--no-lc"]) == 0
    df = pd.read_csv(out, index_col=0)
    published = pd.read_csv(alpaca_eval_dir / "leaderboard_alpaca_eval_gpt4.csv", index_col=0)
    for name in df.index:
        assert df.loc[name, "win_rate"] == pytest.approx(published.loc[name, "win_rate"], abs=1e-6)
    assert main(["leaderboard", files[0], "--format", "md"]) == 0
    assert "| generator | win-rate (%)" in capsys.readouterr().out


def test_elo_command(tmp_path, capsys):
    battles = [{"model_a": "x", "model_b": "y", "winner": "model_a"}] * 8 + [{"model_a": "y", "model_b": "x", "winner": "tie"}] * 2
    path = _write(tmp_path / "battles.json", battles)
    out = tmp_path / "ratings.csv"
    assert main(["elo", str(path), "--output", str(out), "--n-bootstrap", "5", "--anchor", "y=1000"]) == 0
    table = pd.read_csv(out, index_col=0)
    assert list(table.index) == ["x", "y"] and table.loc["y", "bt_rating"] == pytest.approx(1000)


def test_compare_and_evaluate_commands(tmp_path, capsys):
    ann = [{"instruction": f"q{i}", "output_1": "r", "output_2": "m", "preference": 2 if i < 8 else 1} for i in range(10)]
    a = _write(tmp_path / "a.json", ann)
    b = _write(tmp_path / "b.json", [{**x, "preference": 1} for x in ann])
    assert main(["compare", str(a), str(b), "--n-bootstrap", "50", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["difference"] == pytest.approx(80.0) and r["n_a_better"] == 8
    assert r["a"] == str(a) and r["b"] == str(b)


def _annotation(**kw):
    return {"instruction": "q", "output_1": "r", "output_2": "m", "preference": 1, **kw}


@pytest.mark.parametrize("command,content,expected", [
    (["leaderboard"], '[{"instruction": "q", "output_1": "r", "outp', "invalid JSON"),
    (["leaderboard"], [{"instruction": "q", "output_1": "r", "output_2": "m"}], "field 'preference'"),
    (["leaderboard"], [_annotation(), _annotation(preference="left")], "row 1, field 'preference'"),
    (["leaderboard"], [_annotation(preference=7)], "row 0, field 'preference'"),
    (["leaderboard"], {"not": "annotations"}, "expected a list of records"),
    (["leaderboard"], [_annotation(), {"output_1": "r", "output_2": "m", "preference": 1}], "row 1, field 'instruction'"),
    (["leaderboard"], [_annotation(instruction=None)], "row 0, field 'instruction'"),
    (["elo"], [{"model_a": "a", "model_b": "b", "winner": "draw"}], "winner must be one of"),
    (["elo"], "model_a,model_b,winner\n", "invalid JSON"),
])
def test_malformed_files_exit_2(tmp_path, capsys, command, content, expected):
    bad = _write(tmp_path / "bad.json", content)
    assert main(command + [str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "bad.json" in err


def test_compare_names_a_and_b_and_reads_as_a_sentence(tmp_path, capsys):
    ann = [{"instruction": f"q{i}", "output_1": "r", "output_2": "m", "generator_2": "alpha",
            "preference": 2 if i < 8 else 1} for i in range(10)]
    a = _write(tmp_path / "a.json", ann)
    b = _write(tmp_path / "b.json", [{**x, "generator_2": "beta", "preference": 1} for x in ann])
    assert main(["compare", str(b), str(a), "--n-bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert f"A = beta ({b})" in out and f"B = alpha ({a})" in out
    # B (alpha) wins 8 of 10 where A (beta) lost all: B better by 80 points
    assert "on 10 shared instructions: B better by 80.00 points [" in out
    assert "p < 0.005" in out and "A better on 0 instructions, B on 8" in out


def test_compare_without_instruction_names_file_and_row(tmp_path, capsys):
    good = _write(tmp_path / "good.json", [_annotation(), _annotation(instruction="q2")])
    bad = _write(tmp_path / "bad.json", [_annotation(), _annotation(instruction=None)])
    assert main(["compare", str(good), str(bad)]) == 2
    assert "bad.json, row 1, field 'instruction'" in capsys.readouterr().err


def test_leaderboard_command_with_instruction_difficulty(alpaca_eval_dir, tmp_path):
    out = tmp_path / "lb.csv"
    ann = alpaca_eval_dir / "alpaca-7b" / "annotations_weighted_alpaca_eval_gpt4_turbo.json"
    assert main(["leaderboard", str(ann), "--instruction-difficulty", str(alpaca_eval_dir / "instruction_difficulty.json"),
                 "--lc-bootstrap", "20", "--output", str(out)]) == 0
    row = pd.read_csv(out, index_col=0).loc["alpaca-7b"]
    assert row["length_controlled_winrate"] == pytest.approx(6.6277275, abs=1e-6)  # see test_length_control.py
    assert row["lc_ci_low"] < row["length_controlled_winrate"] < row["lc_ci_high"]


def test_leaderboard_command_rejects_an_unknown_instruction(alpaca_eval_dir, tmp_path, capsys):
    ann = _write(tmp_path / "ann.json", [_annotation(instruction="not in the eval set")])
    assert main(["leaderboard", str(ann), "--instruction-difficulty",
                 str(alpaca_eval_dir / "instruction_difficulty.json")]) == 2
    assert "ann.json, row 0, field 'instruction': instruction not in the instruction-difficulty file" in \
        capsys.readouterr().err


def test_compare_with_a_malformed_file_exits_2(tmp_path, capsys):
    good = _write(tmp_path / "good.json", [_annotation()])
    bad = _write(tmp_path / "bad.json", [{"instruction": "q", "output_1": "r", "preference": 1}])
    assert main(["compare", str(good), str(bad)]) == 2
    assert "bad.json, row 0, field 'output_2'" in capsys.readouterr().err


def test_missing_file_and_bad_format_exit_2(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: file not found" in capsys.readouterr().err
    path = _write(tmp_path / "a.json", [_annotation()])
    assert main(["leaderboard", str(path), "--format", "pdf"]) == 2
    assert "unknown --format 'pdf'" in capsys.readouterr().err


def test_evaluate_command_reports_bad_outputs(tmp_path, capsys):
    ref = _write(tmp_path / "eval.json", [{"instruction": "q", "output": "r", "generator": "ref"}])
    outputs = _write(tmp_path / "outputs.json", [{"instruction": "other", "output": "m"}])
    assert main(["evaluate", str(outputs), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "outputs.json, row 0, field 'instruction'" in err and "not found in the reference" in err
