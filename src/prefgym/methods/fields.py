"""Config fields every method shares, defined once: how models load, LoRA, reward-model ensembles,
experiment tracking, the generation engine; and a DeepSpeed launch's config fitted to the method.

A method's config inherits them (`class DPOConfig(TrainFields, LoraFields)`), so `--set
dtype=bfloat16`, `--set mixed_precision=bf16`, `--set gradient_checkpointing=true` or `--set
report_to=tensorboard` work on every command. The values are checked when the config is built (a
ConfigError naming the key). Every training loop makes its Accelerator with `make_accelerator`.

Experiment tracking (`report_to`) goes through Accelerate's trackers beside the metrics.jsonl
that every loop writes: `accelerator_kwargs` / `start_tracking` / `track` /
`finish_tracking`. API keys (WANDB_API_KEY, ...) are read by the trackers from the environment,
never from a config.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
    mixed_precision: str = "no"
    """Accelerate mixed precision (TRL's bf16 / fp16): no, bf16 or fp16; forward passes autocast, weights in `dtype`
    (float32: fp32 master weights). no: a launcher's --mixed_precision, if any (`make_accelerator`)."""

    def __post_init__(self):
        super().__post_init__()
        tracker_names(self.report_to)
        check_mixed_precision(self.mixed_precision, self.dtype)


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


MIXED_PRECISIONS = ("no", "bf16", "fp16")


def resolved_dtype(dtype: str) -> str:
    """The name of the weights dtype a `dtype` field loads (`loading.resolve_dtype`: "auto" is
    bfloat16 where the device computes in it, an Ampere GPU or a CPU with AMX, else float32)."""
    from prefgym.models.loading import resolve_dtype

    return str(resolve_dtype(dtype)).removeprefix("torch.")


def check_mixed_precision(mixed_precision: str, dtype: str) -> None:
    """ConfigError naming the key for an unknown mixed precision, or one that cannot train the weights
    `dtype` loads: fp16 needs float32 weights (its gradient scaler refuses fp16 gradients; bf16
    weights would be squeezed into fp16's range), and neither autocasts float16 weights usefully.
    bf16 over bfloat16 weights is allowed (TRL allows it) but keeps no fp32 master weights."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(f"key 'mixed_precision' should be one of {', '.join(MIXED_PRECISIONS)}, "
                          f"got {mixed_precision!r}")
    refused = {"fp16": ("float16", "bfloat16"), "bf16": ("float16",), "no": ()}[mixed_precision]
    if not refused:
        return
    weights = resolved_dtype(dtype)
    if weights in refused:
        shown = dtype if weights == dtype else f"{dtype} ({weights} here)"
        raise ConfigError(f"key 'mixed_precision': {mixed_precision} with dtype {shown} weights does not train; "
                          f"load the weights in float32 (dtype=float32) for {mixed_precision} mixed precision")


def make_accelerator(cfg, output_dir: str | Path, **extra):
    """The Accelerator of a training loop: cfg.mixed_precision, trackers (`accelerator_kwargs`),
    data-parallel CPU processes (gloo) when several run without a GPU; `extra`: more Accelerator arguments.

    Accelerate keeps mixed precision process-wide; a one-process run (a pipeline, the tests) that
    trains several times gets the setting each config asks for (`end_mixed_precision` turns it off
    after each). cfg.mixed_precision no leaves a launcher's `--mixed_precision` in force, as TRL does.
    Models the loop runs unprepared (reference, reward model, sampling) go under
    `accelerator.autocast()`, as `prepare` puts the trained model's forward."""
    import torch
    from accelerate import Accelerator

    mixed = cfg.mixed_precision if cfg.mixed_precision != "no" else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    n_proc = int(os.environ.get("WORLD_SIZE", "1"))
    current = _current_mixed_precision(default=mixed)
    if current != mixed:
        if n_proc > 1:
            raise ConfigError(f"key 'mixed_precision': {mixed} in a launch that already trained with {current}; "
                              "every training of one launch needs the same mixed_precision")
        _reset_accelerate()
    if mixed == "fp16" and not torch.cuda.is_available():
        raise ConfigError("key 'mixed_precision': fp16 needs a GPU (Accelerate ignores it on CPU); use bf16")
    return Accelerator(mixed_precision=mixed, cpu=n_proc > 1 and not torch.cuda.is_available(),
                       **accelerator_kwargs(cfg, output_dir), **extra)


def end_mixed_precision() -> None:
    """After a one-process training: Accelerate's process-wide mixed precision back to unset, so that
    what runs next in the process (another training, a bare Accelerator) does not inherit it."""
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if one_process and _current_mixed_precision(default="no") != "no":
        _reset_accelerate()


def _current_mixed_precision(default: str) -> str:
    """The mixed precision of the Accelerate state this process holds (`default` before any
    Accelerator): under DeepSpeed the state keeps "no" and the setting lives in the DeepSpeed config,
    which `AcceleratorState.mixed_precision` reads."""
    from accelerate.state import AcceleratorState

    if "_mixed_precision" not in AcceleratorState._shared_state:
        return default
    return AcceleratorState().mixed_precision


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


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
    """ConfigError for a ZeRO stage 3 config that does not gather the weights to save: each process
    holds a shard of every weight, and the saved model is the full weights gathered
    (`common.save_trained`), which DeepSpeed gives only with stage3_gather_16bit_weights_on_model_save."""
    if plugin.zero_stage != 3:
        return
    gather = plugin.deepspeed_config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save")
    if gather is not True:
        raise ConfigError(f"DeepSpeed ZeRO stage 3: zero_optimization.stage3_gather_16bit_weights_on_model_save is "
                          f"{gather!r}; set it to true (zero3_save_16bit_model: true in the Accelerate config, as in "
                          "configs/accelerate/deepspeed_zero3.yaml) so that the trained model can be saved whole")


_FITTED = "_prefgym_fitted"  # the plugin attribute naming the keys prefgym filled (and may fill again)
_AUTO = "_prefgym_auto"  # the plugin attribute naming the keys the launch's config left to "auto"


def fit_deepspeed_config(plugin, cfg):
    """Fill what Accelerate cannot without a DataLoader given to `prepare` (every prefgym loop
    batches by hand), where the config leaves it to us ('auto', or filled by us for an earlier
    training of the launch, which shares the plugin): train_micro_batch_size_per_gpu
    (`micro_batch_size`), train_batch_size (back to auto: Accelerate multiplies), gradient_clipping
    (the method's max_grad_norm; 0, none, for methods that do not clip). gradient_accumulation_steps must be 1: prefgym's loops
    accumulate `grad_accum` micro-batches themselves, loss scaled, and tell DeepSpeed where an
    accumulation ends (`common.no_sync_unless`). The other keys the config leaves to "auto"
    (a DeepSpeed config file's zero_optimization bucket sizes, which Accelerate's `prepare` sizes
    from the model's hidden size, in place) are set back to "auto" first, so that each training of
    a launch (a reward-model ensemble's members, a pipeline's stages) gets its own. Returns the plugin."""
    check_deepspeed_stage(plugin)
    _restore_auto(plugin)
    config, fitted = plugin.deepspeed_config, getattr(plugin, _FITTED, set())
    gas = config.get("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        raise ConfigError(f"DeepSpeed gradient_accumulation_steps is {gas!r}; set it to 1 (or auto) and use the "
                          "method's grad_accum: prefgym accumulates micro-batches itself")
    if "scheduler" in config:  # Accelerate refuses it only for a scheduler passed to `prepare`
        raise ConfigError(f"DeepSpeed config has a 'scheduler' section ({config['scheduler'].get('type', '?')}); "
                          "remove it: prefgym's loops step their own learning-rate schedule (the method's "
                          "warmup_steps, SFT's lr_scheduler), which DeepSpeed's would fight")
    values = {"train_micro_batch_size_per_gpu": micro_batch_size(cfg), "train_batch_size": "auto",
              "gradient_accumulation_steps": 1, "gradient_clipping": float(getattr(cfg, "max_grad_norm", 0.0) or 0.0)}
    for key, value in values.items():
        if config.get(key, "auto") == "auto" or key in fitted:
            config[key] = value
            fitted.add(key)
    setattr(plugin, _FITTED, fitted)
    zero = config.get("zero_optimization", {})
    if any(zero.get(key) == "auto" for key in _HIDDEN_SIZED):
        zero.update({k: v for k, v in _hidden_sized(cfg).items() if zero.get(k) == "auto"})
    return plugin


_HIDDEN_SIZED = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _hidden_sized(cfg) -> dict:
    """Accelerate's values for the zero_optimization keys a DeepSpeed config file may leave to
    "auto" (HF's ZeRO-3 template does): reduce_bucket_size h², stage3_prefetch_bucket_size 0.9·h²,
    stage3_param_persistence_threshold 10·h, h the hidden size of the method's model. Accelerate
    reads h from the prepared module's `config`, which prefgym's wrappers (PairLogps,
    PolicyAndValue, TokenScorer) do not have, and stops; prefgym reads the model folder's config."""
    from transformers import AutoConfig

    folder = getattr(cfg, "model_name_or_path", None) or getattr(cfg, "policy_model", None)
    try:
        model_config = AutoConfig.from_pretrained(str(folder)).get_text_config()
    except (OSError, ValueError) as e:
        raise ConfigError(f"DeepSpeed config: zero_optimization {', '.join(_HIDDEN_SIZED)} left to auto are sized "
                          f"from the model's hidden size, but {folder!r} gave no model config ({str(e)[:200]}); "
                          "set them to numbers") from None
    h = getattr(model_config, "hidden_size", None) or max(getattr(model_config, "hidden_sizes", None) or [0])
    return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h}


def _restore_auto(plugin) -> None:
    """Set the keys the launch's config left to "auto" (noted at its first training, before any
    `prepare` filled them) back to "auto"."""
    if not hasattr(plugin, _AUTO):
        setattr(plugin, _AUTO, _auto_keys(plugin.deepspeed_config))
    for key in getattr(plugin, _AUTO):
        *parents, last = key.split(".")
        node = plugin.deepspeed_config
        for part in parents:
            node = node[part]
        node[last] = "auto"


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    """The dotted keys ("zero_optimization.reduce_bucket_size") whose value in `config` is "auto"."""
    keys = []
    for key, value in config.items():
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.append(prefix + key)
    return keys


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
