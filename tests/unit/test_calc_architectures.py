"""The architecture table matches the published parameter counts."""

from __future__ import annotations

import pytest

from kubetune.calc import ARCHITECTURES, architecture, parameter_count

# Published totals (model cards), in millions.
PUBLISHED = {
    "smollm2-135m": 134.5,
    "llama-3.2-1b": 1235.8,
    "llama-3.2-3b": 3212.7,
    "llama-3.1-8b": 8030.3,
    "llama-3.1-70b": 70553.7,
    "qwen2.5-0.5b": 494.0,
    "qwen2.5-7b": 7615.6,
}


@pytest.mark.parametrize(("name", "millions"), PUBLISHED.items())
def test_parameter_count_matches_model_card(name: str, millions: float) -> None:
    assert parameter_count(ARCHITECTURES[name]) / 1e6 == pytest.approx(millions, rel=2e-3)


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"llama-3\.1-8b"):
        architecture("gpt-5")
