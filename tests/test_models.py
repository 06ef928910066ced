"""Model loading, score pooling, atomic export and scoring with a tokenizer other than the policy's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from repo_lightning.models.backbone import (
    FusedGELUTanh,
    disable_dropout,
    fuse_activations,
    load_causal_lm,
    load_score_model,
    sequence_scores,
)
from repo_lightning.models.export import export_pretrained
from repo_lightning.models.scorer import Scorer, decode_responses, same_tokenizer, score_samples
from repo_lightning.safetyworld import World, WorldConfig
from repo_lightning.safetyworld.tokenizer import build_word_tokenizer
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE
from repo_lightning.text.tokenizers import load_tokenizer


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- loading ------------------------------------------------------------------------------------------------


def test_fused_gelu_is_gelu_new_up_to_rounding_and_keeps_weights_and_config(tiny_exports, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    tok = load_tokenizer(tiny_exports["tokenizer"])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0)
    reference = GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path / "gpt2")
    fused = load_causal_lm(tok, model_name_or_path=str(tmp_path / "gpt2")).eval()
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, FusedGELUTanh) for m in fused.modules()) == 2
    assert fused.config.activation_function == "gelu_new"
    _assert_same_weights(_state(reference), _state(fused))
    ids = torch.randint(3, len(tok), (2, 8))
    torch.testing.assert_close(fused(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(FusedGELUTanh()(x), NewGELUActivation()(x), rtol=0, atol=1e-6)
    plain = load_causal_lm(tok, model_name_or_path=str(tmp_path / "gpt2"), fused_activations=False)
    assert sum(isinstance(m, NewGELUActivation) for m in plain.modules()) == 2
    assert fuse_activations(plain) is plain and not any(isinstance(m, NewGELUActivation) for m in plain.modules())


def test_disable_dropout_zeroes_every_dropout(tiny_exports):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny_exports["tokenizer"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2)).train()
    assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert disable_dropout(model) is model
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.randint(3, len(tok), (2, 8))
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)  # deterministic in train mode


def test_causal_lm_from_config_takes_vocab_and_special_ids_from_tokenizer(tiny_exports, tiny_model_config):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    model = load_causal_lm(tok, model_config=tiny_model_config)
    assert model.training
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.get_output_embeddings().weight.shape == (len(tok), 32)


def test_causal_lm_round_trips_through_a_saved_folder(tiny_exports, tiny_model_config, tmp_path):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    model = load_causal_lm(tok, model_config=tiny_model_config)
    model.save_pretrained(tmp_path / "lm")
    loaded = load_causal_lm(tok, model_name_or_path=str(tmp_path / "lm"))
    assert loaded.training
    _assert_same_weights(_state(model), _state(loaded))


def test_score_model_from_config_has_one_label_and_pads_like_the_tokenizer(tiny_exports, tiny_model_config):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    model = load_score_model(tok, model_config=tiny_model_config)
    assert model.config.num_labels == 1
    assert model.score.weight.shape == (1, 32)
    assert model.config.pad_token_id == tok.pad_token_id == 0


def test_score_model_from_a_causal_lm_folder_keeps_the_backbone(tiny_exports):
    tok = load_tokenizer(tiny_exports["sft"])
    lm = load_causal_lm(tok, model_name_or_path=tiny_exports["sft"])
    scorer = load_score_model(tok, model_name_or_path=tiny_exports["sft"])
    assert scorer.config.num_labels == 1 and scorer.training
    backbone = _state(scorer.model)
    _assert_same_weights(backbone, _state(lm.model))


def test_score_model_from_a_score_folder_keeps_the_head(tiny_exports):
    tok = load_tokenizer(tiny_exports["reward"])
    a = load_score_model(tok, model_name_or_path=tiny_exports["reward"])
    b = AutoModelForSequenceClassification.from_pretrained(tiny_exports["reward"])
    _assert_same_weights(_state(a), _state(b))


@pytest.mark.parametrize("loader", [load_causal_lm, load_score_model])
def test_exactly_one_source_is_required(loader, tiny_exports, tiny_model_config):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    with pytest.raises(ValueError, match="exactly one of model_name_or_path"):
        loader(tok)
    with pytest.raises(ValueError, match="exactly one of model_name_or_path"):
        loader(tok, model_name_or_path=tiny_exports["sft"], model_config=tiny_model_config)


def test_model_config_without_model_type_is_rejected(tiny_exports, tiny_model_config):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    del tiny_model_config["model_type"]
    with pytest.raises(ValueError, match="model_type"):
        load_causal_lm(tok, model_config=tiny_model_config)


@pytest.mark.parametrize("loader", [load_causal_lm, load_score_model])
def test_missing_folder_error_names_the_path(loader, tiny_exports, tmp_path):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=f"could not load a model from '{missing}'"):
        loader(tok, model_name_or_path=missing)


def test_missing_tokenizer_error_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(FileNotFoundError, match=f"could not load a tokenizer from '{missing}'"):
        load_tokenizer(missing)


# --- pooling ------------------------------------------------------------------------------------------------


def test_sequence_scores_match_hf_on_right_padding_and_ignore_left_padding(tiny_exports):
    tok = load_tokenizer(tiny_exports["reward"])
    model = load_score_model(tok, model_name_or_path=tiny_exports["reward"]).eval()
    long = [tok.bos_token_id, *_ids(tok, "how do i help ? ASSISTANT : first then also next"), tok.eos_token_id]
    short = [tok.bos_token_id, *_ids(tok, "help me ? ASSISTANT : sorry"), tok.eos_token_id]
    assert len(long) == 13 and len(short) == 8
    pad = tok.pad_token_id
    right = torch.tensor([long, short + [pad] * 5])
    right_mask = torch.tensor([[1] * 13, [1] * 8 + [0] * 5])
    with torch.no_grad():
        hf = model(input_ids=right, attention_mask=right_mask).logits[:, 0]
        ours = sequence_scores(model, right, right_mask)
        alone = model(input_ids=torch.tensor([short])).logits[0, 0]
        left = sequence_scores(model, torch.tensor([[pad] * 4 + short]), torch.tensor([[0] * 4 + [1] * 8]))
    assert ours.shape == (2,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-5)
    # The padded short row scores as the unpadded sequence does, padded on either side.
    torch.testing.assert_close(ours[1], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left[0], alone, rtol=0, atol=1e-5)
    assert abs(ours[0] - ours[1]) > 1e-4  # the two sequences are told apart


# --- export -------------------------------------------------------------------------------------------------


def test_export_writes_a_loadable_folder_and_replaces_an_old_one(tiny_exports, tiny_model_config, tmp_path):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    first, second = (load_score_model(tok, model_config=tiny_model_config) for _ in range(2))
    target = tmp_path / "exports" / "reward"
    export_pretrained(first, tok, target, metadata={"stage": "reward"})
    assert (target / "repo_lightning.json").read_text().strip().startswith("{")
    export_pretrained(second, tok, target)
    loaded = AutoModelForSequenceClassification.from_pretrained(target)
    _assert_same_weights(_state(second), _state(loaded))
    assert sorted(p.name for p in target.parent.iterdir()) == ["reward"]
    assert not (target / "repo_lightning.json").exists()  # nothing left from the first export


def test_export_failing_midway_leaves_the_old_export_intact(tiny_exports, tiny_model_config, tmp_path, monkeypatch):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    old, new = (load_score_model(tok, model_config=tiny_model_config) for _ in range(2))
    target = tmp_path / "exports" / "cost"
    export_pretrained(old, tok, target, metadata={"stage": "cost"})
    before = sorted(p.name for p in target.iterdir())

    def save_half_then_fail(self, save_directory, **kwargs):
        (save_directory / "config.json").write_text("{}")  # a partial write into the staging folder
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_pretrained(new, tok, target)
    monkeypatch.undo()
    assert sorted(p.name for p in target.parent.iterdir()) == ["cost"]  # no staging or backup folder
    assert sorted(p.name for p in target.iterdir()) == before
    loaded = AutoModelForSequenceClassification.from_pretrained(target)
    _assert_same_weights(_state(old), _state(loaded))


# --- scoring with another tokenizer -------------------------------------------------------------------------


def test_score_samples_retokenizes_for_a_scorer_with_another_tokenizer(tiny_exports, tiny_model_config):
    policy_tok = load_tokenizer(tiny_exports["tokenizer"])
    # The same words in reverse order: every word gets another id, so policy ids mean nothing to this scorer.
    words = World(WorldConfig(num_topics=6)).vocabulary()
    scorer_tok = build_word_tokenizer(list(reversed(words)))
    assert not same_tokenizer(policy_tok, scorer_tok)
    assert _ids(policy_tok, "first then") != _ids(scorer_tok, "first then")
    torch.manual_seed(0)
    model = load_score_model(scorer_tok, model_config=tiny_model_config).eval()
    scorer = Scorer(model=model, tokenizer=scorer_tok, template=SAFE_RLHF_TEMPLATE, reuse_policy_ids=False)

    prompts = ["how do i help ?", "tell me the steps"]
    responses = ["first then also", "sorry i cannot help with that"]
    # Policy layout: left-padded templated prompt, response + eos, right padding.
    pad = policy_tok.pad_token_id
    pieces = [
        (
            [policy_tok.bos_token_id, *_ids(policy_tok, SAFE_RLHF_TEMPLATE.format(prompt=prompt))],
            [*_ids(policy_tok, " " + response), policy_tok.eos_token_id],
        )
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    width_p = max(len(p) for p, _ in pieces)
    width_r = max(len(r) for _, r in pieces)
    rows, masks, response_ids, response_masks = [], [], [], []
    for p, r in pieces:
        left, right = width_p - len(p), width_r - len(r)
        rows.append([pad] * left + p + r + [pad] * right)
        masks.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
        response_ids.append(r + [pad] * right)
        response_masks.append([1] * len(r) + [0] * right)
    sequences, mask = torch.tensor(rows), torch.tensor(masks)
    decoded = decode_responses(policy_tok, torch.tensor(response_ids), torch.tensor(response_masks))
    assert decoded == responses

    got = score_samples(scorer, sequences, mask, prompts, decoded, batch_size=1)

    expected = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses, strict=True):
            text = f"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
            ids = [scorer_tok.bos_token_id, *_ids(scorer_tok, text), *_ids(scorer_tok, " " + response)]
            ids.append(scorer_tok.eos_token_id)
            expected.append(model(input_ids=torch.tensor([ids])).logits[0, 0])
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-5)
    # Reading the policy's ids as they are would give other scores: the retokenisation is what makes them right.
    reused = Scorer(model=model, tokenizer=scorer_tok, template=SAFE_RLHF_TEMPLATE, reuse_policy_ids=True)
    assert not torch.allclose(score_samples(reused, sequences, mask, prompts, decoded), got, atol=1e-4)


def test_score_samples_needs_responses_when_retokenizing(tiny_exports, tiny_model_config):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    model = load_score_model(tok, model_config=tiny_model_config).eval()
    scorer = Scorer(model=model, tokenizer=tok, template=SAFE_RLHF_TEMPLATE, reuse_policy_ids=False)
    ids = torch.tensor([[1, 5, 2]])
    with pytest.raises(ValueError, match="decoded responses"):
        score_samples(scorer, ids, torch.ones_like(ids), ["help"], None)
