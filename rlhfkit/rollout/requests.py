"""What a generation call takes and returns, and the per-sample bookkeeping every backend shares.

    ids, params = prepare_requests(tokenizer, prompts, params, n, max_len)   # checked, tokenised
    row = new_row(r, s, ids[r], params[r], eos_ids, tokenizer, text_events)
    ev = check_stop(row, token, tokenizer, text_events)     # after each token appended to row

``Engine``, ``HFGenerator`` and ``VLLMGenerator`` all return ``Completion``s and ``StreamEvent``s;
the engine and HFGenerator check stops token by token with ``check_stop`` (vLLM checks its own,
with the same stop set: ``stop_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfkit.errors import UserError
from rlhfkit.rollout.sampling import SamplingParams, random_key, stream_key
from rlhfkit.rollout.text import IncrementalText, find_stop, held_back


@dataclass
class Completion:
    """One sample of one prompt."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens; includes the stop token (EOS) or the token that completed a stop string."""
    logprobs: list[float]
    """log_softmax(logits / T)[token] of each generated token, before top-k/top-p (see sampling.py)."""
    text: str
    """Decoded tokens without special tokens, cut before a matched stop string."""
    finish_reason: str
    """'stop' (stop token or stop string) or 'length' (max_new_tokens reached)."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sample, None for 'length'."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """With ``SamplingParams.logprobs = k > 0``: per generated token, the k most likely
    (token id, log-prob) under the same distribution as ``logprobs``, most likely first."""


@dataclass
class StreamEvent:
    """New output of one sample after a step (``Engine.stream``)."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    """Tokens made in this step (one, or none when only text was released)."""
    text: str
    """Text newly safe to show (never part of a possible stop string)."""
    finished: bool = False
    completion: Completion | None = None
    """The whole sample, on its last event."""
    logprobs: list[float] = field(default_factory=list)
    """The log-probs of ``token_ids``."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """With ``SamplingParams.logprobs > 0``: the alternatives of each of ``token_ids``."""


def prepare_requests(
    tokenizer, prompts, params, n: int, max_len: int | None, limit: str = "the model's {} positions"
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Token ids of each prompt (str prompts tokenised) and its SamplingParams (one for all, or one
    per prompt), checked: n >= 1, no empty prompt, prompt + max_new_tokens <= ``max_len`` (None: no
    check). ``limit`` names that bound in the error ('{}' is ``max_len``)."""
    if n < 1:
        raise UserError(f"n={n}: expected >= 1 samples per prompt")
    params = params if params is not None else SamplingParams()
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise UserError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            p = tokenizer(p, add_special_tokens=False)["input_ids"]
        p = [int(t) for t in p]
        if not p:
            raise UserError(f"prompt {i} is empty: generation needs at least one token")
        ids.append(p)
    for i, (p, sp) in enumerate(zip(ids, params)):
        if max_len and len(p) + sp.max_new_tokens > max_len:
            raise UserError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens {sp.max_new_tokens} > {limit.format(max_len)}"
            )
    return ids, params


def stop_ids(sp: SamplingParams, eos_ids: frozenset) -> frozenset:
    """The stop tokens of a request: ``sp.stop_token_ids`` if given, else the model's ``eos_ids``;
    none with ``ignore_eos``."""
    if sp.ignore_eos:
        return frozenset()
    return eos_ids if sp.stop_token_ids is None else frozenset(sp.stop_token_ids)


@dataclass
class Row:
    """A sample in flight: host-side state of one row of a decode batch."""

    req: int
    sample: int
    params: SamplingParams
    stop_ids: frozenset
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] | None = None  # SamplingParams.logprobs > 0
    detok: IncrementalText | None = None  # with stop strings or text events
    streamed: int = 0  # characters of detok.text already streamed
    done: Completion | None = None
    group: int = -1  # the engine's: samples of one prompt admitted together (one prefill)
    key: int = 0  # the sample's random stream (sampling.stream_key): token t draws sampling.uniform(key, t)


def new_row(
    r: int, s: int, prompt: list[int], sp: SamplingParams, eos_ids: frozenset, tokenizer, text_events: bool
) -> Row:
    """Sample ``s`` of prompt ``r``, before its first token; its random stream is its own
    (``stream_key(sp.seed, s, prompt)``, or a random one for an unseeded request)."""
    row = Row(r, s, sp, stop_ids(sp, eos_ids), prompt, top=[] if sp.logprobs else None)
    row.key = stream_key(sp.seed, s, prompt) if sp.seed is not None else random_key()
    if sp.stop or text_events:
        row.detok = IncrementalText(tokenizer)
    return row


def check_stop(q: Row, t: int, tokenizer, text_events: bool) -> StreamEvent | None:
    """Stop checks for the token ``t`` just appended to q: a stop string (the text is cut before
    it), a stop token, max_new_tokens. Sets ``q.done`` when q finished; returns the StreamEvent to
    emit (None when there is nothing to say: no text events and not finished).

    Runs once per generated token per row: keep it cheap (no work beyond the event itself)."""
    reason, stop, cut = None, None, None
    if q.detok is not None:
        start = len(q.detok.text)
        q.detok.add([t])
        if q.params.stop:
            hit = find_stop(q.detok.text, q.params.stop, start)
            if hit is not None:
                cut, stop, reason = hit[0], hit[1], "stop"
    if reason is None and t in q.stop_ids:
        reason, stop = "stop", t
    if reason is None and len(q.tokens) >= q.params.max_new_tokens:
        reason = "length"
    if reason is not None:
        if cut is not None:
            text = q.detok.text[:cut]
        else:
            text = tokenizer.decode(q.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        q.done = Completion(q.req, q.sample, q.prompt, q.tokens, q.logprobs, text, reason, stop, q.top)
        delta = text[q.streamed :] if text_events else ""
        return StreamEvent(q.req, q.sample, [t], delta, True, q.done, q.logprobs[-1:], _last(q.top))
    if not text_events:
        return None
    safe = len(q.detok.text) - held_back(q.detok.text, q.params.stop)
    delta = q.detok.text[q.streamed : safe] if safe > q.streamed else ""
    q.streamed = max(q.streamed, safe)
    return StreamEvent(q.req, q.sample, [t], delta, logprobs=q.logprobs[-1:], top_logprobs=_last(q.top))


def _last(top: list | None) -> list | None:
    return None if top is None else top[-1:]
