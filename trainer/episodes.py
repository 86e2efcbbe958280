"""The trainer's check of a multi-turn episode: it re-runs the environment and renders again.

A worker's episode is the model's turns with the environment's replies between them. The
trainer trusts none of the replies: it decodes each model turn itself, asks its own copy of
the environment (its own tool calls, its own sandbox, its own cache) what it answers, and
refuses the episode when
- the worker's reply messages differ from the trainer's (`tool_output_mismatch`: a forged tool
  result),
- the reply's tokens are not exactly the chat template's rendering of the trainer's reply
  (`environment_tokens_mismatch`: text injected between turns),
- the episode goes on where it had ended: after a model turn without its end-of-turn token or
  after the environment said done (`extra_turn`), past `max_turns` (`too_many_turns`),
- or the episode stops where it had to go on (`episode_cut_short`: a reply was due and fit).
What passes is the conversation the rewards score; the environment's tokens are kept out of
the loss and out of the log-prob check (`model_token_mask`).
"""

from __future__ import annotations

import time
from typing import Any

from swarmrl.base.generation import Sample
from swarmrl.environments import ChatMessage, Environment
from swarmrl.environments.episode import Episode, next_reply
from swarmrl.protocol.messages import Completion
from swarmrl.protocol.refusals import Refused


class EpisodeChecker:
    """Verifies episodes against the trainer's own environment; `seconds` is the time spent."""

    def __init__(self, environment: Environment, tokenizer: Any, max_tokens: int) -> None:
        if not environment.deterministic():
            raise ValueError(
                f"environment {environment.name!r} is not deterministic (a tool marked "
                "@tool(deterministic=False)): the trainer cannot verify what untrusted workers "
                "say it answered, so this run refuses it"
            )
        self.environment = environment
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.end_ids = {tokenizer.eos_token_id}
        self.seconds = 0.0

    def check(self, completion: Completion) -> list[ChatMessage]:
        """The verified conversation after the prompt, or Refused with the reason."""
        started = time.perf_counter()
        try:
            return self._check(completion)
        finally:
            self.seconds += time.perf_counter() - started

    def _check(self, completion: Completion) -> list[ChatMessage]:
        """Replay the episode through the workers' own loop (environments/episode.py), the
        model's turns from the submission, the replies from the trainer's environment."""
        lengths = completion.turn_lengths or [len(completion.token_ids)]
        max_turns = self.environment.config.max_turns
        model_turns = (len(lengths) + 1) // 2
        if model_turns > max_turns:
            raise Refused(
                "too_many_turns", f"{model_turns} model turns (environment.max_turns {max_turns})"
            )
        ids, logprobs = completion.token_ids, completion.logprobs
        episode, position = Episode(prompt=[]), 0
        for turn in range(model_turns):
            end = position + lengths[2 * turn]
            sample = Sample(ids[position:end], logprobs[position:end], "stop", "")
            episode.add_model_turn(sample, self.max_tokens, self.tokenizer, self.end_ids)
            position = end
            answer = next_reply(self.environment, self.tokenizer, episode, self.max_tokens)
            last = turn + 1 == model_turns
            if answer is None:
                if not last:
                    raise Refused(
                        "extra_turn",
                        f"the episode ends after model turn {turn + 1} (the turn did not end, "
                        "was the last allowed, the environment is done or its reply does not "
                        "fit), but the submission goes on",
                    )
                break
            if last:
                raise Refused(
                    "episode_cut_short",
                    f"the environment answers model turn {turn + 1} and its reply fits in "
                    f"{self.max_tokens} tokens, but the episode stops",
                )
            reply, expected = answer
            self._check_reply(completion, turn, reply, expected, ids[position:], lengths)
            episode.add_reply(reply, expected)
            position += len(expected)
        return episode.conversation

    @staticmethod
    def _check_reply(
        completion: Completion,
        turn: int,
        reply: list[ChatMessage],
        expected: list[int],
        rest: list[int],
        lengths: list[int],
    ) -> None:
        claimed = [{"role": r.role, "content": r.content} for r in completion.replies[turn]]
        mine = [{"role": r["role"], "content": r["content"]} for r in reply]
        if claimed != mine:
            raise Refused(
                "tool_output_mismatch",
                f"after model turn {turn + 1} the worker says the environment answered "
                f"{_short(claimed)}; it answers {_short(mine)}",
            )
        got = rest[: lengths[2 * turn + 1]]
        if got != expected:
            raise Refused(
                "environment_tokens_mismatch",
                f"after model turn {turn + 1}: {len(got)} environment tokens that are not the "
                f"chat template's {len(expected)} for the environment's reply",
            )


def model_token_mask(completion_length: int, turn_lengths: list[int]) -> list[float]:
    """1.0 for each token the model sampled, 0.0 for the environment's (odd turns)."""
    if not turn_lengths:
        return [1.0] * completion_length
    return [1.0 - turn % 2 for turn, length in enumerate(turn_lengths) for _ in range(length)]


def _short(messages: list[ChatMessage]) -> str:
    text = repr([m["content"] for m in messages])
    return text if len(text) <= 80 else text[:77] + "..."
