"""The CPU speed techniques of training, in one place (docs/performance.md says why and how much).

  technique                   module          applies to
  training attention          attention.py    every model a stage trains or compares on a CPU, where it
                                              gives the model's own logits (checked once per model)
  compiled blocks             compile.py      bf16 training of all weights on a CPU with a C++ compiler
                                              (compile=auto; compile=on forces it); a failed compile
                                              is reported once and falls back to eager
  SwiGLU backward             swiglu.py       LLaMA-style MLPs (LLaMA, Mistral, Qwen) in compiled
                                              bf16 blocks
  bf16 matmul weights         weights.py      frozen models under bf16 (PPO's reference)
  fused gradient clipping     optim.py        every optimizer step (``clip_and_step``)
  owned params, AdamW state   optim.py        ``make_optimizer`` on a CPU
  malloc settings             memory.py       every stage on a CPU (``make_accelerator``); PPO and the
                                              pipeline hand memory back with ``release_memory``

``prepare_for_training`` (models a stage trains) and ``prepare_for_inference`` (frozen models
compared with them) apply the per-model techniques in one call and log one line of what they
applied, and of what a model's family cannot take, why; on a GPU nothing, unless compile=on asks
for compiled blocks. The rollout engine's own kernels (C++ decode attention, prepacked bf16
weights) live with it in ``rlhfkit/rollout/`` and apply at every ``generate``.
"""

from rlhfkit.accel.prepare import Applied, prepare_for_inference, prepare_for_training

__all__ = ["Applied", "prepare_for_inference", "prepare_for_training"]
