"""scripts/gpu_smoke.sh --dry-run: prints every stage's command and checks the CLI accepts it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.sh"


def dry_run(script: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "PREFGYM": str(bin_dir / "prefgym"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path / "smoke"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # about 20 s: a dozen CLI starts
def test_dry_run_lists_every_stage_and_the_cli_accepts_them(tmp_path):
    result = dry_run(SCRIPT, tmp_path)
    assert result.returncode == 0, result.stderr
    stages = [line.split("]")[0].lstrip("[") for line in result.stdout.splitlines() if line.startswith("[")]
    assert stages == ["import-gguf", "world", "sft", "preference-data", "reward-model", "ppo", "best-of-n", "generate",
                      "evaluate", "ppo-vllm", "best-of-n-vllm", "generate-vllm-engine", "vllm-serve", "generate-vllm",
                      "evaluate-vllm"]
    assert "dtype=bfloat16" in result.stdout and "--dtype bfloat16" in result.stdout
    lines = {line.split("]")[0].lstrip("["): line for line in result.stdout.splitlines() if line.startswith("[")}
    for stage in ("ppo-vllm", "best-of-n-vllm"):  # the in-process engine, in bf16
        assert "--set engine=vllm" in lines[stage] and "dtype=bfloat16" in lines[stage]
    assert "--backend vllm" in lines["generate-vllm-engine"]
    assert lines["sft"].split("--model ")[1].startswith(str(tmp_path / "smoke" / "smollm2"))


@pytest.mark.slow  # about 20 s
def test_dry_run_with_a_model_folder_skips_the_import(tmp_path):
    result = dry_run(SCRIPT, tmp_path, "--model", str(tmp_path / "my-model"))
    assert result.returncode == 0, result.stderr
    assert "[import-gguf]" not in result.stdout
    assert f"sft --model {tmp_path / 'my-model'} " in result.stdout
    assert not (tmp_path / "smoke").exists()  # a dry run writes nothing


@pytest.mark.slow  # about 30 s
def test_dry_run_refuses_an_option_or_a_config_key_the_cli_does_not_have(tmp_path):
    text = SCRIPT.read_text()
    for old, new, message in (("--max-new-tokens 128 --no-progress\nstage evaluate ",
                               "--max-new-tokenz 128 --no-progress\nstage evaluate ", "has no option --max-new-tokenz"),
                              ("--set epochs=1", "--set epochz=1", "RewardModelConfig has no field(s) epochz")):
        assert old in text
        broken = tmp_path / "broken.sh"
        broken.write_text(text.replace(old, new))
        result = dry_run(broken, tmp_path)
        assert result.returncode == 1 and message in result.stderr


def test_shipped_accelerate_configs_load_with_accelerates_own_loader():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    folder = SCRIPT.parents[1] / "configs" / "accelerate"
    expected = {"ddp": (DistributedType.MULTI_GPU, None), "fsdp": (DistributedType.FSDP, None),
                "deepspeed_zero2": (DistributedType.DEEPSPEED, 2), "deepspeed_zero3": (DistributedType.DEEPSPEED, 3)}
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(expected)
    for name, (kind, zero) in expected.items():
        cfg = load_config_from_file(str(folder / f"{name}.yaml"))
        assert cfg.distributed_type == kind and cfg.mixed_precision == "bf16" and cfg.num_processes == 2
        if zero is not None:
            assert cfg.deepspeed_config["zero_stage"] == zero
    assert load_config_from_file(str(folder / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    zero3 = load_config_from_file(str(folder / "deepspeed_zero3.yaml")).deepspeed_config
    assert zero3["zero3_init_flag"] is True and zero3["zero3_save_16bit_model"] is True  # partitioned load, whole save
