"""From a worker's submission to scored groups: check it, refuse repeats, score it.

Runs on the server's network thread. A submission for a lease the worker held is checked
(verify.check_submission), compared with everything accepted before (verify.ReplayGuard) and
scored by the trainer's reward functions on the trainer's own decoding of the token ids; the
rewards a worker reports are never read. The prompts (text and token ids) the trainer leases
are cached here until their group is accepted.
"""

from __future__ import annotations

from typing import Any

from swarmrl.base.config import Config
from swarmrl.protocol.messages import Submission
from swarmrl.rewards import score_completions
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.checks import ReplayGuard, check_submission
from swarmrl.trainer.data import prompt_text, prompt_token_ids
from swarmrl.trainer.leases import OpenLease


class Intake:
    def __init__(
        self,
        config: Config,
        tokenizer: Any,
        tasks: Any,
        reward_functions: list[tuple[str, Any, float]],
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.tasks = tasks
        self.reward_functions = reward_functions
        self.replays = ReplayGuard()
        self.reward_log: list[float] = []  # every scored sample's reward since the last take
        self._prompts: dict[int, tuple[str, list[int]]] = {}

    def prompt(self, index: int) -> tuple[str, list[int]]:
        """Prompt `index` of the stream as (text, token ids)."""
        cached = self._prompts.get(index)
        if cached is None:
            text = prompt_text(self.config.data, self.tokenizer, self.tasks.train(index).question)
            cached = (text, prompt_token_ids(self.config.data, self.tokenizer, text))
            self._prompts[index] = cached
        return cached

    def admit(
        self, submission: Submission, lease: OpenLease, current_version: int, worker_id: str
    ) -> list[ScoredGroup]:
        """The submission's groups, scored; raises Refused with the reject reason."""
        texts = check_submission(submission, lease, self.config, current_version, self.tokenizer)
        self.replays.check(submission, lease.prompt_indices)
        groups = self._score(lease, submission, texts, worker_id)
        self.replays.remember(submission, lease.prompt_indices)
        for index in lease.prompt_indices:
            self._prompts.pop(index, None)
        return groups

    def take_rewards(self) -> list[float]:
        rewards, self.reward_log = self.reward_log, []
        return rewards

    def _score(
        self, lease: OpenLease, sub: Submission, texts: list[list[str]], worker_id: str
    ) -> list[ScoredGroup]:
        prompts, completions, columns = [], [], {"answer": []}
        for index, group_texts in zip(lease.prompt_indices, texts, strict=True):
            task = self.tasks.train(index)
            for text in group_texts:
                prompts.append(self.prompt(index)[0])
                completions.append(text)
                columns["answer"].append(task.answer)
                for key, value in task.columns.items():
                    columns.setdefault(key, []).append(value)
        columns["completion_ids"] = [c.token_ids for g in sub.groups for c in g.completions]
        scores = score_completions(self.reward_functions, prompts, completions, columns)
        self.reward_log.extend(scores.total)
        size = self.config.sampling.num_generations
        return [
            ScoredGroup(
                prompt_index=index,
                prompt_token_ids=self.prompt(index)[1],
                completion_token_ids=[c.token_ids for c in group.completions],
                behavior_logprobs=[c.logprobs for c in group.completions],
                rewards=scores.total[k * size : (k + 1) * size],
                worker_id=worker_id,
                policy_version=sub.policy_version,
            )
            for k, (index, group) in enumerate(zip(lease.prompt_indices, sub.groups, strict=True))
        ]
