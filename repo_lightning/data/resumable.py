"""A training DataLoader that resumes part-way through an epoch, so a run killed mid-epoch continues exactly.

Lightning saves a train dataloader's ``state_dict()`` in every checkpoint (``loops.fit_loop`` under
``"combined_loader"``) and calls ``load_state_dict`` before iterating again when a run resumes, but only if the
DataLoader object itself has both methods; a plain ``DataLoader`` restarts the interrupted epoch from its first batch,
so a resumed run trains on different batches from the interrupted one.

:class:`ResumableSampler` is a ``DistributedSampler`` (its order is a function of ``(seed, epoch)`` and each rank
keeps its share) that can skip the samples already consumed in one epoch; :class:`ResumableDataLoader` counts the
batches it has handed out and is what Lightning saves and restores. Lightning fetches no batch ahead for loaders
with a length, so at a checkpoint the count equals the batches trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next pass over a given epoch can start after the samples already consumed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume: tuple[int, int] | None = None
        self.skipped = 0

    def resume(self, epoch: int, samples: int) -> None:
        """Make the next pass skip its first ``samples`` indices if that pass is of ``epoch`` (else nothing)."""
        self.set_epoch(epoch)
        self._resume = (epoch, samples)

    def __iter__(self) -> Iterator[int]:
        """This rank's indices for the current epoch, minus those consumed before a resume."""
        indices = list(super().__iter__())
        resume, self._resume = self._resume, None
        self.skipped = resume[1] if resume is not None and resume[0] == self.epoch else 0
        return iter(indices[self.skipped :])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` with the ``state_dict`` Lightning saves in checkpoints.

    The state is ``{"epoch": e, "batches": n}``: ``n`` batches of epoch ``e`` were handed out. Restoring it makes
    the next pass over epoch ``e`` start at batch ``n``; a pass over any other epoch starts at its beginning (a
    checkpoint written at the end of an epoch resumes with the next one).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler) or self.batch_size is None:
            raise TypeError("ResumableDataLoader needs a ResumableSampler and a batch_size")
        self._epoch = self.sampler.epoch
        self._batches = 0

    def __iter__(self) -> Iterator:
        """Batches of the current epoch, counted as they are handed out."""
        first = True
        for batch in super().__iter__():
            if first:
                first = False
                self._epoch = self.sampler.epoch
                self._batches = self.sampler.skipped // self.batch_size
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: how far through which epoch the loader is."""
        return {"epoch": int(self._epoch), "batches": int(self._batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after ``state["batches"]`` batches of epoch ``state["epoch"]``."""
        self._epoch, self._batches = int(state["epoch"]), int(state["batches"])
        self.sampler.resume(self._epoch, self._batches * self.batch_size)
