"""Records -> token ids -> padded tensors.

A prompt is rendered with the tokenizer's chat template (``add_generation_prompt=True``); the
response is the assistant text followed by the token the template ends an assistant turn with
(``end_of_turn_id``: ``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, …; EOS without a
template) — exactly what a chat policy produces when it samples that answer and stops, so SFT,
the reward model and PPO all see the same token layout:

    [ chat-formatted prompt ............ ][ response tokens ... END ]
                                          ^ loss / reward starts here

A tokenizer without a chat template gets the plain format ``"{user}\\n\\n"`` per turn.

Truncation rule (``max_length`` = prompt + response tokens), applied to every stage:
  1. the prompt is cut from the left (oldest context first) but keeps at least
     ``max_length // 2`` tokens (or all of it when shorter);
  2. if it still does not fit, the response is cut from the right; for the reward model its
     last kept token is replaced by the end-of-turn token, so the scalar head always reads one.
Each truncated example is counted and the count is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.records import Demonstration, Message, Ranking
from rlhfkit.models.loading import end_of_turn_id


def encode_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of a chat prompt, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    text = "".join(f"{m['content']}\n\n" for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str, end: int | None = None) -> list[int]:
    """Response token ids followed by the end-of-turn token (``end``, default ``end_of_turn_id``)."""
    end = end_of_turn_id(tokenizer) if end is None else end
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [end]


def fit(
    prompt: list[int], response: list[int], max_length: int, eos_last: int | None = None
) -> tuple[list[int], list[int], bool]:
    """Apply the truncation rule of the module docstring. Returns (prompt, response, truncated)."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    keep_prompt = max(min(len(prompt), max_length // 2), max_length - len(response))
    prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt < len(prompt) else prompt
    room = max_length - len(prompt)
    if len(response) > room:
        response = response[:room]
        if eos_last is not None and response:
            response = response[:-1] + [eos_last]
    return prompt, response, True


@dataclass
class Encoded:
    """One tokenised sequence: ``prompt_len`` leading prompt tokens, then the response."""

    input_ids: list[int]
    prompt_len: int
    truncated: bool = False


def encode_demonstration(tokenizer, demo: Demonstration, max_length: int) -> Encoded:
    p, r, cut = fit(encode_prompt(tokenizer, demo.messages), encode_response(tokenizer, demo.response), max_length)
    return Encoded(p + r, len(p), cut)


def encode_ranking(tokenizer, ranking: Ranking, max_length: int) -> list[Encoded]:
    """All K responses of one ranking, each after the same prompt."""
    prompt = encode_prompt(tokenizer, ranking.messages)
    end = end_of_turn_id(tokenizer)
    out = []
    for text in ranking.responses:
        p, r, cut = fit(prompt, encode_response(tokenizer, text, end), max_length, eos_last=end)
        out.append(Encoded(p + r, len(p), cut))
    return out


def collate(examples: list[Encoded], pad_id: int, response_only: bool = True) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example.

    Returns input_ids (B, T), attention_mask (B, T), loss_mask (B, T) — 1 on response tokens
    (``response_only``) or on every real token — and last_index (B,), the position of each
    sequence's final token (the end-of-turn token the reward head reads).
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        loss[i, e.prompt_len if response_only else 0 : n] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "last_index": attn.sum(1) - 1}


def collate_packed(examples: list[Encoded], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Pack examples greedily (in order) into rows of at most ``max_length`` tokens.

    Attention stays within each example: a block-diagonal causal mask (B, 1, T, T) and
    position ids that restart at 0 for every example, so a packed row computes exactly what
    the examples would compute alone.
    """
    rows: list[list[Encoded]] = [[]]
    for e in examples:
        if rows[-1] and sum(len(x.input_ids) for x in rows[-1]) + len(e.input_ids) > max_length:
            rows.append([])
        rows[-1].append(e)
    width = max(sum(len(x.input_ids) for x in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    loss = torch.zeros((B, width), dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    seg = torch.full((B, width), -1, dtype=torch.long)  # -1 = padding
    for b, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e.input_ids)
            ids[b, at : at + n] = torch.tensor(e.input_ids)
            loss[b, at + e.prompt_len : at + n] = 1
            pos[b, at : at + n] = torch.arange(n)
            seg[b, at : at + n] = s
            at += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    mask4d = (causal & same) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only
    return {"input_ids": ids, "attention_mask": mask4d[:, None], "position_ids": pos, "loss_mask": loss}


def collate_shared_prompt(
    groups: list[list[Encoded]], pad_id: int
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """One row per prompt: the prompt once, then each of its responses (the reward model's K answers).

    Row layout and attention (``P`` = prompt, ``a``/``b`` = two responses)::

        tokens   P P P a a a b b        response tokens see the prompt and their own
        a sees   x x x x x x . .        earlier tokens, never another response; each
        b sees   x x x . . . x x        response's positions continue from the prompt's

    so every response computes exactly what it computes after its own copy of the prompt, while
    the prompt's tokens go through the model once instead of K times. Responses of one group whose
    prompts were truncated differently (``fit``) get rows of their own. (Capping the row length,
    so that attention spans shorter rows at the price of more prompt copies, measured no faster
    for K = 6 answers of ~90 tokens after a ~55-token prompt.)

    Returns (batch, where): batch has input_ids (R, T), attention_mask (R, 1, T, T) bool,
    position_ids (R, T); ``where[i]`` = (row, column) of the last token (the end-of-turn token) of the i-th
    sequence of ``groups``, flattened in order.
    """
    rows: list[tuple[list[int], list[tuple[int, list[int]]]]] = []  # (prompt ids, [(seq index, response ids)])
    seq = 0
    for group in groups:
        by_prompt: dict[tuple[int, ...], int] = {}
        for e in group:
            prompt = tuple(e.input_ids[: e.prompt_len])
            if prompt not in by_prompt:
                by_prompt[prompt] = len(rows)
                rows.append((list(prompt), []))
            rows[by_prompt[prompt]][1].append((seq, e.input_ids[e.prompt_len :]))
            seq += 1
    width = max(len(p) + sum(len(r) for _, r in rs) for p, rs in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -2, dtype=torch.long)  # -2 padding, -1 prompt, s = response s
    where: list[tuple[int, int]] = [(0, 0)] * seq
    for b, (prompt, responses) in enumerate(rows):
        n = len(prompt)
        ids[b, :n] = torch.tensor(prompt, dtype=torch.long)
        pos[b, :n] = torch.arange(n)
        seg[b, :n] = -1
        at = n
        for s, (i, resp) in enumerate(responses):
            m = len(resp)
            ids[b, at : at + m] = torch.tensor(resp, dtype=torch.long)
            pos[b, at : at + m] = torch.arange(n, n + m)
            seg[b, at : at + m] = s
            where[i] = (b, at + m - 1)
            at += m
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    q, k = seg[:, :, None], seg[:, None, :]
    visible = ((k == -1) | (k == q)) & (q != -2)
    mask4d = (causal & visible) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only
    return {"input_ids": ids, "attention_mask": mask4d[:, None], "position_ids": pos}, where


def length_groups(lengths: list[int], slack: float = 1.25) -> list[list[int]]:
    """Split a batch into forward passes of similar lengths, to cut padding.

    Indices are sorted by length and a new group starts whenever padding the group to its
    longest member would cost more than ``slack`` × its real tokens. The optimisation step is
    unchanged (the gradients of all groups add up before it); only wasted pad compute goes.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= slack * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups
