"""Reward functions: a registry by name, the built-in math, code and format rewards, scoring.

Importing the package registers the built-ins (`math_accuracy`, `integer_match`,
`think_answer_format`, `boxed_format`, `answer_only_format`, `code_tests`, `code_tests_all`,
`code_block_format`); math-verify and sympy load only when a math reward first runs, and the
code sandbox (bubblewrap) is checked only when a code reward first runs.
"""

from swarmrl.rewards import code, format, math  # noqa: F401  (registers the built-in functions)
from swarmrl.rewards.registry import REWARD_FUNCTIONS, load_reward_function, register
from swarmrl.rewards.scoring import Scores, score_completions

__all__ = ["REWARD_FUNCTIONS", "Scores", "load_reward_function", "register", "score_completions"]
