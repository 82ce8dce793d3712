"""The hand-stepped learning-rate schedules of the training loops (`common.warmup_schedule`,
`common.step_scheduler`): one step per optimizer step, none when the loss scaler skips one."""

import pytest
import torch
from accelerate import Accelerator

from prefgym.methods import common


def _prepared(lr: float = 1.0):
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # the fp16 loss scaler, as on a GPU
    model = torch.nn.Linear(4, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=lr))
    return accelerator, model, optimizer


def test_warmup_is_linear_then_constant():
    accelerator, model, optimizer = _prepared(lr=2.0)
    scheduler = common.warmup_schedule(accelerator, optimizer, 4)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(6):
        accelerator.backward(model(torch.ones(2, 4)).sum())
        optimizer.step()
        common.step_scheduler(accelerator, scheduler)
        optimizer.zero_grad()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs == pytest.approx([2.0 * min(1, (s + 1) / 4) for s in range(7)])


def test_a_step_the_loss_scaler_skips_does_not_advance_the_schedule():
    accelerator, model, optimizer = _prepared()
    scheduler = common.warmup_schedule(accelerator, optimizer, 4)
    skipped, lrs, used = [], [], []
    for i in range(4):
        loss = model(torch.ones(2, 4)).sum() * (float("inf") if i == 1 else 1.0)  # step 2 overflows
        accelerator.backward(loss)
        optimizer.step()
        used.append(common.step_scheduler(accelerator, scheduler))  # the rate the step used: logged
        optimizer.zero_grad()
        skipped.append(accelerator.optimizer_step_was_skipped)
        lrs.append(scheduler.get_last_lr()[0])
    assert skipped == [False, True, False, False]
    assert lrs == pytest.approx([0.5, 0.5, 0.75, 1.0])
    assert used == pytest.approx([0.25, 0.5, 0.5, 0.75])


def test_the_schedule_is_saved_with_the_checkpoint(tmp_path):
    accelerator, model, optimizer = _prepared()
    scheduler = common.warmup_schedule(accelerator, optimizer, 10)
    for _ in range(3):
        accelerator.backward(model(torch.ones(2, 4)).sum())
        optimizer.step()
        common.step_scheduler(accelerator, scheduler)
    accelerator.save_state(str(tmp_path / "ckpt"))
    again, _, optimizer2 = _prepared()
    restored = common.warmup_schedule(again, optimizer2, 10)
    again.load_state(str(tmp_path / "ckpt"))
    assert restored.last_epoch == 3 and restored.get_last_lr() == pytest.approx([0.4])


def test_a_checkpoint_of_the_prepared_scheduler_layout_resumes(tmp_path):
    """Checkpoints written while the loops handed their schedule to `accelerator.prepare`
    (scheduler.bin) resume with the hand-stepped one."""
    accelerator, model, optimizer = _prepared()
    old = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    old = accelerator.prepare(old)
    for _ in range(3):
        accelerator.backward(model(torch.ones(2, 4)).sum())
        optimizer.step()
        old.step()
    accelerator.save_state(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "scheduler.bin").exists()
    again, _, optimizer2 = _prepared()
    restored = common.warmup_schedule(again, optimizer2, 10)
    common.load_state(again, tmp_path / "ckpt")
    assert restored.last_epoch == 3 and restored.get_last_lr() == pytest.approx([0.4])


def test_a_prepared_scheduler_checkpoint_of_two_processes_resumes_at_the_steps_taken(tmp_path, monkeypatch):
    """On N processes Accelerate's prepared scheduler advanced N times a step: such a checkpoint
    (one random_states file per process) resumes at the steps taken, learning rate included."""
    import shutil

    import accelerate.scheduler

    accelerator, model, optimizer = _prepared()
    old = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10)))
    monkeypatch.setattr(accelerate.scheduler, "AcceleratorState", lambda: type("S", (), {"num_processes": 2})())
    for _ in range(3):
        accelerator.backward(model(torch.ones(2, 4)).sum())
        optimizer.step()
        old.step()
    monkeypatch.undo()
    assert old.scheduler.last_epoch == 6 and optimizer.param_groups[0]["lr"] == pytest.approx(0.7)
    accelerator.save_state(str(tmp_path / "ckpt"))
    shutil.copyfile(tmp_path / "ckpt" / "random_states_0.pkl", tmp_path / "ckpt" / "random_states_1.pkl")
    again, _, optimizer2 = _prepared()
    restored = common.warmup_schedule(again, optimizer2, 10)
    common.load_state(again, tmp_path / "ckpt")
    assert restored.last_epoch == 3 and restored.get_last_lr() == pytest.approx([0.4])
    assert restored.state_dict()["_step_count"] == 4
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(0.4)  # the optimizer's saved 0.7 re-derived
    common.step_scheduler(again, restored)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(0.5)
    # a crash before the next save: the same folder, now migrated, resumes the same way again
    third, _, optimizer3 = _prepared()
    restored3 = common.warmup_schedule(third, optimizer3, 10)
    common.load_state(third, tmp_path / "ckpt")
    assert restored3.last_epoch == 3 and restored3.get_last_lr() == pytest.approx([0.4])
    assert optimizer3.param_groups[0]["lr"] == pytest.approx(0.4)


def test_a_checkpoint_without_the_schedule_is_refused_with_its_folder(tmp_path):
    from prefgym.errors import PrefgymError

    accelerator, model, optimizer = _prepared()
    accelerator.save_state(str(tmp_path / "ckpt"))  # nothing registered: no schedule in it
    again, _, optimizer2 = _prepared()
    common.warmup_schedule(again, optimizer2, 10)
    with pytest.raises(PrefgymError, match=r"ckpt: this checkpoint does not fit the model being trained "
                                           r"\(Number of custom checkpoints"):
        common.load_state(again, tmp_path / "ckpt")
