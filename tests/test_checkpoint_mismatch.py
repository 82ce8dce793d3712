"""A checkpoint whose tensors do not fit the model (an older prefgym's, or other settings) is a
PrefgymError naming its folder, not torch's state-dict traceback; a fitting one restores."""

from __future__ import annotations

import pytest
import torch

from prefgym.errors import PrefgymError
from prefgym.methods import common


def _prepared(make):
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    return accelerator, accelerator.prepare(make())


def test_a_checkpoint_of_another_model_is_a_clear_error_and_a_fitting_one_restores(tmp_path):
    accelerator, model = _prepared(lambda: torch.nn.Sequential(torch.nn.Linear(3, 2)))
    accelerator.save_state(str(tmp_path / "ckpt"))
    want = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.zero_()
    common.load_state(accelerator, tmp_path / "ckpt")
    assert torch.equal(model[0].weight, want)

    for other in (lambda: torch.nn.Sequential(torch.nn.Linear(3, 4)),  # other shapes
                  lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))):  # more parameters
        accelerator, _ = _prepared(other)
        with pytest.raises(PrefgymError, match="does not fit the model") as e:
            common.load_state(accelerator, tmp_path / "ckpt")
        assert str(tmp_path / "ckpt") in str(e.value) and "--no-resume" in str(e.value)
