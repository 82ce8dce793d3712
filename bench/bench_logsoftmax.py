"""Peak memory of the losses over a 128k vocabulary: full fp32 log-softmax vs prefgym's sliced one.

    python bench/bench_logsoftmax.py [--batch 4] [--seq 128] [--vocab 128256] [--threads 1]
                                     [--losses token,sft,dpo,quark] [--dtypes float32,bfloat16]

A tiny random Llama (hidden 64, 2 layers) with a Llama-3-sized vocabulary (128,256 tokens), made
from a local config: its logits dominate the memory, as they do for real models with large
vocabularies. Each (loss, variant, dtype) runs one forward + backward pass in a fresh process:

- `token`: per-token log-probs of whole rows (PPO, RLOO, GRPO, online DPO's rollouts): `full` is
  `log_softmax(logits.float() / T).gather(...)`, `sliced` is `common.token_logprobs`;
- `sft`: SFT's summed cross-entropy over the response tokens (also FeedME, reward conditioning,
  expert iteration): `full` is `cross_entropy(logits.float(), ...)`, `sliced` is
  `sft._response_loss_sum`;
- `dpo`: the summed log-probs of chosen and rejected responses (DPO, KTO, SimPO, online DPO's
  updates), `batch` pairs with a seq / 4-token prompt and two responses of the rest: `full`
  gathers from `log_softmax(logits.float())`, `sliced` is `dpo.PairLogps` as it is;
- `quark`: Quark's NLL + KL(policy ‖ reference) − entropy over the vocabulary: `full` is the
  expression over fp32 (N, V) rows, `sliced` is `quark.quark_loss` as it is.

Memory is the process's peak resident set size during the pass (ru_maxrss) minus its RSS just
before it (model built, inputs made): what the pass itself needs. Both variants' losses and
gradients are checked equal. Writes bench/results/logsoftmax.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "logsoftmax.json"


def full_logprobs(logits, ids, temperature):
    import torch

    logps = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return torch.nn.functional.pad(logps.gather(2, ids[:, 1:, None]).squeeze(-1), (1, 0))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _loss(loss: str, variant: str, model, ids):
    """The loss `loss` of one batch, the old full fp32 expression or prefgym's own (`variant`)."""
    import torch
    import torch.nn.functional as F

    from prefgym.methods import common, dpo, quark, sft

    B, T = ids.shape
    if loss == "token":
        logits = model(input_ids=ids).logits  # (B, T, V) in the model's dtype
        fn = full_logprobs if variant == "full" else common.token_logprobs
        return -fn(logits, ids, 0.7)[:, 1:].mean()
    if loss == "sft":  # the first quarter of each row is the prompt (no loss)
        labels = ids.clone()
        labels[:, : T // 4] = -100
        if variant == "sliced":
            return sft._response_loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                  "labels": labels}) / (labels[:, 1:] != -100).sum()
        logits = model(input_ids=ids).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    if loss == "dpo":  # `batch` pairs: prompt T // 4 tokens, chosen and rejected the rest
        P = T // 4
        prompt_ids, response_ids = ids[:, :P], torch.cat([ids[:, P:], ids[:, P:].flip(0)], 1).reshape(2 * B, T - P)
        if variant == "full":  # what PairLogps did: one (2B, R, V) tensor of the logits, gathered
            def full_pair_logps(self, prompt_ids, prompt_mask, response_ids, response_mask):
                out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=1)
                out.cache.batch_repeat_interleave(2)
                logits = self.model(input_ids=response_ids, attention_mask=torch.cat(
                    [prompt_mask.repeat_interleave(2, 0), response_mask], 1), position_ids=P + torch.arange(
                    response_ids.shape[1])[None], cache=out.cache).logits
                logits = torch.cat([out.logits[:, -1:].repeat_interleave(2, 0), logits[:, :-1]], 1)
                logps = torch.gather(torch.log_softmax(logits.float(), -1), 2, response_ids[..., None]).squeeze(-1)
                return logps.sum(-1)[0::2], logps.sum(-1)[1::2]

            dpo.PairLogps.forward = full_pair_logps
        chosen, rejected = dpo.PairLogps(model)(prompt_ids, torch.ones_like(prompt_ids), response_ids,
                                                torch.ones_like(response_ids))
        return -F.logsigmoid(0.1 * (chosen - rejected)).mean() - (chosen + rejected).mean() / T
    if loss == "quark":  # every position's logits, the reference's from a second pass without gradient
        logits = model(input_ids=ids).logits
        with torch.no_grad():
            ref = model(input_ids=ids).logits[:, :-1].reshape(B * (T - 1), -1)
        pol, targets = logits[:, :-1].reshape(B * (T - 1), -1), ids[:, 1:].reshape(-1)
        control_ids = torch.arange(5)  # control tokens that took rows of the vocabulary: masked out
        if variant == "sliced":
            nll, kl, entropy = (t.mean() for t in quark._quark_token_terms(pol, ref, targets, control_ids))
        else:  # the expression Quark used: fp32 (N, V) rows, log-softmaxes kept for backward
            pol = pol.float()
            nll = F.cross_entropy(pol, targets)
            logp = F.log_softmax(pol.index_fill(-1, control_ids, -1e9), -1)
            logq = F.log_softmax(ref.float().index_fill(-1, control_ids, -1e9), -1)
            p = logp.exp()
            kl, entropy = (p * (logp - logq)).sum(-1).mean(), -(p * logp).sum(-1).mean()
        return nll + 0.05 * kl - 0.06 * entropy
    raise ValueError(loss)


def worker(loss: str, variant: str, dtype: str, batch: int, seq: int, vocab: int, threads: int) -> dict:
    """One forward + backward in this process; returns its memory, time and a loss/grad fingerprint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    ids = torch.randint(0, vocab, (batch, seq))
    _loss(loss, variant, model, ids[:1, :8]).backward()  # the libraries' first-call set-up, outside the measure
    model.zero_grad(set_to_none=True)
    before_rss, before_peak = rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    value = _loss(loss, variant, model, ids)
    value.backward()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad = model.lm_head.weight.grad.float()
    return {"loss_name": loss, "variant": variant, "dtype": dtype, "peak_mib": peak - before_rss, "wall_s": wall,
            "setup_peak_below_pass_peak": before_peak < peak,
            "logits_mib": batch * seq * vocab * torch.finfo(getattr(torch, dtype)).bits / 8 / 2**20,
            "loss": value.item(), "grad_norm": grad.norm().item(), "grad_sum_abs": grad.abs().sum().item()}


def run_variant(args, loss: str, variant: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--loss", loss, "--dtype", dtype, "--batch", str(args.batch),
           "--seq", str(args.seq), "--vocab", str(args.vocab), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


LOSSES = ("token", "sft", "dpo", "quark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["full", "sliced"], help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=LOSSES, default="token", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.loss, args.worker, args.dtype, args.batch, args.seq, args.vocab, args.threads)))
        return
    import torch
    import transformers

    results: dict = {}
    for loss in args.losses.split(","):
        for dtype in args.dtypes.split(","):
            full, sliced = run_variant(args, loss, "full", dtype), run_variant(args, loss, "sliced", dtype)
            for key in ("loss", "grad_norm", "grad_sum_abs"):  # the same computation
                assert abs(full[key] - sliced[key]) <= 1e-4 * max(1.0, abs(full[key])), (loss, dtype, key, full, sliced)
            ratio = full["peak_mib"] / sliced["peak_mib"]
            results.setdefault(loss, {})[dtype] = {"full": full, "sliced": sliced, "peak_ratio_full_over_sliced": ratio}
            print(f"{loss:6s} {dtype:9s} logits {full['logits_mib']:7.1f} MiB | peak during forward+backward: full "
                  f"{full['peak_mib']:7.1f} MiB, sliced {sliced['peak_mib']:7.1f} MiB ({ratio:.2f}x less) | "
                  f"time full {full['wall_s']:.2f} s, sliced {sliced['wall_s']:.2f} s", flush=True)
    report = {"command": "python " + " ".join(["bench/bench_logsoftmax.py", *sys.argv[1:]]),
              "settings": {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "threads": args.threads},
              "model": "random Llama, hidden 64, 2 layers, untied LM head",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "results": results}
    from prefgym.io import write_json

    write_json(args.out, report)


if __name__ == "__main__":
    main()
