"""SFT on the built-in world's demonstrations improves the gold quality of the base model."""

from __future__ import annotations

import numpy as np

from prefgym.methods.sft import SFTConfig, train_sft
from prefgym.models.generation import SamplingConfig, generate_outputs


def _gold_qualities(model_path, records) -> np.ndarray:
    from prefgym.world.gold import gold_quality

    outputs = generate_outputs(model_path, records, SamplingConfig(temperature=0, max_new_tokens=32, batch_size=40))
    return np.array([gold_quality(o["instruction"], o["input"], o["output"]) for o in outputs])


def test_sft_on_world_demonstrations_beats_the_base_model(tiny_world, tmp_path):
    from prefgym.world import load_split

    val = load_split(tiny_world, "val") + load_split(tiny_world, "eval")  # 80 held-out instructions
    cfg = SFTConfig(model_name_or_path=str(tiny_world / "base_model"), train_file=str(tiny_world / "data"),
                    split="sft", output_dir=str(tmp_path / "sft"), epochs=20, lr=3e-3,
                    per_device_batch_size=8, max_length=256, progress=False)
    sft = train_sft(cfg)
    base_q, sft_q = _gold_qualities(tiny_world / "base_model", val), _gold_qualities(sft, val)
    diff = sft_q - base_q  # paired over the same val instructions
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    print(f"mean gold quality on val+eval ({len(val)} instructions): base {base_q.mean():.3f}, "
          f"sft {sft_q.mean():.3f}, paired difference {diff.mean():+.3f} ± {se:.3f}")
    # The tiny world's base model already earns format/conciseness credit with short junk (about
    # 0.24); SFT learns the answer shapes and method steps: a clear paired gain.
    assert diff.mean() > 0.04 and diff.mean() > 2 * se


def test_sft_defaults_to_the_built_in_world(tiny_world, tmp_path, monkeypatch, capsys):
    from prefgym.cli import main
    from prefgym.world import default_world_dir

    monkeypatch.setenv("PREFGYM_HOME", str(tmp_path / "home"))
    out = tmp_path / "sft"
    assert main(["sft", "--out", str(out), "--max-steps", "2", "--no-progress"]) == 2
    assert "no --model given and the built-in world is not built" in capsys.readouterr().err

    default_world_dir("default", 0).parent.mkdir(parents=True)
    default_world_dir("default", 0).symlink_to(tiny_world)
    assert main(["sft", "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--no-progress"]) == 0
    saved = __import__("json").loads((out / "sft_config.json").read_text())
    assert saved["model_name_or_path"] == str(default_world_dir("default", 0) / "base_model")
    assert saved["total_steps"] == 2 and (out / "model.safetensors").exists()
