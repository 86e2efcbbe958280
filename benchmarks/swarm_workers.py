"""The simulated rollout workers of benchmarks/swarm_scale.py, run in their own process.

Every worker is an asyncio task with its own ZeroMQ DEALER (transport.make_dealer), speaking
protocol v1 through framing.encode/decode: hello, work requests, heartbeats, submissions whose
token ids decode to their text, with log-probs. Nothing is generated: a worker sleeps for a
lognormal draw around its mean lease time. Workers crash (a fresh one rejoins after 1-5 s) and
blip (reconnect with the same identity). `simulate(spec)` runs this file as a script on a
spec written by swarm_scale.py and returns what the workers counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from swarmrl.base.config import DataConfig
from swarmrl.base.models import load_tokenizer
from swarmrl.protocol import messages as m
from swarmrl.protocol.framing import decode, encode
from swarmrl.protocol.transport import make_dealer
from swarmrl.trainer.data import load_tasks

# ---- the simulated workers (a second process) ------------------------------------------


def simulation_spec(
    args: argparse.Namespace, config: Any, endpoint: str, model_path: str
) -> dict[str, Any]:
    fastest, spread, n = args.fastest_s, args.spread, args.workers
    return {
        "endpoint": endpoint,
        "model_path": model_path,
        "data": config.data.model_dump(mode="json"),
        "mean_lease_s": [fastest * spread ** (i / max(n - 1, 1)) for i in range(n)],
        "sigma": args.sigma,
        "prompts_per_lease": args.prompts_per_lease,
        "completion_tokens": args.completion_tokens,
        "duration_s": args.duration,
        "heartbeat_s": args.heartbeat_s,
        "heartbeat_timeout_s": args.heartbeat_timeout_s,
        "crash_rate": args.crash_rate,
        "blip_rate": args.blip_rate,
        "seed": args.seed,
    }


def simulate(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        spec_path, out_path = Path(folder) / "spec.json", Path(folder) / "out.json"
        spec["out"] = str(out_path)
        spec_path.write_text(json.dumps(spec))
        subprocess.run(
            [sys.executable, __file__, str(spec_path)],
            check=True,
            timeout=spec["duration_s"] + 300,
        )
        return json.loads(out_path.read_text())


def run_simulation(spec: dict[str, Any]) -> None:
    """The worker process: every simulated worker as an asyncio task; results to spec["out"]."""
    context = zmq.asyncio.Context()
    context.set(zmq.MAX_SOCKETS, 4 * len(spec["mean_lease_s"]) + 64)
    tasks = load_tasks(DataConfig(**spec["data"]), 0)
    shared = Shared(spec, load_tokenizer(spec["model_path"]), tasks)
    workers = [SimWorker(shared, context, i, mean) for i, mean in enumerate(spec["mean_lease_s"])]
    shared.started = time.monotonic()
    shared.deadline = shared.started + spec["duration_s"]
    asyncio.run(run_all(workers, shared))
    ended = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    context.destroy(linger=0)
    Path(spec["out"]).write_text(
        json.dumps(
            {
                "workers": [w.stats for w in workers],
                "accepts": shared.accepts,
                "started": shared.started,
                "deadline": shared.deadline,
                "ended": ended,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "loop_lag": shared.loop_lag,
            }
        )
    )


async def run_all(workers: list[SimWorker], shared: Shared) -> None:
    monitor = asyncio.create_task(watch_loop(shared))
    await asyncio.gather(*(worker.run() for worker in workers))
    monitor.cancel()


async def watch_loop(shared: Shared) -> None:
    """How late the simulator's event loop wakes from a 0.1 s sleep: if it is late, measured
    latencies include the simulator's own delay."""
    while True:
        started = time.monotonic()
        await asyncio.sleep(0.1)
        shared.loop_lag.append(time.monotonic() - started - 0.1)


class Shared:
    """What every simulated worker reads: settings, the tasks, cached completion texts."""

    def __init__(self, spec: dict[str, Any], tokenizer: Any, tasks: Any) -> None:
        self.spec, self.tokenizer, self.tasks = spec, tokenizer, tasks
        self.started = self.deadline = 0.0
        self.accepts: list[tuple[float, int, int]] = []
        self.loop_lag: list[float] = []
        filler_words = max(spec["completion_tokens"] - 8, 0)
        self.filler = " ".join(["so"] * filler_words) + (" " if filler_words else "")
        self._texts: dict[int, tuple[str, list[int]]] = {}

    def completion(self, value: int) -> tuple[str, list[int]]:
        """A text ending in `value` and its token ids (which decode back to exactly it)."""
        cached = self._texts.get(value)
        if cached is None:
            text = f"{self.filler}The answer is {value}."
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            assert self.tokenizer.decode(ids, skip_special_tokens=True) == text
            cached = self._texts[value] = (text, ids)
        return cached


class Gone(Exception):
    """No answer within the heartbeat timeout: reconnect."""


class Crashed(Exception):
    """The simulated process died mid-lease."""


class SimWorker:
    """One rollout worker's conversation, as rollout/worker.py holds it, minus the engine."""

    def __init__(self, shared: Shared, context: Any, index: int, mean_lease_s: float) -> None:
        self.shared, self.spec, self.context = shared, shared.spec, context
        self.random = random.Random(shared.spec["seed"] * 100_003 + index)
        self.index, self.name, self.mean = index, f"sim{index:04d}", mean_lease_s
        self.identity = self._new_identity()
        self.socket: Any = None
        self.version = 0  # a fresh worker holds the base model, version 0
        self.stats: dict[str, Any] = {
            "mean_lease_s": mean_lease_s,
            "leases": 0,
            "accepted_samples": 0,
            "rejected": {},
            "latencies": [],
            "weight_bytes": 0,
            "keyframes": 0,
            "deltas": 0,
            "duplicates": 0,
            "gaps": 0,
            "versions_advanced": 0,
            "crashes": 0,
            "blips": 0,
            "timeouts": 0,
            "no_work": 0,
        }

    def _new_identity(self) -> bytes:
        return bytes([self.random.randrange(1, 256)]) + self.random.randbytes(15)

    async def run(self) -> None:
        await asyncio.sleep(self.random.uniform(0, 2))  # workers do not all start at once
        while time.monotonic() < self.shared.deadline:
            try:
                await self._session()
            except Gone:
                self.stats["timeouts"] += 1
            except Crashed:
                self.stats["crashes"] += 1
                self._close()
                await asyncio.sleep(self.random.uniform(1, 5))
                self.identity, self.version = self._new_identity(), 0  # a restarted process
        if self.socket is not None:
            await self._send(m.Bye(reason="benchmark over"))
            self._close()

    def _close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    async def _session(self) -> None:
        self._close()
        self.socket = make_dealer(self.context, self.spec["endpoint"], self.identity, 2**30)
        await self._send(
            m.Hello(
                worker_name=self.name,
                backend="sim",
                software_version="bench",
                max_prompts_per_lease=self.spec["prompts_per_lease"],
                weights_version=self.version,
            )
        )
        await self._await((m.RunSpec,))
        while time.monotonic() < self.shared.deadline:
            await self._send(
                m.WorkRequest(
                    max_prompts=self.spec["prompts_per_lease"], weights_version=self.version
                )
            )
            message, blobs = await self._await((m.WeightUpdate, m.Lease, m.NoWork))
            while isinstance(message, m.WeightUpdate) and not self._apply(message, blobs):
                message, blobs = await self._await((m.WeightUpdate, m.Lease, m.NoWork))
            if isinstance(message, m.Lease):
                await self._work(message)
                if self.random.random() < self.spec["blip_rate"]:
                    self.stats["blips"] += 1
                    return  # reconnect with the same identity and weights
            elif isinstance(message, m.NoWork):
                self.stats["no_work"] += 1
                await self._sleep_beating(message.retry_after_s)

    def _apply(self, update: Any, blobs: list) -> bool:
        """Take a weight update as the real worker does; False for a duplicate (ignored)."""
        self.stats["weight_bytes"] += update.num_bytes
        if update.version <= self.version:
            self.stats["duplicates"] += 1
            return False
        if update.base_version == -1:
            self.stats["keyframes"] += 1
        elif update.base_version == self.version:
            self.stats["deltas"] += 1
        else:  # a hole in the chain: the real worker drops to version -1 and asks for a keyframe
            self.stats["gaps"] += 1
            self.version = -1
            return True
        self.stats["versions_advanced"] += update.version - max(self.version, 0)
        self.version = update.version
        return True

    async def _work(self, lease: Any) -> None:
        seconds = self.mean * self.random.lognormvariate(
            -(self.spec["sigma"] ** 2) / 2, self.spec["sigma"]
        )
        if self.random.random() < self.spec["crash_rate"]:
            await self._sleep_beating(seconds * self.random.random())
            raise Crashed
        await self._sleep_beating(seconds)
        if time.monotonic() >= self.shared.deadline:
            return
        groups = [self._group(prompt.prompt_id, lease.num_generations) for prompt in lease.prompts]
        submission = m.Submission.model_construct(
            type="submission",
            lease_id=lease.lease_id,
            policy_version=self.version,
            groups=groups,
            generation_seconds=seconds,
        )
        sent = time.monotonic()
        await self._send(submission)
        reply, _ = await self._await((m.Accept, m.Reject), lease_id=lease.lease_id)
        self.stats["latencies"].append(time.monotonic() - sent)
        self.stats["leases"] += 1
        if isinstance(reply, m.Accept):
            samples = len(lease.prompts) * lease.num_generations
            self.stats["accepted_samples"] += samples
            self.shared.accepts.append((time.monotonic(), samples, self.index))
        else:
            self.stats["rejected"][reply.reason] = self.stats["rejected"].get(reply.reason, 0) + 1

    def _group(self, prompt_id: str, size: int) -> Any:
        """`size` completions, each right (reward 1) or wrong with even odds."""
        answer = int(self.shared.tasks.train(int(prompt_id[1:])).answer)
        completions = []
        for _ in range(size):
            value = answer if self.random.random() < 0.5 else answer + self.random.randint(1, 9)
            text, ids = self.shared.completion(value)
            # Distinct log-probs per sample: a re-leased prompt's honest answer is no replay.
            logprobs = [-self.random.random()] + [-0.1] * (len(ids) - 1)
            completions.append(
                m.Completion.model_construct(
                    token_ids=ids, logprobs=logprobs, text=text, finish_reason="stop"
                )
            )
        return m.GroupResult.model_construct(prompt_id=prompt_id, completions=completions)

    async def _send(self, message: Any) -> None:
        await self.socket.send_multipart(encode(message), copy=False)

    async def _sleep_beating(self, seconds: float) -> None:
        """Sleep, heartbeating every interval as a generating worker does."""
        end = min(time.monotonic() + seconds, self.shared.deadline)
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.spec["heartbeat_s"]))
            await self._send(m.Heartbeat(sent_at=time.time(), weights_version=self.version))

    async def _await(self, kinds: tuple[type, ...], lease_id: str | None = None) -> tuple:
        """The next message of `kinds` (for `lease_id`); heartbeats and strays are skipped."""
        deadline = time.monotonic() + self.spec["heartbeat_timeout_s"]
        while (left := deadline - time.monotonic()) > 0:
            if not await self.socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            message, blobs = decode(await self.socket.recv_multipart(copy=False))
            if isinstance(message, m.Reject) and message.lease_id is None:
                raise Gone
            ours = lease_id is None or getattr(message, "lease_id", None) == lease_id
            if isinstance(message, kinds) and ours:
                return message, blobs
            if isinstance(message, m.WeightUpdate):  # a chain's tail while waiting for a verdict
                self.stats["weight_bytes"] += message.num_bytes
                self.stats["duplicates"] += 1
        raise Gone


if __name__ == "__main__":
    run_simulation(json.loads(Path(sys.argv[1]).read_text()))
