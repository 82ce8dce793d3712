"""The built-in world: a synthetic stand-in for instruction data, a pretrained LM, human labelers
and API judges, small enough to run the whole AlpacaFarm loop on a laptop CPU.

- `build_world(out_dir, scale, seed)` writes the splits, tokenizer and base model;
- `gold.gold_quality(instruction, input, output)` is the programmatic ground truth;
- `humans.HumanPopulation` are the simulated human labelers;
- `judges.WORLD_JUDGES` / `judges.world_judge_prob` are the simulated API judges.
"""

from prefgym.world.build import SCALES, SPLITS, build_world, default_world_dir, load_split, read_manifest
from prefgym.world.gold import gold_components, gold_quality

__all__ = ["build_world", "default_world_dir", "load_split", "read_manifest", "SCALES", "SPLITS",
           "gold_quality", "gold_components"]
