"""Run the eval suites on one or more model versions and a baseline -> one results dict.

    results = run_eval(EvalConfig(models=["v1=runs/ppo/final"], baseline="smollm2-135m-instruct",
                                  suites=["truthful", "harmless", "helpful", "tax"]))

Data: each data set comes from its own option (``truthfulqa_mc``, ``crows_pairs``, ...), else
from ``data_dir`` laid out as DEFAULT_FILES, else from its public Hugging Face hub dataset
(HUB_DEFAULTS, needs a network once; ``datasets`` caches it). All of it is loaded before any
model, so a missing file or an unreachable hub fails in seconds with one message naming the
option to pass.

Models are evaluated one at a time (loaded, scored, freed). Per-model suites: ``truthful``
(TruthfulQA MC1/MC2, optional generation), ``harmless`` (RealToxicityPrompts toxic and
non-toxic subsets, CrowS-Pairs), ``tax`` (perplexity). ``helpful`` compares each model's
answers with the baseline's under the judge; ``tax`` also reports ppl_M / ppl_B - 1.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhfkit.config import BACKEND_HELP, Backend, Precision, check_literals, opt
from rlhfkit.errors import UserError
from rlhfkit.evals.data import HubDataset, HubUnavailable
from rlhfkit.evals.toxicity import challenging_prompts, nontoxic_prompts

SUITES = ("helpful", "truthful", "harmless", "tax")

# where each data set sits inside --data-dir: the file names of the data sets' own releases
DEFAULT_FILES = {
    "truthfulqa_mc": "truthfulqa/mc_task.json",
    "truthfulqa_gen": "truthfulqa/TruthfulQA.csv",
    "crows_pairs": "crows-pairs/crows_pairs_anonymized.csv",
    "rtp_toxic": "realtoxicityprompts/toxic.jsonl",
    "rtp_nontoxic": "realtoxicityprompts/nontoxic.jsonl",
    "help_prompts": "self-instruct-seed/seed_tasks.jsonl",
    "tax_text": "tinyshakespeare/input.txt",
}

# where each data set comes from when neither its option nor --data-dir gives it
HUB_DEFAULTS = {
    "truthfulqa_mc": HubDataset("truthfulqa/truthful_qa", "multiple_choice", "validation"),
    "truthfulqa_gen": HubDataset("truthfulqa/truthful_qa", "generation", "validation"),
    "crows_pairs": HubDataset("nyu-mll/crows_pairs", None, "test"),
    "rtp_toxic": HubDataset("allenai/real-toxicity-prompts", None, "train", challenging_prompts),
    "rtp_nontoxic": HubDataset("allenai/real-toxicity-prompts", None, "train", nontoxic_prompts),
    "help_prompts": HubDataset("HuggingFaceH4/self-instruct-seed", None, "train"),
    "tax_text": HubDataset("karpathy/tiny_shakespeare", None, "test"),
}


@dataclass
class EvalConfig:
    """Evaluate model versions: helpful (win-rate), truthful (TruthfulQA), harmless (RTP, CrowS-Pairs),
    tax (perplexity). Data sets load from their Hugging Face hub datasets (once, then cached), or from
    local copies (--data-dir, or one option per data set)."""

    models: list = opt(
        [],
        "Models to evaluate, each SPEC or NAME=SPEC (a HF dir, .gguf, hub id, "
        "'smollm2-135m-instruct', 'tiny-random'); repeatable or comma-separated.",
        flag="--model",
    )
    baseline: str | None = opt(None, "Baseline model (SPEC or NAME=SPEC) for win-rates and the alignment tax.")
    suites: list = opt(
        list(SUITES), f"Suites to run, repeatable or comma-separated: {', '.join(SUITES)}.", flag="--suite"
    )
    out: str = opt("runs/eval", "Output directory (eval.json + eval.html) or a .json/.html path.")
    data_dir: str | None = opt(
        None,
        "Local copies of the data sets (default: the hub datasets), laid out as "
        + ", ".join(DEFAULT_FILES.values())
        + "; the per-data options override it.",
    )
    truthfulqa_mc: str | None = opt(
        None,
        "TruthfulQA MC data: mc_task.json, a datasets dir or a hub name "
        "owner/name[:config] (default: truthfulqa/truthful_qa:multiple_choice).",
    )
    truthfulqa_gen: str | None = opt(
        None,
        "TruthfulQA generation data: TruthfulQA.csv, a datasets dir or a hub "
        "name (default: truthfulqa/truthful_qa:generation).",
    )
    mc_limit: int | None = opt(None, "TruthfulQA MC questions (default: all).")
    truthful_gen: bool = opt(True, "Also score TruthfulQA generation (greedy; ROUGE-L/BLEU), capped by gen_limit.")
    gen_limit: int | None = opt(100, "Questions for TruthfulQA generation (null = all).")
    crows_pairs: str | None = opt(
        None, "CrowS-Pairs: crows_pairs_anonymized.csv, a datasets dir or a hub name (default: nyu-mll/crows_pairs)."
    )
    crows_limit: int | None = opt(None, "CrowS-Pairs pairs (default: all).")
    rtp_toxic: str | None = opt(
        None,
        "RealToxicityPrompts challenging prompts, jsonl or datasets dir (default: "
        "allenai/real-toxicity-prompts where challenging is true).",
    )
    rtp_nontoxic: str | None = opt(
        None,
        "RealToxicityPrompts non-toxic prompts, jsonl or datasets dir (default: "
        "allenai/real-toxicity-prompts with prompt toxicity < 0.5).",
    )
    rtp_prompts: int | None = opt(50, "Prompts per RealToxicityPrompts subset (null = all).")
    rtp_k: int = opt(4, "Sampled continuations per RTP prompt (the paper: 25).")
    rtp_max_new_tokens: int = opt(20, "Tokens per RTP continuation (the paper: 20).")
    rtp_temperature: float = opt(1.0, "Sampling temperature of RTP continuations.")
    rtp_top_p: float = opt(0.9, "Nucleus sampling p of RTP continuations.")
    toxicity_model: str | None = opt(
        None, "A Hugging Face text-classification model for toxicity (default: the better-profanity lexicon)."
    )
    toxicity_label: str = opt("toxic", "The toxicity model's label that means toxic.")
    help_prompts: str | None = opt(
        None,
        "Helpfulness prompts for judge=reference / an RM: self-instruct "
        "seed_tasks.jsonl or records with prompt/reference (default for "
        "judge=reference: HuggingFaceH4/self-instruct-seed).",
    )
    help_limit: int | None = opt(50, "Helpfulness prompts to use (null = all).")
    help_max_new_tokens: int = opt(128, "Longest helpfulness answer (tokens).")
    judge: str = opt(
        "gold",
        "'gold' (the gold rubric on the built-in task's eval prompts), 'reference' (ROUGE-L "
        "to help_prompts' reference answers) or a reward-model directory.",
    )
    tax_text: str | None = opt(
        None,
        "Held-out text for the alignment-tax perplexity: a text file, or records "
        "with `text` (default: karpathy/tiny_shakespeare, test split).",
    )
    tax_chars: int | None = opt(20_000, "Score the last N characters of the held-out text (null = all).")
    tax_window: int = opt(512, "Tokens per perplexity window.")
    best_of: int = opt(
        1,
        "Best-of-N (WebGPT; Stiennon et al. 2020): each evaluated model (not the baseline) answers the "
        "helpful prompts and TruthfulQA generation with --reward-model's best of N samples (RTP stays "
        "plain sampling). 1 = greedy as usual, or one sample when --reward-model is given.",
    )
    best_of_temperature: float = opt(1.0, "Sampling temperature of the best-of-N samples.")
    reward_model: str | None = opt(None, "Reward-model directory (saved by `rlhfkit rm`) that picks the best of N.")
    limit: int | None = opt(None, "Cap on items of every suite (quick runs); the per-suite caps still apply.")
    precision: Precision = opt("fp32", "fp32, bf16 or auto.")
    rollout_backend: Backend = opt("auto", "Generator of the generation suites: " + BACKEND_HELP + ".")
    batch_size: int = opt(16, "Batch size for scoring and generation.")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice).")
    seed: int = opt(0, "Random seed (sampling, bootstrap).")
    device: str | None = opt(None, "cpu, cuda, ... (default: cuda when available).")
    show_progress: bool = opt(True, "Show progress bars.", flag="--progress")

    def __post_init__(self) -> None:
        check_literals(self)

    def source(self, key: str) -> str | HubDataset:
        """Where data set ``key`` comes from: its option, else ``data_dir``, else the hub."""
        explicit = getattr(self, key)
        if explicit:
            return explicit
        if self.data_dir:
            p = Path(self.data_dir).expanduser() / DEFAULT_FILES[key]
            if p.exists():
                return str(p)
            raise UserError(
                f"--data-dir {self.data_dir}: {DEFAULT_FILES[key]} is missing (add it, pass "
                f"{option(key)} PATH, or leave --data-dir out to load {HUB_DEFAULTS[key]} from the hub)"
            )
        return HUB_DEFAULTS[key]


def option(key: str) -> str:
    """The ``rlhfkit eval`` option of data set ``key``: 'truthfulqa_mc' -> '--truthfulqa-mc'."""
    return "--" + key.replace("_", "-")


def _cap(n: int | None, limit: int | None) -> int | None:
    vals = [v for v in (n, limit) if v]
    return min(vals) if vals else None


def split_spec(spec: str) -> tuple[str, str]:
    """'name=spec' -> (name, spec); 'spec' -> (short name, spec)."""
    if "=" in spec and not Path(spec).exists():
        name, s = spec.split("=", 1)
        return name, s
    return Path(spec.rstrip("/")).name or spec, spec


def load_model(spec: str, cfg: EvalConfig):
    from rlhfkit.models.loading import load_causal_lm, resolve_precision

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prec = resolve_precision(cfg.precision, device)
    loaded = load_causal_lm(spec, dtype=torch.bfloat16 if prec == "bf16" else torch.float32)
    loaded.model.to(device)
    return loaded


def data_keys(cfg: EvalConfig) -> list[str]:
    """The data sets the asked suites read (help_prompts only where the judge needs them)."""
    keys = []
    if "truthful" in cfg.suites:
        keys += ["truthfulqa_mc"] + (["truthfulqa_gen"] if cfg.truthful_gen else [])
    if "harmless" in cfg.suites:
        keys += ["rtp_toxic", "rtp_nontoxic", "crows_pairs"]
    if "tax" in cfg.suites:
        keys += ["tax_text"]
    if "helpful" in cfg.suites and not _help_from_task(cfg):
        keys += ["help_prompts"]
    return keys


def _help_from_task(cfg: EvalConfig) -> bool:
    """The gold judge (and a reward-model judge without --help-prompts) uses the built-in task's prompts."""
    return cfg.judge == "gold" or (cfg.judge != "reference" and not cfg.help_prompts)


def _load_one(key: str, src, cfg: EvalConfig):
    from rlhfkit.evals.crows_pairs import load_crows_pairs
    from rlhfkit.evals.helpful import load_help_prompts
    from rlhfkit.evals.tax import load_heldout_text
    from rlhfkit.evals.toxicity import load_rtp
    from rlhfkit.evals.truthfulqa import load_truthfulqa_gen, load_truthfulqa_mc

    if key == "truthfulqa_mc":
        return load_truthfulqa_mc(src)[: _cap(cfg.mc_limit, cfg.limit)]
    if key == "truthfulqa_gen":
        return load_truthfulqa_gen(src)[: _cap(cfg.gen_limit, cfg.limit)]
    if key in ("rtp_toxic", "rtp_nontoxic"):
        return load_rtp(src, limit=_cap(cfg.rtp_prompts, cfg.limit))
    if key == "crows_pairs":
        return load_crows_pairs(src)[: _cap(cfg.crows_limit, cfg.limit)]
    if key == "tax_text":
        return load_heldout_text(src, cfg.tax_chars)
    return load_help_prompts(src)[: _cap(cfg.help_limit, cfg.limit)]


def load_eval_data(cfg: EvalConfig) -> dict:
    """Every data set of the asked suites, loaded before any model is: a missing file or an
    unreachable hub then fails in seconds with one message, not after minutes of scoring.

    Once the hub proves unreachable the remaining hub data sets are not tried (each try waits
    ~20 s of retries without a network); the message lists every option that needs a local copy.
    """
    data: dict = {"sources": {}}
    failed: list[tuple[str, HubUnavailable]] = []
    offline: HubUnavailable | None = None
    for key in data_keys(cfg):
        src = cfg.source(key)
        data["sources"][key] = str(src)
        if offline and (isinstance(src, HubDataset) or _is_hub_name(src)):
            failed.append((key, offline))
            continue
        if cfg.show_progress and isinstance(src, HubDataset):
            print(f"eval data: {key} from the Hugging Face hub, {src} (cached after the first time)", file=sys.stderr)
        try:
            data[key] = _load_one(key, src, cfg)
        except HubUnavailable as e:
            failed.append((key, e))
            offline = offline or (e if e.offline else None)
    if failed:
        raise UserError(_hub_failure_message(failed, offline))
    return data


def _is_hub_name(src) -> bool:
    from rlhfkit.evals.data import looks_like_hub_name

    return looks_like_hub_name(str(src))


def _hub_failure_message(failed: list[tuple[str, HubUnavailable]], offline: HubUnavailable | None) -> str:
    """One message: why the hub failed, and the options (or --data-dir files) to give instead."""
    keys = [k for k, _ in failed]
    why = (
        f"the Hugging Face hub cannot be reached ({offline.reason})"
        if offline
        else "; ".join(f"{e.source}: {e.reason}" for _, e in failed)
    )
    return (
        f"eval data: {why}. Pass local copies (a file or a saved `datasets` directory): "
        f"{', '.join(option(k) + ' PATH' for k in keys)}; or --data-dir DIR (the pipeline's eval_data_dir=DIR) "
        f"holding {', '.join(DEFAULT_FILES[k] for k in keys)}."
    )


def evaluate_model(spec: str, cfg: EvalConfig, data: dict, need_help_answers: list[str] | None, reward_fn=None) -> dict:
    """All per-model suites for one model on the loaded ``data``; returns its results (and its helpful
    answers). With ``reward_fn`` the helpful answers and TruthfulQA generation are best-of-N."""
    from rlhfkit.evals.crows_pairs import crows_pairs_eval
    from rlhfkit.evals.generation import best_of_n_fn, chat_prompt, generator_fn
    from rlhfkit.evals.loglik import LoglikScorer
    from rlhfkit.evals.tax import perplexity_eval
    from rlhfkit.evals.toxicity import ClassifierToxicity, LexiconToxicity, rtp_eval
    from rlhfkit.evals.truthfulqa import truthfulqa_gen_eval, truthfulqa_mc_eval

    loaded = load_model(spec, cfg)
    model, tok = loaded.model, loaded.tokenizer
    scorer = LoglikScorer(model, tok, batch_size=cfg.batch_size, show_progress=cfg.show_progress)
    # the ONE generation function every generation suite uses (a GenerateFn, generation.py)
    gen = generator_fn(
        model,
        tok,
        top_p=cfg.rtp_top_p,
        seed=cfg.seed,
        show_progress=cfg.show_progress,
        precision=cfg.precision,
        backend=cfg.rollout_backend,
    )
    res: dict = {"path": loaded.path, "timings_s": {}}
    help_chat = [chat_prompt(tok, p) for p in need_help_answers] if need_help_answers is not None else []
    # best-of-N: the helpful answers and TruthfulQA generation (RTP keeps the plain sampler)
    gen_best = gen
    if reward_fn is not None:
        gen_best = best_of_n_fn(
            gen, reward_fn, cfg.best_of, cfg.best_of_temperature, rm_prompts=dict(zip(help_chat, need_help_answers))
        )
        res["best_of"] = cfg.best_of

    def timed(name, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, its seconds recorded under ``name`` (arguments, not a closure:
        the suites below run in a loop and beside a ``del`` of the objects they use)."""
        t0 = time.time()
        out = fn(*args, **kwargs)
        res["timings_s"][name] = round(time.time() - t0, 1)
        return out

    if "truthful" in cfg.suites:
        t = {"mc": timed("truthfulqa_mc", truthfulqa_mc_eval, scorer, data["truthfulqa_mc"])}
        if cfg.truthful_gen:
            t["gen"] = timed("truthfulqa_gen", truthfulqa_gen_eval, gen_best, data["truthfulqa_gen"])
        res["truthful"] = t
    if "harmless" in cfg.suites:
        torch.manual_seed(cfg.seed)
        tox = ClassifierToxicity(cfg.toxicity_model, cfg.toxicity_label) if cfg.toxicity_model else LexiconToxicity()
        h: dict = {"toxicity_scorer": tox.name}
        for subset in ("toxic", "nontoxic"):
            h[f"rtp_{subset}"] = timed(
                f"rtp_{subset}",
                rtp_eval,
                gen,
                tox,
                data[f"rtp_{subset}"],
                k=cfg.rtp_k,
                max_new_tokens=cfg.rtp_max_new_tokens,
                temperature=cfg.rtp_temperature,
            )
        h["crows_pairs"] = timed("crows_pairs", crows_pairs_eval, scorer, data["crows_pairs"])
        res["harmless"] = h
    if "tax" in cfg.suites:
        res["tax"] = timed("perplexity", perplexity_eval, scorer, data["tax_text"], window=cfg.tax_window)
    if need_help_answers is not None:
        outs = timed("helpful_answers", gen_best, help_chat, 1, cfg.help_max_new_tokens, 0.0)
        res["_help_answers"] = [o[0].strip() for o in outs]
    del loaded, model, scorer
    gc.collect()
    return res


def help_prompt_set(cfg: EvalConfig, data: dict) -> list:
    """The prompts of the helpful suite: the built-in task's eval split for the gold judge (and
    for a reward-model judge without --help-prompts), else the loaded help_prompts."""
    from rlhfkit.evals.helpful import HelpPrompt

    if _help_from_task(cfg):
        from rlhfkit.tasks import load_task

        task = load_task("eval")[: _cap(cfg.help_limit, cfg.limit)]
        return [HelpPrompt(p.text, None, {"prompt": p}) for p in task]
    return data["help_prompts"]


def make_judge(cfg: EvalConfig, help_prompts):
    from rlhfkit.evals.helpful import GoldJudge, ReferenceJudge, RewardJudge, hf_reward_fn

    if cfg.judge == "gold":
        return GoldJudge([p.meta["prompt"] for p in help_prompts])
    if cfg.judge == "reference":
        refs = {p.text: p.reference for p in help_prompts if p.reference}
        if len(refs) < len(help_prompts):
            raise UserError("--judge reference: some prompts have no reference answer; use --judge RM_DIR")
        return ReferenceJudge(refs)
    return RewardJudge(hf_reward_fn(cfg.judge))


def gold_scores(help_prompts, answers: list[str], who: str) -> dict:
    """Mean gold-rubric total and instruction-level following rate of ``answers`` (gold judge only)."""
    from rlhfkit.feedback.rubric import instruction_following_rate, score

    scores = [score(p.meta["prompt"], a) for p, a in zip(help_prompts, answers)]
    return {
        f"gold_score_{who}": sum(s.total for s in scores) / max(len(scores), 1),
        f"instruction_following_{who}": instruction_following_rate(scores),
    }


def run_eval(cfg: EvalConfig) -> dict:
    from rlhfkit.evals.helpful import helpful_eval
    from rlhfkit.evals.tax import alignment_tax

    bad = [s for s in cfg.suites if s not in SUITES]
    if bad:
        raise UserError(f"--suite: unknown {', '.join(bad)} (choose from {', '.join(SUITES)})")
    if not cfg.models:
        raise UserError("--model: give at least one model")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if "helpful" in cfg.suites and not cfg.baseline:
        raise UserError(
            "--suite helpful needs --baseline MODEL (a win-rate is model vs baseline), or leave helpful out of --suite"
        )
    if cfg.best_of < 1:
        raise UserError(f"--best-of must be >= 1, got {cfg.best_of}")
    if cfg.best_of > 1 and not cfg.reward_model:
        raise UserError(
            f"--best-of {cfg.best_of} needs --reward-model RM_DIR (the reward model that picks the best of "
            f"{cfg.best_of} samples), or leave --best-of at 1"
        )
    if cfg.reward_model and not Path(cfg.reward_model).expanduser().is_dir():
        raise UserError(f"--reward-model {cfg.reward_model}: no such directory (a reward model saved by `rlhfkit rm`)")
    t0 = time.time()
    named = [split_spec(s) for s in cfg.models]
    versions = ([split_spec(cfg.baseline)] if cfg.baseline else []) + named
    names = [n for n, _ in versions]
    if len(set(names)) != len(names):
        raise UserError(f"two models share the name {names}: label them name=spec")
    # 1. all data (and a judge that needs no model) before the first model is loaded
    data = load_eval_data(cfg)
    help_prompts = help_prompt_set(cfg, data) if "helpful" in cfg.suites else None
    judge = make_judge(cfg, help_prompts) if help_prompts is not None and cfg.judge in ("gold", "reference") else None
    out: dict = {"config": asdict(cfg), "versions": names, "baseline": names[0] if cfg.baseline else None, "models": {}}
    out["config"]["data_sources"] = data["sources"]
    reward_fn = None
    if cfg.reward_model:
        from rlhfkit.algos.best_of_n import kl_bound
        from rlhfkit.evals.helpful import hf_reward_fn

        reward_fn = hf_reward_fn(cfg.reward_model, batch_size=cfg.batch_size)
        out["best_of"] = {
            "n": cfg.best_of,
            "kl_bound": kl_bound(cfg.best_of),
            "temperature": cfg.best_of_temperature,
            "reward_model": cfg.reward_model,
            "suites": ["helpful", "truthful_gen"],
        }
    # 2. each model in turn (best-of-N for the evaluated models, never the baseline)
    for name, spec in versions:
        torch.manual_seed(cfg.seed)
        rf = reward_fn if (name, spec) in named else None
        out["models"][name] = evaluate_model(
            spec, cfg, data, [p.text for p in help_prompts] if help_prompts else None, reward_fn=rf
        )
    # 3. comparisons with the baseline
    if help_prompts is not None:
        judge = judge or make_judge(cfg, help_prompts)
        base = out["models"][names[0]]["_help_answers"]
        out["helpful"] = {}
        for name, _ in named:
            mine = out["models"][name]["_help_answers"]
            out["helpful"][name] = helpful_eval([p.text for p in help_prompts], mine, base, judge, seed=cfg.seed)
            if cfg.judge == "gold":
                out["helpful"][name].update(gold_scores(help_prompts, mine, "model"))
                out["helpful"][name].update(gold_scores(help_prompts, base, "baseline"))
    for r in out["models"].values():
        r.pop("_help_answers", None)
    out["config"]["help_prompt_count"] = len(help_prompts) if help_prompts else 0
    if "tax" in cfg.suites and cfg.baseline:
        pb = out["models"][names[0]]["tax"]["perplexity"]
        out["alignment_tax"] = {
            n: {
                "perplexity": out["models"][n]["tax"]["perplexity"],
                "baseline_perplexity": pb,
                "tax": alignment_tax(out["models"][n]["tax"]["perplexity"], pb),
            }
            for n, _ in named
        }
    out["wall_seconds"] = round(time.time() - t0, 1)
    return out
