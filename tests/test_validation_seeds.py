"""Multi-seed validation: per-seed rank correlations of simulated vs human win-rates, their mean
with a paired bootstrap interval, and `prefgym run --validate --seeds`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps

from prefgym.cli import main
from prefgym.errors import ConfigError, DataError
from prefgym.evaluation.validation import batch_correlations, markdown_table, plot_seeds, seed_validation
from prefgym.pipeline import load_run_config, parse_seeds


def records(scores, order=None) -> list[dict]:
    """Annotation records of one method: score p in [0, 1] on instruction i -> preference 1 + p."""
    order = range(len(scores)) if order is None else order
    return [{"instruction": f"q{i:03d}", "input": "", "preference": 1.0 + float(scores[i])} for i in order]


def toy_seed(rng, n_methods=6, n_instructions=80, noise=0.35) -> tuple[dict, np.ndarray, np.ndarray]:
    """A seed's annotations: methods of rising quality, human and simulated judges noisy around it."""
    quality = np.linspace(0.25, 0.7, n_methods)[:, None]
    sim = (rng.random((n_methods, n_instructions)) < quality + noise * (rng.random((n_methods, 1)) - 0.5)) * 1.0
    human = (rng.random((n_methods, n_instructions)) < quality).astype(float)
    human[:, ::7] = 0.5  # some draws
    names = [f"m{j}" for j in range(n_methods)]
    annotations = {"simulated": {m: records(sim[j]) for j, m in enumerate(names)},
                   "human": {m: records(human[j]) for j, m in enumerate(names)}}
    return annotations, sim, human


def test_per_seed_values_match_scipy_on_hand_computed_win_rates():
    rng = np.random.default_rng(1)
    seeds = {s: toy_seed(rng) for s in (0, 3)}
    summary = seed_validation({s: a for s, (a, _, _) in seeds.items()}, n_bootstrap=50)
    for s, (_, sim, human) in seeds.items():
        sim_rates = [100 * sum(row) / len(row) for row in sim.tolist()]
        human_rates = [100 * sum(row) / len(row) for row in human.tolist()]
        r = summary["per_seed"][s]
        assert list(r["simulated"].values()) == pytest.approx(sim_rates)
        assert list(r["human"].values()) == pytest.approx(human_rates)
        assert r["spearman"] == pytest.approx(sps.spearmanr(sim_rates, human_rates).statistic)
        assert r["pearson"] == pytest.approx(sps.pearsonr(sim_rates, human_rates).statistic)
        assert r["spearman_p"] == pytest.approx(sps.spearmanr(sim_rates, human_rates).pvalue)
        assert (r["n_methods"], r["n_instructions"]) == (6, 80)
    per = [summary["per_seed"][s]["spearman"] for s in seeds]
    assert summary["spearman"]["mean"] == pytest.approx(np.mean(per))
    assert (summary["spearman"]["min"], summary["spearman"]["max"]) == (min(per), max(per))


def test_bootstrap_matches_a_loop_over_replicates_with_scipy():
    rng = np.random.default_rng(2)
    seeds = {s: toy_seed(rng, n_instructions=40) for s in (0, 1)}
    b = 60
    summary = seed_validation({s: a for s, (a, _, _) in seeds.items()}, n_bootstrap=b, seed=7)
    draws = np.random.default_rng(7)
    spearman, pearson = np.zeros(b), np.zeros(b)
    for _, sim, human in seeds.values():  # the same draws, in the same order: one (B, n) block per seed
        idx = draws.integers(0, sim.shape[1], (b, sim.shape[1]))
        for k in range(b):
            x, y = sim[:, idx[k]].mean(1), human[:, idx[k]].mean(1)
            spearman[k] += sps.spearmanr(x, y).statistic / len(seeds)
            pearson[k] += sps.pearsonr(x, y).statistic / len(seeds)
    assert summary["spearman"]["interval"] == pytest.approx(list(np.quantile(spearman, [0.025, 0.975])))
    assert summary["pearson"]["interval"] == pytest.approx(list(np.quantile(pearson, [0.025, 0.975])))


def test_batch_correlations_equal_scipy_column_by_column_with_ties():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, (7, 30)).astype(float), rng.random((7, 30))
    spearman, pearson = batch_correlations(x, y)
    for k in range(30):
        assert spearman[k] == pytest.approx(sps.spearmanr(x[:, k], y[:, k]).statistic)
        assert pearson[k] == pytest.approx(sps.pearsonr(x[:, k], y[:, k]).statistic)


def test_intervals_contain_the_point_estimates():
    rng = np.random.default_rng(4)
    summary = seed_validation({s: toy_seed(rng, n_instructions=200)[0] for s in (0, 1, 2)}, n_bootstrap=300)
    for name in ("spearman", "pearson"):
        low, high = summary[name]["interval"]
        assert low < summary[name]["mean"] < high
        for r in summary["per_seed"].values():
            assert r[f"{name}_interval"][0] <= r[name] <= r[f"{name}_interval"][1]


def test_resampling_is_paired_across_methods_and_evaluators():
    # identical judgements on both sides: every paired replicate has identical win-rates on both
    # sides, so both correlations are exactly 1; independent draws for each side would not be
    rng = np.random.default_rng(5)
    scores = (rng.random((5, 30)) < np.linspace(0.2, 0.8, 5)[:, None]).astype(float)
    side = {f"m{j}": records(scores[j]) for j in range(5)}
    summary = seed_validation({0: {"simulated": side, "human": side}}, n_bootstrap=200)
    for name in ("spearman", "pearson"):
        assert summary[name]["interval"] == pytest.approx([1.0, 1.0])
        assert summary[name]["undefined_replicates"] == 0


def test_instructions_are_matched_by_key_not_by_position():
    rng = np.random.default_rng(6)
    annotations, sim, _ = toy_seed(rng, n_instructions=50)
    shuffled = {"simulated": {m: records(sim[j], order=rng.permutation(50))
                              for j, m in enumerate(annotations["simulated"])},
                "human": annotations["human"]}
    a = seed_validation({0: annotations}, n_bootstrap=100)
    b = seed_validation({0: shuffled}, n_bootstrap=100)
    assert a["spearman"] == b["spearman"] and a["pearson"] == b["pearson"]


def test_too_few_methods_is_a_clear_error():
    side = {m: records([1, 0, 1]) for m in ("a", "b")}
    with pytest.raises(DataError, match="seed 4: 2 methods judged by both"):
        seed_validation({4: {"simulated": side, "human": side}})


def test_table_and_figure_show_every_seed(tmp_path):
    rng = np.random.default_rng(7)
    summary = seed_validation({s: toy_seed(rng)[0] for s in (0, 1)}, n_bootstrap=50)
    table = markdown_table(summary)
    assert "| 0 | 6 | 80 |" in table and "| 1 | 6 | 80 |" in table and "**mean**" in table
    assert "| m3 |" in table
    assert plot_seeds(summary, tmp_path / "f.png").stat().st_size > 1000
    json.dumps(summary)  # the summary is written as JSON


@pytest.mark.parametrize("text, message", [("0,x", "'x' in '0,x' is not a seed"), ("1,2,1", "seed 1 given more"),
                                           ("", "'' in '' is not a seed"), ("-1", "'-1' in '-1' is not a seed")])
def test_bad_seeds_exit_2_with_a_message(text, message, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=message):
        parse_seeds(text)
    never_run(monkeypatch)
    assert main(["run", "--validate", "--seeds", text, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def never_run(monkeypatch) -> None:
    """Bad seeds must stop `prefgym run` before any stage: a run here fails the test at once."""
    import prefgym.pipeline

    def fail(*args, **kwargs):
        raise AssertionError("prefgym run started despite bad seeds")

    monkeypatch.setattr(prefgym.pipeline, "run", fail)
    monkeypatch.setattr(prefgym.pipeline, "run_seeds", fail)


def test_seeds_in_the_run_config(tmp_path, capsys, monkeypatch):
    never_run(monkeypatch)
    assert parse_seeds(" 0, 2") == [0, 2]
    path = tmp_path / "run.yaml"
    path.write_text("seeds: [3, 4]\nscale: quick\n")
    cfg = load_run_config(path)
    assert (cfg.seeds, cfg.out_dir) == ([3, 4], "prefgym-runs/quick-seeds")
    path.write_text("seed: 0\nseeds: [3, 4]\n")
    with pytest.raises(ConfigError, match="either seed or seeds"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="either seed or seeds"):
        load_run_config(None, seed=1, seeds=[2, 3])
    path.write_text("seeds: [3, true]\n")
    with pytest.raises(ConfigError, match="seeds: True is not a seed"):
        load_run_config(path)
    path.write_text("seeds: [3, 3]\n")
    assert main(["run", "--config", str(path)]) == 2
    assert "seed 3 given more than once" in capsys.readouterr().err


def test_run_command_hands_the_seeds_to_run_seeds_and_prints_the_table(tmp_path, capsys, monkeypatch):
    import prefgym.pipeline

    seen = {}

    def fake_run_seeds(cfg, overwrite=False):
        seen.update(seeds=cfg.seeds, validate=cfg.validate, out=cfg.out_dir)
        (tmp_path / "validation_seeds.md").write_text("| **mean** |\n")
        return tmp_path

    monkeypatch.setattr(prefgym.pipeline, "run_seeds", fake_run_seeds)
    assert main(["run", "--validate", "--seeds", "2,0", "--out", str(tmp_path)]) == 0
    assert seen == {"seeds": [2, 0], "validate": True, "out": str(tmp_path)}
    printed = capsys.readouterr().out
    assert "| **mean** |" in printed and str(tmp_path / "seed-2") in printed


@pytest.mark.slow
def test_two_seeds_end_to_end_on_the_tiny_world(tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = ["run", "--scale", "tiny", "--validate", "--seeds", "0,1", "--methods", "best_of_n,feedme",
            "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "validation_seeds.json").read_text())
    assert summary["seeds"] == [0, 1]
    for s in (0, 1):
        single = json.loads((out / f"seed-{s}" / "validation.json").read_text())  # each seed is a complete run
        r = summary["per_seed"][str(s)]
        assert r["simulated"] == pytest.approx(single["simulated"]) and r["human"] == pytest.approx(single["human"])
        assert r["spearman"] == pytest.approx(single["spearman"])
    assert (out / "figures" / "sim_vs_human_seeds.png").exists()
    assert "**mean**" in capsys.readouterr().out
    # rerunning resumes: every stage of every seed is done, and the summary is the same
    assert main(argv) == 0
    assert json.loads((out / "validation_seeds.json").read_text()) == summary
