"""The config tree and recipes: loading, typed overrides, error messages, TOML round trip."""

import tomllib
from pathlib import Path

import pytest

from swarmrl.base.config import Config, ConfigError
from swarmrl.base.recipes import load_config, parse_overrides, recipe_path, to_toml


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the shipped recipe ------------------------------------------------------------------


def test_shipped_recipes_load_with_the_values_written_in_them() -> None:
    import tomllib

    for name in ("arithmetic", "gsm8k", "calculator", "gsm8k_python"):
        config = load_config(name)
        assert Path(config.recipe).name == f"{name}.toml"
        written = tomllib.loads(Path(config.recipe).read_text())
        dumped = config.model_dump()
        for section, values in written.items():
            if section == "rewards":
                assert [r.function for r in config.rewards] == [r["function"] for r in values]
                continue
            for key, value in values.items():
                actual = dumped[section][key]
                assert (list(actual) if isinstance(actual, tuple) else actual) == value, key
    # a key the recipe leaves out keeps its default
    assert load_config("arithmetic").swarm.lease_timeout_s == 300.0


def test_no_recipe_means_the_arithmetic_recipe() -> None:
    assert recipe_path(None) == recipe_path("arithmetic")
    assert load_config(None).recipe == load_config("arithmetic").recipe


# --- overrides ----------------------------------------------------------------------------


def test_the_e2e_recipe_is_the_default_recipe_plus_a_length_reward() -> None:
    from tests.conftest import E2E_RECIPE

    default, e2e = load_config().model_dump(), load_config(E2E_RECIPE).model_dump()
    length = {"function": "tests.trl_rewards:reward_len", "weight": 0.1}
    assert e2e.pop("rewards") == [*default.pop("rewards"), length]
    assert e2e.pop("recipe") != default.pop("recipe")
    assert e2e == default


def test_overrides_are_typed_by_the_field_they_set() -> None:
    arguments = [
        "--trainer.learning_rate",
        "2e-5",
        "--eval.before=false",
        "--swarm.workers",
        "3",
        "--model.device",
        "cuda:0",
        "--data.operations",
        '["+", "*"]',
        "--logging.run_name",
        "2024",
    ]
    assert parse_overrides(arguments)[0] == ("trainer.learning_rate", "2e-5")
    config = load_config(None, arguments)
    assert config.trainer.learning_rate == 2e-5
    assert config.eval.before is False
    assert config.swarm.workers == 3
    assert config.model.device == "cuda:0"  # not a TOML literal: kept as the plain string
    assert config.data.operations == ["+", "*"]
    assert config.logging.run_name == "2024"  # a string field keeps the text as typed


def test_parse_overrides_rejects_malformed_arguments() -> None:
    with pytest.raises(ConfigError, match=r"expected --section\.key VALUE, got 'learning_rate'"):
        parse_overrides(["learning_rate", "1"])
    with pytest.raises(ConfigError, match="got '--trainer'"):
        parse_overrides(["--trainer", "1"])
    with pytest.raises(ConfigError, match=r"--trainer\.learning_rate needs a value"):
        parse_overrides(["--trainer.learning_rate"])


def test_overrides_apply_on_top_of_the_recipe() -> None:
    config = load_config("arithmetic", ["--trainer.learning_rate", "3e-5", "--eval.before=false"])
    assert config.trainer.learning_rate == 3e-5
    assert config.eval.before is False
    assert config.eval.after is True
    assert config.trainer.max_steps == 40  # untouched recipe value


def test_override_creates_a_section_the_recipe_lacks(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rewards]]\nfunction = "integer_match"\n')
    config = load_config(str(path), ["--checkpoint.keep", "5"])
    assert config.checkpoint.keep == 5
    assert config.checkpoint.every_steps == 10


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[trainer]\nlearing_rate = 1e-5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: unknown key")
    assert "learing_rate" in message
    assert "did you mean" in message
    assert "'trainer.learning_rate'" in message


def test_unknown_section_in_file_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "[trainr]\nlearning_rate = 1e-5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainr'; did you mean 'trainer'\?"):
        load_config(str(path))


def test_unknown_key_without_close_match_has_no_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "[trainer]\nzzzz = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}: unknown key 'trainer.zzzz'"


def test_unknown_key_on_command_line_says_command_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("arithmetic", ["--trainer.learing_rate", "1e-5"])
    message = str(caught.value)
    assert message.startswith("command line: unknown key")
    assert "learing_rate" in message
    assert "'trainer.learning_rate'" in message
    assert "arithmetic.toml" not in message


def test_invalid_value_in_file_names_file_and_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[trainer]\nlearning_rate = -1.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: invalid config"
    assert lines[1].startswith("  trainer.learning_rate: Input should be greater than 0")
    assert lines[1].endswith("(got -1.0)")


def test_invalid_literal_names_key_path_and_choices(tmp_path: Path) -> None:
    path = write(tmp_path, '[trainer]\nloss_type = "foo"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid config")
    assert "trainer.loss_type" in message
    assert "'dapo'" in message
    assert "(got 'foo')" in message


def test_invalid_override_value_names_the_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("arithmetic", ["--trainer.loss_type", "foo"])
    assert "trainer.loss_type" in str(caught.value)
    assert "(got 'foo')" in str(caught.value)


def test_every_invalid_value_is_listed(tmp_path: Path) -> None:
    path = write(tmp_path, "[sampling]\nnum_generations = 1\ntop_p = 1.5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("  sampling.num_generations: Input should be greater than or")
    assert lines[2].startswith("  sampling.top_p: Input should be less than or equal to 1")


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[trainer]\nlearning_rate = \n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value).startswith(f"{path}: not valid TOML: ")
    assert "line 2" in str(caught.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(missing))
    assert str(caught.value) == f"{missing}: recipe file not found"


def test_directory_is_not_a_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe file not found"):
        recipe_path(str(tmp_path))


def test_unknown_shipped_recipe_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("no_such_recipe")
    message = str(caught.value)
    assert message.startswith("no_such_recipe: no such recipe file or shipped recipe")
    assert "'arithmetic'" in message


def test_rewards_must_not_be_empty(tmp_path: Path) -> None:
    path = write(tmp_path, "rewards = []\n")
    with pytest.raises(ConfigError, match="at least one reward function is required"):
        load_config(str(path))


def test_huggingface_source_requires_path(tmp_path: Path) -> None:
    path = write(tmp_path, '[data]\nsource = "huggingface"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value).startswith(f"{path}: invalid config")
    assert "data.path is required when data.source = 'huggingface'" in str(caught.value)


def test_operand_bounds_and_prompt_template_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, "[data]\nfirst_operand = [9, 3]\n")
    bounds = r"data\.first_operand: lower bound 9 exceeds upper bound 3"
    with pytest.raises(ConfigError, match=bounds):
        load_config(str(path))
    path = write(tmp_path, '[data]\nprompt_template = "no placeholder"\n')
    with pytest.raises(ConfigError, match=r"must contain '\{question\}'"):
        load_config(str(path))


def test_clip_high_defaults_to_epsilon() -> None:
    assert load_config("arithmetic").trainer.clip_high == 0.2
    assert load_config("arithmetic", ["--trainer.epsilon_high", "0.28"]).trainer.clip_high == 0.28


# --- to_toml ------------------------------------------------------------------------------


def test_to_toml_round_trip_of_shipped_recipe(tmp_path: Path) -> None:
    config = load_config("arithmetic", ["--trainer.learning_rate", "3e-5"])
    text = to_toml(config)
    assert "learning_rate = 3e-05\n" in text
    assert "recipe =" not in text
    path = write(tmp_path, text, "resolved.toml")
    again = load_config(str(path))
    assert again.recipe == str(path)
    assert again.model_dump(exclude={"recipe"}) == config.model_dump(exclude={"recipe"})


def test_to_toml_round_trip_with_tricky_values(tmp_path: Path) -> None:
    recipe = write(
        tmp_path,
        """
[data]
source = "huggingface"
path = "json"
data_files = { train = "a/train.jsonl", test = "b/test.jsonl" }
answer_format = "gsm8k"
use_chat_template = false
system_prompt = "Say \\"hi\\"\\nthen a backslash \\\\ done"
operations = ["+", "-", "*"]

[sampling]
stop = ["\\n\\n", "</s>"]

[trainer]
epsilon_high = 0.28
max_minutes = 0.5

[[rewards]]
function = "integer_match"
weight = 0.5

[[rewards]]
function = "my.module:score"
weight = 2.0
""",
    )
    config = load_config(str(recipe))
    assert config.data.system_prompt == 'Say "hi"\nthen a backslash \\ done'
    assert config.sampling.stop == ["\n\n", "</s>"]
    text = to_toml(config)
    tomllib.loads(text)  # valid TOML
    again = load_config(str(write(tmp_path, text, "resolved.toml")))
    assert again.model_dump(exclude={"recipe"}) == config.model_dump(exclude={"recipe"})
    # relative data files resolve against the recipe's folder, and stay put in the resolved copy
    expected = {"train": str(tmp_path / "a/train.jsonl"), "test": str(tmp_path / "b/test.jsonl")}
    assert config.data.data_files == again.data.data_files == expected
    assert [(r.function, r.weight) for r in again.rewards] == [
        ("integer_match", 0.5),
        ("my.module:score", 2.0),
    ]


def test_to_toml_omits_none_values() -> None:
    text = to_toml(Config())
    parsed = tomllib.loads(text)
    assert "epsilon_high" not in parsed["trainer"]
    assert "system_prompt" not in parsed["data"]
    assert parsed["trainer"]["learning_rate"] == 1e-5
    assert parsed["rewards"] == [{"function": "integer_match", "weight": 1.0}]


# --- bugs ---------------------------------------------------------------------------------


def test_override_into_a_non_table_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config("arithmetic", ["--rewards.function", "integer_match"])


def test_override_below_a_scalar_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config("arithmetic", ["--trainer.learning_rate.x", "1"])


def test_numeric_looking_override_for_a_string_field() -> None:
    config = load_config("arithmetic", ["--logging.run_name", "2024"])
    assert config.logging.run_name == "2024"


def test_the_optional_environment_section_takes_overrides_and_checks_its_keys(
    tmp_path: Path,
) -> None:
    config = load_config("calculator", ["--environment.max_turns", "3"])
    assert config.environment is not None and config.environment.max_turns == 3
    with pytest.raises(ConfigError, match=r"did you mean 'environment\.max_turns'"):
        load_config("calculator", ["--environment.max_turn", "3"])
    recipe = tmp_path / "r.toml"
    recipe.write_text('[environment]\ntools = ["multiply"]\nmax_tunrs = 2\n')
    with pytest.raises(ConfigError, match=r"r\.toml: unknown key 'environment\.max_tunrs'"):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match="needs at least one tool"):
        load_config(None, ["--environment.max_turns", "2"])  # a tools environment without tools
