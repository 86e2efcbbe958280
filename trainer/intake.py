"""From a worker's submission to scored groups in the buffer: check, refuse repeats, score,
credit.

Runs on the server's network thread. `settle` closes the lease the worker held, `admit`s the
submission (checks.check_submission, the ReplayGuard against everything accepted before, and
scoring with the trainer's reward functions on the trainer's own decoding of the token ids;
in a multi-turn run, on the conversation episodes.py rebuilt by re-running the environment),
buffers the groups with a reward spread, credits the worker in the ledger and records the
verdict in the contribution chain. From a worker not yet proven honest, groups without a
spread earn no credit and their prompts are leased again later (LeaseBook.defer); the last
few are kept, and credited if a log-prob check passes them while the trainer waits. The prompts
(text and token ids) the trainer leases are cached here until their group is done.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from swarmrl.base.config import Config
from swarmrl.environments import make_environment
from swarmrl.protocol.messages import Submission
from swarmrl.rewards import score_completions
from swarmrl.trainer.buffer import GroupBuffer, ScoredGroup
from swarmrl.trainer.checks import ReplayGuard, check_submission
from swarmrl.trainer.contributions import ContributionLedger
from swarmrl.trainer.data import prompt_text, prompt_token_ids
from swarmrl.trainer.episodes import EpisodeChecker
from swarmrl.trainer.grpo import overlong_penalty
from swarmrl.trainer.leases import LeaseBook, OpenLease, prompt_id
from swarmrl.trainer.ledger import Ledger, WorkerRecord

log = logging.getLogger("trainer")

UNCHECKED_GROUPS = 16  # new workers' groups without a spread kept for a check (`credit`)


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
        self.end_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.environment = None
        self.episodes: EpisodeChecker | None = None  # a multi-turn run's verifier
        if config.environment is not None:
            self.environment = make_environment(config.environment)
            limit = config.sampling.max_completion_length
            self.episodes = EpisodeChecker(self.environment, tokenizer, limit)
        self.reward_log: list[float] = []  # every scored sample's reward since the last take
        self.groups_scored = self.groups_without_spread = 0  # since the last take
        self._prompts: dict[int, tuple[str, list[int]]] = {}
        self.leases: LeaseBook | None = None  # where settled groups go (connect)
        self.buffer: GroupBuffer | None = None
        self.ledger: Ledger | None = None
        self.contributions: ContributionLedger | None = None
        # New workers' groups without a spread, not credited unless checked while idle.
        self.unchecked: deque[ScoredGroup] = deque(maxlen=UNCHECKED_GROUPS)

    def connect(
        self,
        leases: LeaseBook,
        buffer: GroupBuffer,
        ledger: Ledger,
        contributions: ContributionLedger | None,
    ) -> None:
        """The server's lease book, buffer and ledgers, for `settle`."""
        self.leases, self.buffer, self.ledger = leases, buffer, ledger
        self.contributions = contributions

    def settle(
        self, sub: Submission, worker: WorkerRecord, current_version: int, now: float
    ) -> None:
        """Take an accepted submission all the way, or raise Refused (its prompts requeued)."""
        assert self.leases is not None and self.buffer is not None and self.ledger is not None
        self.replays.check_lease(sub.lease_id)
        lease = self.leases.close(sub.lease_id, worker.worker_id, now)
        try:
            groups = self.admit(sub, lease, current_version, worker.worker_id, worker.proven)
        except BaseException:
            self.leases.requeue(lease.prompt_indices)  # the lease is closed: keep its prompts
            raise
        useful = [group for group in groups if group.has_signal()]
        idle = [group for group in groups if not group.has_signal()]
        self.groups_scored += len(groups)
        self.groups_without_spread += len(idle)
        for group in useful:
            self.buffer.put(group)
        credited, unscored = groups, 0
        if not worker.proven:  # groups without a spread prove nothing: no credit, no burn
            self.leases.defer([group.prompt_index for group in idle])
            credited, unscored = useful, sum(len(group.rewards) for group in idle)
            self.unchecked.extend(idle)  # credited if a log-prob check passes them (`credit`)
        samples = sum(len(group.rewards) for group in credited)
        self.ledger.accept(worker, samples, sub.generation_seconds, unscored)
        if self.contributions is not None:
            self.contributions.record(
                "accepted",
                worker.worker_id,
                key=worker.key,
                lease=sub.lease_id,
                prompts=[prompt_id(g.prompt_index) for g in credited],
                version=sub.policy_version,
                samples=samples,
                reward_sum=sum(sum(g.rewards) for g in credited),
            )
        prompts = ",".join(g.prompt_id for g in sub.groups)
        without = ",".join(prompt_id(g.prompt_index) for g in idle) or "-"
        log.debug(
            "lease %s (%s) accepted from %s: %d samples, %d/%d groups with reward "
            "spread (without: %s, %s)",
            sub.lease_id,
            prompts,
            worker.worker_id,
            samples + unscored,
            len(useful),
            len(groups),
            without,
            "again" if unscored else "done",
        )

    def take_unchecked(self) -> list[ScoredGroup]:
        """The kept groups without a spread of workers still unproven (and still recorded)."""
        assert self.ledger is not None
        records = self.ledger.records
        groups = [g for g in self.unchecked if g.worker_id in records]
        self.unchecked.clear()
        return [g for g in groups if not records[g.worker_id].proven]

    def credit(self, passed: list[ScoredGroup]) -> None:
        """Credit the groups without a spread that a log-prob check `passed`: they were honest
        work, held back only for want of proof."""
        assert self.ledger is not None
        for group in passed:
            record = self.ledger.records.get(group.worker_id)
            if record is None:
                continue
            samples = len(group.rewards)
            record.unscored -= samples
            self.ledger.accept(record, samples)
            if self.contributions is not None:
                self.contributions.record(
                    "accepted",
                    group.worker_id,
                    key=record.key,
                    lease=None,
                    prompts=[prompt_id(group.prompt_index)],
                    version=group.policy_version,
                    samples=samples,
                    reward_sum=sum(group.rewards),
                    checked_later=True,
                )

    def prompt(self, index: int) -> tuple[str, list[int]]:
        """Prompt `index` of the stream as (text, token ids)."""
        cached = self._prompts.get(index)
        if cached is None:
            question = self.tasks.train(index).question
            text = prompt_text(self.config.data, self.tokenizer, question, self.environment)
            cached = (text, prompt_token_ids(self.config.data, self.tokenizer, text))
            self._prompts[index] = cached
        return cached

    def admit(
        self,
        submission: Submission,
        lease: OpenLease,
        current_version: int,
        worker_id: str,
        keep_idle: bool = True,
    ) -> list[ScoredGroup]:
        """The submission's groups, scored; raises Refused with the reject reason. Without
        `keep_idle`, groups without a reward spread are not kept as done: their prompts will
        be leased again, so their completions are not remembered as accepted either."""
        texts: list[list[Any]]
        texts = check_submission(submission, lease, self.config, current_version, self.tokenizer)
        if self.episodes is not None:  # the rewards score the verified conversations
            texts = [[self.episodes.check(c) for c in g.completions] for g in submission.groups]
        self.replays.check(submission, lease.prompt_indices)
        groups = self._score(lease, submission, texts, worker_id)
        done = [g.prompt_index for g in groups if keep_idle or g.has_signal()]
        self.replays.remember(submission, lease.prompt_indices, set(done))
        for index in done:
            self._prompts.pop(index, None)
        return groups

    def take_episode_check_seconds(self) -> float | None:
        """Seconds spent verifying episodes (re-running the environment) since the last take;
        None in a single-turn run."""
        if self.episodes is None:
            return None
        seconds, self.episodes.seconds = self.episodes.seconds, 0.0
        return seconds

    def take_rewards(self) -> list[float]:
        rewards, self.reward_log = self.reward_log, []
        self.groups_scored = self.groups_without_spread = 0
        return rewards

    def _score(
        self, lease: OpenLease, sub: Submission, texts: list[list[Any]], worker_id: str
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
        ids = [c.token_ids for g in sub.groups for c in g.completions]
        columns["completion_ids"] = ids
        scores = score_completions(self.reward_functions, prompts, completions, columns)
        trainer, limit = self.config.trainer, self.config.sampling.max_completion_length
        total = [  # DAPO's soft overlong punishment, when asked for (verl's names)
            reward
            + overlong_penalty(
                len(i), limit, trainer.overlong_buffer_len, trainer.overlong_penalty_factor
            )
            for reward, i in zip(scores.total, ids, strict=True)
        ]
        # The trainer's own judgement (not the worker's finish_reason): at the limit, no end.
        cut = [len(i) >= limit and i[-1] not in self.end_ids for i in ids]
        self.reward_log.extend(total)
        size = self.config.sampling.num_generations
        return [
            ScoredGroup(
                prompt_index=index,
                prompt_token_ids=self.prompt(index)[1],
                completion_token_ids=[c.token_ids for c in group.completions],
                behavior_logprobs=[c.logprobs for c in group.completions],
                rewards=total[k * size : (k + 1) * size],
                worker_id=worker_id,
                policy_version=sub.policy_version,
                truncated=cut[k * size : (k + 1) * size],
                turn_lengths=[c.turn_lengths for c in group.completions],
            )
            for k, (index, group) in enumerate(zip(lease.prompt_indices, sub.groups, strict=True))
        ]
