"""Merging an adapter: the merged model computes what base + adapter computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.trainer.export import merge_adapter
from kubetune.trainer.resolve import ResolvedModel


def _adapter(base_dir: Path, folder: Path, *, dora: bool) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        use_dora=dora,
        init_lora_weights=False,  # random A and B: the adapter really changes the output
    )
    get_peft_model(base, config).save_pretrained(folder)


def _logits(model: object, ids: object) -> object:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[operator]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_logits_equal_base_plus_adapter(
    tmp_path: Path, tiny_model_dir: Path, dora: bool
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = tmp_path / "adapter"
    _adapter(tiny_model_dir, adapter_dir, dora=dora)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    resolved = ResolvedModel(uri=str(tiny_model_dir), path=tiny_model_dir)
    merged_dir = merge_adapter(
        resolved, adapter_dir, tokenizer, tmp_path / "merged", "float32", 0, max_shard_size="200KB"
    )

    ids = torch.tensor([tokenizer.encode("Rewrite 5 March 2021 as an ISO date.")])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    expected, actual = _logits(with_adapter, ids), _logits(merged, ids)
    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), ids)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)

    # Sharded safetensors with an index, the tokenizer and the generation config.
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((merged_dir / s).is_file() and s.endswith(".safetensors") for s in shards)
    assert not list(merged_dir.glob("*.bin"))
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (merged_dir / name).is_file()
    assert "lora" not in json.dumps(index["weight_map"])
