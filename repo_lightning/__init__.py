"""repo_lightning: safe RLHF with Rectified Policy Optimization (RePO) on PyTorch Lightning."""

__version__ = "0.1.0"
