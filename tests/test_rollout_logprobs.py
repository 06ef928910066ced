"""``sampling.logprobs_from_generation``: the old log-probs read from ``generate``'s sampling logits are the ones the
extra actor forward pass gives (the untempered policy's), up to float rounding; sampling itself is unchanged."""

from __future__ import annotations

import pytest
import torch

import repo_lightning.modules.rollout as rollout_module
from repo_lightning.data.collate import PromptExample, collate_prompts
from repo_lightning.models.backbone import load_causal_lm
from repo_lightning.modules.policy_config import Sampling
from repo_lightning.modules.rollout import collect_rollout, response_logits, response_logprobs, sample_responses
from repo_lightning.text.tokenizers import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Prompt lengths of the batch: left padding on all rows but the longest.
PROMPT_LENGTHS = (7, 3, 5, 1, 7, 2, 4, 6)
MAX_NEW_TOKENS = 10


def _prompts(tok, repeat: int = 2):
    words = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    examples = [
        PromptExample([tok.bos_token_id, *words[3 * i : 3 * i + n - 1]], f"p{i}", i)
        for i, n in enumerate(PROMPT_LENGTHS)
    ]
    batch = collate_prompts(examples, tok.pad_token_id)
    return batch.input_ids.repeat(repeat, 1), batch.attention_mask.repeat(repeat, 1)


#: Output-embedding scale per family: sharper than the near-uniform untrained models, so that the log-probs depend
#: on the context (GPT-2's embeddings are tied, so its factor also scales the input; 2 keeps eos reachable).
SHARPEN = {"llama": 20.0, "gpt2": 2.0}


def _actor(tiny_exports, tok, family):
    if family == "llama":
        actor = load_causal_lm(tok, tiny_exports["sft"])
    else:  # W1's family, with absolute positions: wrong positions under left padding would show
        torch.manual_seed(3)
        gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}
        actor = load_causal_lm(tok, model_config=gpt2)
    with torch.no_grad():
        actor.get_output_embeddings().weight.mul_(SHARPEN[family])
    return actor.eval()


def _sample(actor, tok, ids, mask, temperature, top_k, seed, with_logprobs):
    torch.manual_seed(seed)
    return sample_responses(
        actor,
        ids,
        mask,
        MAX_NEW_TOKENS,
        temperature,
        1.0,
        top_k,
        tok.eos_token_id,
        tok.pad_token_id,
        False,
        with_logprobs,
    )


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 0), (1.6, 5), (0.0, 0)])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_logprobs_are_the_forward_logprobs(tiny_exports, family, temperature, top_k):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    actor = _actor(tiny_exports, tok, family)
    ids, mask = _prompts(tok)
    prompt_length = ids.shape[1]
    assert (mask == 0).any(1).sum() >= 2  # left-padded rows
    # A seed whose batch has responses ending in eos before the cap (so pad follows them) beside full-length ones.
    for seed in range(200):
        samples = _sample(actor, tok, ids, mask, temperature, top_k, seed, with_logprobs=True)
        lengths = samples[2].sum(1)
        if temperature == 0.0 or (lengths < samples[2].shape[1]).any() and (lengths == MAX_NEW_TOKENS).any():
            break
    else:
        pytest.fail("no seed gave both early-eos and full-length responses")
    sequences, full_mask, response_mask, logprobs = samples
    # Sampling is unchanged by asking for the logits: the same tokens, the same masks.
    plain = _sample(actor, tok, ids, mask, temperature, top_k, seed, with_logprobs=False)
    assert torch.equal(plain[0], sequences) and torch.equal(plain[1], full_mask) and plain[3] is None

    with torch.no_grad():
        forward = response_logprobs(actor, sequences, full_mask, prompt_length)
        logits = response_logits(actor, sequences, full_mask, prompt_length)
    on = response_mask.bool()
    assert logprobs.dtype == torch.float32 and logprobs.shape == forward.shape
    torch.testing.assert_close(logprobs[on], forward[on], rtol=0, atol=1e-5)
    assert torch.equal(logprobs[~on], torch.zeros_like(logprobs[~on]))  # after eos: 0, never read
    if temperature not in (0.0, 1.0):
        # The untempered policy's log-probs (the module's definition), not those of the distribution sampled from.
        tempered = torch.log_softmax(logits / temperature, -1).gather(-1, sequences[:, prompt_length:, None])[..., 0]
        assert (logprobs[on] - tempered[on]).abs().max() > 1e-2
    if family == "gpt2":
        # The comparison sees positions: GPT-2 run without the mask's position ids differs on left-padded rows.
        with torch.no_grad():
            shifted = actor(input_ids=sequences, attention_mask=full_mask).logits[:, prompt_length - 1 : -1]
        shifted = torch.log_softmax(shifted.float(), -1).gather(-1, sequences[:, prompt_length:, None])[..., 0]
        assert (shifted[on] - forward[on]).abs().max() > 1e-2


def test_collect_rollout_with_the_option_changes_only_logprobs_by_rounding(tiny_policy, monkeypatch):
    module = tiny_policy
    tok = module.tokenizer
    ids, mask = _prompts(tok, repeat=1)
    batch = collate_prompts(
        [PromptExample(row[m.bool()].tolist(), f"p{i}", i) for i, (row, m) in enumerate(zip(ids, mask, strict=True))],
        tok.pad_token_id,
    )
    forwards = []
    counted = rollout_module.response_logprobs

    def counting(model, *args):
        forwards.append(model)
        return counted(model, *args)

    monkeypatch.setattr(rollout_module, "response_logprobs", counting)
    rollouts = {}
    for flag in (False, True):
        sampling = Sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.8, logprobs_from_generation=flag)
        torch.manual_seed(0)
        rollouts[flag] = collect_rollout(module.models, batch, sampling, 2, sampling.temperature)
    # Off: actor and reference forward passes; on: the reference alone.
    assert forwards == [module.actor, module.ref_model, module.ref_model]
    off, on = rollouts[False], rollouts[True]
    for name in ("sequences", "attention_mask", "response_mask", "ref_logprobs", "reward_values", "cost_values"):
        assert torch.equal(getattr(on, name), getattr(off, name)), name
    for name in ("rewards", "costs"):
        assert torch.equal(getattr(on, name), getattr(off, name)), name
    valid = off.response_mask.bool()
    torch.testing.assert_close(on.logprobs[valid], off.logprobs[valid], rtol=0, atol=1e-5)
    assert on.responses == off.responses
