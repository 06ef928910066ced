"""The layout helpers (FSDP2 blocks and mesh choice) and LoRA: merging by hand, and a LoRA reward run's export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, TINY_WORLD
from transformers import AutoModelForSequenceClassification

from repo_lightning.cli import main
from repo_lightning.models.backbone import load_causal_lm
from repo_lightning.models.lora import LoRA, as_lora, merge_lora_state_dict
from repo_lightning.models.sharding import Sharding, as_sharding, shard_mesh, transformer_blocks
from repo_lightning.text.tokenizers import load_tokenizer


def test_merge_lora_folds_the_scaled_product_into_the_base_weight():
    # W0 = [[1, 0], [0, 1]], A = [[1, 2]] (r=1, in=2), B = [[3], [4]] (out=2), s = alpha / r = 0.5:
    # B @ A = [[3, 6], [4, 8]], so W = W0 + 0.5 * B A = [[2.5, 3], [2, 5]]; the bias is only renamed.
    state = {
        "layer.base_layer.weight": torch.eye(2),
        "layer.base_layer.bias": torch.tensor([7.0, 8.0]),
        "layer.lora_A.default.weight": torch.tensor([[1.0, 2.0]]),
        "layer.lora_B.default.weight": torch.tensor([[3.0], [4.0]]),
        "norm.weight": torch.ones(2),
    }
    merged = merge_lora_state_dict(state, {"layer": 0.5})
    assert sorted(merged) == ["layer.bias", "layer.weight", "norm.weight"]
    torch.testing.assert_close(merged["layer.weight"], torch.tensor([[2.5, 3.0], [2.0, 5.0]]))
    torch.testing.assert_close(merged["layer.bias"], torch.tensor([7.0, 8.0]))


def test_settings_arrive_as_dicts_from_configs_and_are_checked():
    assert as_sharding(None) == Sharding()
    assert as_sharding({"frozen": "replicate"}).frozen == "replicate"
    assert as_lora({"rank": 4}) == LoRA(rank=4) and as_lora(None) is None
    with pytest.raises(ValueError, match="offload_frozen needs sharding.frozen: shard"):
        Sharding(frozen="replicate", offload_frozen=True)
    with pytest.raises(ValueError, match="lora.rank must be >= 1"):
        LoRA(rank=0)


def test_transformer_blocks_are_the_decoder_layers(tiny_exports):
    model = load_causal_lm(load_tokenizer(tiny_exports["tokenizer"]), model_config=dict(TINY_MODEL))
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * TINY_MODEL["num_hidden_layers"]
    assert blocks[0] is model.model.layers[0]


class _Mesh:
    """A stand-in for a 2D ``DeviceMesh`` (``data_parallel`` x ``tensor_parallel``) of the given sizes."""

    def __init__(self, data: int, tensor: int) -> None:
        self.ndim, self.sizes = 2, {"data_parallel": data, "tensor_parallel": tensor}

    def __getitem__(self, name: str):
        return _Axis(name, self.sizes[name])


class _Axis:
    def __init__(self, name: str, size: int) -> None:
        self.name, self._size, self.ndim = name, size, 1

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize(
    ("data", "tensor", "expected"),
    [(1, 8, "tensor_parallel"), (16, 1, "data_parallel"), (2, 8, "both")],
)
def test_shard_mesh_shards_over_the_axis_larger_than_one_or_uses_hsdp(data, tensor, expected):
    mesh = _Mesh(data, tensor)
    chosen = shard_mesh(mesh)
    assert (chosen is mesh) if expected == "both" else (chosen.name == expected)


def test_lora_reward_trains_adapters_and_head_and_exports_a_plain_merged_model(tmp_path, tiny_exports):
    pytest.importorskip("peft")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "repo_lightning.modules.RewardModule",
            "init_args": {
                "model_name_or_path": tiny_exports["reward"],
                "lora": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
                "export_dir": str(tmp_path / "export"),
            },
        },
        "data": {
            "mode": "preference",
            "world": dict(TINY_WORLD),
            "tokenizer": tiny_exports["tokenizer"],
            "cache_dir": str(tmp_path / "cache"),
            "batch_size": 4,
            "max_prompt_length": 32,
            "max_length": 48,
        },
    }
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    model = cli.model.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable
    assert trainable - {"score.weight"} and all(".lora_" in n for n in trainable - {"score.weight"})
    assert not any("k_proj.lora" in n for n in trainable)  # only the named targets are adapted

    exported = AutoModelForSequenceClassification.from_pretrained(Path(tmp_path / "export")).eval()
    start = AutoModelForSequenceClassification.from_pretrained(tiny_exports["reward"])
    merged, original = exported.state_dict(), start.state_dict()
    assert merged.keys() == original.keys()
    changed = {k for k in original if not torch.equal(merged[k], original[k])}
    assert changed == {"score.weight"} | {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qv"}
    batch = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        ours = cli.model.eval()(batch)
        theirs = exported(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(theirs.view(2, batch.num_pairs).T, ours, rtol=1e-5, atol=1e-5)
