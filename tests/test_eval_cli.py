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
    assert main(["compare", str(a), str(b), "--n-bootstrap", "50"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["difference"] == pytest.approx(80.0) and r["n_a_better"] == 8


def _annotation(**kw):
    return {"instruction": "q", "output_1": "r", "output_2": "m", "preference": 1, **kw}


@pytest.mark.parametrize("command,content,expected", [
    (["leaderboard"], '[{"instruction": "q", "output_1": "r", "outp', "invalid JSON"),
    (["leaderboard"], [{"instruction": "q", "output_1": "r", "output_2": "m"}], "field 'preference'"),
    (["leaderboard"], [_annotation(), _annotation(preference="left")], "row 1, field 'preference'"),
    (["leaderboard"], [_annotation(preference=7)], "preference must be in [1, 2]"),
    (["leaderboard"], {"not": "annotations"}, "field 'preference'"),
    (["elo"], [{"model_a": "a", "model_b": "b", "winner": "draw"}], "winner must be one of"),
    (["elo"], "model_a,model_b,winner\n", "invalid JSON"),
])
def test_malformed_files_exit_2(tmp_path, capsys, command, content, expected):
    bad = _write(tmp_path / "bad.json", content)
    assert main(command + [str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "bad.json" in err


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
