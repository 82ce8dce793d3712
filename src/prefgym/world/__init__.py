"""The built-in world: a synthetic stand-in for instruction data, a pretrained LM, human labelers
and API judges, small enough to run the whole AlpacaFarm loop on a laptop CPU.

- `build_world(out_dir, scale, seed)` writes the splits, tokenizer and base model;
- `gold.gold_quality(instruction, input, output)` is the programmatic ground truth;
- `humans.HumanPopulation` are the simulated human labelers;
- `judges.WORLD_JUDGES` / `judges.world_judge_prob` are the simulated API judges.
"""

from prefgym.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {  # loaded on first use (numpy): `prefgym --help` stays fast
    "build": ["build_world", "default_world_dir", "load_split", "read_manifest", "SCALES", "SPLITS"],
    "gold": ["gold_quality", "gold_components"],
})
