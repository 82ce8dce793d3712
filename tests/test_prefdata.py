"""Preference data on the built-in world: sample pairs from a policy, annotate with the noisy pool."""

from __future__ import annotations

import json

import pytest

from prefgym.errors import ConfigError
from prefgym.methods import preference_data
from test_prefdata_toy import one_torch_thread  # noqa: F401 (autouse fixture)


def test_preference_data_on_world_is_alpacafarm_format_and_resumes(tiny_world, tmp_path):
    cfg = preference_data.PreferenceDataConfig(
        policy_model=str(tiny_world / "base_model"), prompt_file=str(tiny_world / "data" / "preference.json"),
        output_dir=str(tmp_path / "prefs"), max_instructions=12, num_samples=2, max_new_tokens=12,
        chunk_size=5, batch_size=8)
    path = preference_data.run(cfg)
    rows = json.loads(path.read_text())
    samples = [json.loads(l) for l in (tmp_path / "prefs" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all(len(s["outputs"]) == 2 for s in samples)
    assert 8 <= len(rows) <= 12  # instructions whose two samples are equal give no pair
    for r in rows:
        assert r["output_1"] != r["output_2"]
        assert r["preference"] in (1, 2, 1.5)
        assert {"instruction", "input", "annotator"} <= set(r)
    # rerun: nothing sampled again, same labels (annotations come from the cache)
    before = (tmp_path / "prefs" / "samples.jsonl").read_text()
    assert json.loads(preference_data.run(cfg).read_text()) == rows
    assert (tmp_path / "prefs" / "samples.jsonl").read_text() == before
    # a run cut short mid-chunk redoes that chunk whole and gets the same samples
    lines = before.splitlines(keepends=True)
    (tmp_path / "prefs" / "samples.jsonl").write_text("".join(lines[:7]))
    preference_data.run(cfg)
    assert (tmp_path / "prefs" / "samples.jsonl").read_text() == before


def test_preference_data_needs_two_samples(tmp_path):
    with pytest.raises(ConfigError, match="num_samples"):
        preference_data.run(preference_data.PreferenceDataConfig(policy_model="x", prompt_file="y",
                                                                 output_dir=str(tmp_path), num_samples=1))
