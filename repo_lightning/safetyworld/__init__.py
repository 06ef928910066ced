"""SafetyWorld: the built-in task with ground-truth helpfulness and harm oracles (docs/safetyworld.md)."""

from repo_lightning.safetyworld.config import WorldConfig
from repo_lightning.safetyworld.generate import BEHAVIOURS, CONVERSATION_TEMPLATE, REFUSAL, Topic
from repo_lightning.safetyworld.world import World

__all__ = ["BEHAVIOURS", "CONVERSATION_TEMPLATE", "REFUSAL", "Topic", "World", "WorldConfig"]
