"""The end of an iteration and of a run for PPO, A2C, RLOO and GRPO (``recipes/ppo.py``'s step 8):
the KL controller's update and the metrics line (``log_and_checkpoint``), resumable checkpoints
(``checkpoint``: the whole weights and optimizer state, gathered first under FSDP2), and the final
save (``save_final``: the policy as a Hugging Face directory, the critic beside it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rlhfkit.accel.memory import release_memory, rss_mb
from rlhfkit.algos.ppo import explained_variance, kl_k3, masked_mean
from rlhfkit.config import PPOConfig
from rlhfkit.models.lora import unwrap
from rlhfkit.recipes.common import MetricsLog, gather_checkpoint, save_checkpoint, save_model_dir
from rlhfkit.recipes.engines import engine, full_state_dict, sharded
from rlhfkit.recipes.ppo_models import Models, _Checkpoint
from rlhfkit.recipes.ppo_processes import Rollout, gather_into

if TYPE_CHECKING:
    from rlhfkit.recipes.ppo import Advantages, Optimization

RSS_SLACK = 1.25  # hand freed memory back to the OS when the resident size grew by this factor


def log_and_checkpoint(
    cfg: PPOConfig,
    done: int,
    total: int,
    m: Models,
    ro: Rollout,
    adv: Advantages,
    opt: Optimization,
    stats: dict[str, float],
    times: dict[str, float],
    log: MetricsLog,
    out: Path,
    acc=None,
) -> dict:
    """Update the KL controller, write the iteration's metrics line, hand memory back to the OS
    when the resident size grew, and checkpoint every ``save_every`` iterations. Returns the metrics."""
    mask, fw = ro.batch.response_mask, ro.fw
    kl_mean = float(adv.kl.sum(1).mean())
    opt.kl_ctl.update(kl_mean, len(ro.texts))
    last = {
        "score": float(ro.penalised.mean()), "score_raw": float(ro.raw.mean()),
        "kl": kl_mean, "kl_k3": float((kl_k3(fw["logprobs"], fw["ref_logprobs"]) * mask).sum(1).mean()),
        "entropy": float(masked_mean(fw["entropy"], mask)),
        "non_score_reward": float((-adv.beta * adv.kl).sum(1).mean()), "reward": float(adv.rewards.sum(1).mean()),
        "beta": adv.beta,
        "response_length": float(mask.sum(1).float().mean()), "no_eos_fraction": float((~ro.ended).float().mean()),
        "lr": opt.scheduler.get_last_lr()[0],
        **times, "time_iteration": sum(times.values()),
    }  # fmt: skip
    # Freed memory is kept for the next iteration's tensors (reuse_freed_memory): handing it back
    # every iteration made each one page-fault its GBs afresh. It is handed back only if the
    # resident size grew by a quarter over the first iteration's, so fragmentation cannot make it creep.
    if "values" in fw:  # not without a critic (RLOO, GRPO)
        last["explained_variance"] = float(explained_variance(fw["values"], adv.returns, mask))
        last["value_mean"] = float(masked_mean(fw["values"], mask))
        last["return_mean"] = float(masked_mean(adv.returns, mask))
    last["rss_mb"], last["peak_rss_mb"] = rss_mb()
    opt.rss_base = opt.rss_base or last["rss_mb"]
    if last["rss_mb"] > RSS_SLACK * opt.rss_base:
        release_memory()
        last["rss_mb"] = rss_mb()[0]
    last |= stats
    if done % cfg.log_every == 0 or done == total:
        log.log(done, **last)
    if cfg.save_every and done % cfg.save_every == 0 and done != total:
        checkpoint(out, done, m, opt, acc)
    if acc is not None:
        acc.wait_for_everyone()
    return last


def checkpoint(out: Path, step: int, m: Models, opt: Optimization, acc=None) -> None:
    """``save_checkpoint`` of policy, critic, optimizer, schedule and KL controller by the main
    process. Every process calls it: under FSDP2 the whole weights and optimizer state are gathered
    first (``gather_checkpoint``, keyed by name; resume re-shards them)."""
    gathered = gather_checkpoint(acc, opt.modules, opt.optimizer) if acc is not None and sharded(acc) else None
    if acc is None or acc.is_main_process:
        extra = {"kl_ctl": opt.kl_ctl.state_dict()}
        model = _Checkpoint(m.policy, m.critic)
        save_checkpoint(out, step, model, opt.optimizer, opt.scheduler, extra=extra, gathered=gathered)


def save_final(
    cfg: PPOConfig, m: Models, opt: Optimization, total: int, out: Path, last: dict, say=print, acc=None
) -> None:
    """A resumable checkpoint (with save_every), then the critic and, last, the policy with LoRA
    merged as a plain Hugging Face directory (``out/model`` marks a finished run). Every process
    calls it, the main one writes; under FSDP2 the others help gather the whole weights first."""
    if cfg.save_every:
        checkpoint(out, total, m, opt, acc)
    critic_weights = None
    if acc is not None and m.critic.kind != "none":  # FSDP2, DeepSpeed: gathered; else None (its own)
        part = "seq_model" if m.critic.kind == "rm" else "head"
        if engine(acc) == "deepspeed":  # the engine holds policy and critic
            critic_weights = full_state_dict(acc, opt.modules, f"critic.{part}.")
        else:
            critic_weights = full_state_dict(acc, getattr(m.critic, part))
    if m.whole is not None:
        gather_into(m.policy, m.whole)  # FSDP2, DeepSpeed: the whole policy, saved from its copy
    if acc is not None and not acc.is_main_process:
        return
    m.critic.save(out / "critic", merge=True, state_dict=critic_weights)  # critic 'none': nothing
    if m.critic.kind == "rm":
        m.tok.save_pretrained(out / "critic")
    save_model_dir(unwrap(m.policy if m.whole is None else m.whole, merge=True), m.tok, out / "model")
    saved = f"{out / 'model'}" + (f" and {out / 'critic'}" if m.critic.kind != "none" else "")
    say(f"saved {saved}; last score {last.get('score', float('nan')):.4f}, KL {last.get('kl', float('nan')):.4f}")
