"""DeepSpeed in prefgym's training loops: ZeRO stage 3 (configs/accelerate/deepspeed_zero3.yaml),
and the dtype every model computes in under DeepSpeed's bf16 / fp16 (`engine_dtype`,
`to_engine_dtype`: the engine casts the parameters of the model it trains, and Accelerate's
`autocast` does nothing, so the models loaded beside it get the same cast at load).

Under ZeRO-3 each process holds 1/N of every parameter of the model `accelerator.prepare` gets,
and DeepSpeed's module hooks gather each layer's weights for its forward and free them after.
Once a ZeRO-3 Accelerator exists, transformers loads every model partitioned (zero.Init: each
parameter an empty tensor plus a shard), so three places need care:

- Frozen models (reference, reward, a DPO reference folder) are never prepared, so nothing
  would gather their weights: `whole_weights` loads them whole on every process, as without
  DeepSpeed (models/loading.py, for every model loaded with trainable=False).
- The trained model before `prepare` (DPO's and KTO's reference pre-pass, PPO's value head made
  from the reward head) and during rollouts: `gathered` holds its full weights for the block;
  on a prepared engine it also lifts DeepSpeed's per-layer hooks (TRL's
  `unwrap_model_for_generation`), so generation runs on whole weights without a collective per
  layer and token, which processes sampling responses of different lengths could not match.
- The final save: `accelerator.get_state_dict` gathers the weights (the config's
  stage3_gather_16bit_weights_on_model_save, Accelerate's zero3_save_16bit_model) and the main
  process writes them (`common.save_trained`).
"""

from __future__ import annotations

import contextlib


def is_zero3(accelerator) -> bool:
    """True when `accelerator` runs DeepSpeed ZeRO stage 3."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def is_partitioned(model) -> bool:
    """True when `model`'s parameters are ZeRO-3 partitions (zero.Init or a ZeRO-3 engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def whole_weights():
    """Models transformers loads inside the block are whole, not zero.Init-partitioned.

    Accelerate's `deepspeed_plugin.zero3_init_context_manager(enable=False)` does not do this
    (Accelerate 1.15, transformers 5: it sets the same ZeRO-3 config again, and transformers
    partitions by the config's stage), so the config transformers reads is taken away for the
    block and the plugin's put back after."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from accelerate.state import AcceleratorState

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def gathered(model, part: str = ""):
    """The full weights of `model` (of its submodule `part`, "policy") on every process for the
    block, to read, when ZeRO-3 partitions them; else nothing.

    `model` is a module holding zero.Init partitions (before `prepare`) or a prepared ZeRO-3
    engine: then its per-layer gather/free hooks are lifted for the block and put back after, so
    forwards of `part` in the block, generation included, run on the whole weights with no
    collective. Every process must enter the block (the gathering is a collective)."""
    if not is_partitioned(model):
        yield
        return
    import deepspeed

    offload = _parameter_offload(model)
    params = list(getattr(model, "module", model).get_submodule(part).parameters())
    with deepspeed.zero.GatheredParameters(params):
        if offload is None:
            yield
            return
        _lift_hooks(offload)
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def _parameter_offload(model):
    """The ZeRO-3 engine's parameter coordinator (its hooks), or None for a module that is no engine."""
    optimizer = getattr(model, "optimizer", None)
    return getattr(optimizer, "parameter_offload", None)


def _lift_hooks(offload) -> None:
    """Remove DeepSpeed's per-layer forward/backward hooks (which would free each gathered layer after its forward)."""
    for param in offload.module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def engine_dtype():
    """The dtype DeepSpeed computes in for this launch: bfloat16 / float16 when the current
    Accelerate state is a DeepSpeed one whose config enables bf16 / fp16 (`--mixed_precision` fills
    it); None otherwise, and when no Accelerator has been made."""
    from accelerate.state import AcceleratorState, is_initialized

    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    return None if plugin is None else config_dtype(plugin.deepspeed_config)


def config_dtype(ds_config: dict):
    """The parameter dtype a DeepSpeed config gives the model it trains: fp16 first, then bf16 (or
    its old key `bfloat16`), as DeepSpeed's engine reads them; None for float32 (an "auto" not yet
    filled counts as off)."""
    import torch

    def enabled(*keys):
        return any(str(ds_config.get(k, {}).get("enabled", False)).lower() == "true" for k in keys)

    return torch.float16 if enabled("fp16") else torch.bfloat16 if enabled("bf16", "bfloat16") else None


def to_engine_dtype(model):
    """`model` with its floating parameters in `engine_dtype()` (nothing done when None).

    Under DeepSpeed bf16/fp16, `accelerator.autocast()` does nothing and the engine casts the
    parameters of the model it prepares, not its buffers (engine.py `_cast_module_mixed_precision`:
    a rotary `inv_freq` stays float32). Models that are never prepared (reference, reward models)
    get the same cast at load, and so does the trained model before `prepare` (which would cast it
    anyway) for DPO's and KTO's reference pre-pass: at step 1 policy and reference then compute
    alike. ZeRO-3 partitions (zero.Init) are already in that dtype and are left alone."""
    dtype = engine_dtype()
    if dtype is not None:
        cast_parameters(model, dtype)
    return model


def cast_parameters(model, dtype) -> None:
    """Cast `model`'s floating parameters (not ZeRO-3 partitions, not buffers) to `dtype` in place."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not hasattr(p, "ds_id"):
            p.data = p.data.to(dtype)


def full_ndim(param) -> int:
    """The dimensions of `param`'s full tensor (a ZeRO-3 partition is a 1-d shard; `ds_shape` is the whole)."""
    return len(param.ds_shape) if hasattr(param, "ds_shape") else param.ndim

