"""Generation with transformers' ``model.generate``: the rollout backend for any causal LM.

    gen = HFGenerator(model, tokenizer)                    # precision="auto": bf16 autocast where fast
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=128), n=4)   # the Engine's Completions

It returns what ``Engine`` returns (see ``rlhfkit.rollout.backends.Generator``) for models the
engine does not run. How a call runs:
 1. every sample is a row of its own (prompt × n, prompt-major); rows whose SamplingParams give the
    same ``generate`` settings are batched, at most ``max_batch`` rows per call, left-padded
    (prompts sorted by length within a settings group, so rows of a batch pad little);
 2. ``model.generate`` runs with a ``GenerationConfig`` that spells out every setting (no penalties,
    no warpers of its own), so a checkpoint's ``generation_config.json`` defaults (Qwen's top_k=20,
    a repetition penalty) do not change what is sampled. Fields without a neutral value
    (suppress_tokens, bad_words_ids, min_p, ...) would still come from it; chat models set none.
    Sampling rows pick their token in a logits processor (``RowSampler``) with the engine's own
    ``sample_next`` (temperature, top-k, top-p, inverse CDF) and each sample's own random stream,
    and hand ``generate`` a one-hot score that its greedy step takes;
 3. each step, the raw logits of the step (``outputs.logits[:, -1]`` in fp32, exactly what
    ``output_logits=True`` returns) are caught by a forward hook on the model, and a stopping
    criterion (``Rows``) reads the tokens just sampled: it records each token's log-prob
    log_softmax(logits / T)[token] (T = 1 for greedy; before top-k/top-p, as the engine), checks the
    stop tokens, stop strings and max_new_tokens exactly as the engine does, and tells ``generate``
    which rows are done. So ``stream`` sees every step: it runs ``generate`` in a worker thread and
    yields the rows' StreamEvents as they are made (chat shows text before the answer ends).
    Tokens after a row's stop are discarded.

Seeds: ``generate``'s own sampling (``torch.multinomial`` on the global RNG, one stream for the whole
batch) is not used: sample ``s`` of a request seeded ``seed`` draws token t with
``sampling.uniform(stream_key(seed, s, prompt), t)``, as in the engine. So a prompt's samples do not depend
on the batch, the caller's RNG is never touched by a seeded call, and where the two backends'
logits agree (fp32) the engine and this generator sample the same tokens.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from rlhfkit.errors import UserError
from rlhfkit.models.loading import resolve_precision, stop_token_ids
from rlhfkit.models.lora import unwrap
from rlhfkit.rollout.requests import Completion, Row, StreamEvent, check_stop, new_row, prepare_requests
from rlhfkit.rollout.sampling import SamplingParams, row_uniforms, sample_next


class HFGenerator:
    """Generation with ``model.generate`` on the live module (see the module docstring).

    model: any transformers causal LM (also PEFT-wrapped), on CPU or CUDA; used as it is, never copied.
    precision: 'auto' (bf16 where the hardware has it), 'bf16' or 'fp32'; an fp32 model runs under
        bf16 autocast when it resolves to bf16, a bf16 model runs in bf16.
    max_batch: rows (samples) per ``generate`` call.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, precision: str = "auto", max_batch: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        param = next(model.parameters())
        self.precision = "bf16" if param.dtype == torch.bfloat16 else resolve_precision(precision, param.device)
        self.eos_ids = stop_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self._busy = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def push_weights(self, model: torch.nn.Module) -> float:
        """Nothing to do (the ``Generator`` protocol): ``generate`` runs the live module."""
        return 0.0

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
        progress: bool = False,
    ) -> list[Completion]:
        """``Generator.generate`` (``rlhfkit.rollout.backends``): rows batched by setting, see the module docstring."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n * len(prompts), desc="generate", unit="sample")
        out: list[Completion] = []

        def collect(events: list[StreamEvent]) -> None:
            for ev in events:
                if ev.finished:
                    out.append(ev.completion)
                    if bar is not None:
                        bar.update(1)

        try:
            self._run(prompts, params, n, text_events=False, emit=collect)
        finally:
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
        """Like ``generate`` but yields StreamEvents as tokens are made: ``generate`` runs in a worker
        thread and hands each step's events over; closing the iterator stops it at the next step."""
        self._prepare(prompts, params, n)  # bad input fails here, not in the thread
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                self._run(prompts, params, n, text_events=True, emit=events.put, cancel=cancel)
            except BaseException as e:  # handed to the consumer, raised there
                events.put(e)
            finally:
                events.put(None)

        thread = threading.Thread(target=work, name="hf-generate", daemon=True)
        thread.start()
        try:
            while (item := events.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            cancel.set()
            thread.join()

    # ------------------------------------------------------------------ the calls

    def _run(self, prompts, params, n, text_events: bool, emit: Callable, cancel: threading.Event | None = None):
        ids, params = self._prepare(prompts, params, n)
        if not ids:
            return
        if self._busy:
            raise UserError("this generator is already generating (finish or close the other stream first)")
        self._busy = True
        model = unwrap(self.model)  # PEFT: the transformers model, LoRA layers still in its modules
        logits: list[torch.Tensor] = []  # the latest step's raw logits (B, V) fp32

        def catch(module, args, output) -> None:
            logits[:] = [output.logits[:, -1].float()]

        hook = model.register_forward_hook(catch)
        # eval mode for the call: a PPO policy in train mode with gradient checkpointing would make
        # generate drop its KV cache (dropout is off anyway: disable_dropout)
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                for batch in self._batches(ids, params, n):
                    rows = [
                        new_row(r, s, ids[r], params[r], self.eos_ids, self.tokenizer, text_events) for r, s in batch
                    ]
                    self._generate(model, rows, logits, text_events, emit, cancel)
                    if cancel is not None and cancel.is_set():
                        break
        finally:
            model.train(training)
            hook.remove()
            self._busy = False

    def _prepare(self, prompts, params, n: int) -> tuple[list[list[int]], list[SamplingParams]]:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return prepare_requests(self.tokenizer, prompts, params, n, limit)

    def _batches(self, ids: list[list[int]], params: list[SamplingParams], n: int) -> list[list[tuple[int, int]]]:
        """(prompt, sample) rows in batches of at most max_batch that share one generate setting,
        each setting's prompts sorted by length (samples of a prompt stay together)."""
        groups: dict[tuple, list[int]] = {}
        for r, sp in enumerate(params):
            groups.setdefault(_settings(sp), []).append(r)
        batches = []
        for reqs in groups.values():
            rows = [(r, s) for r in sorted(reqs, key=lambda r: len(ids[r])) for s in range(n)]
            batches += [rows[i : i + self.max_batch] for i in range(0, len(rows), self.max_batch)]
        return batches

    def _generate(self, model, rows: list[Row], logits: list, text_events: bool, emit: Callable, cancel) -> None:
        """One ``generate`` call for rows of one setting; emits each step's StreamEvents."""
        sp = rows[0].params
        dev = self.device
        L = max(len(q.prompt) for q in rows)
        input_ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)  # (B, L) left-padded
        attention_mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, q in enumerate(rows):
            input_ids[i, L - len(q.prompt) :] = torch.tensor(q.prompt)
            attention_mask[i, L - len(q.prompt) :] = 1
        # every setting spelled out: one left None is filled from the checkpoint's generation_config.
        # generate always takes the argmax: sampling rows get a one-hot score from RowSampler
        config = GenerationConfig(
            max_new_tokens=sp.max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            guidance_scale=1.0,
            num_beams=1,
            num_return_sequences=1,
            renormalize_logits=False,
            remove_invalid_values=False,
            use_cache=True,
            eos_token_id=[],  # stops are the Rows criterion's: no EOS check of generate's own
            pad_token_id=self.pad_id,
            output_logits=False,
            return_dict_in_generate=False,
        )
        watch = Rows(self, rows, logits, text_events, emit, cancel)
        model.generate(
            input_ids=input_ids.to(dev),
            attention_mask=attention_mask.to(dev),
            generation_config=config,
            logits_processor=LogitsProcessorList([] if sp.greedy else [RowSampler(rows, L)]),
            stopping_criteria=StoppingCriteriaList([watch]),
        )

    def _autocast(self):
        """bf16 autocast for an fp32 model when precision resolves to bf16 (as the engine)."""
        if self.precision == "bf16" and next(self.model.parameters()).dtype != torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def _settings(sp: SamplingParams) -> tuple:
    """What a ``generate`` call needs to be the same for all its rows (stop tokens, stop strings and
    log-prob counts are checked per row)."""
    return (sp.max_new_tokens, sp.greedy, sp.temperature, sp.top_k, sp.top_p)


class RowSampler(LogitsProcessor):
    """Samples each row's next token with ``sampling.sample_next`` from the row's own stream and
    returns scores that are 0 at that token and -inf elsewhere, so ``generate``'s argmax takes it.

    rows: the batch's samples (one setting); prompt_len: the left-padded prompt length, so the
    step (index of the token being made) is ``input_ids.shape[1] - prompt_len``. The scores
    ``generate`` passes in are the step's raw logits in fp32 (no processors of its own run)."""

    def __init__(self, rows: list[Row], prompt_len: int):
        self.keys = [q.key for q in rows]
        self.prompt_len = prompt_len
        sp = rows[0].params
        self.settings = (sp.temperature, sp.top_k, sp.top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, dev = scores.shape[0], scores.device
        step = input_ids.shape[1] - self.prompt_len
        u = row_uniforms(self.keys, [step] * B, dev)  # (B,)
        T, k, p = self.settings
        full = torch.full((B,), 1.0, device=dev)
        tokens, _ = sample_next(scores, full * T, torch.full((B,), k, device=dev), full * p, uniforms=u)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)  # (B, V) one-hot


class Rows(StoppingCriteria):
    """Called by ``generate`` after each step: records the step's token and log-prob of every live
    row, checks its stops (``check_stop``, as the engine), emits the step's StreamEvents, and returns which
    rows are done. ``logits`` holds the step's raw logits (B, V) fp32 (the forward hook's)."""

    def __init__(self, gen: HFGenerator, rows: list[Row], logits: list, text_events: bool, emit, cancel):
        self.gen, self.rows, self.logits = gen, rows, logits
        self.text_events, self.emit, self.cancel = text_events, emit, cancel
        sp = rows[0].params
        self.temperature = 1.0 if sp.greedy else sp.temperature
        self.k = max(q.params.logprobs for q in rows)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tokens = input_ids[:, -1]  # (B,)
        logp = torch.log_softmax(self.logits[0] / self.temperature, dim=-1)  # (B, V)
        picked = logp.gather(-1, tokens[:, None])[:, 0].tolist()
        if self.k:
            top_lps, top_ids = (x.tolist() for x in torch.topk(logp, min(self.k, logp.shape[-1]), dim=-1))
        events = []
        for b, (q, t, lp) in enumerate(zip(self.rows, tokens.tolist(), picked)):
            if q.done is not None:
                continue
            q.tokens.append(t)
            q.logprobs.append(lp)
            if q.top is not None:
                q.top.append(list(zip(top_ids[b], top_lps[b]))[: q.params.logprobs])
            ev = check_stop(q, t, self.gen.tokenizer, self.text_events)
            if ev is not None:
                events.append(ev)
        if events:
            self.emit(events)
        stop = self.cancel is not None and self.cancel.is_set()
        return torch.tensor([stop or q.done is not None for q in self.rows], device=input_ids.device)
