"""Step 0: next-token pretraining on a raw text corpus (also the corpus PPO-ptx mixes in).

The corpus is tokenised as one stream (documents joined by EOS) and cut into chunks of
``max_length`` tokens; every token is a target. The loop is SFT's (``run_lm_training``).
"""

from __future__ import annotations

from rlhfkit.config import PretrainConfig
from rlhfkit.data.tokenize import Encoded
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
