"""The LightningModules, one per pipeline stage."""

from repo_lightning.modules.cost import CostModule
from repo_lightning.modules.policy import PolicyModule
from repo_lightning.modules.reward import RewardModule
from repo_lightning.modules.sft import SFTModule

__all__ = ["CostModule", "PolicyModule", "RewardModule", "SFTModule"]
