"""Fidelity fixes of the policy stage: one score readout when pad == eos, and no dropout in the RL models."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from repo_lightning.data.collate import PreferenceExample, collate_preference
from repo_lightning.models.backbone import disable_dropout, load_score_model, sequence_scores
from repo_lightning.models.scorer import Scorer, score_samples
from repo_lightning.modules import PolicyModule
from repo_lightning.modules.scoring import pair_scores
from repo_lightning.text.tokenizers import load_tokenizer


def _pad_is_eos_tokenizer(tiny_exports, tmp_path):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    tok.pad_token = tok.eos_token  # as load_tokenizer does for Llama-2, which has no pad token
    folder = tmp_path / "tok_pad_eos"
    tok.save_pretrained(folder)
    tok = load_tokenizer(str(folder))
    assert tok.pad_token_id == tok.eos_token_id
    return tok


def test_training_and_rollout_read_the_same_token_when_pad_is_eos(tiny_exports, tiny_model_config, tmp_path):
    tok = _pad_is_eos_tokenizer(tiny_exports, tmp_path)
    torch.manual_seed(0)
    model = load_score_model(tok, model_config=tiny_model_config).eval()
    assert model.config.pad_token_id == tok.eos_token_id
    eos = tok.eos_token_id
    prompt = [tok.bos_token_id, *tok("how do i help ? ASSISTANT :", add_special_tokens=False)["input_ids"]]
    long = tok("first then also next", add_special_tokens=False)["input_ids"] + [eos]
    short = tok("sorry", add_special_tokens=False)["input_ids"] + [eos]
    batch = collate_preference(
        [PreferenceExample((prompt + long, prompt + short), 0, 1, (True, True))], tok.pad_token_id
    )
    with torch.no_grad():
        trained = pair_scores(model, batch)[0]  # the reward/cost stage's readout
        # The rollout's readout: left-padded prompt, right-padded response, mask up to and including eos.
        width = max(len(long), len(short))
        seqs = torch.tensor(
            [prompt + long + [eos] * (width - len(long)), prompt + short + [eos] * (width - len(short))]
        )
        mask = torch.tensor([[1] * (len(prompt) + len(r)) + [0] * (width - len(r)) for r in (long, short)])
        scorer = Scorer(model, tok, "", reuse_policy_ids=True)
        rollout = score_samples(scorer, seqs, mask, ["", ""])
        at_eos = torch.stack(
            [
                sequence_scores(model, s[None, : int(m.sum())], m[None, : int(m.sum())])
                for s, m in zip(seqs, mask, strict=True)
            ]
        ).squeeze(1)
        hf_pooling = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(trained, rollout, rtol=0, atol=1e-5)
    torch.testing.assert_close(trained, at_eos, rtol=0, atol=1e-5)
    # Hugging Face's pooling skips the eos (it equals pad) and reads the token before it: a different readout.
    assert (hf_pooling - trained).abs().max() > 1e-4


def _gpt2_exports(tok, root):
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    paths = {}
    torch.manual_seed(0)
    paths["sft"] = root / "sft"
    GPT2LMHeadModel(config).save_pretrained(paths["sft"])
    for seed, name in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        GPT2ForSequenceClassification(GPT2Config(**{**config.to_dict(), "num_labels": 1})).save_pretrained(root / name)
        paths[name] = root / name
    for path in paths.values():
        tok.save_pretrained(path)
    return {k: str(v) for k, v in paths.items()}


def test_policy_stage_runs_its_trained_models_without_dropout(tiny_exports, tmp_path):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    paths = _gpt2_exports(tok, tmp_path)
    module = PolicyModule(
        actor_path=paths["sft"],
        reward_model_path=paths["reward"],
        cost_model_path=paths["cost"],
        tokenizer_path=tiny_exports["tokenizer"],
    )
    module.configure_model()
    module.train()
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7, 8, tok.eos_token_id]])
    mask = torch.ones_like(ids)
    for model in (module.actor, module.reward_critic, module.cost_critic):
        assert model.training
        with torch.no_grad():
            first, second = (
                model(input_ids=ids, attention_mask=mask).logits,
                model(input_ids=ids, attention_mask=mask).logits,
            )
        assert torch.equal(first, second)
        assert model.config.resid_pdrop == 0.1  # the config (and so the export) keeps the model's own dropout
    # A GPT-2 in train mode with its dropout on differs pass to pass: the check above could fail.
    torch.manual_seed(0)
    raw = GPT2LMHeadModel.from_pretrained(paths["sft"]).train()
    with torch.no_grad():
        assert not torch.equal(raw(input_ids=ids).logits, raw(input_ids=ids).logits)
        disable_dropout(raw)
        assert torch.equal(raw(input_ids=ids).logits, raw(input_ids=ids).logits)
