"""A guard against NaN and infinite values: stop with the first non-finite quantity named, or skip its batch.

A NaN reward model, a too large learning rate or an overflow otherwise trains on silently and writes checkpoints and
exports full of NaN. The checks here name *what* went non-finite (``train/loss``, the gradient of
``model.score.weight``) and *where it came from* (the model and its config key), so the message says what to fix.

* :func:`check_finite` raises :class:`~repo_lightning.errors.NonFiniteError` on the first non-finite value.
* :class:`FiniteGuard` is the per-module policy: ``raise`` (the default) or ``skip`` the batch, counted.
* :func:`all_finite` is the fast check behind the two below (one reduction per tensor, one sync per device).
* :func:`first_nonfinite_weight` finds the first non-finite parameter or buffer of a model (for loaded models and
  for exports).
* :class:`NonFiniteWeightCheck` is the callback the CLI adds to every run: it checks every model's weights when
  fit, validate or test starts (a NaN model folder stops the run naming the model and its path), the gradients
  before each optimizer step of a module without its own guard (the policy), and the trained weights and state
  after each training batch, before any checkpoint of that step is written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from repo_lightning.errors import NonFiniteError

log = logging.getLogger(__name__)

OnNonFinite = Literal["raise", "skip"]

#: The config key each top-level model of a stage module was loaded from.
MODEL_SOURCES = {
    "model": "model_name_or_path",
    "actor": "actor_path",
    "ref_model": "actor_path",
    "reward_model": "reward_model_path",
    "reward_critic": "reward_model_path",
    "cost_model": "cost_model_path",
    "cost_critic": "cost_model_path",
    "reward_members": "reward_ensemble_paths",
    "cost_members": "cost_ensemble_paths",
}


def _local(tensor: Tensor) -> Tensor:
    # A DTensor (FSDP2 shard) is checked on the shard this rank holds.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def count_nonfinite(tensor: Tensor) -> int:
    """Number of NaN or infinite entries of ``tensor`` (0 for integer and bool tensors)."""
    tensor = _local(tensor)
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor.detach())).sum())


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """``True`` only if every value of every tensor is finite; one host sync per device instead of one per tensor.

    Each floating tensor is reduced to its sum (one pass, no temporaries), and the sums are checked together. A sum
    is non-finite whenever one of its values is (NaN and inf propagate), so ``True`` is exact; ``False`` may also
    come from a sum of finite values that overflows, which is why callers confirm a ``False`` with
    :func:`count_nonfinite` tensor by tensor (the slow path, taken only when something is, or may be, wrong).
    """
    sums: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        tensor = _local(tensor).detach()
        if tensor.is_complex():
            tensor = torch.view_as_real(tensor)
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        total = tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()
        sums.setdefault(total.device, []).append(total.float())
    return all(bool(torch.isfinite(torch.stack(group)).all()) for group in sums.values())


def describe(name: str, tensor: Tensor) -> str:
    """``name (3 of 32 values NaN or inf)``."""
    tensor = _local(tensor)
    bad = count_nonfinite(tensor)
    nan = int(torch.isnan(tensor.detach()).sum()) if tensor.is_floating_point() else 0
    kind = "NaN" if nan == bad else "inf" if nan == 0 else "NaN or inf"
    return f"{name} ({bad} of {tensor.numel()} values {kind})"


def check_finite(name: str, tensor: Tensor | None, source: str) -> None:
    """Raise unless every value of ``tensor`` is finite.

    Args:
        name: What the tensor is (``train/loss``, ``rewards``, ``gradient of actor.lm_head.weight``).
        tensor: The values (``None`` passes).
        source: The model or setting it came from (``reward model (model.init_args.reward_model_path=...)``).

    Raises:
        NonFiniteError: ``non-finite <name> from <source>: ...``.
    """
    if tensor is not None and count_nonfinite(tensor):
        raise NonFiniteError(f"non-finite {describe(name, tensor)} from {source}")


def first_nonfinite_weight(model: nn.Module, trainable_only: bool = False) -> str | None:
    """Name and share of the first non-finite parameter or buffer of ``model``, or ``None`` when all are finite.

    Args:
        model: The model.
        trainable_only: Check only parameters with ``requires_grad`` (and every buffer).
    """
    parameters = [(n, t) for n, t in model.named_parameters() if not trainable_only or t.requires_grad]
    buffers = list(model.named_buffers())
    if all_finite(t for _, t in parameters + buffers):
        return None
    for name, tensor in parameters + buffers:
        if count_nonfinite(tensor):
            return describe(name, tensor)
    return None


def first_nonfinite_gradient(parameters: Iterable[tuple[str, nn.Parameter]]) -> str | None:
    """``gradient of <name> (...)`` for the first parameter whose gradient holds NaN or inf, else ``None``."""
    parameters = list(parameters)
    if all_finite(p.grad for _, p in parameters if p.grad is not None):
        return None
    for name, parameter in parameters:
        if parameter.grad is not None and count_nonfinite(parameter.grad):
            return describe(f"gradient of {name}", parameter.grad)
    return None


class FiniteGuard:
    """What a module does on a non-finite loss or gradient: ``raise`` (stop the run) or ``skip`` the batch.

    Skipped batches are counted (:attr:`skipped`) and logged as a warning; the module logs the count as
    ``train/nonfinite_skipped``.

    Args:
        on_nonfinite: ``raise`` or ``skip``.
        source: The model the checked values come from, for messages.
    """

    def __init__(self, on_nonfinite: OnNonFinite = "raise", source: str = "the model") -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.source = source
        self.skipped = 0

    def _fail(self, message: str, step: int | None) -> bool:
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"{message}; stopped before the optimizer step (set model.init_args.on_nonfinite: skip to skip "
                "such batches)"
            )
        self.skipped += 1
        log.warning(
            "skipping batch%s: %s (%d skipped so far)",
            f" at step {step}" if step is not None else "",
            message,
            self.skipped,
        )
        return False

    def fail(self, message: str, step: int | None = None) -> bool:
        """Raise, or (``skip``) count the batch and return ``False``: for a failure found elsewhere (another rank)."""
        return self._fail(message, step)

    def check(self, name: str, tensor: Tensor | None, step: int | None = None, source: str | None = None) -> bool:
        """``True`` if ``tensor`` is finite (or ``None``); otherwise raise or (``skip``) count and return ``False``.

        Args:
            name: What the tensor is (``rewards``, ``train/loss``).
            tensor: The values.
            step: The global step, for the skip warning.
            source: Where the values come from, if not the guard's own ``source`` (``model_source(module, name)``).
        """
        if tensor is None or not count_nonfinite(tensor):
            return True
        return self._fail(f"non-finite {describe(name, tensor)} from {source or self.source}", step)

    def check_gradients(self, model: nn.Module, step: int | None = None, prefix: str = "") -> bool:
        """Check every gradient of ``model``; on ``skip`` the gradients are dropped so the step changes nothing.

        Returns:
            ``True`` if every gradient is finite.
        """
        named = [(f"{prefix}{name}", p) for name, p in model.named_parameters()]
        found = first_nonfinite_gradient(named)
        if found is None:
            return True
        self._fail(f"non-finite {found} from {self.source}", step)
        for _, parameter in named:
            parameter.grad = None  # optimizers skip parameters without a gradient
        return False


def model_source(module: L.LightningModule, child: str) -> str:
    """``reward_model (model.init_args.reward_model_path='...')``: a top-level model and the key it came from."""
    key = MODEL_SOURCES.get(child)
    value = module.hparams.get(key) if key is not None else None
    if value is None and child == "model" and module.hparams.get("model_config") is not None:
        return "model (built from model.init_args.model_config)"
    return f"{child} (model.init_args.{key}={value!r})" if value is not None else child


class NonFiniteWeightCheck(L.Callback):
    """Stop a run whose models hold NaN or infinite weights, naming the model and the folder it came from.

    At the start of fit, validate and test every parameter and buffer of the LightningModule is checked (a model
    folder with NaN weights never gets to train, score or be exported). After each training batch the trained
    parameters and every buffer (the dual variable's multiplier and window) are checked; this callback runs before
    ``ModelCheckpoint`` (Lightning orders checkpoint callbacks last), so a non-finite step is never checkpointed.
    """

    def _check(self, trainer: L.Trainer, module: L.LightningModule, when: str, trainable_only: bool) -> None:
        found = None
        for child_name, child in module.named_children():
            bad = first_nonfinite_weight(child, trainable_only)
            if bad is not None:
                found = f"{model_source(module, child_name)}: {bad}"
                break
        for name, buffer in module.named_buffers(recurse=False) if found is None else ():
            if count_nonfinite(buffer):
                found = describe(name, buffer)
                break
        # Every rank must raise together, or the others would wait for it in the next collective.
        if trainer.strategy.reduce_boolean_decision(found is None, all=True):
            return
        raise NonFiniteError(f"non-finite weights {when}: {found or 'on another rank'}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check every loaded model before the first step."""
        self._check(trainer, pl_module, "at the start of fit", trainable_only=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check every model before validating (only when ``validate`` is the command: fit checked already)."""
        if trainer.state.fn == "validate":
            self._check(trainer, pl_module, "at the start of validate", trainable_only=False)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check every model before testing."""
        self._check(trainer, pl_module, "at the start of test", trainable_only=False)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Stop before a non-finite gradient reaches the weights, for modules without their own guard.

        Lightning calls this hook from ``optimizer.step()`` under manual optimization too (the policy stage). A module
        with a ``finite_guard`` attribute (the SFT, reward and cost stages) checks its own gradients, with its own
        ``raise``/``skip`` choice, and is left alone.
        """
        if getattr(pl_module, "finite_guard", None) is not None:
            return
        for child_name, child in pl_module.named_children():
            found = first_nonfinite_gradient(child.named_parameters())
            if found is not None:
                raise NonFiniteError(
                    f"non-finite {found} in {model_source(pl_module, child_name)}; stopped before the optimizer step"
                )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        """Check trained weights and state after the step, before this step's checkpoint is saved."""
        self._check(trainer, pl_module, f"after training step {trainer.global_step}", trainable_only=True)


def guard_loss(module: L.LightningModule, guard: FiniteGuard, loss: Tensor) -> bool:
    """Check a training loss in a module's ``training_step``; on ``skip`` also log the running skip count.

    Returns:
        ``True`` to train on the batch, ``False`` to skip it (the step then returns ``None``).
    """
    finite = guard.check("train/loss", loss, module.global_step)
    if guard.on_nonfinite == "skip":
        module.log("train/nonfinite_skipped", float(guard.skipped), reduce_fx="max", batch_size=1)
    return finite


def guard_gradients(module: L.LightningModule, guard: FiniteGuard, model: nn.Module, prefix: str = "model.") -> bool:
    """Check the gradients of ``model`` in ``on_before_optimizer_step``; on ``skip`` also log the skip count.

    Returns:
        ``True`` if every gradient is finite; on ``skip`` the gradients were dropped, so the step changes nothing.
    """
    finite = guard.check_gradients(model, module.global_step, prefix)
    if guard.on_nonfinite == "skip":
        module.log("train/nonfinite_skipped", float(guard.skipped), reduce_fx="max", batch_size=1)
    return finite


def finite_on_all_ranks(
    module: L.LightningModule, guard: FiniteGuard, values: dict[str, tuple[Tensor | None, str]]
) -> bool:
    """Check named tensors (``name: (tensor, source)``) on every rank together; raise, or (``skip``) count and log.

    Every rank takes the same decision (a rank that raised alone would leave the others waiting in a collective).

    Returns:
        ``True`` when every value on every rank is finite.
    """
    step = module.global_step
    bad = next(((n, t, src) for n, (t, src) in values.items() if t is not None and count_nonfinite(t)), None)
    if module.trainer.strategy.reduce_boolean_decision(bad is None, all=True):
        return True
    if bad is None:
        ok = guard.fail("non-finite value on another rank", step)
    else:
        ok = guard.check(bad[0], bad[1], step, bad[2])
    module.log("train/nonfinite_skipped", float(guard.skipped), reduce_fx="max", batch_size=1)
    return ok
