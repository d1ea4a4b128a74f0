"""Loading a model folder's tokenizer, ready for chat fine-tuning.

- Chat template: the model's own when it has one. A tokenizer without one (a base model)
  gets `CHATML_TEMPLATE`, the ChatML format (`<|im_start|>role\\ncontent<|im_end|>\\n`) that
  SmolLM2, Qwen2 and many fine-tunes use. Its markers are plain text to a tokenizer that
  lacks them as special tokens (no new tokens are added, so no embedding is resized); the
  model learns them during fine-tuning. `uses_fallback_chat_template` tells which applies,
  for the data report. A `spec.dataset.chatTemplate` override is applied by the caller.
- Padding: a tokenizer without a pad token pads with its EOS token. Loss masks must
  therefore come from the attention mask (or the assistant mask), never from comparing ids
  with `pad_token_id`, or the EOS that ends each answer would be masked too. Padding is on
  the right, as training collators expect; batched generation (evaluation) must switch to
  `padding_side="left"` so every prompt ends where generation starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.dataset import ChatTemplate, ChatTemplatePreset
from kubetune.trainer.resolve.errors import ModelResolutionError, redact

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The fallback chat template (ChatML)."""


ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
"""The Alpaca prompt format as a chat template (`dataset.chatTemplate.preset: Alpaca`)."""


def chat_template_override(choice: ChatTemplate | None) -> str | None:
    """The Jinja template `spec.dataset.chatTemplate` asks for; None keeps the model's own
    (or the ChatML fallback when it has none)."""
    if choice is None:
        return None
    if choice.jinja is not None:
        return choice.jinja
    return {
        ChatTemplatePreset.MODEL: None,
        ChatTemplatePreset.CHATML: CHATML_TEMPLATE,
        ChatTemplatePreset.ALPACA: ALPACA_TEMPLATE,
    }[choice.preset]


def load_tokenizer(
    model_dir: str | Path,
    *,
    trust_remote_code: bool = False,
    padding_side: Literal["left", "right"] = "right",
    chat_template: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a resolved model folder.

    Args:
        model_dir: the folder (`ResolvedModel.path`).
        trust_remote_code: `spec.model.trustRemoteCode` (custom tokenizer classes).
        padding_side: "right" for training, "left" for batched generation.
        chat_template: a Jinja chat template to use instead of the model's own
            (`chat_template_override(spec.dataset.chatTemplate)`).

    Returns:
        The tokenizer, with a chat template and a pad token.

    Raises:
        ModelResolutionError: SourceNotFound when the folder has no usable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        said = " ".join(redact(str(err)).split())  # before cutting: no piece of a secret
        said = said if len(said) <= 300 else said[:299] + "…"
        raise ModelResolutionError(
            Reason.SOURCE_NOT_FOUND,
            f"cannot load a tokenizer from {model_dir}: the model folder needs its tokenizer "
            f"files (tokenizer.json or tokenizer.model, tokenizer_config.json); upload them "
            f"next to config.json ({type(err).__name__}: {said})",
            uri=str(model_dir),
        ) from err
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelResolutionError(
                Reason.SOURCE_NOT_FOUND,
                f"the tokenizer in {model_dir} has neither a pad nor an EOS token; set "
                "pad_token in its tokenizer_config.json",
                uri=str(model_dir),
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def uses_fallback_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the chat template is kubetune's ChatML fallback, not the model's own."""
    return bool(tokenizer.chat_template == CHATML_TEMPLATE)
