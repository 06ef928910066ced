"""``sampling.resample_identical_temperature``: prompts whose ``k`` samples are one answer are sampled again, hotter.

A group of identical samples gets zero advantage under every baseline, so no gradient (docs/results.md rounds
16-17). The option draws only those prompts' samples again, once, at another temperature.
"""

from __future__ import annotations

import pytest
import torch

import repo_lightning.modules.rollout as rollout_module
from repo_lightning.data.collate import PromptExample, collate_prompts
from repo_lightning.errors import ConfigError
from repo_lightning.modules.policy_config import Sampling
from repo_lightning.modules.policy_steps import rollout_metrics
from repo_lightning.modules.rollout import collect_rollout, identical_groups, replace_samples, response_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_identical_groups_compares_whole_rows():
    ids = torch.tensor([[5, 6, 0], [5, 6, 0], [5, 7, 0], [5, 6, 0], [9, 0, 0], [9, 0, 0]])
    assert identical_groups(ids, 2).tolist() == [True, False, True]
    assert identical_groups(ids, 3).tolist() == [False, False]
    # the same words, one cut longer: two different answers
    assert identical_groups(torch.tensor([[5, 6, 0], [5, 6, 6]]), 2).tolist() == [False]


def test_replace_samples_pads_the_narrower_width_and_replaces_only_the_rows():
    P = 2  # prompt columns
    samples = (
        torch.tensor([[1, 2, 7, 3], [1, 2, 7, 3], [1, 4, 8, 3]]),  # sequences, response width 2 (eos 3)
        torch.ones(3, 4, dtype=torch.long),
        torch.ones(3, 2, dtype=torch.long),
        torch.tensor([[-1.0, -2.0], [-1.0, -2.0], [-3.0, -4.0]]),
    )
    new = (
        torch.tensor([[1, 2, 9, 9, 3], [1, 2, 3, 0, 0]]),  # response width 3; pad id 0 after eos
        torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        torch.tensor([[1, 1, 1], [1, 0, 0]]),
        torch.tensor([[-5.0, -6.0, -7.0], [-8.0, 0.0, 0.0]]),
    )
    rows = torch.tensor([True, True, False])
    seq, att, resp, lp = replace_samples(samples, new, rows, pad_token_id=0)
    assert seq.tolist() == [[1, 2, 9, 9, 3], [1, 2, 3, 0, 0], [1, 4, 8, 3, 0]]
    assert att.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert resp.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert lp.tolist() == [[-5.0, -6.0, -7.0], [-8.0, 0.0, 0.0], [-3.0, -4.0, 0.0]]
    assert seq.shape[1] - P == resp.shape[1]
    # the new samples narrower than the old: they are padded instead; without log-probs on one side, none
    narrow = (*(t[2:] for t in samples[:3]), None)
    seq, _, resp, lp = replace_samples(new, narrow, torch.tensor([False, True]), pad_token_id=0)
    assert seq.tolist() == [[1, 2, 9, 9, 3], [1, 4, 8, 3, 0]]
    assert resp.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert lp is None


def test_sampling_checks_the_option():
    with pytest.raises(ConfigError, match="sampling.resample_identical_temperature must be > 0"):
        Sampling(resample_identical_temperature=0.0)
    with pytest.raises(ConfigError, match="resample_identical_temperature needs samples_per_prompt >= 2"):
        Sampling(samples_per_prompt=1, resample_identical_temperature=1.5)
    assert Sampling(resample_identical_temperature=1.5).resample_identical_temperature == 1.5


@pytest.fixture
def module(tiny_policy):
    return tiny_policy


def _batch(tok, n: int = 2):
    words = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    examples = [PromptExample([tok.bos_token_id, *words[3 * i : 3 * i + 2 + i]], f"p{i}", i) for i in range(n)]
    return collate_prompts(examples, tok.pad_token_id)


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_collect_rollout_resamples_only_the_identical_groups(module, monkeypatch, with_logprobs):
    """Group 0's two samples are one answer and group 1's differ: only group 0 is sampled again, at the option's
    temperature, and everything downstream (log-probs, scores, responses) is that of the merged samples."""
    tok, k = module.tokenizer, 2
    batch = _batch(tok)
    words = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    a, b, c, d = words[10:14]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    calls = []
    real = rollout_module.sample_responses

    def fake(actor, input_ids, attention_mask, max_new_tokens, temperature, *args, **kwargs):
        calls.append((input_ids.clone(), temperature))
        first = len(calls) == 1
        responses = [[a, b, eos], [a, b, eos], [c, eos, pad], [d, eos, pad]] if first else [[c, d, c, eos], [d, eos]]
        width = max(map(len, responses))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in responses])
        response_mask = rollout_module.response_mask_from_ids(ids, eos)
        sequences = torch.cat([input_ids, torch.where(response_mask.bool(), ids, pad)], 1)
        full = torch.cat([attention_mask, response_mask], 1)
        logprobs = None
        if kwargs.get("with_logprobs"):
            logprobs = response_logprobs(actor, sequences, full, input_ids.shape[1])
        return sequences, full, response_mask, logprobs

    monkeypatch.setattr(rollout_module, "sample_responses", fake)
    sampling = Sampling(max_new_tokens=4, logprobs_from_generation=with_logprobs, resample_identical_temperature=1.7)
    rollout = collect_rollout(module.models, batch, sampling, k, 1.0, resample_temperature=1.7)
    assert real is not rollout_module.sample_responses
    assert [t for _, t in calls] == [1.0, 1.7]
    prompt_rows = batch.input_ids.repeat_interleave(k, 0)
    assert torch.equal(calls[1][0], prompt_rows[:2])  # group 0's prompt, k times: only the identical group
    assert rollout.resampled_groups.tolist() == [True, False]
    P = rollout.prompt_length
    assert rollout.response_ids.tolist() == [[c, d, c, eos], [d, eos, pad, pad], [c, eos, pad, pad], [d, eos, pad, pad]]
    assert rollout.response_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert torch.equal(rollout.attention_mask[:, P:], rollout.response_mask.long())
    assert rollout.responses[2:] == [tok.decode([c]), tok.decode([d])]
    # the old log-probs are those of the merged sequences, whichever way they were read
    expected = response_logprobs(module.actor, rollout.sequences, rollout.attention_mask, P)
    valid = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs[valid], expected[valid], rtol=0, atol=1e-5)
    metrics = rollout_metrics(rollout, k)
    assert metrics["resampled_group_rate"].item() == 0.5
    assert metrics["identical_group_rate"].item() == 0.0
    # option off: one sampling call, no record
    calls.clear()
    rollout = collect_rollout(module.models, batch, sampling, k, 1.0)
    assert len(calls) == 1 and rollout.resampled_groups is None
    assert "resampled_group_rate" not in rollout_metrics(rollout, k)


def test_collect_rollout_samples_nothing_again_when_no_group_is_identical(module, monkeypatch):
    calls = []
    real = rollout_module.sample_responses

    def counting(*args, **kwargs):
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "sample_responses", counting)
    batch, sampling = _batch(module.tokenizer), Sampling(max_new_tokens=8)
    torch.manual_seed(0)
    off = collect_rollout(module.models, batch, sampling, 2, 1.0)
    torch.manual_seed(0)
    on = collect_rollout(module.models, batch, sampling, 2, 1.0, resample_temperature=2.0)
    assert on.resampled_groups.tolist() == [False, False]  # the near-uniform tiny actor's samples differ
    assert calls == [1.0, 1.0]  # one sampling call each: nothing drawn again
    assert torch.equal(on.sequences, off.sequences) and on.responses == off.responses
