"""Step 0: next-token pretraining on a raw text corpus (also the corpus PPO-ptx mixes in).

The corpus is tokenised as one stream (documents joined by EOS) and cut into chunks of
``max_length`` tokens; every token is a target. The loop is SFT's (``run_lm_training``).
PPO-ptx (InstructGPT's pretraining term in PPO, ``recipes/ppo.py``) reads and cuts its corpus the
same way (``load_ptx``, ``ptx_chunks``) and adds ``ptx_loss`` to each PPO step.
"""

from __future__ import annotations

import torch

from rlhfkit.config import PPOConfig, PretrainConfig
from rlhfkit.data.tokenize import Encoded
from rlhfkit.errors import UserError
from rlhfkit.models.layout import scored_forward
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.recipes.common import load_split, make_accelerator, prepare_out
from rlhfkit.recipes.sft import run_lm_training


def chunk_corpus(tokenizer, documents: list[str], max_length: int) -> list[Encoded]:
    """Token chunks of exactly ``max_length`` (the last, shorter one is kept if >= 2 tokens)."""
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    chunks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return [Encoded(c, 0) for c in chunks if len(c) >= 2]


def train_pretrain(cfg: PretrainConfig, say=print) -> dict:
    acc = make_accelerator(cfg)
    out, ckpt = prepare_out(cfg, acc)
    say = say if acc.is_main_process else (lambda *a, **k: None)
    train_docs, eval_docs = load_split(cfg, "text", say)  # a bad file is reported before the model loads
    loaded = load_causal_lm(cfg.model)
    if not eval_docs and len(train_docs) == 1 and cfg.eval_fraction > 0:
        # One document (a .txt corpus): hold out its tail instead.
        text = train_docs[0]
        cut = int(len(text) * (1 - cfg.eval_fraction))
        train_docs, eval_docs = [text[:cut]], [text[cut:]]
    train = chunk_corpus(loaded.tokenizer, train_docs, cfg.max_length)
    held_out = chunk_corpus(loaded.tokenizer, eval_docs, cfg.max_length)
    say(f"pretrain: {len(train)} chunks of {cfg.max_length} tokens, {len(held_out)} held out")
    return run_lm_training(cfg, acc, loaded.model, loaded.tokenizer, train, held_out, out, ckpt, say, desc="pretrain")


def load_ptx(cfg: PPOConfig) -> list[str] | None:
    """PPO-ptx corpus documents (None when PPO-ptx is off)."""
    from rlhfkit.data.loaders import load_records

    if not (cfg.ptx_data and cfg.ptx_coef > 0):
        return None
    return load_records(cfg.ptx_data, "text", fields=cfg.fields or None).records


def ptx_chunks(cfg: PPOConfig, docs: list[str], tok) -> list[list[int]]:
    """PPO-ptx corpus chunks (token ids), cut like ``rlhfkit pretrain`` does."""
    chunks = [e.input_ids for e in chunk_corpus(tok, docs, cfg.ptx_length)]
    if not chunks:
        raise UserError(f"ptx_data={cfg.ptx_data}: no chunk of >= 2 tokens")
    return chunks


def ptx_loss(policy, chunks: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token NLL over the tokens of ``chunks`` (InstructGPT's PPO-ptx term), the
    batch made on the policy's device."""
    device = next(policy.parameters()).device
    T = max(len(c) for c in chunks)
    ids = torch.tensor([c + [pad_id] * (T - len(c)) for c in chunks], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in chunks], dtype=torch.long, device=device)
    # (B, T-1): position t predicts token t + 1
    positions = torch.arange(T - 1, device=device).expand(len(chunks), -1)
    _, logits = scored_forward(policy, ids, mask, positions)  # (B, T-1, V), the model's own logits
    target_mask = mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits.float()[target_mask], ids[:, 1:][target_mask])
    return nll
