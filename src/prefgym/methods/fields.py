"""Config fields every method shares, defined once: how models load, LoRA, reward-model ensembles,
experiment tracking, the generation engine; and a DeepSpeed launch's config fitted to the method.

A method's config inherits them (`class DPOConfig(TrainFields, LoraFields)`), so `--set
dtype=bfloat16`, `--set gradient_checkpointing=true` or `--set report_to=tensorboard` work on
every command. The values are checked when the config is built (a ConfigError naming the key).

Experiment tracking (`report_to`) goes through Accelerate's trackers beside the metrics.jsonl
that every loop writes: `accelerator_kwargs` / `start_tracking` / `track` /
`finish_tracking`. API keys (WANDB_API_KEY, ...) are read by the trackers from the environment,
never from a config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prefgym.errors import ConfigError
from prefgym.models.vllm_engine import EngineFields, check_engine_fields

DTYPES = ("float32", "bfloat16", "float16", "auto")
PROMPT_FORMATS = ("auto", "alpaca", "chat")


@dataclass
class ModelFields:
    """How a method loads and prompts its models (sampling-only stages use these too)."""

    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16, or auto (bfloat16 where the device computes in it, else float32)."""
    attn_implementation: Optional[str] = None
    """Attention kernel passed to transformers: eager, sdpa, flash_attention_2, ... (None: transformers' default)."""
    prompt_format: str = "auto"
    """Prompt: alpaca, chat (the tokenizer's chat template) or auto (chat when the tokenizer has a template)."""

    def __post_init__(self):
        check_model_fields(self)


@dataclass
class TrainFields(ModelFields):
    """ModelFields plus what only training needs."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    report_to: str = "none"
    """Experiment trackers beside metrics.jsonl: none, all, or a comma list (tensorboard, wandb, trackio, ...)."""
    save_every_seconds: float = 300.0
    """Save a checkpoint whenever this many seconds have passed since the last, as well as every
    `save_steps` steps (0: by steps only). Loops that save after every iteration (Quark) ignore it."""

    def __post_init__(self):
        super().__post_init__()
        tracker_names(self.report_to)


@dataclass
class LoraFields:
    """LoRA adapters (peft) instead of full fine-tuning; the adapters are merged into the saved model."""

    use_lora: bool = False
    """Train LoRA adapters instead of all weights (merged into the saved model)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA inputs."""


@dataclass
class GenerationFields(EngineFields):
    """Which engine samples (`engine: hf | vllm | auto`), for the methods that generate; the same
    fields as `SamplingConfig`'s. List it before ModelFields / TrainFields among the bases so its
    check runs (`class BestOfNConfig(RewardEnsembleFields, GenerationFields, ModelFields)`)."""

    def __post_init__(self):
        check_engine_fields(self)
        super().__post_init__()


REWARD_ENSEMBLE_RULES = ("mean", "worst", "uwo")
"""How an ensemble's member rewards become one (`reward_model.combine_ensemble_scores`)."""


@dataclass
class RewardEnsembleFields:
    """How a method that optimises a reward model scores with a reward-model ensemble (Coste et
    al. 2024); a plain reward-model folder is an ensemble of one, where every rule gives its score.
    List it first among the bases (`class PPOConfig(RewardEnsembleFields, TrainFields, ...)`) so
    its check runs before theirs."""

    reward_ensemble: str = "mean"
    """Rule combining the members' normalised rewards: mean, worst (their minimum) or uwo (mean − uwo_coef · variance)."""
    uwo_coef: float = 1.0
    """Weight of the members' variance in the uwo rule (uncertainty-weighted optimisation)."""

    def __post_init__(self):
        check_reward_ensemble(self.reward_ensemble, self.uwo_coef)
        super().__post_init__()


def check_reward_ensemble(rule: str, uwo_coef: float) -> None:
    """ConfigError naming the key when the ensemble rule is unknown or uwo_coef is negative."""
    if rule not in REWARD_ENSEMBLE_RULES:
        raise ConfigError(f"key 'reward_ensemble' should be one of {', '.join(REWARD_ENSEMBLE_RULES)}, got {rule!r}")
    if not uwo_coef >= 0:
        raise ConfigError(f"key 'uwo_coef' should be at least 0 (a penalty on disagreement), got {uwo_coef!r}")


def check_model_fields(cfg) -> None:
    """ConfigError naming the key when dtype or prompt_format is not one prefgym knows."""
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"key 'dtype' should be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"key 'prompt_format' should be one of {', '.join(PROMPT_FORMATS)}, got {cfg.prompt_format!r}")
    if cfg.attn_implementation is not None and not cfg.attn_implementation.strip():
        raise ConfigError("key 'attn_implementation' is empty; leave it unset for transformers' default")


# ---------------------------------------------------------------------------------------------
# Experiment tracking


def tracker_names(report_to: str) -> list[str]:
    """`"tensorboard,wandb"` -> ["tensorboard", "wandb"]; "none" -> []; "all" -> ["all"].

    ConfigError for a name Accelerate does not know, or a tracker whose package is not installed
    (Accelerate would drop it silently).
    """
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if "all" in names:
        return ["all"]
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"key 'report_to': unknown tracker {name!r}; use none, all or a comma list of "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    for name in names:
        if name not in available:
            raise ConfigError(f"key 'report_to': tracker {name!r} is not installed (pip install {name})")
    return names


def accelerator_kwargs(cfg, output_dir: str | Path) -> dict:
    """`Accelerator(**accelerator_kwargs(cfg, out))`: log_with and project_dir when cfg.report_to asks for trackers."""
    names = tracker_names(getattr(cfg, "report_to", "none"))
    return {"log_with": names, "project_dir": str(Path(output_dir) / "tracking")} if names else {}


def start_tracking(accelerator, cfg, name: str) -> None:
    """Start the trackers (run `name`, the config as hyper-parameters); nothing when none were asked for.

    Every training loop calls it once its Accelerator exists and before `accelerator.prepare`, so
    it also fits a DeepSpeed launch's config to the method (`fit_deepspeed_config`)."""
    if accelerator.state.deepspeed_plugin is not None:
        fit_deepspeed_config(accelerator.state.deepspeed_plugin, cfg)
    if accelerator.log_with:
        accelerator.init_trackers(name, config=_flat_config(cfg))


# ---------------------------------------------------------------------------------------------
# DeepSpeed


def micro_batch_size(cfg) -> int:
    """Sequences (or pairs) one process passes forward and backward at a time: per_device_batch_size;
    PPO's rollout batch, RLOO's / GRPO's prompts x k, over their mini-batches."""
    if hasattr(cfg, "per_device_batch_size"):
        return cfg.per_device_batch_size
    if hasattr(cfg, "per_device_rollout_batch_size"):
        return max(1, cfg.per_device_rollout_batch_size // cfg.num_mini_batches)
    if hasattr(cfg, "per_device_prompts"):
        return max(1, cfg.per_device_prompts * cfg.k // cfg.num_mini_batches)
    return 1


def check_deepspeed_stage(plugin) -> None:
    """ConfigError for ZeRO stage 3: it partitions every model transformers loads once the
    Accelerator exists (the reference and reward models too, which prefgym runs unprepared), and
    the saved model would need gathering; stages 0 to 2 keep whole weights on each process."""
    if plugin.zero_stage == 3:
        raise ConfigError("DeepSpeed ZeRO stage 3 is not supported (reference and reward models would be "
                          "partitioned unprepared); use configs/accelerate/deepspeed_zero2.yaml or fsdp.yaml")


_FITTED = "_prefgym_fitted"  # the plugin attribute naming the keys prefgym filled (and may fill again)


def fit_deepspeed_config(plugin, cfg):
    """Fill what Accelerate cannot without a DataLoader given to `prepare` (every prefgym loop
    batches by hand), where the config leaves it to us ('auto', or filled by us for an earlier
    training of the launch, which shares the plugin): train_micro_batch_size_per_gpu
    (`micro_batch_size`), train_batch_size (back to auto: Accelerate multiplies), gradient_clipping
    (the method's max_grad_norm; 0, none, for methods that do not clip). gradient_accumulation_steps must be 1: prefgym's loops
    accumulate `grad_accum` micro-batches themselves, loss scaled, and tell DeepSpeed where an
    accumulation ends (`common.no_sync_unless`). Returns the plugin."""
    check_deepspeed_stage(plugin)
    config, fitted = plugin.deepspeed_config, getattr(plugin, _FITTED, set())
    gas = config.get("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        raise ConfigError(f"DeepSpeed gradient_accumulation_steps is {gas!r}; set it to 1 (or auto) and use the "
                          "method's grad_accum: prefgym accumulates micro-batches itself")
    values = {"train_micro_batch_size_per_gpu": micro_batch_size(cfg), "train_batch_size": "auto",
              "gradient_accumulation_steps": 1, "gradient_clipping": float(getattr(cfg, "max_grad_norm", 0.0) or 0.0)}
    for key, value in values.items():
        if config.get(key, "auto") == "auto" or key in fitted:
            config[key] = value
            fitted.add(key)
    setattr(plugin, _FITTED, fitted)
    return plugin


def track(accelerator, metrics: dict, step: int | None = None) -> None:
    """Send the numbers of a metrics.jsonl row to the trackers at `step` (default: metrics["step"]);
    nothing without trackers. Each loop calls it beside its metrics.jsonl write."""
    if accelerator.trackers:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        accelerator.log(numbers, step=metrics.get("step") if step is None else step)


def finish_tracking(accelerator) -> None:
    """Flush and close the trackers (what `accelerator.end_training` does, without ending the process group)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def _flat_config(cfg) -> dict:
    """Config values trackers accept as hyper-parameters (numbers, strings, booleans; the rest as JSON)."""
    out = {}
    for key, value in dataclasses.asdict(cfg).items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out
