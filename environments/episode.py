"""The multi-turn rollout loop: the model's turns alternate with the environment's replies.

Every episode of a batch takes a turn at once (one `generate` call over the growing token
prompts; vLLM's prefix cache makes the repeat cheap). A model turn that ends with the end-of-turn
token is answered by the environment; its reply is rendered by the chat template (chat.py) and
appended as tokens the model did not sample (log-prob 0, outside the loss). An episode ends
when the environment says so, at `max_turns` model turns, when the model stops without its
end-of-turn token, or when the next reply would not leave room for one more model token within
`max_tokens`, the limit of the whole episode after the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from swarmrl.base.generation import Sample
from swarmrl.environments.chat import reply_token_ids
from swarmrl.environments.interface import ChatMessage, Environment

# (token-id prompts, max new tokens) -> one Sample per prompt
Generate = Callable[[list[list[int]], int], list[Sample]]


@dataclass
class Episode:
    prompt: list[int]
    token_ids: list[int] = field(default_factory=list)  # everything after the prompt
    logprobs: list[float] = field(default_factory=list)  # 0.0 for the environment's tokens
    turn_lengths: list[int] = field(default_factory=list)  # model, environment, model, ...
    replies: list[list[ChatMessage]] = field(default_factory=list)
    conversation: list[ChatMessage] = field(default_factory=list)  # after the prompt
    finish_reason: Literal["stop", "length"] = "stop"
    done: bool = False

    def add_model_turn(
        self, sample: Sample, max_tokens: int, tokenizer: Any, end_ids: set[int]
    ) -> None:
        room = max_tokens - len(self.token_ids)
        ids, logprobs = sample.token_ids[:room], sample.logprobs[:room]
        self.token_ids += ids
        self.logprobs += logprobs
        self.turn_lengths.append(len(ids))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        self.conversation.append({"role": "assistant", "content": text})
        ended = bool(ids) and ids[-1] in end_ids
        self.finish_reason = "stop" if ended else "length"
        self.done = not ended or len(self.token_ids) >= max_tokens

    @property
    def model_turns(self) -> int:
        return (len(self.turn_lengths) + 1) // 2

    def add_reply(self, reply: list[ChatMessage], ids: list[int]) -> None:
        self.token_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.turn_lengths.append(len(ids))
        self.replies.append(reply)
        self.conversation += reply


def next_reply(
    environment: Environment, tokenizer: Any, episode: Episode, max_tokens: int
) -> tuple[list[ChatMessage], list[int]] | None:
    """The environment's reply to the episode's last model turn, with its tokens, or None when
    the episode ends there: the turn ended it (no end-of-turn token, or the token limit), it
    was the last turn allowed, the environment is done, or the reply would leave no room for
    one more model token. Workers build episodes with it, the trainer verifies them with it."""
    if episode.done or episode.model_turns >= environment.config.max_turns:
        return None
    reply = environment.respond(episode.conversation)
    if reply is None:
        return None
    ids = reply_token_ids(tokenizer, reply)
    if len(episode.token_ids) + len(ids) >= max_tokens:
        return None
    return reply, ids


def run_episodes(
    environment: Environment,
    tokenizer: Any,
    prompts: list[list[int]],
    generate: Generate,
    max_tokens: int,
    end_ids: set[int],
) -> list[Episode]:
    """One episode per prompt (repeat a prompt for several)."""
    episodes = [Episode(list(prompt)) for prompt in prompts]
    for _ in range(environment.config.max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        budget = max(max_tokens - len(e.token_ids) for e in active)
        samples = generate([e.prompt + e.token_ids for e in active], budget)
        for episode, sample in zip(active, samples, strict=True):
            episode.add_model_turn(sample, max_tokens, tokenizer, end_ids)
            answer = next_reply(environment, tokenizer, episode, max_tokens)
            if answer is None:
                episode.done = True
            else:
                episode.add_reply(*answer)
    return episodes
