"""Laying a stage's models out for sharded training: FSDP2 ``fully_shard`` per transformer block.

Under ``lightning.pytorch.strategies.ModelParallelStrategy`` a module builds its models in ``configure_model`` and
then calls :func:`shard_models`, which shards every trained model (and, by default, every frozen one) block by block
over the strategy's device mesh. Under any other strategy (single device, DDP, Lightning's FSDP with its own
``auto_wrap_policy``) it does nothing, so one config runs under all of them.

Mesh: with ``tensor_parallel_size: 1`` (or ``data_parallel_size: 1``) the models are sharded over the other,
one-dimensional, axis. With both axes larger than one (the strategy's ``auto`` default on several nodes:
``data_parallel`` = nodes, ``tensor_parallel`` = GPUs per node) they are sharded within a node and replicated across
nodes (HSDP), because tensor parallelism is not implemented here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from repo_lightning.models.backbone import DType, torch_dtype


@dataclass(frozen=True)
class Sharding:
    """How ``ModelParallelStrategy`` (FSDP2) lays out a stage's models; ignored by every other strategy.

    Attributes:
        compute_dtype: FSDP2 mixed precision: parameters are all-gathered and used in this dtype while the sharded
            (master) copy keeps the model's ``dtype`` and gradients are reduced in float32. Pair ``dtype: float32``
            with ``compute_dtype: bfloat16`` for bf16 mixed precision; ``None`` computes in ``dtype``.
        reshard_after_forward: Free each block's gathered parameters after its forward pass (ZeRO-3; less memory,
            one more all-gather in backward). ``False`` keeps them until the backward pass (ZeRO-2).
        frozen: ``shard`` the frozen models (reference, reward and cost models) like the trained ones, or
            ``replicate`` a full copy on every rank (no communication in their forward passes, more memory).
        offload_frozen: Keep the shards of the frozen models in CPU memory and copy each block to the GPU only
            for its forward pass (needs ``frozen: shard``).
    """

    compute_dtype: DType | None = None
    reshard_after_forward: bool = True
    frozen: Literal["shard", "replicate"] = "shard"
    offload_frozen: bool = False

    def __post_init__(self) -> None:
        if self.offload_frozen and self.frozen != "shard":
            raise ValueError("sharding.offload_frozen needs sharding.frozen: shard (FSDP2 offloads shards)")


def as_sharding(value: Sharding | dict | None) -> Sharding:
    """A :class:`Sharding` from a module argument; ``None`` gives the defaults.

    The argument is a dict when the hyperparameters come from a config: LightningCLI records the config as given,
    and ``load_from_checkpoint`` passes that back.
    """
    if value is None:
        return Sharding()
    return Sharding(**value) if isinstance(value, dict) else value


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes), in order.

    Falls back to the members of the model's largest ``nn.ModuleList`` for models that do not name them.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TypeError(f"{type(model).__name__}: found no transformer blocks to shard")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def shard_mesh(device_mesh):
    """The mesh to shard over: a 1D mesh, or a 2D ``(replicate, shard)`` mesh for HSDP (see the module docstring)."""
    if device_mesh.ndim == 1:
        return device_mesh
    data, tensor = device_mesh["data_parallel"], device_mesh["tensor_parallel"]
    if tensor.size() == 1:
        return data
    if data.size() == 1:
        return tensor
    return device_mesh


def fully_shard_model(
    model: nn.Module,
    mesh,
    compute_dtype: DType | None = None,
    reshard_after_forward: bool = True,
    offload: bool = False,
    frozen: bool = False,
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every transformer block of ``model`` and then to the model itself.

    The root group holds what is left (embeddings, final norm, heads). Blocks are sharded first so that each
    block's parameters are gathered only for its own forward and backward pass. A trained model keeps its root
    group gathered from forward to backward (FSDP2's default for a root): the critics read per-position scores off
    the head with a hook (``backbone.token_scores``), a path FSDP2's backward hooks on the model's outputs do not
    see. A frozen model, never differentiated, frees its root group after every forward pass.

    Args:
        model: The Hugging Face model (modified in place: its parameters become ``DTensor`` shards).
        mesh: The device mesh (1D: shard; 2D: replicate x shard).
        compute_dtype: Mixed-precision parameter dtype (gradients reduced in float32); ``None``: none.
        reshard_after_forward: Free gathered parameters after each forward pass.
        offload: Keep the shards in CPU memory (FSDP2 ``CPUOffloadPolicy``).
        frozen: The model is never differentiated (see above).

    Returns:
        ``model``.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = {
        "mesh": mesh,
        "offload_policy": CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy(),
    }
    if compute_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch_dtype(compute_dtype), reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=True if frozen else None, **kwargs)
    return model


def shard_models(
    device_mesh,
    trained: Iterable[nn.Module],
    frozen: Iterable[nn.Module] = (),
    sharding: Sharding | dict | None = None,
) -> bool:
    """Shard a stage's models when its strategy is ``ModelParallelStrategy``; otherwise do nothing.

    Call it at the end of ``configure_model``. Every rank must have built identical weights (same checkpoint, or
    the same seed for a fresh model): FSDP2 keeps each rank's slice of its own copy and broadcasts nothing.

    Args:
        device_mesh: The LightningModule's ``device_mesh`` (set only by ``ModelParallelStrategy``; ``None``
            elsewhere, and then nothing is sharded).
        trained: The models with gradients: always sharded.
        frozen: The models without gradients: sharded, offloaded or replicated as ``sharding`` says.
        sharding: Layout options; ``None`` uses the defaults of :class:`Sharding`.

    Returns:
        Whether the models were sharded (``generate`` then needs ``synced_gpus=True``).
    """
    if device_mesh is None:
        return False
    sharding = as_sharding(sharding)
    mesh = shard_mesh(device_mesh)
    common = {"compute_dtype": sharding.compute_dtype, "reshard_after_forward": sharding.reshard_after_forward}
    for model in trained:
        fully_shard_model(model, mesh, **common)
    if sharding.frozen == "shard":
        for model in frozen:
            fully_shard_model(model, mesh, offload=sharding.offload_frozen, frozen=True, **common)
    return True


def move_offloaded_to_cpu(models: Iterable[nn.Module]) -> None:
    """Put CPU-offloaded FSDP2 models back in CPU memory after the strategy moved the whole module to the GPU.

    ``ModelParallelStrategy.setup`` calls ``module.to(root_device)`` after ``configure_model``, which also moves
    the shards that FSDP2 was told to keep on the CPU; FSDP2 re-registers them on ``.to("cpu")``.
    """
    for model in models:
        if any(p.device.type != "cpu" for p in model.parameters()):
            model.to("cpu")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every block, non-reentrant (works with FSDP2, LoRA and frozen embeddings)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
