"""Environments: tool-call parsing, tools answering (errors included), the chat template's
rendering of a reply, and the multi-turn episode loop, on the real tiny model's tokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from swarmrl.base.config import EnvironmentConfig
from swarmrl.base.generation import Sample
from swarmrl.environments import ToolEnvironment, make_environment, tool
from swarmrl.environments.chat import reply_text, reply_token_ids
from swarmrl.environments.episode import run_episodes
from swarmrl.environments.tools import ToolCall, load_tool, parse_tool_calls

CALL = '<tool_call>{"name": "multiply", "arguments": {"a": 347, "b": 29}}</tool_call>'


@tool
def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "done"


@tool
def broken() -> str:
    """Always raises."""
    raise RuntimeError("tool is broken")


def calculator(**settings: Any) -> ToolEnvironment:
    environment = make_environment(EnvironmentConfig(tools=["multiply", "add"], **settings))
    assert isinstance(environment, ToolEnvironment)
    return environment


def test_hermes_tool_calls_are_parsed_in_order_and_bad_ones_become_errors() -> None:
    text = f'Let me compute. {CALL} and <tool_call>{{"name": "add", "arguments": {{}}}}</tool_call>'
    assert parse_tool_calls(text) == [
        ToolCall("multiply", {"a": 347, "b": 29}),
        ToolCall("add", {}),
    ]
    assert parse_tool_calls("just 10063") == []
    assert parse_tool_calls("<tool_call>{not json}</tool_call>")[0].startswith("error: ")
    assert parse_tool_calls('<tool_call>["multiply"]</tool_call>')[0].startswith("error: ")
    assert parse_tool_calls('<tool_call>{"name": "add", "arguments": 3}</tool_call>') == [
        "error: the tool call's arguments must be an object"
    ]
    assert parse_tool_calls('<tool_call>{"name": "add"').pop() == (
        "error: <tool_call> was not closed with </tool_call>"
    )


def test_tools_answer_and_every_failure_is_a_message_not_a_crash() -> None:
    environment = calculator()
    assert environment.respond([{"role": "assistant", "content": CALL}]) == [
        {"role": "tool", "content": "10063"}
    ]
    assert environment.respond([{"role": "assistant", "content": "10063"}]) is None

    def answer(call: str) -> str:
        reply = environment.respond([{"role": "assistant", "content": call}])
        assert reply is not None and len(reply) == 1
        return reply[0]["content"]

    unknown = answer('<tool_call>{"name": "divide", "arguments": {"a": 1}}</tool_call>')
    assert unknown == "error: unknown tool 'divide'; tools: multiply, add"
    bad = answer('<tool_call>{"name": "add", "arguments": {"a": "x", "b": 2}}</tool_call>')
    assert bad.startswith("error: bad arguments for add: a: ")
    missing = answer('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert "b: Missing required argument" in missing
    huge = answer('<tool_call>{"name": "multiply", "arguments": {"a": 1e999, "b": 2}}</tool_call>')
    assert huge.startswith("error: ")


def test_a_tool_that_raises_or_hangs_answers_with_an_error_and_output_is_cut() -> None:
    names = [f"{__name__}:slow", f"{__name__}:broken", "multiply"]
    environment = make_environment(
        EnvironmentConfig(tools=names, tool_timeout_s=0.2, max_tool_output_chars=5)
    )
    start = time.monotonic()
    calls = (
        '<tool_call>{"name": "slow", "arguments": {"seconds": 2}}</tool_call>'
        '<tool_call>{"name": "broken", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "multiply", "arguments": {"a": 123456, "b": 1000}}</tool_call>'
    )
    reply = environment.respond([{"role": "assistant", "content": calls}])
    assert time.monotonic() - start < 1.5
    assert [m["content"] for m in reply or []] == [
        "error: slow ran past 0.2 s",
        "error: broken raised RuntimeError: tool is broken",
        "12345... [4 more characters cut]",
    ]


def test_only_marked_functions_can_be_named_as_tools() -> None:
    assert load_tool(f"{__name__}:slow") is slow
    with pytest.raises(ValueError, match=r"not marked with @swarmrl\.environments\.tool"):
        load_tool("os:system")
    with pytest.raises(ValueError, match="needs the package 'no_such_package'"):
        load_tool("no_such_package.tools:search")
    with pytest.raises(ValueError, match="unknown tool 'divide'"):
        load_tool("divide")
    with pytest.raises(ValueError, match="unknown environment 'chess'"):
        make_environment(EnvironmentConfig(name="chess"))
    with pytest.raises(ValueError, match="is not an Environment subclass"):
        make_environment(EnvironmentConfig(name="os:path"))
    with pytest.raises(ValueError, match="needs at least one tool"):
        make_environment(EnvironmentConfig())


def test_tools_declare_whether_they_can_be_rerun_and_publish_their_schema() -> None:
    @tool(deterministic=False)
    def clock() -> float:
        """The time now."""
        return time.time()

    assert calculator().deterministic()
    schemas = calculator().tool_schemas()
    assert [s["function"]["name"] for s in schemas] == ["multiply", "add"]
    assert schemas[0]["function"]["parameters"]["required"] == ["a", "b"]
    environment = make_environment(EnvironmentConfig(tools=["multiply", f"{__name__}:slow"]))
    assert environment.deterministic()
    environment.tools["clock"] = clock
    assert not environment.deterministic()


def test_a_reply_renders_as_the_chat_template_writes_a_tool_message(tokenizer: Any) -> None:
    reply = [{"role": "tool", "content": "10063"}]
    assert reply_text(tokenizer, reply) == (
        "\n<|im_start|>tool\n10063<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = reply_token_ids(tokenizer, reply)
    assert tokenizer.decode(ids) == reply_text(tokenizer, reply)


def test_episodes_alternate_model_turns_and_replies_within_the_limits(tokenizer: Any) -> None:
    end = tokenizer.eos_token_id
    turns = {  # what the scripted model says at each of its turns, per episode
        0: [CALL, "The answer is 10063."],
        1: ["10063"],
        2: [CALL, CALL, CALL],
    }

    def generate(prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        samples = []
        for prompt in prompts:
            episode = prompt[0]
            said = tokenizer.decode(prompt[1:]).count("<|im_start|>assistant")
            ids = [*tokenizer.encode(turns[episode][said], add_special_tokens=False), end]
            samples.append(Sample(ids, [-0.5] * len(ids), "stop", ""))
        return samples

    environment = calculator(max_turns=3)
    episodes = run_episodes(environment, tokenizer, [[0], [1], [2]], generate, 200, {end})
    first, second, third = episodes
    assert [m["role"] for m in first.conversation] == ["assistant", "tool", "assistant"]
    assert first.conversation[1]["content"] == "10063"
    assert first.replies == [[{"role": "tool", "content": "10063"}]]
    reply = reply_token_ids(tokenizer, first.replies[0])
    model_turn = len(first.token_ids) - len(reply) - first.turn_lengths[2]
    assert first.turn_lengths == [model_turn, len(reply), first.turn_lengths[2]]
    assert first.token_ids[model_turn : model_turn + len(reply)] == reply
    assert first.logprobs[model_turn : model_turn + len(reply)] == [0.0] * len(reply)
    assert first.logprobs[:model_turn] == [-0.5] * model_turn
    assert first.finish_reason == "stop"
    assert second.turn_lengths == [len(second.token_ids)] and second.replies == []
    assert len(third.turn_lengths) == 5  # 3 model turns (max_turns), the last one unanswered
    assert third.conversation[-1]["role"] == "assistant"

    # A token limit that leaves no room after the first reply ends the episode there.
    short = run_episodes(environment, tokenizer, [[0]], generate, first.turn_lengths[0] + 3, {end})
    assert short[0].turn_lengths == [first.turn_lengths[0]] and short[0].replies == []
    # A turn cut at the limit ends the episode as "length".
    cut = run_episodes(environment, tokenizer, [[0]], generate, 5, {end})
    assert cut[0].turn_lengths == [5] and cut[0].finish_reason == "length"


def test_the_python_tool_runs_in_the_sandbox() -> None:
    from swarmrl.environments.python_tool import python
    from swarmrl.rewards.sandbox import sandbox_enabled

    if not sandbox_enabled():
        pytest.skip("bubblewrap is not available")
    assert python("print(6 * 7)") == "42\n"
    assert python("raise ValueError('no')") == "error: ValueError: no"
    escaped = python("print(open('/root/.bashrc').read()[:20])")
    assert escaped.startswith("error: ")
    network = python("import socket; socket.create_connection(('1.1.1.1', 53), timeout=1)")
    assert network.startswith("error: ")


def test_the_gpu_python_recipe_loads_offline_and_answers_qwen_style_calls(tokenizer: Any) -> None:
    """recipes/gsm8k_python.toml on the GSM8K fixture: its tasks, its prompt with the tool, a
    tool call as Qwen writes it run in the sandbox, and the math reward on the conversation."""
    from swarmrl.base.recipes import load_config
    from swarmrl.rewards import load_reward_function
    from swarmrl.rewards.sandbox import sandbox_enabled
    from swarmrl.trainer.data import load_tasks, prompt_text

    config = load_config("gsm8k_python")
    fixtures = Path(__file__).parent / "fixtures"
    config.data = config.data.model_copy(
        update={
            "path": "json",
            "subset": None,
            "data_files": {
                "train": str(fixtures / "gsm8k_train.jsonl"),
                "test": str(fixtures / "gsm8k_test.jsonl"),
            },
        }
    )
    assert config.environment is not None
    tasks = load_tasks(config.data, heldout_size=2)
    task = next(t for t in (tasks.train(i) for i in range(10)) if t.answer == "72")
    environment = make_environment(config.environment)
    assert environment.tool_schemas()[0]["function"]["name"] == "python"
    assert task.question in prompt_text(config.data, tokenizer, task.question, environment)
    if not sandbox_enabled():
        pytest.skip("bubblewrap is not available")
    program = {"name": "python", "arguments": {"code": "print(48 + 48 // 2)"}}
    call = f"<tool_call>\n{json.dumps(program)}\n</tool_call>"  # Qwen puts it on its own line
    conversation = [{"role": "assistant", "content": f"Let me compute.\n{call}"}]
    reply = environment.respond(conversation)
    assert reply == [{"role": "tool", "content": "72\n"}]
    conversation += [*reply, {"role": "assistant", "content": "So \\boxed{72}."}]
    score = load_reward_function("math_accuracy")
    assert score(prompts=[""], completions=[conversation], answer=[task.answer]) == [1.0]
