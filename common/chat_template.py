"""The chat template SFT trains with and records in its checkpoint, so every later stage renders alike.

A pretrained (base) model usually has no chat template, or one without trl's `{% generation %}` markers
that assistant-only loss needs. `choose_chat_template` gives the tokenizer a trainable one (the model's
own, trl's patched version of it, ChatML, or the user's file), makes EOS the token that ends the
assistant's turn (generation stops there and the reward is read there), gives it a pad token distinct
from EOS, and grows the embeddings for the tokens it had to add.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template

from common.errors import PipelineError
from common.modeling import ensure_distinct_pad

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def chatml_template(default_system: str = "") -> str:
    """ChatML with `{% generation %}` around each assistant reply and its `<|im_end|>`, so assistant-only
    loss trains the model to stop; `default_system` is rendered when the chat starts without a system turn."""
    system = ("{%- if loop.first and messages[0]['role'] != 'system' -%}"
              f"{{{{ '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}"
              "{%- endif -%}") if default_system else ""
    return (
        "{%- for message in messages -%}" + system +
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


@dataclass
class ChatSetup:
    """What `choose_chat_template` did, for the log and the SFT manifest."""
    template: str          # "model's own", "model's own (trl adds generation markers)", "chatml", or a file
    eos_token: str
    pad_token: str
    added_tokens: list[str]


def template_text(tokenizer: PreTrainedTokenizerBase, choice: str, source: str) -> tuple[str, str]:
    """(template, how it was chosen) for `choice`: auto, chatml, or a Jinja file with generation markers."""
    if choice == "chatml":
        return chatml_template(), "chatml"
    if choice != "auto":
        path = Path(choice)
        if not path.is_file():
            raise PipelineError(f"chat_template: {choice} is neither auto, chatml nor a template file")
        text = path.read_text()
        if not GENERATION_MARKER.search(text):
            raise PipelineError(f"{choice}: the template has no {{% generation %}} ... {{% endgeneration %}} "
                                "around the assistant's reply, which assistant-only loss needs; add them or pass "
                                "--chat_template chatml")
        return text, str(path)
    own = tokenizer.chat_template
    if isinstance(own, str) and GENERATION_MARKER.search(own):
        return own, "model's own"
    if isinstance(own, str):
        try:
            get_training_chat_template(tokenizer)
            return own, "model's own (trl adds generation markers)"
        except ValueError:
            return chatml_template(), f"chatml (the template of {source} has no generation markers trl can add)"
    return chatml_template(), f"chatml ({source} has no chat template)"


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase, source: str) -> str:
    """The token the template writes right after an assistant reply: it must be EOS, so replies stop there."""
    reply = "Reply text."
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi."},
                                              {"role": "assistant", "content": reply}], tokenize=False)
    after = rendered.split(reply, 1)[1] if reply in rendered else ""
    specials = sorted({tokenizer.eos_token or "", *tokenizer.get_added_vocab()}, key=len, reverse=True)
    token = next((t for t in specials if t and after.startswith(t)), None)
    if token is None:
        raise PipelineError(f"the chat template of {source} ends an assistant reply with {after[:20]!r}, not with a "
                            "special token, so generation could not stop there; pass --chat_template chatml")
    return token


def choose_chat_template(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, choice: str,
                         source: str) -> ChatSetup:
    """Give `tokenizer` a trainable chat template, EOS at the end of the assistant's turn and a distinct pad;
    tokens it lacks are added and `model`'s embeddings grow to match (new rows start at the mean)."""
    template, how = template_text(tokenizer, choice, source)
    vocab = tokenizer.get_vocab()
    added = [t for t in CHATML_TOKENS if t in template and t not in vocab]
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added})
    tokenizer.chat_template = template
    tokenizer.eos_token = end_of_turn_token(tokenizer, source)
    size = len(tokenizer)
    ensure_distinct_pad(tokenizer, source, add_missing=True)
    added += [tokenizer.pad_token] if len(tokenizer) > size else []
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return ChatSetup(template=how, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, added_tokens=added)
