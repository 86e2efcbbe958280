"""Protocol v3: every message the trainer and the rollout workers exchange.

This module owns the schema and its limits. Each top-level message is a pydantic model with a
`type` discriminator; `Message` is their tagged union and `MESSAGE_ADAPTER` validates untrusted
input against it. Validation is strict (no "1" -> 1 coercion, no NaN or inf, no unknown fields)
and every string and list is bounded, because workers are untrusted. Bytes on the wire are
framing.py's business; sockets are transport.py's.

Conversation (worker W, trainer T):
    W Hello -> T RunSpec (+ a WeightUpdate keyframe when T's weights differ from the base model)
    W WorkRequest -> T Lease | NoWork
    W Submission -> T Accept | Reject
    T WeightUpdate after each optimizer step; Heartbeat both ways; Bye from either side.
"""

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

# 2: Submission lost worker_rewards and Accept accepted_groups (nobody read them).
# 3: multi-turn episodes: RunSpec.environment, Completion.turn_lengths and replies.
PROTOCOL_VERSION = 3

MAX_PROMPTS_PER_LEASE = 256
MAX_GENERATIONS = 64
MAX_TOKENS_PER_SEQUENCE = 32768
MAX_TEXT_CHARS = 200_000
MAX_NAME_CHARS = 128
MAX_REASON_CHARS = 2000
MAX_ID_CHARS = 128
MAX_MODEL_CHARS = 1024  # a Hub id or a local path
MAX_STOP_STRINGS = 16
MAX_TOOLS = 64
MAX_TURNS = 32  # model turns per episode (config.EnvironmentConfig.max_turns has the same cap)
MAX_REPLY_MESSAGES = 16  # environment messages in one reply (a turn's tool results)
# Logprobs are <= 0; engines round, so allow a hair above zero.
LOGPROB_EPSILON = 1e-4

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Reason = Annotated[str, Field(max_length=MAX_REASON_CHARS)]
# Text a worker sends that reaches a log line, the ledger or a terminal: no control
# characters (a newline could forge a log line, an escape sequence could rewrite a terminal).
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*$"
Label = Annotated[str, Field(max_length=MAX_NAME_CHARS, pattern=PRINTABLE)]
Remark = Annotated[str, Field(max_length=MAX_REASON_CHARS, pattern=PRINTABLE)]
Version = Annotated[int, Field(ge=0)]
WeightsVersion = Annotated[int, Field(ge=-1)]  # -1: holds no trainer weights
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Logprob = Annotated[float, Field(le=LOGPROB_EPSILON)]
Seconds = Annotated[float, Field(ge=0)]
NumGenerations = Annotated[int, Field(ge=1, le=MAX_GENERATIONS)]


class _Model(BaseModel):
    # strict: reject type coercion; allow_inf_nan=False: every float on the wire is finite.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Hello(_Model):
    """Worker -> trainer, first message on connect."""

    type: Literal["hello"] = "hello"
    protocol_version: int = PROTOCOL_VERSION
    worker_name: Label
    backend: Label
    software_version: Label  # the worker's swarmrl version, for the ledger
    max_prompts_per_lease: int = Field(ge=1)
    weights_version: WeightsVersion = -1


class SamplingParams(_Model):
    """How workers sample; logprobs must be the processed ones (after temperature)."""

    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    top_k: int = Field(ge=0)  # 0 = off
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_PER_SEQUENCE)
    stop: list[Name] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    logprobs_mode: Literal["processed"] = "processed"


class EnvironmentSpec(_Model):
    """The run's environment (config.EnvironmentConfig): a worker builds it by name."""

    name: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)  # a name or an import path
    tools: list[Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS)]] = Field(
        max_length=MAX_TOOLS
    )
    max_turns: int = Field(ge=1, le=MAX_TURNS)
    max_tool_output_chars: int = Field(ge=1, le=MAX_TEXT_CHARS)
    tool_timeout_s: float = Field(gt=0, le=300)


class RunSpec(_Model):
    """Trainer -> worker answer to Hello: what to run and the worker's trainer-assigned id."""

    type: Literal["run_spec"] = "run_spec"
    protocol_version: int = PROTOCOL_VERSION
    run_id: Id
    worker_id: Id
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    dtype: Name
    sampling: SamplingParams
    num_generations: NumGenerations
    heartbeat_interval_s: float = Field(gt=0)
    heartbeat_timeout_s: float = Field(gt=0)
    weights_version: WeightsVersion
    # LoRA: the published weights are adapters; a worker merges W + adapter_scale * B @ A.
    adapter_scale: float | None = Field(default=None, gt=0)
    # Multi-turn runs: completions are episodes, the environment's replies between model turns.
    environment: EnvironmentSpec | None = None


class WorkRequest(_Model):
    """Worker -> trainer: lease me up to max_prompts prompts; I hold weights_version."""

    type: Literal["work_request"] = "work_request"
    max_prompts: int = Field(ge=1)
    weights_version: WeightsVersion


class LeasePrompt(_Model):
    prompt_id: Id
    token_ids: list[TokenId] = Field(min_length=1, max_length=MAX_TOKENS_PER_SEQUENCE)
    seed: int = Field(ge=0, lt=2**64)


class Lease(_Model):
    """Trainer -> worker: sample num_generations completions per prompt within deadline_s (a
    worker that cannot submit in time drops the lease: the trainer has leased it again)."""

    type: Literal["lease"] = "lease"
    lease_id: Id
    policy_version: Version
    num_generations: NumGenerations
    prompts: list[LeasePrompt] = Field(min_length=1, max_length=MAX_PROMPTS_PER_LEASE)
    deadline_s: float = Field(gt=0)  # relative to receipt: immune to clock skew


class NoWork(_Model):
    type: Literal["no_work"] = "no_work"
    reason: Reason
    retry_after_s: Seconds


class ReplyMessage(_Model):
    """One message of an environment's reply (a tool result), as the worker says."""

    role: Name
    content: str = Field(max_length=MAX_TEXT_CHARS)


class Completion(_Model):
    """One sample. In a multi-turn run, an episode: `token_ids` holds the model's turns and the
    environment's replies in between (`turn_lengths`: model, environment, model, ...; the
    environment's tokens carry log-prob 0), and `replies` the messages each reply rendered."""

    token_ids: list[TokenId] = Field(max_length=MAX_TOKENS_PER_SEQUENCE)
    logprobs: list[Logprob] = Field(max_length=MAX_TOKENS_PER_SEQUENCE)
    text: str = Field(max_length=MAX_TEXT_CHARS)
    finish_reason: Literal["stop", "length"]
    turn_lengths: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, max_length=2 * MAX_TURNS - 1
    )
    replies: list[list[ReplyMessage]] = Field(default_factory=list, max_length=MAX_TURNS - 1)

    @model_validator(mode="after")
    def _consistent(self) -> "Completion":
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} token ids")
        if not self.turn_lengths:
            if self.replies:
                raise ValueError("replies without turn_lengths")
            return self
        if sum(self.turn_lengths) != len(self.token_ids):
            raise ValueError(
                f"turn_lengths add up to {sum(self.turn_lengths)}, not {len(self.token_ids)} tokens"
            )
        if len(self.turn_lengths) % 2 == 0:
            raise ValueError("an episode starts and ends with a model turn: odd turn_lengths")
        if len(self.replies) != len(self.turn_lengths) // 2:
            raise ValueError(
                f"{len(self.replies)} replies for {len(self.turn_lengths) // 2} environment turns"
            )
        if any(not 1 <= len(reply) <= MAX_REPLY_MESSAGES for reply in self.replies):
            raise ValueError(f"a reply holds 1..{MAX_REPLY_MESSAGES} messages")
        return self


class GroupResult(_Model):
    prompt_id: Id
    completions: list[Completion] = Field(min_length=1, max_length=MAX_GENERATIONS)


class Submission(_Model):
    """Worker -> trainer: the completions for one lease, sampled with policy_version."""

    type: Literal["submission"] = "submission"
    lease_id: Id
    policy_version: Version
    groups: list[GroupResult] = Field(min_length=1, max_length=MAX_PROMPTS_PER_LEASE)
    generation_seconds: Seconds  # how long the engine took; the ledger keeps it


class Accept(_Model):
    type: Literal["accept"] = "accept"
    lease_id: Id


class Reject(_Model):
    """reason is a short code ("lease_expired", "stale_version", "malformed", "unknown_lease",
    "not_your_lease", or a framing.ProtocolError reason); detail is for humans."""

    type: Literal["reject"] = "reject"
    lease_id: Id | None
    reason: Name
    detail: Reason = ""


class WeightUpdate(_Model):
    """Trainer -> worker. The payload is the single blob frame after this one, num_bytes long.
    base_version -1: a keyframe (full weights); otherwise apply it on top of base_version."""

    type: Literal["weight_update"] = "weight_update"
    version: Version
    codec: Name
    fingerprint: Name
    num_bytes: int = Field(ge=0)
    base_version: WeightsVersion = -1


class Heartbeat(_Model):
    type: Literal["heartbeat"] = "heartbeat"
    sent_at: float  # sender's wall clock, for logs only
    weights_version: WeightsVersion = -1


class Bye(_Model):
    type: Literal["bye"] = "bye"
    reason: Remark


Message = Annotated[
    Hello
    | RunSpec
    | WorkRequest
    | Lease
    | NoWork
    | Submission
    | Accept
    | Reject
    | WeightUpdate
    | Heartbeat
    | Bye,
    Field(discriminator="type"),
]
MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
# The "type" tags, in union order: ("hello", "run_spec", ...).
MESSAGE_TYPES: tuple[str, ...] = tuple(
    cls.model_fields["type"].default for cls in get_args(get_args(Message)[0])
)
