"""What every training recipe needs besides its own loop: the accelerator, the batch plan,
optimizer and schedule, metrics log, LoRA, and atomic checkpoints that resume exactly.

These are plain functions that the recipes call; there is no trainer base class.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.accel.memory import reuse_freed_memory
from rlhfkit.accel.optim import allocate_adamw_state, own_memory
from rlhfkit.config import TrainConfig, save_config
from rlhfkit.data.jsonl import append_jsonl, read_jsonl, write_jsonl
from rlhfkit.errors import UserError
from rlhfkit.models.loading import resolve_precision
from rlhfkit.recipes.engines import _check_engine, _env_flag, engine, full_state_dict, sharded

# ---------------------------------------------------------------- accelerator


def make_accelerator(cfg: TrainConfig):
    """One process by default; ``torchrun --nproc_per_node N -m rlhfkit.cli …`` (or an accelerate
    config with N processes) gives N, DDP over gloo on CPU or NCCL on GPUs.

    DDP is told not to broadcast buffers: by default it broadcasts them at every forward after a
    synchronised one, a collective that each rank must reach the same number of times. Our
    micro-batches split into forwards of similar lengths (``length_groups``), so ranks run
    different numbers of forwards per step and hung, one in its backward's all-reduce, the other
    in that broadcast. The buffers are RoPE frequencies, computed alike on every rank.

    The experiment trackers of ``cfg.report_to`` become accelerate's ``log_with``; each stage
    calls this first, so a tracker that is not installed stops the run before any model loads."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    trackers = report_to_trackers(cfg.report_to)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.precision, device)
    if device == "cpu":
        reuse_freed_memory()
    # accelerate keeps one global state per process; the pipeline (and a test session) runs
    # several stages in one process, each with its own precision: start each from a clean
    # state (the process group itself, in PartialState, is kept).
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # TensorBoard writes to logging_dir/<project name>: out/tensorboard/rlhfkit
    where = ProjectConfiguration(project_dir=cfg.out, logging_dir=str(Path(cfg.out) / "tensorboard"))
    acc = Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        cpu=device == "cpu",
        log_with=trackers or None,
        project_config=where,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    _check_engine(acc, cfg)
    set_seed(cfg.seed)
    return acc


TRACKERS = ("tensorboard", "wandb", "mlflow")


def report_to_trackers(report_to: str) -> list[str]:
    """The trackers that ``report_to`` names: ``none``, ``all`` (those of TRACKERS that are
    installed, as in accelerate and transformers) or a comma list of TRACKERS. A named tracker
    whose package is missing is a UserError that gives the pip command."""
    names = [n.strip().lower() for n in report_to.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        found = [t for t in TRACKERS if _missing_package(t) is None]
        if not found:
            raise UserError("report_to=all: none of tensorboard, wandb, mlflow is installed (pip install tensorboard)")
        return found
    for n in names:
        if n not in TRACKERS:
            raise UserError(f"report_to={report_to}: expected none, all, or a comma list of {', '.join(TRACKERS)}")
        if (package := _missing_package(n)) is not None:
            raise UserError(f"report_to={n} needs the {package} package: pip install {package}")
    return list(dict.fromkeys(names))


def _missing_package(tracker: str) -> str | None:
    needs = [tracker]
    if tracker == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        needs.append("alembic")  # our local default is MLflow's SQLite store, whose schema alembic creates
    return next((p for p in needs if importlib.util.find_spec(p) is None), None)


def world(acc) -> tuple[int, int]:
    return acc.process_index, acc.num_processes


# ---------------------------------------------------------------- batches


def batch_plan(n_examples: int, cfg: TrainConfig) -> list[list[int]]:
    """The whole run's global batches (example indices), fixed by the seed.

    Epoch e is a permutation drawn from ``seed + e``; fractional epochs stop early. The plan is
    a pure function of (n, cfg), so a resumed run skips exactly the batches it already did.
    """
    if n_examples == 0:
        raise UserError("no training examples")
    bs = min(cfg.batch_size, n_examples)
    per_epoch = n_examples // bs
    if cfg.max_steps > 0:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil(per_epoch * cfg.epochs))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        perm = torch.randperm(n_examples, generator=g).tolist()
        for i in range(per_epoch):
            plan.append(perm[i * bs : (i + 1) * bs])
            if len(plan) == total:
                break
        epoch += 1
    return plan


def shard(batch: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: a contiguous slice split ``grad_accum`` ways."""
    per = math.ceil(len(batch) / world_size)
    mine = batch[rank * per : (rank + 1) * per]
    k = math.ceil(len(mine) / grad_accum) if mine else 1
    return [mine[i : i + k] for i in range(0, len(mine), k)]


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/held-out split of ``n`` records."""
    n_eval = int(round(n * fraction)) if n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345)).tolist()
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


# ---------------------------------------------------------------- optimizer


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int, lr_of: dict | None = None):
    """AdamW over the trainable parameters of ``model`` and its learning-rate schedule.

    ``lr_of`` maps parameters to their own peak learning rate (a group of their own); the
    schedule scales every group alike."""
    lr_of = lr_of or {}
    params = [p for p in model.parameters() if p.requires_grad and p not in lr_of]
    groups = [{"params": params, "lr": cfg.lr}] + [
        {"params": [p], "lr": lr} for p, lr in lr_of.items() if p.requires_grad
    ]
    # not on GPUs: accelerate moves the model there next (make_accelerator); not when FSDP or DeepSpeed
    # shards it next (the moments allocated here would belong to the parameters they replace)
    shards_next = _env_flag("ACCELERATE_USE_FSDP") or _env_flag("ACCELERATE_USE_DEEPSPEED")
    on_cpu = not torch.cuda.is_available() and not shards_next
    if on_cpu:
        own_memory([p for g in groups for p in g["params"]])
    # fused AdamW: one kernel per tensor, ~3x faster on CPU than the default foreach path; CUDA has it too
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), eps=1e-8, fused=True)
    if on_cpu:
        allocate_adamw_state(opt)

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "linear":
            return 1.0 - progress
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise AssertionError(cfg.schedule)  # TrainConfig's Literal admits no other

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def apply_lora(model: torch.nn.Module, cfg: TrainConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters when ``cfg.lora``; otherwise return it unchanged."""
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    if list(cfg.lora_targets) == ["all-linear"]:
        targets = "all-linear"  # peft: every linear layer except the output layer (and a SEQ_CLS head)
    else:
        present = {name.split(".")[-1] for name, _ in model.named_modules()}
        targets = [t for t in cfg.lora_targets if t in present]
        if not targets:
            raise UserError(f"lora_targets={cfg.lora_targets}: none of these modules exist in the model")
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type=task_type,
    )
    return get_peft_model(model, lcfg)


# ---------------------------------------------------------------- metrics


class MetricsLog:
    """Appends one JSON object per line to ``out/metrics.jsonl``, the run's record whatever
    ``report_to`` says, and sends the same numbers under the same names and steps to the
    trackers that ``make_accelerator`` set up (``acc.log``). Only the main process writes.

    Trackers keep their files under ``out``: ``tensorboard/``, ``wandb/`` and MLflow's
    ``mlflow.db`` (unless MLFLOW_TRACKING_URI points elsewhere); project "rlhfkit", the run named
    after ``out``, the config as hyperparameters. ``close()`` ends the trackers' runs.
    """

    def __init__(self, out: Path, acc, cfg: TrainConfig, resume_step: int | None = None):
        self.path = out / "metrics.jsonl"
        self.acc = acc
        self.enabled = acc.is_main_process
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():  # drop lines past the checkpoint
            write_jsonl(self.path, [row for row in read_jsonl(self.path) if row.get("step", 0) <= resume_step])
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if acc.log_with:
            self._start_trackers(out.resolve(), cfg, resume_step)

    def _start_trackers(self, out: Path, cfg: TrainConfig, resume_step: int | None) -> None:
        name = "/".join(out.parts[-2:])  # e.g. "demo/sft"
        kwargs: dict[str, dict] = {"wandb": {"name": name, "dir": str(out)}, "mlflow": {"run_name": name}}
        if resume_step is not None:
            # TensorBoard hides what the killed run logged after the checkpoint, as metrics.jsonl drops it
            kwargs["tensorboard"] = {"purge_step": resume_step + 1}
        if "mlflow" in [str(t) for t in self.acc.log_with] and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # MLflow 3 refuses its file store ('./mlruns', "maintenance mode"); SQLite is its default now
            mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
            kwargs["mlflow"]["logging_dir"] = str(out / "mlartifacts")  # artifacts: beside it, not in the cwd
        self.acc.init_trackers("rlhfkit", config=hyperparameters(cfg), init_kwargs=kwargs)

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        append_jsonl(self.path, row)
        if self.acc.trackers:
            self.acc.log(
                {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))}, step=step
            )

    def close(self) -> None:
        """End the trackers' runs (files flushed, the W&B and MLflow runs finished). Not
        ``acc.end_training()``: it also destroys the process group, which the pipeline's next
        stage in this process still uses."""
        for tracker in self.acc.trackers:
            tracker.finish()
        self.acc.trackers.clear()


def hyperparameters(cfg: TrainConfig) -> dict[str, bool | int | float | str]:
    """``cfg`` as the flat hyperparameters trackers accept (TensorBoard's hparams take only
    bool/int/float/str): a dict becomes ``fields.prompt``-style keys, a list or None its JSON text."""
    flat: dict[str, bool | int | float | str] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                put(f"{key}.{k}", v)
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = json.dumps(value, default=str)

    for key, value in dataclasses.asdict(cfg).items():
        put(key, value)
    return flat


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, extra: dict | None = None, keep: int = 1, gathered=None
) -> Path:
    """Write ``out/checkpoints/step-N`` atomically: ``model/`` (a Hugging Face directory) and
    ``state.pt`` (optimizer, schedule, RNG, step). A crash mid-write leaves the previous
    checkpoint as the latest; only the newest ``keep`` are kept.

    ``gathered``: (weights, optimizer state) of a sharded run, whole (``gather_checkpoint``); its
    optimizer state is keyed by parameter names (``get_optimizer_state_dict``), not numbers."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights, optimizer_state = gathered or (None, optimizer.state_dict())
    model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=weights)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer_state,
            "sharded": gathered is not None,
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "extra": extra or {},
        },
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_dir(model, tok, path: Path, state_dict: dict | None = None) -> None:
    """Save ``model`` (and ``tok``) as a Hugging Face directory atomically: written beside ``path``
    and renamed into place, so a ``path/config.json`` always belongs to a complete model — the
    pipeline takes it to mean "this stage has finished"."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)  # state_dict: gathered from shards
    if tok is not None:
        tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def periodic_checkpoint(
    acc, cfg: TrainConfig, out: Path, done: int, total: int, model, optimizer, scheduler, prepared=None, prefix=""
) -> None:
    """Every ``cfg.save_every`` optimizer steps (not the last: the end of the run saves), the main
    process writes a checkpoint while the others wait (``write_checkpoint``)."""
    if cfg.save_every and done % cfg.save_every == 0 and done != total:
        write_checkpoint(acc, out, done, model, optimizer, scheduler, prepared, prefix)


def write_checkpoint(acc, out: Path, step: int, model, optimizer, scheduler, prepared=None, prefix: str = "") -> None:
    """``save_checkpoint`` of ``model`` (unwrapped) by the main process; every process calls it.
    Sharded (FSDP): the whole weights of ``prepared`` under ``prefix`` and the whole optimizer state
    are gathered first, so that the checkpoint's ``model/`` is a Hugging Face directory as always."""
    gathered = gather_checkpoint(acc, prepared, optimizer, prefix) if sharded(acc) else None
    if acc.is_main_process:
        save_checkpoint(out, step, model, optimizer, scheduler, gathered=gathered)
    acc.wait_for_everyone()


def gather_checkpoint(acc, prepared, optimizer, prefix: str = "") -> tuple[dict, dict] | None:
    """Whole weights and optimizer state of a sharded run on the main process (None elsewhere); a
    collective. The optimizer state is torch's ``get_optimizer_state_dict`` (keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if engine(acc) != "fsdp":
        raise UserError(f"checkpoints (save_every, resume) under {engine(acc)} are not supported: use FSDP2 or DDP")
    weights = full_state_dict(acc, prepared, prefix)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_state = get_optimizer_state_dict(prepared, getattr(optimizer, "optimizer", optimizer), options=options)
    return (weights, optimizer_state) if acc.is_main_process else None


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.pt").exists())
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, acc=None, prepared=None) -> tuple[int, dict]:
    """Restore weights, optimizer, schedule and RNG; returns (step, extra).

    Sharded (``acc`` under FSDP; ``prepared`` the model the optimizer trains, ``model`` the part of it
    that the checkpoint's ``model/`` holds): every process reads the whole state and keeps its shard."""
    state = torch.load(ckpt / "state.pt", weights_only=False)
    on_shards = acc is not None and sharded(acc)
    if state.get("sharded", False) != on_shards:
        written, now = ("FSDP", "without it") if state.get("sharded") else ("without FSDP", "under FSDP")
        raise UserError(f"{ckpt} was written {written}: resume it the same way, not {now}")
    load_weights(model, ckpt / "model", on_shards=on_shards)
    if on_shards:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)
        set_optimizer_state_dict(prepared, inner, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["extra"]


def load_weights(model: torch.nn.Module, path: Path, on_shards: bool = False) -> None:
    """The ``*.safetensors`` weights that ``save_pretrained`` wrote to ``path`` (a full model or peft
    adapters) into ``model``; a UserError when they do not fit it (a tied LM head may be absent)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f))
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    if on_shards:  # FSDP: each process keeps its shard of the whole tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        missing, unexpected = set_model_state_dict(model, weights, options=options)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise UserError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def prepare_out(cfg: TrainConfig, acc) -> tuple[Path, Path | None]:
    """Create the output directory; refuse to overwrite a run unless resuming."""
    out = Path(cfg.out)
    ckpt = None
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"resume: no checkpoint in {out}/checkpoints to resume from")
    elif latest_checkpoint(out) is not None or (out / "model" / "config.json").exists():
        raise UserError(f"{out} already holds a run: pass resume=true to continue it, or choose another out")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.wait_for_everyone()
    return out, ckpt


def progress(total: int, initial: int, enabled: bool, desc: str) -> Iterator:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


class TimeBudget:
    """``cfg.max_seconds`` of wall-clock for a stage, counted from when it is made (the stage's start,
    loading included): ``spent(done, total)`` after each step says whether to stop there. Why:
    optimisers compared on one budget (benchmarks/optimizers.py) each get the same seconds, not the
    same steps.

    The step during which the budget ran out is finished, never cut; the stage then saves its model as
    usual. With several processes the main one's clock decides for all (one collective per step), so
    they stop at the same step. ``result()`` is what the stage adds to its result dict."""

    def __init__(self, cfg: TrainConfig, acc=None, say=print) -> None:
        self.seconds, self.acc, self.say = cfg.max_seconds, acc, say
        self.t0 = time.perf_counter()
        self.stopped_at: int | None = None
        self.total = 0

    def spent(self, done: int, total: int) -> bool:
        """True (and one line said) when the budget ran out by the end of step ``done`` of ``total``."""
        self.total = total
        if not self.seconds or done >= total:
            return False
        over = time.perf_counter() - self.t0 >= self.seconds
        if self.acc is not None and self.acc.num_processes > 1:
            from accelerate.utils import broadcast

            over = bool(broadcast(torch.tensor([float(over)], device=self.acc.device)).item())
        if over:
            self.stopped_at = done
            self.say(f"stopped at the time budget after {done} of {total} steps (max_seconds={self.seconds:g})")
        return over

    def steps(self, total: int) -> int:
        """The steps the stage did of its ``total``: where the budget stopped it, else all of them."""
        return self.stopped_at or total

    def result(self) -> dict:
        """What the budget did, for the stage's result: {} when it did not stop it, else ``step`` (the
        steps done), ``stopped_at_time_budget`` and ``planned_steps``."""
        if self.stopped_at is None:
            return {}
        return {"step": self.stopped_at, "stopped_at_time_budget": True, "planned_steps": self.total}


# ---------------------------------------------------------------- data


def load_split(cfg: TrainConfig, kind: str, say=print) -> tuple[list, list]:
    """Training and held-out records: ``eval_data`` when given, else a seeded ``eval_fraction``."""
    from rlhfkit.data.loaders import load_records

    if not cfg.data:
        raise UserError("data=…: no training data given (a file, a datasets directory or a hub name)")
    got = load_records(cfg.data, kind, fields=cfg.fields or None, split=cfg.split, skip_invalid=cfg.skip_invalid)
    say(got.summary())
    records = got.records
    if cfg.eval_data:
        held = load_records(
            cfg.eval_data, kind, fields=cfg.fields or None, split=cfg.eval_split, skip_invalid=cfg.skip_invalid
        )
        say(held.summary())
        train, held_out = records, held.records
    else:
        tr, ev = split_eval(len(records), cfg.eval_fraction, cfg.seed)
        train, held_out = [records[i] for i in tr], [records[i] for i in ev]
    if cfg.limit:
        train = train[: cfg.limit]
    return train, held_out
