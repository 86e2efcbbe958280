"""How an environment's reply becomes tokens: the chat template's rendering of its messages.

The model's turn ends with the end-of-turn token it sampled; what the chat template writes
after that token, for the reply's messages and the next assistant header, is the environment's
part of the episode. It is rendered after a fixed one-turn conversation and cut just after the
end-of-turn token, so it does not depend on the history (true of ChatML-family templates:
SmolLM, Qwen, Hermes). Worker and trainer both call `reply_token_ids`; the trainer compares.
"""

from __future__ import annotations

import functools
from typing import Any

from swarmrl.environments.interface import ChatMessage

_ANCHOR = [{"role": "user", "content": "-"}, {"role": "assistant", "content": "-"}]


@functools.cache
def _anchor_end(tokenizer: Any) -> str:
    """The fixed conversation's rendering up to and including its end-of-turn token (the same
    for every reply, so worked out once per tokenizer)."""
    end = tokenizer.eos_token
    before = tokenizer.apply_chat_template(_ANCHOR, tokenize=False)
    cut = before.rfind(end)
    if cut < 0:
        raise ValueError(
            f"the chat template does not end an assistant turn with {end!r}: environments need "
            "a template that renders each message after the previous one (ChatML and kin)"
        )
    return before[: cut + len(end)]


def reply_text(tokenizer: Any, reply: list[ChatMessage]) -> str:
    """The text after the model's end-of-turn token: the reply, then the assistant header."""
    anchor = _anchor_end(tokenizer)
    after = tokenizer.apply_chat_template(
        _ANCHOR + reply, tokenize=False, add_generation_prompt=True
    )
    if not after.startswith(anchor):
        raise ValueError(
            "the chat template renders a conversation differently once a reply follows it: "
            "environments need a template that renders each message after the previous one "
            "(ChatML and kin)"
        )
    return after[len(anchor) :]


def reply_token_ids(tokenizer: Any, reply: list[ChatMessage]) -> list[int]:
    return tokenizer.encode(reply_text(tokenizer, reply), add_special_tokens=False)
