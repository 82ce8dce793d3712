"""The run report: report.html and leaderboard.md say what they are, keep the reference out of the
ranking, show PPO's proxy reward beside its gold and human win-rates, and warn about noise."""

from __future__ import annotations

import importlib.metadata
import json
import re

import pytest

from prefgym.evaluation import plots
from prefgym.evaluation.report import noise_notes, ppo_curve_records, split_reference
from prefgym.evaluation.winrate import win_rate
from prefgym.io import write_json, write_jsonl
from prefgym.pipeline import Pipeline, load_run_config

N = 40
TIMINGS = {"world": 12.5, "sft": 30.25, "sim/preference_data": 4.0, "sim/ppo": 20.0, "sim/evaluate": 8.0}


def _annotations(generator: str, wins: set[int]) -> list[dict]:
    """Model `generator` against the reference on N instructions: it wins on `wins`, loses elsewhere."""
    return [{"instruction": f"task {i}", "input": "", "output_1": f"ref {i}", "output_2": f"{generator} {i}",
             "generator_2": generator, "preference": 2 if i in wins else 1} for i in range(N)]


def _row(generator: str, annotations: list[dict], **extra) -> dict:
    wr = win_rate([a["preference"] for a in annotations])
    return {"generator": generator, "trained_on": "sim", **wr, "avg_length": 20,
            "length_controlled_winrate": wr["win_rate"], "human_win_rate": wr["win_rate"] - 1,
            "human_standard_error": wr["standard_error"], "gold_win_rate": wr["win_rate"] - 2,
            "gold_standard_error": wr["standard_error"], **extra}


# ppo and dpo differ on one instruction (within noise); dpo is far above sft
WINS = {"reference": None, "ppo": set(range(30)), "dpo": set(range(29)), "sft": set(range(8))}


def make_run(tmp_path, ppo_snapshots: bool = True, kl_k3: bool = False):
    """A run folder as `prefgym run --scale quick --seed 7` leaves it, without training anything."""
    cfg = load_run_config(None, scale="quick", seed=7, out_dir=str(tmp_path / "run"), methods=["ppo", "dpo"])
    out = tmp_path / "run"
    write_json(out / "world" / "data" / "eval.json",
               [{"instruction": f"task {i}", "input": "", "output": f"ref {i}", "generator": "reference"}
                for i in range(N)])
    rows = []
    for generator, wins in WINS.items():
        if wins is None:  # the reference against itself: a draw everywhere
            rows.append({**_row("reference", [{"preference": 1.5}] * N), "human_win_rate": 50.0, "gold_win_rate": 50.0})
            continue
        annotations = _annotations(generator, wins)
        write_json(out / "sim" / "eval" / generator / "annotations_pool.json", annotations)
        rows.append(_row(generator, annotations))
    write_json(out / "sim" / "eval" / "results.json", rows)
    write_json(out / "timings.json", TIMINGS)
    write_jsonl(out / "sim" / "methods" / "ppo" / "metrics.jsonl",
                [{"step": s, "score": 0.1 * s, "kl": 0.05 * s - 0.02, **({"kl_k3": 0.04 * s} if kl_k3 else {})}
                 for s in range(1, 7)])
    if ppo_snapshots:
        write_json(out / "sim" / "eval" / "ppo_curve.json", [
            {"step": s, "model": "m", "win_rate": 20.0 + s, "standard_error": 3.0, "human_win_rate": 21.0 + s,
             "human_standard_error": 3.1, "gold_win_rate": 30.0 - s, "gold_standard_error": 2.0} for s in (0, 3, 6)])
    Pipeline(cfg).report()
    return out


def _ranked_generators(html: str) -> list[str]:
    table = html[html.index('<table id="leaderboard">'):]
    table = table[:table.index("</table>")]
    return re.findall(r'<td class="name">([^<]+)</td>', table)


def _captions(html: str) -> list[str]:
    return re.findall(r"<figcaption><h2>(.*?)</h2></figcaption>", html)


def test_report_says_what_it_is(tmp_path):
    html = (make_run(tmp_path) / "report.html").read_text()
    assert '<dd id="scale">quick</dd>' in html and '<dd id="seed">7</dd>' in html
    assert f"{N} evaluation instructions" in html
    # the annotators behind each column, read from their configs
    assert "column “pool”</dt><dd class=\"annotators\">world_pool: 13 judges, one drawn per example; no label flips" in html
    assert "column “humans”" in html and "world_humans" in html
    assert "column “gold”" in html and "gold quality" in html
    assert "world_pool_noisy: 13 judges, one drawn per example; 25% of labels flipped" in html  # training feedback
    versions = html[html.index('<dd id="versions">'):]
    for dist in ("torch", "transformers"):
        assert f"{dist} {importlib.metadata.version(dist)}" in versions[:300]
    stage_table = html[html.index('<table id="stage-times">'):]
    for stage, seconds in TIMINGS.items():
        assert f'<td class="name">{stage}</td><td>{seconds:.1f}</td>' in stage_table
    assert f"<b>{sum(TIMINGS.values()):.1f}</b>" in stage_table


def test_reference_is_not_ranked_and_all_columns_are_shown(tmp_path):
    html = (make_run(tmp_path) / "report.html").read_text()
    assert _ranked_generators(html) == ["ppo", "dpo", "sft"]
    assert 'id="reference-note"' in html and "50% by construction" in html
    head = html[html.index('<table id="leaderboard">'):html.index("</thead>")]
    assert "win-rate (pool)" in head and "win-rate (humans)" in head and "win-rate (gold)" in head
    # the cells are the rows' numbers: ppo 75.0 (pool), 74.0 (humans), 73.0 (gold)
    ppo_row = html[html.index('<td class="name">ppo</td>'):]
    ppo_row = ppo_row[:ppo_row.index("</tr>")]
    assert re.findall(r"<td>(\d+\.\d) ± ", ppo_row) == ["75.0", "74.0", "73.0"]


def test_figure_titles_are_distinct_and_overoptimization_is_shown(tmp_path):
    html = (make_run(tmp_path) / "report.html").read_text()
    captions = _captions(html)
    assert len(captions) == len(set(captions)) == 3
    assert any("proxy reward" in c and "gold and human win-rate" in c for c in captions)
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', html)) == 3
    assert "src=\"http" not in html  # self-contained


def test_without_ppo_snapshots_there_is_no_overoptimization_figure(tmp_path):
    html = (make_run(tmp_path, ppo_snapshots=False) / "report.html").read_text()
    assert not any("proxy reward" in c for c in _captions(html))
    assert any("KL" in c for c in _captions(html))  # PPO's own metrics still are


def test_markdown_leaderboard_ranks_methods_and_warns_about_noise(tmp_path):
    md = (make_run(tmp_path) / "leaderboard.md").read_text()
    assert md.startswith(f"Win-rate (%) against the reference ± standard error on {N} eval instructions; "
                         "scale quick, seed 7.")
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert [line.split(" | ")[1] for line in table] == ["ppo", "dpo", "sft"]
    assert [line.split(" | ")[0] for line in table] == ["| 1", "| 2", "| 3"]
    assert "Not ranked: the reference" in md
    notes = md[md.index("Differences within noise at this n"):].splitlines()[1:]
    assert len(notes) == 1 and notes[0].startswith("- ppo vs dpo: +2.5 points, paired 95% interval [")


def _rows_and_annotations(wins_by_generator: dict[str, set[int]]):
    annotations = {g: _annotations(g, w) for g, w in wins_by_generator.items()}
    rows = [_row(g, a) for g, a in annotations.items()]
    return split_reference(rows)[0], annotations


def test_noise_notes_pair_instructions():
    # a wins on 20 instructions, b on a subset of 14: a 15-point gap. Unpaired, it is within noise
    # (1.96 × sqrt(SE_a² + SE_b²) ≈ 21 points); paired, every difference favours a: not noise.
    methods, annotations = _rows_and_annotations({"a": set(range(20)), "b": set(range(14))})
    a, b = methods
    half = 1.96 * (a["standard_error"] ** 2 + b["standard_error"] ** 2) ** 0.5
    assert a["win_rate"] - b["win_rate"] == pytest.approx(15.0) and half > 15.0
    assert noise_notes(methods, annotations.get) == []
    unpaired = noise_notes(methods, lambda g: None)
    assert len(unpaired) == 1 and f"[{15 - half:.1f}, {15 + half:.1f}] includes 0" in unpaired[0]


def test_noise_notes_flag_only_adjacent_pairs_within_noise():
    methods, annotations = _rows_and_annotations({"x": set(range(30)), "y": set(range(29)), "z": set(range(8))})
    assert [m["generator"] for m in methods] == ["x", "y", "z"]
    notes = noise_notes(methods, annotations.get)
    assert len(notes) == 1 and notes[0].startswith("x vs y: +2.5 points")


def test_ppo_curve_records_join_metrics_and_snapshots():
    metrics = [{"step": s, "score": 0.5 * s, "kl": 0.1 * s} for s in (1, 2, 3)]
    curve = [{"step": 0, "win_rate": 40.0, "standard_error": 2.0, "human_win_rate": 41.0, "human_standard_error": 2.1,
              "gold_win_rate": 30.0, "gold_standard_error": 1.0},
             {"step": 3, "win_rate": 45.0, "standard_error": 2.0, "human_win_rate": 44.0, "human_standard_error": 2.1,
              "gold_win_rate": 28.0, "gold_standard_error": 1.0}]
    records = ppo_curve_records(metrics, curve)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["reward"] for r in records] == [None, 0.5, 1.0, 1.5]
    assert (records[0]["gold_win_rate"], records[0]["gold_win_rate_se"]) == (30.0, 1.0)
    assert (records[3]["human_win_rate"], records[3]["human_win_rate_se"]) == (44.0, 2.1)
    assert records[3]["win_rate"] == 45.0 and "win_rate" not in records[1]


def test_overoptimization_figure_plots_reward_beside_gold_and_human():
    records = ppo_curve_records([{"step": s, "score": 0.1 * s} for s in range(1, 7)],
                                [{"step": s, "win_rate": 20.0 + s, "standard_error": 3.0, "human_win_rate": 21.0 + s,
                                  "human_standard_error": 3.0, "gold_win_rate": 30.0 - s,
                                  "gold_standard_error": 2.0} for s in (0, 3, 6)])
    fig = plots.overoptimization_figure(records)
    left, right = fig.axes
    (reward,) = left.get_lines()
    assert list(reward.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(reward.get_ydata()) == pytest.approx([0.1 * s for s in range(1, 7)])
    lines = {line.get_label(): line for line in right.get_lines()}
    assert list(lines["gold"].get_xdata()) == [0, 3, 6] and list(lines["gold"].get_ydata()) == [30, 27, 24]
    assert list(lines["humans"].get_ydata()) == [21, 24, 27] and list(lines["pool"].get_ydata()) == [20, 23, 26]
    assert left.get_title() != right.get_title()
    plots.plt.close(fig)


def test_kl_is_k3_when_logged_else_labelled_a_sample_estimate():
    k1_only = [{"step": s, "kl": v} for s, v in enumerate([0.0, -0.01, 0.2])]
    fig = plots.kl_figure(k1_only)
    assert "k1 sample estimate" in fig.axes[0].get_ylabel() and "below 0" in fig.axes[0].get_ylabel()
    plots.plt.close(fig)
    fig = plots.kl_figure([{**r, "kl_k3": abs(r["kl"])} for r in k1_only])
    assert "k3" in fig.axes[0].get_ylabel() and "non-negative" in fig.axes[0].get_ylabel()
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [0.0, 0.01, 0.2]
    plots.plt.close(fig)


def test_report_rerun_after_snapshots_keeps_one_figure_per_caption(tmp_path):
    out = make_run(tmp_path, kl_k3=True)
    before = sorted(p.name for p in (out / "figures").iterdir())
    Pipeline(load_run_config(None, scale="quick", seed=7, out_dir=str(out), methods=["ppo", "dpo"])).report()
    assert sorted(p.name for p in (out / "figures").iterdir()) == before == \
        ["leaderboard.png", "ppo_kl.png", "ppo_overoptimization.png"]
    assert json.loads((out / "timings.json").read_text()) == TIMINGS
