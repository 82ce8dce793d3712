"""Leaderboards: reproduce the published AlpacaEval rows from the annotations, and write md/csv/html."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from prefgym.errors import DataError
from prefgym.evaluation import leaderboard_from_annotations, leaderboard_row, load_annotations, write_leaderboard
from prefgym.evaluation.winrate import avg_length

EXACT = ["n_wins", "n_wins_base", "n_draws", "n_total"]


def _model_dirs(alpaca_eval_dir, annotation_file):
    dirs = sorted(p.parent for p in alpaca_eval_dir.glob(f"*/{annotation_file}"))
    assert dirs, f"no {annotation_file} in {alpaca_eval_dir}"
    return dirs


def test_reproduces_every_published_alpaca_eval_gpt4_row(alpaca_eval_dir):
    published = pd.read_csv(alpaca_eval_dir / "leaderboard_alpaca_eval_gpt4.csv", index_col=0)
    dirs = _model_dirs(alpaca_eval_dir, "annotations_alpaca_eval_gpt4.json")
    ours = leaderboard_from_annotations([d / "annotations_alpaca_eval_gpt4.json" for d in dirs], length_controlled=False)
    assert set(ours.index) == {d.name for d in dirs}
    for name in ours.index:
        for col in ("win_rate", "standard_error", "discrete_win_rate"):
            assert ours.loc[name, col] == pytest.approx(published.loc[name, col], abs=1e-6), (name, col)
        for col in EXACT:
            assert ours.loc[name, col] == published.loc[name, col], (name, col)
        # avg_length: from the annotations' output_2 and from model_outputs.json
        assert ours.loc[name, "avg_length"] == published.loc[name, "avg_length"]
        outputs = json.loads((alpaca_eval_dir / name / "model_outputs.json").read_text())
        assert avg_length([o["output"] for o in outputs]) == published.loc[name, "avg_length"]


def test_reproduces_weighted_alpaca_eval_2_row(alpaca_eval_dir):
    published = pd.read_csv(alpaca_eval_dir / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv", index_col=0)
    for d in _model_dirs(alpaca_eval_dir, "annotations_weighted_alpaca_eval_gpt4_turbo.json"):
        row = leaderboard_row(load_annotations(d / "annotations_weighted_alpaca_eval_gpt4_turbo.json"),
                              length_controlled=False)
        for col in ("win_rate", "standard_error", "discrete_win_rate"):
            assert row[col] == pytest.approx(published.loc[d.name, col], abs=1e-6), col
        for col in EXACT + ["avg_length"]:
            assert row[col] == published.loc[d.name, col], col


def test_published_length_controlled_rows_are_close(alpaca_eval_dir):
    # AlpacaEval 1 (GPT-4 judge vs text-davinci-003) has no instruction difficulties: our GLM without
    # them still lands within a few points of these published rows (README, "Length-controlled win-rate").
    published = pd.read_csv(alpaca_eval_dir / "leaderboard_alpaca_eval_gpt4.csv", index_col=0)
    dirs = _model_dirs(alpaca_eval_dir, "annotations_alpaca_eval_gpt4.json")
    ours = leaderboard_from_annotations([d / "annotations_alpaca_eval_gpt4.json" for d in dirs])
    for name in ours.index:
        assert abs(ours.loc[name, "length_controlled_winrate"] - published.loc[name, "length_controlled_winrate"]) < 7


def _toy_annotations(tmp_path):
    rows = []
    for gen, prefs in (("m-good", [2, 2, 2, 1]), ("m-bad", [1, 1, 0, 2])):
        for i, p in enumerate(prefs):
            rows.append({"instruction": f"t{i}", "output_1": "ref", "output_2": "out" * (i + 1), "generator_1": "ref",
                         "generator_2": gen, "preference": p})
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(rows))
    return path


def test_one_row_per_generator_and_formats(tmp_path):
    df = leaderboard_from_annotations([_toy_annotations(tmp_path)])
    assert list(df.index) == ["m-good", "m-bad"]
    assert df.loc["m-good", "win_rate"] == 75.0 and df.loc["m-bad", "win_rate"] == pytest.approx(100 * 1.5 / 4)
    csv = write_leaderboard(df, tmp_path / "lb.csv")
    back = pd.read_csv(csv, index_col=0)
    assert list(back.columns)[:6] == ["win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total"]
    assert back.loc["m-bad", "n_draws"] == 1
    md = write_leaderboard(df, tmp_path / "lb.md").read_text()
    assert "| m-good | 75.00 ± 25.00 |" in md
    page = write_leaderboard(df, tmp_path / "lb.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page and "<td>m-bad</td>" in page


def _write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def _rows(generator, n, start=0, length=10):
    return [{"instruction": f"q{i}", "output_1": "r" * 20, "output_2": "m" * (length + i), "generator_2": generator,
             "preference": 2 if i % 3 else 1} for i in range(start, start + n)]


def test_a_copy_of_another_generators_file_is_named_in_a_warning(tmp_path, caplog):
    first = _write_rows(tmp_path / "x" / "annotations.json", _rows("x", 6))
    copy = _write_rows(tmp_path / "y" / "annotations.json", _rows("x", 6))  # mislabelled: says x, sits in y
    other = _write_rows(tmp_path / "z" / "annotations.json", _rows("z", 6))
    with caplog.at_level("WARNING"):
        df = leaderboard_from_annotations([first, copy, other], length_controlled=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "generator x" in warnings[0] and f"{copy} repeats 6 instructions already annotated in {first}" in warnings[0]
    assert df.loc["x", "n_total"] == 12  # pooled, as the warning says


def test_missing_rows_warn_and_avg_length_is_over_the_rows_present(tmp_path, caplog):
    full = _write_rows(tmp_path / "full.json", _rows("full", 6))
    part = _write_rows(tmp_path / "part.json", _rows("part", 4, length=100))
    with caplog.at_level("WARNING"):
        df = leaderboard_from_annotations([full, part], length_controlled=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "generator part: no annotation for 2 of the 6 instructions" in warnings[0]
    # AlpacaEval: int(mean length of the model outputs the file has), not padded to the eval set
    assert df.loc["part", "avg_length"] == int(sum(100 + i for i in range(4)) / 4) == 101
    assert df.loc["part", "n_total"] == 4


def test_missing_rows_against_the_difficulty_file(tmp_path, caplog):
    part = _write_rows(tmp_path / "part.json", _rows("part", 4))
    difficulty = {f"q{i}": 0.1 * i for i in range(10)}
    with caplog.at_level("WARNING"):
        df = leaderboard_from_annotations([part], instruction_difficulty=difficulty, lc_bootstrap=0)
    assert any("no annotation for 6 of the 10 instructions in the instruction-difficulty file" in r.getMessage()
               for r in caplog.records)
    assert {"lc_ci_low", "lc_ci_high"} <= set(df.columns)


@pytest.mark.parametrize("bad", [{"instruction": None}, {"instruction": 3}, {}])
def test_rows_without_an_instruction_are_an_error_naming_file_and_row(tmp_path, bad):
    rows = _rows("m", 3)
    rows[2] = {k: v for k, v in {**rows[2], **bad}.items() if not (k == "instruction" and not bad)}
    path = _write_rows(tmp_path / "ann.json", rows)
    with pytest.raises(DataError, match=r"ann.json, row 2, field 'instruction'"):
        leaderboard_from_annotations([path])
