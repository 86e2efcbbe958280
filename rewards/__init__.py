"""Reward functions: a registry by name, the built-in math and format rewards, batch scoring.

Importing the package registers the built-ins (`math_accuracy`, `integer_match`,
`think_answer_format`, `boxed_format`, `answer_only_format`); math-verify and sympy load only
when a math reward first runs.
"""

from swarmrl.rewards import format, math  # noqa: F401  (registers the built-in functions)
from swarmrl.rewards.registry import REWARD_FUNCTIONS, load_reward_function, register
from swarmrl.rewards.scoring import Scores, score_completions

__all__ = ["REWARD_FUNCTIONS", "Scores", "load_reward_function", "register", "score_completions"]
