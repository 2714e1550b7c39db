"""Tiny random models of several Hugging Face families, for tests that must not assume LLaMA.

``tiny_family(name, tmp_dir)`` builds a 2-layer, d=64, fp32 model of one family from its
transformers config class, saves it with SmolLM2's tokenizer (so the vocabulary is the one
``tiny-random`` uses, see ``rlhfkit.models.loading.tiny_random_dir``) and a chat template in the
family's own style, and returns the directory. What differs between families on purpose:

  - gemma3 / gemma2: own ``<bos>``/``<eos>``/``<pad>`` tokens and a template whose turns end with
    a special ``<end_of_turn>`` that is *not* the EOS; ``generation_config.eos_token_id`` lists
    both (as Google's checkpoints do). gemma2 also soft-caps its attention and final logits.
  - gpt2: ``<|endoftext|>`` is BOS and EOS, its config has no pad id (the tokenizer pads with EOS,
    as GPT-2 users do), and a ChatML template ends turns with ``<|im_end|>`` (!= EOS).
  - the others keep SmolLM2's ChatML template, where the end of turn ``<|im_end|>`` is the EOS.
  - mistral has no sliding window (as Mistral 7B v0.2 on), gemma3 one of 4096 tokens: longer than any
    test's rows, so it changes no number, but it is in the config.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "gpt2", "gemma2")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's own shape: no system role (a system message is folded into the first user turn),
# the assistant is 'model', every turn ends with <end_of_turn>.
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (first if loop.first else '') + message['content'] }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from rlhfkit.models.loading import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    if name.startswith("gemma"):
        tok.add_special_tokens(
            {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
            }
        )
        tok.chat_template = GEMMA
    elif name == "gpt2":
        tok.bos_token = tok.eos_token = tok.pad_token = "<|endoftext|>"
        tok.chat_template = CHATML
    return tok


def _config(name: str, tok):
    import transformers as tf

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vocab = len(tok)
    if name == "llama":
        return tf.LlamaConfig(vocab_size=vocab, **SIZES, tie_word_embeddings=True, **ids)
    if name == "mistral":
        return tf.MistralConfig(vocab_size=vocab, **SIZES, head_dim=16, sliding_window=None, **ids)
    if name == "qwen2":
        return tf.Qwen2Config(vocab_size=vocab, **SIZES, tie_word_embeddings=True, **ids)
    if name == "qwen3":
        return tf.Qwen3Config(vocab_size=vocab, **SIZES, head_dim=16, tie_word_embeddings=True, **ids)
    if name == "phi3":
        return tf.Phi3Config(vocab_size=vocab, **SIZES, max_position_embeddings=2048, **ids)
    if name == "gemma3":
        return tf.Gemma3TextConfig(vocab_size=vocab, **SIZES, head_dim=16, final_logit_softcapping=30.0, **ids)
    if name == "gemma2":
        return tf.Gemma2Config(vocab_size=vocab, **SIZES, head_dim=16, **ids)
    if name == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    raise ValueError(f"unknown family {name!r}: expected one of {', '.join(FAMILIES)}")


def tiny_family(name: str, tmp_dir: str | Path, seed: int = 0) -> str:
    """A tiny random ``name`` model with tokenizer and chat template in ``tmp_dir/tiny-<name>``
    (built once: an existing directory is returned as is). Returns the directory."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    target = Path(tmp_dir) / f"tiny-{name}"
    if (target / "config.json").exists():
        return str(target)
    tok = _tokenizer(name)
    config = _config(name, tok)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name.startswith("gemma"):
        gen.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config = gen
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return str(target)
