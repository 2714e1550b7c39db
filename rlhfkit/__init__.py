"""rlhfkit: Reinforcement Learning from Human Feedback, end to end.

SFT -> reward model from K-way rankings -> PPO -> new rankings on the newest policy (iterated
online RLHF), with evaluation and a web app for the humans. See README.md and the package layout:

  models/   loading (HF dir, hub id, GGUF, the embedded default), reward head
  data/     record types and loaders
  algos/    pure math: losses, GAE, KL, Elo ...
  rollout/  the generation engine
  recipes/  one readable top-to-bottom loop per stage
"""

__version__ = "0.1.0"
