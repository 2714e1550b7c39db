"""Log-likelihood of continuations, batched, with lm-evaluation-harness's exact tokenisation.

Every likelihood-based suite (TruthfulQA MC1/MC2, CrowS-Pairs, perplexity) goes through
``LoglikScorer.loglikelihood([(context, continuation), ...]) -> [float, ...]``: the summed
log-probability of the continuation's tokens given the context. Tests swap in any object with
that one method (a stub with known values), so the metric code never touches a model.

Tokenisation copies ``lm_eval.api.model.TemplateLM`` (lm-eval 0.4.x) so the numbers match:
  - trailing spaces of the context move to the front of the continuation;
  - the pair is tokenised as one string and split at ``len(tokenize(context))``;
  - an empty context becomes the prefix token (BOS, else EOS), as in ``crows_pairs_english``;
  - no special tokens are added (``add_special_tokens=False``, lm-eval's default for causal LMs
    whose tokenizer does not add BOS itself).

Two ways to compute, same numbers up to float noise:
  - ``share_context=False``: requests sorted longest first, batched, padded right with an
    attention mask; one forward each; only the continuation positions go through the LM head.
  - ``share_context=True`` (default): requests with the same context are grouped; the context
    runs once and its KV cache is repeated over the continuations. For TruthfulQA (a 170-token
    few-shot preamble before every one of ~13 choices) this is ~5x less compute.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from rlhfkit.models.layout import head_logits, split_is_exact, trunk

Request = tuple[str, str]  # (context, continuation)


class Scorer(Protocol):
    def loglikelihood(self, requests: Sequence[Request], desc: str = "") -> list[float]: ...


def progress(it: Iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    """A tqdm bar on stderr (tqdm ships with transformers); a no-op when disabled."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, dynamic_ncols=True, leave=False)


class LoglikScorer:
    """Sum of continuation log-probs under a causal LM, lm-eval-compatible.

    ``max_length``: longest input the model sees (left-truncated beyond it, as lm-eval does);
    defaults to the model's ``max_position_embeddings`` capped at 2048.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 16,
        share_context: bool = True,
        max_length: int | None = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self.share_context = share_context
        cfg_len = getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048
        self.max_length = max_length or min(int(cfg_len), 2048)
        self.show_progress = show_progress
        self.device = next(model.parameters()).device
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ------------------------------------------------------------------ tokenisation

    def tok_encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) exactly as lm-eval builds them."""
        if context == "":
            cont = self.tok_encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ scoring

    def loglikelihood(self, requests: Sequence[Request], desc: str = "loglikelihood") -> list[float]:
        encoded = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(encoded, desc=desc)

    @torch.no_grad()
    def loglikelihood_tokens(self, encoded: Sequence[tuple[list[int], list[int]]], desc: str = "") -> list[float]:
        out: list[float | None] = [None] * len(encoded)
        # identical requests are computed once (TruthfulQA's MC1 choices reappear in MC2)
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(encoded):
            if not cont:
                out[i] = 0.0
                continue
            unique[(tuple(ctx), tuple(cont))].append(i)
        keys = list(unique)
        too_long = [k for k in keys if len(k[0]) + len(k[1]) > self.max_length + 1]
        if self.share_context:
            short = [k for k in keys if len(k[0]) + len(k[1]) <= self.max_length + 1]
            values = self._shared(short, desc) | self._plain(too_long, desc)
        else:
            values = self._plain(keys, desc)
        for k, idx in unique.items():
            for i in idx:
                out[i] = values[k]
        return out  # type: ignore[return-value]

    def _head_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets) from final hidden states. # hidden (N, D), targets (N,) -> (N,)"""
        logits = self._lm_head(hidden).float()
        return torch.gather(F.log_softmax(logits, dim=-1), 1, targets[:, None])[:, 0]

    def _body(self, **kw):
        """The trunk without its LM head (the head runs only where a continuation token is), where
        trunk + head give the model's own logits (``rlhfkit.models.layout``: Gemma's soft-capping
        included); else the whole model, whose logits pass through an identity "head"."""
        if split_is_exact(self.model):
            out = trunk(self.model)(**kw)
            self._lm_head = lambda h: head_logits(self.model, h)
            return out.last_hidden_state, out.past_key_values if kw.get("use_cache") else None
        out = self.model(**kw)
        self._lm_head = lambda h: h
        return out.logits, out.past_key_values if kw.get("use_cache") else None

    def _plain(self, keys: list, desc: str) -> dict:
        """One forward per request, batched longest-first, padded right. lm-eval's algorithm."""
        values: dict = {}
        rows = []
        for k in keys:
            ctx, cont = list(k[0]), list(k[1])
            inp = (ctx + cont)[-(self.max_length + 1) :][:-1]  # the last token is only predicted
            rows.append((k, inp, cont))
        rows.sort(key=lambda r: -len(r[1]))
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        for batch in progress(batches, desc=desc, enabled=self.show_progress and len(batches) > 1):
            T = len(batch[0][1])
            ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for b, (_, inp, _) in enumerate(batch):
                ids[b, : len(inp)] = torch.tensor(inp)
                mask[b, : len(inp)] = 1
            hidden, _ = self._body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))  # (B, T, D)
            sel_h, sel_t, owner = [], [], []
            for b, (_, inp, cont) in enumerate(batch):
                n = len(cont)
                pos = torch.arange(len(inp) - n, len(inp))  # positions whose next token is cont
                sel_h.append(hidden[b, pos.to(self.device)])
                sel_t.append(torch.tensor(cont))
                owner += [b] * n
            lp = self._head_logprobs(torch.cat(sel_h), torch.cat(sel_t).to(self.device)).cpu()
            sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, torch.tensor(owner), lp.double())
            for b, (k, _, _) in enumerate(batch):
                values[k] = float(sums[b])
        return values

    def _shared(self, keys: list, desc: str) -> dict:
        """Group by context: run it once, repeat its KV cache over the continuations."""
        import copy

        values: dict = {}
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = defaultdict(list)
        for ctx, cont in keys:
            groups[ctx].append(cont)
        n_chunks = sum(max(1, -(-sum(len(c) > 1 for c in cs) // self.batch_size)) for cs in groups.values())
        bar = progress(range(n_chunks), total=n_chunks, desc=desc, enabled=self.show_progress)
        ticks = iter(bar)
        for ctx, conts in groups.items():
            ctx_ids = torch.tensor([list(ctx)], device=self.device)  # (1, Tc)
            h_ctx, cache = self._body(input_ids=ctx_ids, use_cache=True)
            last = h_ctx[0, -1]  # predicts each continuation's first token
            first = self._head_logprobs(
                last[None].expand(len(conts), -1), torch.tensor([c[0] for c in conts], device=self.device)
            )
            for j, c in enumerate(conts):
                values[(ctx, c)] = float(first[j])
            rest = sorted((c for c in conts if len(c) > 1), key=len, reverse=True)  # less padding
            for s in range(0, len(rest), self.batch_size):
                chunk = rest[s : s + self.batch_size]
                T = max(len(c) for c in chunk) - 1
                ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), len(ctx) + T), dtype=torch.long)
                mask[:, : len(ctx)] = 1
                for b, c in enumerate(chunk):
                    ids[b, : len(c) - 1] = torch.tensor(c[:-1])
                    mask[b, len(ctx) : len(ctx) + len(c) - 1] = 1
                kv = copy.deepcopy(cache) if len(rest) > self.batch_size else cache
                kv.batch_repeat_interleave(len(chunk))
                hidden, _ = self._body(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    past_key_values=kv,
                    use_cache=True,
                )  # (B, T, D); position t predicts c[t + 1]
                next(ticks, None)
                sel_h = torch.cat([hidden[b, : len(c) - 1] for b, c in enumerate(chunk)])
                sel_t = torch.tensor([t for c in chunk for t in c[1:]], device=self.device)
                lp = self._head_logprobs(sel_h, sel_t).cpu().double()
                o = 0
                for c in chunk:
                    n = len(c) - 1
                    values[(ctx, c)] += float(lp[o : o + n].sum())
                    o += n
            if not rest:
                next(ticks, None)
        for _ in ticks:  # close the bar
            pass
        return values

    # ------------------------------------------------------------------ perplexity

    @torch.no_grad()
    def token_nll(self, ids: list[int], window: int | None = None) -> tuple[float, int]:
        """Summed NLL (nats) and token count of a long token stream, scored in windows.

        Each window of ``window`` tokens (default ``max_length``) predicts its tokens 1..W-1
        from the ones before it inside the window; consecutive windows share one token (the
        last of one is the first, unscored, of the next), so every token after the first of
        the stream is scored exactly once.
        """
        W = window or self.max_length
        pieces = []
        for s in range(0, len(ids) - 1, W - 1):  # windows overlap by one token: the context of the next
            chunk = ids[s : s + W]
            if len(chunk) >= 2:
                pieces.append(((chunk[0],), tuple(chunk[1:])))
        vals = self._plain(pieces, "perplexity") if pieces else {}
        nll = -sum(vals[p] for p in pieces)
        n = sum(len(p[1]) for p in pieces)
        return nll, n


def perplexity(nll: float, n_tokens: int) -> float:
    return math.exp(nll / n_tokens) if n_tokens else float("nan")
