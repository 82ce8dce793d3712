"""DPO / IPO: losses against hand computations, cached reference log-probs, tiny end-to-end runs,
and 2 processes (accelerate launch --cpu) against 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prefgym.data.prompts import format_prompt
from prefgym.errors import ConfigError
from prefgym.methods import common, dpo
from test_prefdata_toy import make_toy_model, toy_pairs, one_torch_thread  # noqa: F401 (autouse fixture)


def test_sigmoid_and_ipo_losses_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    # h = (pc - rc) - (pr - rr): row 0: 0.5 - (-1) = 1.5 ; row 1: -1 - 1 = -2
    losses, cr, rj = dpo.preference_loss(pc, pr, rc, rr, beta, "sigmoid")
    expect = [math.log1p(math.exp(-beta * 1.5)), math.log1p(math.exp(-beta * -2.0))]
    np.testing.assert_allclose(losses.numpy(), expect, rtol=1e-6)
    np.testing.assert_allclose(cr.numpy(), [0.25, -0.5])
    np.testing.assert_allclose(rj.numpy(), [-0.5, 0.5])
    losses, _, _ = dpo.preference_loss(pc, pr, rc, rr, beta, "ipo")
    np.testing.assert_allclose(losses.numpy(), [(1.5 - 1.0) ** 2, (-2.0 - 1.0) ** 2], rtol=1e-6)
    with pytest.raises(ConfigError, match="loss_type"):
        dpo.preference_loss(pc, pr, rc, rr, beta, "hinge")


def test_chosen_rejected_skips_ties_and_orders_pairs():
    recs = [{"instruction": "a", "output_1": "x", "output_2": "y", "preference": 2},
            {"instruction": "b", "output_1": "x", "output_2": "y", "preference": 1.5},
            {"instruction": "c", "input": "z", "output_1": "u", "output_2": "v", "preference": 1},
            {"instruction": "d", "output_1": "x", "output_2": "y", "preference": 0},
            {"instruction": "e", "output_1": "x", "output_2": "y", "preference": None},
            {"instruction": "f", "output_1": "s", "output_2": "t", "preference": 1.2},
            {"instruction": "g", "output_1": "s", "output_2": "t", "preference": 1.7}]
    examples = dpo._chosen_rejected(recs)
    assert examples == [(format_prompt("a"), "y", "x", 1.0), (format_prompt("c", "z"), "u", "v", 1.0),
                        (format_prompt("f"), "s", "t", pytest.approx(0.8)),
                        (format_prompt("g"), "t", "s", pytest.approx(0.7))]


def _by_hand(beta, h, eps, loss_type):
    """(1 - ε) ℓ(h) + ε ℓ(-h), written out with math: ℓ = -log σ(β·) (DPO) or (· - 1/(2β))² (IPO)."""
    if loss_type == "sigmoid":
        return (1 - eps) * math.log1p(math.exp(-beta * h)) + eps * math.log1p(math.exp(beta * h))
    return (1 - eps) * (h - 1 / (2 * beta)) ** 2 + eps * (-h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_soft_label_losses_by_hand(loss_type):
    pc, pr = torch.tensor([-3.0, -5.0, -1.0]), torch.tensor([-4.0, -2.0, -1.5])
    rc, rr = torch.tensor([-3.5, -4.0, -2.0]), torch.tensor([-3.0, -3.0, -1.0])
    hs = [1.5, -2.0, 1.5]  # (pc - rc) - (pr - rr)
    eps = torch.tensor([0.0, 0.2, 0.45])
    for beta in (0.1, 0.5, 2.0):
        losses, _, _ = dpo.preference_loss(pc, pr, rc, rr, beta, loss_type, eps)
        np.testing.assert_allclose(losses.numpy(), [_by_hand(beta, h, e, loss_type) for h, e in zip(hs, eps.tolist())],
                                   rtol=1e-5)


def test_flip_probability_combines_soft_labels_and_label_smoothing():
    p = torch.tensor([1.0, 0.8, 0.6])
    np.testing.assert_allclose(dpo.flip_probability(p, 0.0).numpy(), [0.0, 0.2, 0.4], atol=1e-7)
    # independent flips: P(wrong) = ε_label (1 - ε_s) + ε_s (1 - ε_label)
    np.testing.assert_allclose(dpo.flip_probability(p, 0.1).numpy(),
                               [0.1, 0.2 * 0.9 + 0.1 * 0.8, 0.4 * 0.9 + 0.1 * 0.6], atol=1e-7)
    np.testing.assert_allclose(dpo.flip_probability(p, 0.1, "round").numpy(), [0.1, 0.1, 0.1], atol=1e-7)


def test_hard_label_with_label_smoothing_is_trls_conservative_dpo():
    """TRL 0.12-0.28 DPOTrainer.dpo_loss, loss_type='sigmoid': -(1-ε) logσ(βh) - ε logσ(-βh)."""
    import torch.nn.functional as F

    h = torch.tensor([0.7, -1.3, 4.0])
    beta, eps = 0.3, 0.1
    trl = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    flip = dpo.flip_probability(torch.ones(3), eps)
    ours, _, _ = dpo.preference_loss(h, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta, "sigmoid", flip)
    torch.testing.assert_close(ours, trl)


@pytest.mark.slow
def test_losses_equal_trls_dpo_loss():
    """Against TRL 0.23.0's own `DPOTrainer.dpo_loss` (TRL 0.12 to 0.28 give the sigmoid loss
    label_smoothing). Opt-in, TRL is not a dependency:
    pip install --no-deps --target /tmp/trl023 trl==0.23.0
    PYTHONPATH=/tmp/trl023 python -m pytest -q -m slow tests/test_dpo.py -k trl"""
    import importlib.machinery
    import sys
    import types

    pytest.importorskip("trl")
    for name in ("mergekit", "mergekit.config", "mergekit.merge"):  # imported at module level, unused here
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stub.MergeConfiguration = stub.MergeOptions = stub.run_merge = object
        sys.modules.setdefault(name, stub)
    import trl.import_utils as iu

    for key, value in list(vars(iu).items()):  # TRL 0.23 reads transformers 5's (found, version) tuples as True
        if key.startswith("_") and key.endswith("_available") and isinstance(value, tuple):
            setattr(iu, key, bool(value[0]))
    from trl.trainer.dpo_trainer import DPOTrainer

    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6) * 3 - 10 for _ in range(4))
    for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.15), ("ipo", 0.0)):
        trainer = types.SimpleNamespace(beta=0.3, label_smoothing=eps, f_divergence_type="reverse_kl",
                                        use_weighting=False, reference_free=False, loss_type=[loss_type],
                                        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
                                        args=types.SimpleNamespace(use_logits_to_keep=False), ld_alpha=None,
                                        f_alpha_divergence_coef=1.0)
        theirs = DPOTrainer.dpo_loss(trainer, pc, pr, rc, rr, loss_type=loss_type)
        ours = dpo.preference_loss(pc, pr, rc, rr, 0.3, loss_type, dpo.flip_probability(torch.ones(6), eps))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)


RAGGED = [("Say something about cats", "good good good very good", "bad", 1.0),
          ("Say something about rain", "ok", "the bad is very bad fine", 0.8),
          ("Say", "fine", "good", 0.6)]


def _response_logps(model, tok, prompt: str, response: str) -> tuple[float, int]:
    """Sum of log p(response token | prefix) over the response and its EOS, and their number (one full pass)."""
    prompt_ids = tok(prompt)["input_ids"]
    resp_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + resp_ids])).logits[0, :-1].double(), -1)
    return sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(resp_ids)), len(resp_ids)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid"])
def test_batch_losses_average_over_tokens_for_ipo_only(toy, loss_type):
    """IPO: log-ratios are per-token averages (IPO authors, TRL), on ragged lengths; DPO: sums."""
    from transformers import AutoModelForCausalLM

    _, sft, _ = toy
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    tok = common.load_tokenizer(sft)
    ref = torch.tensor([[-3.0, -7.0], [-2.5, -9.0], [-4.0, -1.0]])  # arbitrary reference sums
    beta = 0.5
    cfg = dpo.DPOConfig(loss_type=loss_type, beta=beta, max_length=64)
    losses, chosen_r, _, _, _ = dpo.batch_losses(dpo.PairLogps(model), tok, RAGGED, ref, cfg, "cpu")
    expect, rewards = [], []
    for (prompt, chosen, rejected, p), (rc, rr) in zip(RAGGED, ref.tolist()):
        (pc, nc), (pr, nr) = _response_logps(model, tok, prompt, chosen), _response_logps(model, tok, prompt, rejected)
        if loss_type == "ipo":
            pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
        expect.append(_by_hand(beta, (pc - rc) - (pr - rr), 1 - p, loss_type))
        rewards.append(beta * (pc - rc))
    lengths = [_response_logps(model, tok, e[0], r)[1] for e in RAGGED for r in e[1:3]]
    assert lengths == [6, 2, 2, 7, 2, 2]  # ragged: chosen and rejected lengths differ within and across pairs
    np.testing.assert_allclose(losses.detach().numpy(), expect, rtol=1e-4)
    np.testing.assert_allclose(chosen_r.numpy(), rewards, rtol=1e-4)


def test_config_checks():
    for bad in ({"soft_labels": "mean"}, {"label_smoothing": 0.5}, {"label_smoothing": -0.1}, {"loss_type": "hinge"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            dpo.train(dpo.DPOConfig(model_name_or_path="m", output_dir="o", preference_file="p", **bad))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return root, make_toy_model(root / "sft"), toy_pairs(64, seed=2)


def test_dpo_end_to_end_learns_and_caches_reference(toy):
    from transformers import AutoModelForCausalLM

    root, sft, pairs = toy
    cfg = dpo.DPOConfig(model_name_or_path=str(sft), output_dir=str(root / "dpo"), beta=0.5, lr=3e-3,
                        epochs=3, per_device_batch_size=16, max_length=64, save_steps=4)
    out = dpo.train(cfg, records=pairs)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.05
    assert np.mean([m["rewards/accuracies"] for m in metrics[-3:]]) > 0.7
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy == reference at step 1
    before, after = load_file(sft / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # cached reference log-probs equal an independent computation on the SFT model
    ref = torch.load(out / "reference_logps.pt")
    model = AutoModelForCausalLM.from_pretrained(sft)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft)
    p = pairs[0]
    chosen = p["output_1"] if p["preference"] == 1 else p["output_2"]
    prompt_ids = tok(format_prompt(p["instruction"]))["input_ids"]
    resp_ids = tok(chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + resp_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    by_hand = sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(resp_ids))
    assert ref[0, 0].item() == pytest.approx(by_hand, abs=1e-4)
    assert not (out / "checkpoint").exists()


def test_ipo_and_lora_run(toy):
    root, sft, pairs = toy
    cfg = dpo.DPOConfig(model_name_or_path=str(sft), output_dir=str(root / "ipo"), loss_type="ipo", beta=0.5,
                        lr=1e-2, epochs=2, per_device_batch_size=16, max_length=64, use_lora=True, lora_r=4)
    out = dpo.train(cfg, records=pairs)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(1.0, abs=1e-3)  # (0 - 1/(2·0.5))² at the start
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()


def _favouring_output_1(pairs, preference: float) -> list[dict]:
    """The toy pairs with the better output (more 'good' words) put first and labelled `preference`."""
    out = []
    for p in pairs:
        o1, o2 = (p["output_1"], p["output_2"]) if p["preference"] == 1 else (p["output_2"], p["output_1"])
        out.append({**p, "output_1": o1, "output_2": o2, "preference": preference})
    return out


def test_dpo_on_soft_labels_moves_the_policy_toward_the_favoured_output(toy, tmp_path):
    """A logprob judge's 1.2 (80% output_1) must teach output_1; it once taught output_2."""
    from transformers import AutoModelForCausalLM

    root, sft, _ = toy
    pairs = _favouring_output_1(toy_pairs(32, seed=5), 1.2)
    cfg = dpo.DPOConfig(model_name_or_path=str(sft), output_dir=str(tmp_path / "soft"), beta=0.5, lr=3e-3,
                        epochs=2, per_device_batch_size=16, max_length=64)
    out = dpo.train(cfg, records=pairs)
    policy = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = AutoModelForCausalLM.from_pretrained(sft).eval()
    tok = common.load_tokenizer(sft)
    margins = []
    for p in pairs:  # [log π/π_ref](output_1) - [log π/π_ref](output_2), by an independent forward pass
        prompt = format_prompt(p["instruction"])
        ratio = [_response_logps(policy, tok, prompt, p[o])[0] - _response_logps(reference, tok, prompt, p[o])[0]
                 for o in ("output_1", "output_2")]
        margins.append(ratio[0] - ratio[1])
    assert np.mean(margins) > 0.5 and np.mean(np.array(margins) > 0) > 0.8
    # the logged accuracy is measured against output_1 as well
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["rewards/accuracies"] > 0.8 and metrics[-1]["rewards/margins"] > 0


def _with_attention_dropout(src, dst, p: float):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "attention_dropout": p}))
    return dst


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_so_step_one_policy_equals_reference(toy, tmp_path, disable):
    """With dropout off (the default) the policy's log-probs at step 1 are the reference's: zero rewards."""
    root, sft, pairs = toy
    model = _with_attention_dropout(sft, tmp_path / "sft_dropout", 0.5)
    kw = {} if disable else {"disable_dropout": False}
    cfg = dpo.DPOConfig(model_name_or_path=str(model), output_dir=str(tmp_path / "out"), beta=0.5, lr=1e-3,
                        epochs=1, per_device_batch_size=32, max_length=64, **kw)
    first = json.loads((dpo.train(cfg, records=pairs[:32]) / "metrics.jsonl").read_text().splitlines()[0])
    drift = abs(first["rewards/chosen"]) + abs(first["rewards/rejected"])
    assert (drift < 1e-5) if disable else (drift > 1e-4)  # on: 2e-3 measured (dropout noise, mean over pairs)


from helpers import launch_two_cpu_processes, run_process  # noqa: E402 (shared by the method tests)


def train_with_one_and_two_processes(script, out_dir, batch_one: int, batch_two: int):
    """Run `script OUT BATCH` in 1 process and in 2 (with half the per-process batch); return both
    saved state dicts (`OUT/model.safetensors`). Each run has a deadline; a hang kills its group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_process([sys.executable, str(script), str(out_dir / "one"), str(batch_one)], env=env, check=True)
    run_process(launch_two_cpu_processes(script, str(out_dir / "two"), str(batch_two)),
                env={**env, "ACCELERATE_USE_CPU": "1"}, check=True)
    return load_file(out_dir / "one" / "model.safetensors"), load_file(out_dir / "two" / "model.safetensors")


def assert_two_processes_match_one(script, out_dir, batch_one: int, batch_two: int, atol: float, rtol: float):
    """`train_with_one_and_two_processes`, then the two saved models agree to (atol, rtol); returns
    both runs' metrics.jsonl rows (one process's, two processes')."""
    one, two = train_with_one_and_two_processes(script, out_dir, batch_one, batch_two)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=atol, rtol=rtol)
    return [[json.loads(l) for l in (out_dir / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]


DPO_SCRIPT = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, {tests!r})
    from prefgym.methods import common, dpo
    from test_prefdata_toy import toy_pairs
    cfg = dpo.DPOConfig(model_name_or_path={sft!r}, output_dir=sys.argv[1], beta=0.5, lr=3e-3, epochs=1,
                        per_device_batch_size=int(sys.argv[2]), max_length=64, resume=False, warmup_steps=3)
    dpo.train(cfg, records=toy_pairs(32, seed=3))
""")


@pytest.mark.slow
def test_dpo_two_processes_match_one(toy, tmp_path):
    root, sft, _ = toy
    script = tmp_path / "run_dpo.py"
    script.write_text(DPO_SCRIPT.format(tests=os.path.dirname(__file__), sft=str(sft)))
    m1, m2 = assert_two_processes_match_one(script, tmp_path, 8, 4, atol=2e-5, rtol=1e-4)
    assert [round(m["loss"], 4) for m in m1] == [round(m["loss"], 4) for m in m2]
    # one warmup on any number of processes (a scheduler passed to `accelerator.prepare` would step
    # once per process: the warmup over after 2 steps on 2)
    assert [m["lr"] for m in m2] == [m["lr"] for m in m1] == pytest.approx([3e-3 * min(1, k / 3) for k in (1, 2, 3, 4)])


def test_dpo_cli_trains_and_rejects_unknown_keys(toy, tmp_path, capsys):
    from prefgym.cli import main
    from prefgym.io import write_json

    root, sft, pairs = toy
    write_json(tmp_path / "pairs.json", pairs)
    base = ["dpo", "--model", str(sft), "--preferences", str(tmp_path / "pairs.json"), "-o", str(tmp_path / "cli")]
    assert main(base + ["--set", "learning_rate=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(base + ["--loss-type", "ipo", "--beta", "0.5", "--set", "epochs=1", "--set", "per_device_batch_size=32",
                        "--set", "max_length=64"]) == 0
    assert json.loads((tmp_path / "cli" / "train_config.json").read_text())["loss_type"] == "ipo"
    assert (tmp_path / "cli" / "model.safetensors").exists()


def test_dpo_resume_after_crash_equals_uninterrupted(toy, tmp_path, monkeypatch):
    root, sft, pairs = toy

    def cfg(name):
        return dpo.DPOConfig(model_name_or_path=str(sft), output_dir=str(tmp_path / name), beta=0.5, lr=3e-3,
                             epochs=2, per_device_batch_size=16, max_length=64, save_steps=3, warmup_steps=6)

    full = dpo.train(cfg("full"), records=pairs)  # the warmup outlasts the checkpoint at step 3
    real_append = dpo.append_jsonl

    def crash_at_step_5(path, row):
        real_append(path, row)
        if row.get("step") == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(dpo, "append_jsonl", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        dpo.train(cfg("crashed"), records=pairs)
    monkeypatch.setattr(dpo, "append_jsonl", real_append)
    resumed = dpo.train(cfg("crashed"), records=pairs)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    rows = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    full_rows = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [r["lr"] for r in full_rows] == pytest.approx(
        [3e-3 * min(1, k / 6) for k in range(1, 9)])  # step k used the warmup's k-th rate
