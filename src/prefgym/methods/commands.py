"""`prefgym` sub-commands for the learning methods (one per method module)."""

import typer


def add_commands(app: typer.Typer) -> None:
    """Add every method's sub-command(s) to the `prefgym` app."""
    from prefgym.methods import (
        best_of_n,
        dpo,
        expert_iteration,
        feedme,
        ppo,
        preference_data,
        quark,
        reward_conditioning,
        reward_model,
        sft,
    )

    for module in (sft, preference_data, reward_model, ppo, best_of_n, expert_iteration, quark,
                   feedme, reward_conditioning, dpo):
        module.add_commands(app)
