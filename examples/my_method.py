"""An example of your own method in prefgym's pipeline: best-of-2 with the judge in the loop, then SFT
on the winners.

    prefgym run --scale quick --method-file examples/my_method.py

1. sample two responses from the SFT policy to each of some instructions of the preference split;
2. ask the run's annotators which of the two is better (`ctx.annotate`: every label is counted and
   shown in the leaderboard's `labels` column);
3. fine-tune the SFT policy on instruction -> winner, and return that policy's folder; the
   pipeline evaluates it beside the built-in methods.

The interface (README, "Your own method"): a function `train(ctx)` returning a policy folder (or a
list of outputs, one per `ctx.eval_instructions()`), and optionally `NAME`, the method's name in
the leaderboard (default: the file's name).
"""

from prefgym.data.preferences import annotated_pairs
from prefgym.methods.sft import SFTConfig, train_sft

NAME = "judge_best_of_2"
PROMPTS = {"tiny": 32, "quick": 256, "default": 1000}
"""Instructions labelled, by the run's scale (one label each at most)."""


def train(ctx) -> str:
    prompts = ctx.records("preference")[: PROMPTS.get(ctx.scale, 1000)]
    samples = ctx.generate(prompts, num_samples=2, temperature=1.0)
    pairs = [{"instruction": p["instruction"], "input": p.get("input") or "", "output_1": a, "output_2": b}
             for p, (a, b) in zip(prompts, samples) if a != b]
    labelled = ctx.annotate(pairs)
    winners = [{"instruction": r["instruction"], "input": r["input"], "output": r[f"output_{pref.winner}"]}
               for _, r, pref in annotated_pairs(labelled) if pref.winner is not None]
    # the settings the run uses for binary FeedME (SFT on preferred outputs), tuned for the world's models
    settings = {**ctx.settings("feedme"), "model_name_or_path": ctx.sft_model,
                "output_dir": str(ctx.output_dir / "policy"), "seed": ctx.seed}
    return str(train_sft(SFTConfig(**settings), records=winners))
