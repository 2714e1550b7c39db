"""Model versions the web app serves: found in a run directory, loaded on first use, generated
with a rollout backend (``rlhfkit.rollout.make_generator``: the engine where it runs the model,
else transformers, or vLLM; ``ServeConfig.rollout_backend``).

A pipeline run directory (``rlhfkit pipeline``) holds the versions

    base      pipeline.json's "model"          (only when that spec is a local directory)
    sft       sft/model
    ppo{r}    round{r}/ppo/model
    dpo{r}, a2c{r}, rloo{r}, grpo{r}   round{r}/dpo/model, … (the pipeline's optimizer=…)

Reward models (round{r}/rm/model) are scorers, not chat models, and are not served. Extra versions
come from ``--model name=spec``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.errors import NotFound, UserError
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.rollout import SamplingParams, make_generator


def discover_versions(run: str | Path, extra: list[str] = ()) -> dict[str, str]:
    """``{name: model spec}`` of the chat models in a run directory plus ``name=spec`` extras."""
    run = Path(run)
    found: dict[str, str] = {}
    meta = run / "pipeline.json"
    if meta.exists():
        try:
            base = json.loads(meta.read_text()).get("model", "")
        except json.JSONDecodeError:
            base = ""
        if base and (Path(base) / "config.json").exists():
            found["base"] = base
    if (run / "sft" / "model" / "config.json").exists():
        found["sft"] = str(run / "sft" / "model")
    for optimizer in ("ppo", "a2c", "rloo", "grpo", "dpo", "ilql"):
        rounds = sorted(
            (p for p in run.glob(f"round*/{optimizer}/model/config.json")),
            key=lambda p: int(p.parts[-4][5:]) if p.parts[-4][5:].isdigit() else 0,
        )
        for p in rounds:
            found[f"{optimizer}{p.parts[-4][5:]}"] = str(p.parent)
    for item in extra:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise UserError(f"--model {item!r}: expected name=spec (e.g. mine=runs/x/sft/model)")
        found[name.strip()] = spec.strip()
    return found


@dataclass
class TokenLogprob:
    """One generated token with its log-prob and, when asked, the likeliest tokens at its place."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New text of one sample (``index``) and the log-probs of the tokens made meanwhile (when asked).

    The text is what became safe to show (never part of a possible stop string), so it need not
    match the tokens one to one."""

    text: str
    index: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Reply:
    """The end of one sample: the whole text, why it ended, token counts."""

    text: str
    finish_reason: str  # 'stop' | 'length'
    prompt_tokens: int
    completion_tokens: int
    index: int = 0  # prompt_index * n + sample_index (OpenAI's choice index)
    logprobs: list[TokenLogprob] | None = None  # every generated token's, when asked


class ModelPool:
    """Loads versions on demand (at most ``max_loaded`` at once, least recently used evicted) and
    generates with one lock per version: a generator runs one call at a time.

    Best-of-N (``best_of`` > 1 with ``reward_fn(prompts, responses) -> scores``, ``rlhfkit serve
    --best-of N --reward-model RM``): every answer of ``stream``/``stream_text`` (chat, arena, API)
    is the reward model's best of N samples; the N are generated first, so the picked answer
    arrives as one text chunk (no token-by-token streaming)."""

    def __init__(
        self,
        versions: dict[str, str],
        precision: str = "auto",
        max_loaded: int = 3,
        rollout_backend: str = "auto",
        best_of: int = 1,
        reward_fn=None,
    ):
        if best_of > 1 and reward_fn is None:
            raise UserError(f"best_of={best_of} needs a reward model (rlhfkit serve --reward-model RM_DIR)")
        self.best_of = best_of
        self.reward_fn = reward_fn
        self._rm_lock = threading.Lock()
        self.versions = dict(versions)
        self.precision = precision
        self.rollout_backend = rollout_backend
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, tuple] = OrderedDict()  # name -> (generator, tokenizer, lock)
        self._load_lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.versions)

    def _get(self, name: str):
        if name not in self.versions:
            raise NotFound(f"no model version {name!r} (served: {', '.join(self.versions) or 'none'})")
        with self._load_lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            loaded = load_causal_lm(self.versions[name])
            loaded.model.eval()
            entry = (
                make_generator(loaded.model, loaded.tokenizer, self.rollout_backend, self.precision, max_batch=16),
                loaded.tokenizer,
                threading.Lock(),
            )
            self._loaded[name] = entry
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return entry

    def _params(
        self,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str],
        seed: int | None,
        top_k: int = 0,
        logprobs: int = 0,
    ):
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=list(stop),
            seed=seed,
            logprobs=logprobs,
        )

    def _encode(self, tok, messages: list[dict]) -> list[int]:
        return encode_prompt(tok, messages)

    def stream(
        self, name: str, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.7, **kw
    ) -> Iterator[Delta | Reply]:
        """One conversation's ``n`` samples (one shared prefill): :class:`Delta` items as text is made,
        one :class:`Reply` per sample as it ends. ``logprobs``: None = none, k >= 0 = each token's
        log-prob and its k likeliest alternatives. Other settings: ``_generate_stream``."""

        def encode(tok) -> list[list[int]]:
            return [self._encode(tok, messages)]

        return self._generate_stream(
            name, encode, max_new_tokens=max_new_tokens, temperature=temperature, rm_prompts=[messages], **kw
        )

    def stream_text(
        self, name: str, prompts: list[str], max_new_tokens: int = 16, temperature: float = 1.0, **kw
    ) -> Iterator[Delta | Reply]:
        """``stream`` for plain text prompts (no chat template; /v1/completions), all in one generator
        call; sample j of prompt i has index i·n + j."""

        def encode(tok) -> list[list[int]]:
            return [tok(p)["input_ids"] for p in prompts]  # the tokenizer's own special tokens (BOS), as HF does

        return self._generate_stream(
            name, encode, max_new_tokens=max_new_tokens, temperature=temperature, rm_prompts=list(prompts), **kw
        )

    def _generate_stream(
        self,
        name: str,
        encode,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        stop: list[str] = (),
        seed: int | None = None,
        n: int = 1,
        top_k: int = 0,
        logprobs: int | None = None,
        best_of: int | None = None,
        rm_prompts: list | None = None,
    ) -> Iterator[Delta | Reply]:
        """``stream`` and ``stream_text``: the prompts ``encode(tokenizer)`` gives, generated under the
        model's lock (one call at a time per model). ``best_of``: candidates per prompt whose
        reward-model best ``n`` are returned (OpenAI's completions ``best_of``; default ``n`` times
        the pool's ``best_of``); ``rm_prompts`` are the prompts as the reward model sees them."""
        generator, tok, lock = self._get(name)
        total = best_of or n * self.best_of
        if total > n and self.reward_fn is None:
            raise UserError(f"best_of={total} needs a reward model (rlhfkit serve --reward-model RM_DIR)")
        with lock:
            params = self._params(max_new_tokens, temperature, top_p, stop, seed, top_k, logprobs or 0)
            ids = encode(tok)
            if total <= n:
                yield from self._stream(generator, tok, ids, n, logprobs, params)
                return
            cands = sorted(
                (r for r in self._stream(generator, tok, ids, total, logprobs, params) if isinstance(r, Reply)),
                key=lambda r: r.index,
            )  # (prompts * total,)
        yield from self._pick(cands, rm_prompts or [""] * len(ids), n, total)

    def _pick(self, cands: list[Reply], rm_prompts: list, n: int, total: int) -> Iterator[Delta | Reply]:
        """Best-of-N: the reward model's ``n`` best of each prompt's ``total`` candidates (best first),
        each as one Delta (its whole text) and its Reply; completion tokens count all candidates."""
        from rlhfkit.algos.best_of_n import best_index

        with self._rm_lock:
            scores = self.reward_fn([rm_prompts[r.index // total] for r in cands], [r.text for r in cands])
        for i in range(len(cands) // total):
            group, s = cands[i * total : (i + 1) * total], list(scores[i * total : (i + 1) * total])
            spent = sum(r.completion_tokens for r in group)
            for j in range(n):
                b = best_index(s)
                s[b] = float("-inf")
                best = replace(group[b], index=i * n + j, completion_tokens=spent if j == 0 else 0)
                if best.text or best.logprobs:
                    yield Delta(best.text, best.index, best.logprobs)
                yield best

    @staticmethod
    def _stream(generator, tok, ids: list[list[int]], n: int, logprobs: int | None, params) -> Iterator[Delta | Reply]:
        def token(t: int) -> str:  # special tokens by name (the EOS that ended a sample: '<|im_end|>')
            return tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

        def entries(token_ids, lps, tops) -> list[TokenLogprob]:
            tops = tops or [[] for _ in token_ids]
            return [
                TokenLogprob(token(t), lp, [(token(a), alp) for a, alp in top])
                for t, lp, top in zip(token_ids, lps, tops)
            ]

        for ev in generator.stream(ids, params, n=n):
            index = ev.prompt_index * n + ev.sample_index
            lps = None if logprobs is None else entries(ev.token_ids, ev.logprobs, ev.top_logprobs)
            if ev.text or lps:
                yield Delta(ev.text, index, lps)
            if ev.finished:
                c = ev.completion
                yield Reply(
                    c.text,
                    c.finish_reason,
                    len(ids[ev.prompt_index]),
                    len(c.token_ids),
                    index,
                    None if logprobs is None else entries(c.token_ids, c.logprobs, c.top_logprobs),
                )

    def reply(self, name: str, messages: list[dict], **kw) -> Reply:
        out = None
        for item in self.stream(name, messages, **kw):
            if isinstance(item, Reply):
                out = item
        assert out is not None
        return out

    def sample(
        self, name: str, prompts: list[list[dict]], k: int, max_new_tokens: int, temperature: float = 1.0, seed: int = 0
    ) -> list[list[tuple[str, bool]]]:
        """K answers per prompt (text, finished) in one generator call: labeling batches."""
        generator, tok, lock = self._get(name)
        params = self._params(max_new_tokens, temperature, 1.0, [], seed)
        with lock:
            ids = [self._encode(tok, m) for m in prompts]
            outs = generator.generate(ids, params, n=k)
        return [
            [(c.text.strip(), c.finish_reason == "stop") for c in outs[i * k : (i + 1) * k]]
            for i in range(len(prompts))
        ]
