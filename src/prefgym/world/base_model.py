"""The world's tiny tokenizer and base language model, trained here on world text.

The base model plays the pretrained LM: it has read the world's language (instructions in the
Alpaca format followed by responses, questions with their answers in plain text, lists of things,
short descriptions, sums), so it writes world text and ends its responses with EOS; but the
responses that followed Alpaca prompts belonged to *other* instructions, so it has not learned to
follow instructions. Supervised fine-tuning teaches that.

Both are saved in Hugging Face format: `AutoTokenizer.from_pretrained` and
`AutoModelForCausalLM.from_pretrained` load them like any other model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefgym.data.prompts import format_prompt
from prefgym.seeding import rng_for
from prefgym.world.demonstrations import sample_output
from prefgym.world.families import CATEGORIES, FAMILIES, TOPICS, WORDS, sample_task

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]


@dataclass(frozen=True)
class BaseModelConfig:
    """Size of the tiny tokenizer and causal LM, and how long to pretrain it."""

    vocab_size: int = 1024
    """BPE vocabulary size (special tokens included)."""
    hidden_size: int = 64
    """Width of the transformer."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    max_positions: int = 512
    """Longest sequence (prompt + response) the model handles."""
    pretrain_docs: int = 3000
    """World documents in the pretraining corpus."""
    pretrain_steps: int = 150
    """Optimizer steps of pretraining."""
    batch_size: int = 16
    """Sequences per step."""
    block_size: int = 128
    """Tokens per training sequence (documents are packed)."""
    lr: float = 1e-2
    """Peak learning rate (AdamW, warm-up then cosine decay); 1e-2 reached a lower loss than 3e-3
    and 1e-3 in the same steps."""
    num_threads: int = 1
    """CPU threads for pretraining: one is as fast for a model this small, much faster on a busy
    machine, and gives the same weights on every machine."""


def knowledge_document(rng: np.random.Generator) -> str:
    """A short plain-text document of world facts."""
    kind = int(rng.integers(4))
    if kind == 0:
        cat = list(CATEGORIES)[int(rng.integers(len(CATEGORIES)))]
        items = [CATEGORIES[cat][i] for i in rng.permutation(len(CATEGORIES[cat]))[: int(rng.integers(3, 8))]]
        return f"Some {cat}: {', '.join(items)}."
    if kind == 1:
        topic = list(TOPICS)[int(rng.integers(len(TOPICS)))]
        adj = [TOPICS[topic][i] for i in rng.permutation(8)[:2]]
        return f"The {topic} is {adj[0]} and {adj[1]}."
    if kind == 2:
        a, b = (int(x) for x in rng.integers(1, 21, size=2))
        return f"{a} + {b} = {a + b}. {max(a, b)} is larger than {min(a, b)}."
    w = WORDS[int(rng.integers(len(WORDS)))]
    return f"The word {w} has {len(w)} letters. In uppercase it is {w.upper()}, backwards it is {w[::-1]}."


def question_document(rng: np.random.Generator, exclude: set) -> str:
    """A world question with its right answer, in plain text (not the Alpaca format)."""
    while True:
        task = sample_task(rng)
        if (task.instruction, task.input) not in exclude:
            break
    question = f"{task.instruction} {task.input}".strip()
    return f"Question: {question}\nAnswer: {FAMILIES[task.family].clean(task.fields, rng)}"


def pretraining_corpus(n_docs: int, seed: int, exclude: set = frozenset()) -> list[str]:
    """World documents for pretraining.

    - 40%: an Alpaca prompt answered with the response to *another* task of the same family:
      the format, the kind of answer each instruction wants and EOS, but not the right answer;
    - 40%: plain-text questions with right answers (what a pretrained LM "knows");
    - 20%: world facts (lists of things, descriptions, sums, spellings).
    exclude: (instruction, input) pairs never to show with their answers (held-out val/eval tasks).
    """
    rng = rng_for("world-pretraining-corpus", seed)
    docs = []
    for _ in range(n_docs):
        u = rng.random()
        if u < 0.4:
            task = sample_task(rng)
            other = sample_task(rng, task.family)
            docs.append(format_prompt(task.instruction, task.input) + sample_output(other, rng))
        elif u < 0.8:
            docs.append(question_document(rng, exclude))
        else:
            docs.append(knowledge_document(rng))
    return docs


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=512, clean_up_tokenization_spaces=False)


def make_model(cfg: BaseModelConfig, tokenizer):
    """A freshly initialised tiny Llama-architecture causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 8 // 3,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def pretrain(cfg: BaseModelConfig, tokenizer, docs: list[str], seed: int, progress=None) -> tuple[object, dict]:
    """Pretrain a fresh model on packed `docs` (each followed by EOS); returns (model, stats)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _pretrain(cfg, tokenizer, docs, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: BaseModelConfig, tokenizer, docs: list[str], seed: int, progress) -> tuple[object, dict]:
    import torch

    model = make_model(cfg, tokenizer)
    ids = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tokenizer.eos_token_id])
    stream = torch.tensor(ids, dtype=torch.long)
    n_blocks = len(stream) // cfg.block_size
    blocks = stream[: n_blocks * cfg.block_size].view(n_blocks, cfg.block_size)  # (N, T)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.pretrain_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.pretrain_steps))))
    rng = rng_for("world-pretraining-order", seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(cfg.pretrain_steps):
        batch = blocks[torch.from_numpy(rng.integers(0, n_blocks, size=cfg.batch_size))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, cfg.pretrain_steps, losses[-1])
    seconds = time.perf_counter() - t0
    model.eval()
    stats = {"steps": cfg.pretrain_steps, "tokens": cfg.pretrain_steps * cfg.batch_size * cfg.block_size,
             "corpus_tokens": len(ids), "seconds": round(seconds, 2),
             "tokens_per_second": round(cfg.pretrain_steps * cfg.batch_size * cfg.block_size / seconds),
             "first_loss": round(losses[0], 4), "final_loss": round(float(np.mean(losses[-10:])), 4),
             "parameters": sum(p.numel() for p in model.parameters())}
    return model, stats


def save_base_model(model, tokenizer, out_dir: Path) -> None:
    """Save model (safetensors) and tokenizer together, loadable with the Auto classes."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one tiny shard: the bar is noise in our own progress display
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)

