"""Policy objectives: one class per algorithm, chosen in YAML by ``class_path`` (see ``objective.py``)."""

from repo_lightning.objectives.objective import Objective
from repo_lightning.objectives.ppo import PPO
from repo_lightning.objectives.ppo_lag import PPOLagrangian
from repo_lightning.objectives.repo import RePO

__all__ = ["PPO", "Objective", "PPOLagrangian", "RePO"]
