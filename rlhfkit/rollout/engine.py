"""The rollout engine: batched, continuously refilled generation on the live weights of a model.

    engine = Engine(model, tokenizer)                       # precision="auto": bf16 where fast
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=128), n=4)
    outs[0].token_ids, outs[0].logprobs, outs[0].finish_reason   # 'stop' or 'length'
    outs[0].top_logprobs    # with SamplingParams(logprobs=5): the 5 likeliest tokens at each step
    for ev in engine.stream([chat_ids], SamplingParams(max_new_tokens=256, stop=["\nUser:"])):
        print(ev.text, end="")                              # EOS (<|im_end|>) stops by default

How a call runs (one loop, no HF ``generate``):
 1. every request (prompt × its n samples) waits in a queue, prompt-major;
 2. free rows of the decode batch are filled from the queue: the prompts admitted together are
    prefilled once, right-padded, and each prompt's keys/values are copied into the rows of its
    samples (the K samples of a prompt share one prefill); their first token is sampled from the
    prefill logits. Admitted rows are ordered by prompt length so decode attention can work on
    row chunks of similar lengths;
 3. one decode step runs all live rows at once over the preallocated KV cache (``runner.py``),
    then each row samples its next token (``sampling.py``; each sample from its own seeded stream,
    so a prompt's samples do not depend on the batch around it) and checks its stops. The samples of a
    prompt admitted together form a group: their rows hold identical copies of the prompt's keys
    and values, which the C++ decode kernel reads once per group (``attention_cpu.PrefixGroups``);
    groups follow rows through compaction and refills (a refilled row starts a new group);
 4. a finished row leaves the batch: it is refilled from the queue (continuous batching), or when
    the queue is empty the last live row moves into its place so the batch shrinks.
Positions are per row (each sequence starts at offset 0 of its row), so prompts of any lengths
mix in one batch without padding tricks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from rlhfkit.errors import UserError
from rlhfkit.models.loading import resolve_precision, stop_token_ids
from rlhfkit.rollout.attention_cpu import PrefixGroups
from rlhfkit.rollout.requests import Completion, Row, StreamEvent, check_stop, new_row, prepare_requests
from rlhfkit.rollout.runner import KVCache, Runner
from rlhfkit.rollout.sampling import SamplingParams, row_uniforms, sample_next, sampling_workspace, top_logprobs


class Engine:
    """Generation over a causal LM's live weights (see the module docstring).

    model: a LLaMA-family ``*ForCausalLM`` (also PEFT-wrapped); it is used as it is, never copied.
    precision: 'auto' (bf16 where the hardware has it), 'bf16' or 'fp32'. A bf16 model always
        runs in bf16; an fp32 model runs in bf16 under autocast when precision resolves to bf16.
    max_batch: rows decoded together (memory: 2·layers·kv_heads·head_dim·2 bytes per token per
        row, 23 KB for SmolLM2-135M in bf16).
    max_prefill_tokens: padded prompt tokens per prefill forward (bounds its activation memory).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        precision: str = "auto",
        max_batch: int = 128,
        max_prefill_tokens: int = 8192,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.runner = Runner(model, "fp32")
        device = self.runner.device
        self.precision = resolve_precision(precision, device)
        if self.runner.param_dtype == torch.bfloat16:
            self.precision = "bf16"
        self.runner.precision = self.precision
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = stop_token_ids(tokenizer, model)  # EOS, generation_config's, the chat template's end of turn
        self._cache: KVCache | None = None
        self._busy = False  # one call at a time: calls share the KV cache

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # ------------------------------------------------------------------ public API

    def push_weights(self, model: torch.nn.Module) -> float:
        """Nothing to do (the ``Generator`` protocol): every call reads the live modules' weights."""
        return 0.0

    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
        progress: bool = False,
    ) -> list[Completion]:
        """``Generator.generate`` (``rlhfkit.rollout.backends``); the ``n`` samples of a prompt share one prefill."""
        out: list[Completion] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n * len(prompts), desc="generate", unit="sample")
        # One autocast context around the whole call: its weight-cast cache then casts each
        # fp32 parameter to bf16 once per call instead of once per step.
        with self.runner.autocast():
            for events in self._run(prompts, params, n, text_events=False):
                for ev in events:
                    if ev.finished:
                        out.append(ev.completion)
                        if bar is not None:
                            bar.update(1)
        if bar is not None:
            bar.close()
        out.sort(key=lambda c: (c.prompt_index, c.sample_index))
        return out

    def stream(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
    ) -> Iterator[StreamEvent]:
        """Like ``generate`` but yields StreamEvents as tokens are made (chat, the API)."""
        for events in self._run(prompts, params, n, text_events=True):
            yield from events

    # ------------------------------------------------------------------ the loop

    def _run(self, prompts, params, n, text_events: bool) -> Iterator[list[StreamEvent]]:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        ids, params = prepare_requests(self.tokenizer, prompts, params, n, limit)
        if not ids:
            return
        if self._busy:
            raise UserError("this Engine is already generating (finish or close the other stream first)")
        self._busy = True
        try:
            yield from self._loop(ids, params, n, text_events)
        finally:
            self.runner.unbind()
            self._busy = False

    def _loop(self, ids, params, n, text_events: bool) -> Iterator[list[StreamEvent]]:
        run = self.runner
        dev = self.device
        queue = deque((r, s) for r in range(len(ids)) for s in range(n))
        S = min(self.max_batch, len(queue))
        L = max(len(p) + sp.max_new_tokens for p, sp in zip(ids, params))
        filtering = any(sp.top_k > 0 or sp.top_p < 1 for sp in params)
        with torch.no_grad():
            cache = self._cache_for(S, L)
            rope = run.rope_tables(L)  # from the model's rotary module, every call (cheap)
        # the fast path's weights are taken from the live modules now, once per call, and dropped
        # when the call ends (_run): an optimizer step between calls is always seen
        run.bind(rows_hint=S)
        # fp32 probabilities of every row, reused each step (sampling.sampling_workspace)
        work = None if all(sp.greedy for sp in params) else sampling_workspace(S, run.vocab_size, dev)
        rows: list[Row] = []  # live rows, row i <-> cache slot i
        pending: list[int] = []  # per row: the sampled token not yet in the cache
        groups: PrefixGroups | None = None  # rows sharing a prompt prefix, rebuilt when rows change
        n_groups = 0  # prefill groups made so far (Row.group)

        while queue or rows:
            events: list[StreamEvent] = []
            with torch.no_grad(), run.autocast():  # per step: nothing leaks into the caller between yields
                # 2. admit waiting samples into free rows, one prefill per prompt
                new: list[Row] = []
                budget = self.max_prefill_tokens
                while queue and len(rows) + len(new) < S:
                    r, s = queue[0]
                    fresh = not any(q.req == r for q in new)
                    if fresh and new and budget < len(ids[r]):
                        break
                    queue.popleft()
                    budget -= len(ids[r]) if fresh else 0
                    seq = new_row(r, s, ids[r], params[r], self.eos_ids, self.tokenizer, text_events)
                    seq.group = n_groups + r
                    new.append(seq)
                if new:
                    n_groups += len(ids)  # group ids of the next admission never meet these
                    groups = None
                    # rows sorted by prompt length (samples of a prompt stay together): decode
                    # attention then works on row chunks of similar lengths (runner.attention_chunks)
                    new.sort(key=lambda q: len(q.prompt))
                    logits = self._prefill(cache, new, len(rows), rope)  # (N, V)
                    rows.extend(new)
                    pending.extend([0] * len(new))
                    self._sample(logits, rows, pending, len(rows) - len(new), filtering, work, events, text_events)
                    self._compact(cache, rows, pending)
                # 3. one decode step for all live rows; the samples of a prompt admitted together
                # hold identical copies of its keys/values, which the kernel reads once per group
                if rows:
                    if groups is None:
                        groups = PrefixGroups.build([q.group for q in rows], [len(q.prompt) for q in rows])
                    tok = torch.tensor(pending, dtype=torch.long, device=dev)  # (B,)
                    logits = run.decode(cache, tok, rope, groups)  # (B, V)
                    self._sample(logits, rows, pending, 0, filtering, work, events, text_events)
                    # 4. finished rows leave; the last live rows move into the holes
                    if self._compact(cache, rows, pending):
                        groups = None
            yield events

    def _cache_for(self, slots: int, max_len: int) -> KVCache:
        """The KV cache, kept between calls (PPO calls generate every iteration); grown as needed."""
        c = self._cache
        if c is None or c.slots < slots or c.max_len < max_len or c.k[0].dtype != self.runner.compute_dtype:
            if c is not None and c.k[0].dtype == self.runner.compute_dtype:
                slots, max_len = max(slots, c.slots), max(max_len, c.max_len)
            self._cache = None  # free the old one before allocating
            c = self._cache = self.runner.new_cache(slots, max_len)
        return c

    def _prefill(self, cache: KVCache, new: list[Row], first_row: int, rope) -> torch.Tensor:
        """Prefill the distinct prompts of ``new`` into rows first_row.. ; returns logits (N, V).

        Prompts are grouped by length so right-padding wastes little compute: sorted by length,
        a group closes when its padded size would exceed max_prefill_tokens or 1.25× its real tokens.
        """
        dev = self.device
        by_req: dict[int, list[int]] = {}  # request -> rows (relative to first_row) of its samples
        for j, q in enumerate(new):
            by_req.setdefault(q.req, []).append(j)
        reqs = sorted(by_req, key=lambda r: len(new[by_req[r][0]].prompt))
        groups: list[list[int]] = [[]]
        for r in reqs:
            g = groups[-1] + [r]
            lens = [len(new[by_req[x][0]].prompt) for x in g]
            padded = len(g) * max(lens)
            if groups[-1] and (padded > self.max_prefill_tokens or padded > 1.25 * sum(lens)):
                groups.append([r])
            else:
                groups[-1] = g
        logits = [None] * len(new)
        for g in groups:
            prompts = [new[by_req[r][0]].prompt for r in g]
            T = max(len(p) for p in prompts)
            ids = torch.zeros(len(prompts), T, dtype=torch.long)  # (P, T) right-padded
            for i, p in enumerate(prompts):
                ids[i, : len(p)] = torch.tensor(p)
            lens = torch.tensor([len(p) for p in prompts], device=dev)  # (P,)
            rows = [j for r in g for j in by_req[r]]
            slots = torch.tensor([first_row + j for j in rows], device=dev)  # (N,)
            src = torch.tensor([i for i, r in enumerate(g) for _ in by_req[r]], device=dev)  # (N,)
            out = self.runner.prefill(cache, ids.to(dev), lens, slots, src, rope)  # (N, V)
            for k, j in enumerate(rows):
                logits[j] = out[k]
        return torch.stack(logits)  # (N, V)

    def _sample(self, logits, rows, pending, first, filtering, work, events, text_events):
        """Sample for rows[first:] from logits (N, V); append tokens and check stops. Each row's
        random number is its own stream's for its next token (``Row.key``): batch-independent."""
        seqs = rows[first:]
        temp = torch.tensor([q.params.temperature for q in seqs], device=logits.device)
        top_k = torch.tensor([q.params.top_k for q in seqs], device=logits.device)
        top_p = torch.tensor([q.params.top_p for q in seqs], device=logits.device)
        u = None if work is None else row_uniforms([q.key for q in seqs], [len(q.tokens) for q in seqs], logits.device)
        tokens, logprobs = sample_next(logits, temp, top_k, top_p, None, filtering, work, u)
        k = min(max(q.params.logprobs for q in seqs), logits.shape[-1])
        if k:  # only when asked (the API's top_logprobs): one more pass over the vocabulary
            top_ids, top_lps = (x.tolist() for x in top_logprobs(logits, temp, k))
        for j, (q, t, lp) in enumerate(zip(seqs, tokens.tolist(), logprobs.tolist())):
            pending[first + j] = t
            q.tokens.append(t)
            q.logprobs.append(lp)
            if q.top is not None:
                q.top.append(list(zip(top_ids[j], top_lps[j]))[: q.params.logprobs])
            ev = check_stop(q, t, self.tokenizer, text_events)
            if ev is not None:
                events.append(ev)

    @staticmethod
    def _compact(cache: KVCache, rows: list[Row], pending: list[int]) -> bool:
        """Remove finished rows, moving the last live rows into their holes (rows stay packed).
        Returns whether any row left."""
        src, dst = [], []
        before = len(rows)
        i = 0
        while i < len(rows):
            if rows[i].done is None:
                i += 1
                continue
            while len(rows) - 1 > i and rows[-1].done is not None:  # finished rows at the end: drop
                rows.pop()
                pending.pop()
            last = len(rows) - 1
            if last > i:  # move the last live row into the hole
                rows[i], pending[i] = rows[last], pending[last]
                src.append(last)
                dst.append(i)
                i += 1
            rows.pop()
            pending.pop()
        if src:
            dev = cache.lens.device
            src_t, dst_t = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
            cache.move_rows(src_t, dst_t, int(cache.lens[src_t].max()))
        return len(rows) != before


__all__ = ["Completion", "Engine", "SamplingParams", "StreamEvent"]
