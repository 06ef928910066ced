"""The resumable training DataLoader: its state says how far through which epoch it is, and restoring it resumes."""

from __future__ import annotations

from repo_lightning.data.resumable import ResumableDataLoader, ResumableSampler


def _loader(epoch: int = 0) -> ResumableDataLoader:
    data = list(range(10))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7, drop_last=True)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(data, batch_size=3, sampler=sampler, drop_last=True, collate_fn=list)


def test_state_counts_batches_handed_out():
    loader = _loader()
    assert loader.state_dict() == {"epoch": 0, "batches": 0}
    iterator = iter(loader)
    next(iterator), next(iterator)
    assert loader.state_dict() == {"epoch": 0, "batches": 2}


def test_restored_loader_continues_the_epoch_where_it_stopped():
    full = list(_loader())
    assert len(full) == 3
    interrupted = _loader()
    iterator = iter(interrupted)
    next(iterator)
    state = interrupted.state_dict()

    resumed = _loader()
    resumed.load_state_dict(state)
    assert list(resumed) == full[1:]
    assert resumed.state_dict() == {"epoch": 0, "batches": 3}
    assert list(resumed) == full  # the skip applies to one pass only


def test_state_of_another_epoch_starts_the_new_epoch_at_its_beginning():
    finished = _loader()
    list(finished)
    resumed = _loader()
    resumed.load_state_dict(finished.state_dict())  # saved at the end of epoch 0
    resumed.sampler.set_epoch(1)  # Lightning moves on to epoch 1
    assert list(resumed) == list(_loader(epoch=1))
