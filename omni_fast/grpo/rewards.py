"""R1-Omni's verifiable rewards (src/r1-v/src/open_r1/grpo.py), with the same matching rules, DAPO's soft
overlong punishment, and the registry GRPOConfig's reward names are looked up in.

The accuracy and format rewards take the decoded completion texts (special tokens skipped) and return one float
per completion; the reference sums them into a total reward in {0, 1, 2}.
"""
from __future__ import annotations

import inspect
from typing import Callable

from omni_fast import task
from omni_fast.config import OVERLONG_REWARD, ConfigError


def accuracy_reward(completions: list[str], solutions: list[str]) -> list[float]:
    """1.0 where the completion's answer equals the solution's, else 0.0.

    The answer is the stripped content of the first <answer>...</answer> on one line (no re.DOTALL: an answer
    spanning a newline does not match), falling back to the whole stripped text; the comparison is exact and
    case-sensitive. The reference first tries math_verify's parse/verify, which does not fire for the word
    labels of emotion recognition; that step is skipped here.
    """
    if len(completions) != len(solutions):
        raise ValueError(f"{len(completions)} completions but {len(solutions)} solutions")
    return [float(task.label_of(c, one_line=True) == task.label_of(s, one_line=True))
            for c, s in zip(completions, solutions)]


def format_reward(completions: list[str]) -> list[float]:
    """1.0 where the whole completion is <think>...</think> then <answer>...</answer> (whitespace between,
    anything inside, newlines allowed: re.fullmatch with re.DOTALL), else 0.0."""
    return [float(task.well_formed(c)) for c in completions]


def soft_overlong_punishment(lengths: list[int], max_length: int, buffer_len: int, factor: float) -> list[float]:
    """DAPO's soft overlong punishment (its eq. 13, times factor) of completions of `lengths` tokens (stop token
    included): 0 up to max_length - buffer_len tokens, then falling linearly by factor / buffer_len a token to
    -factor at max_length, and -factor beyond it (a length the engine never returns)."""
    start = max_length - buffer_len
    return [0.0 if n <= start else -factor * (n - start) / buffer_len if n <= max_length else -factor
            for n in lengths]


def overlong_reward(completions: list[str], *, completion_lengths: list[int], config) -> list[float]:
    """The registry's "overlong": soft_overlong_punishment with GRPOConfig's max_completion_length,
    overlong_buffer_len and overlong_penalty_factor."""
    return soft_overlong_punishment(completion_lengths, config.max_completion_length, config.overlong_buffer_len,
                                    config.overlong_penalty_factor)


# --- the registry ---------------------------------------------------------------------------------------------
# A reward function takes the decoded completions (and, when it declares a second parameter, the solutions,
# one per completion) and returns one float per completion; keyword-only parameters named `completion_lengths`
# (each completion's tokens, its stop token included) and `config` (the run's GRPOConfig) are passed by name.
# GRPOConfig.rewards names entries of this registry; the metric of each is logged as "rewards/<function name>",
# as the reference trainer logs it.
RewardFn = Callable[..., list[float]]
REWARD_CONTEXT = ("completion_lengths", "config")  # what a keyword-only parameter of a reward may ask for


class RewardError(ValueError):
    """A reward function that raised or returned the wrong number of values; the message names it."""
REWARD_FUNCS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward,
                                     OVERLONG_REWARD: overlong_reward}


def register_reward(name: str, fn: RewardFn | None = None):
    """Add a reward under `name` (usable as a decorator): fn(completions) or fn(completions, solutions)."""
    def add(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"reward {name!r} must be callable, got {type(f).__name__}")
        REWARD_FUNCS[name] = f
        return f
    return add(fn) if fn is not None else add


def resolve_reward(name: str) -> RewardFn:
    """The reward registered under `name`; a "package.module:function" name is imported and registered on
    first use, so a config file can name a user's reward without code that registers it."""
    if name not in REWARD_FUNCS and ":" in name:
        module, _, attr = name.partition(":")
        try:
            register_reward(name, getattr(_import_from_cwd(module), attr))
        except (ImportError, AttributeError) as e:
            raise KeyError(f"reward {name!r}: cannot import it ({e})") from None
    if name not in REWARD_FUNCS:
        raise KeyError(f"reward {name!r} is not registered; known: {sorted(REWARD_FUNCS)}")
    return REWARD_FUNCS[name]


def resolve_rewards(names: tuple[str, ...] | list[str]) -> list[RewardFn]:
    """GRPOConfig.reward_funcs -> the functions, or a ConfigError naming every name that resolves to none (the
    trainer checks them before it loads anything)."""
    found, unknown = [], []
    for name in names:
        try:
            found.append(resolve_reward(name))
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ConfigError(f"reward_funcs {list(names)}: {unknown}; each must be one of {sorted(REWARD_FUNCS)} or an "
                          "importable 'module:function' (or add your own with omni_fast.grpo.rewards.register_reward)")
    return found


def _import_from_cwd(module: str):
    """import `module`; one the installed packages do not hold is looked for in the working directory too, as
    `python script.py` would find it (the `omni-fast` command's sys.path does not hold the working directory)."""
    import importlib
    import os
    import sys

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or cwd in sys.path:
            raise
    sys.path.append(cwd)  # after everything installed: a folder here never shadows an installed package
    importlib.invalidate_caches()
    return importlib.import_module(module)


def _takes_solutions(fn: RewardFn) -> bool:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) >= 2


def metric_name(name: str) -> str:
    """The metric a registered reward is logged under: "rewards/<function name>", as the reference logs it."""
    return f"rewards/{getattr(resolve_reward(name), '__name__', name)}"


def _context_wanted(fn: RewardFn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]


def compute_rewards(names: tuple[str, ...] | list[str], completions: list[str], solutions: list[str],
                    **context) -> dict[str, list[float]]:
    """{"rewards/<function name>": one float per completion} for each named reward, in order; `context` holds
    what keyword-only parameters may ask for (REWARD_CONTEXT)."""
    out = {}
    for name in names:
        fn = resolve_reward(name)
        try:
            wanted = {k: context[k] for k in _context_wanted(fn)}
        except KeyError as e:
            raise RewardError(f"reward {name!r} has a keyword-only parameter {e.args[0]!r}; those a reward may "
                              f"declare are {list(REWARD_CONTEXT)}") from None
        try:
            values = fn(completions, solutions, **wanted) if _takes_solutions(fn) else fn(completions, **wanted)
            values = [float(v) for v in values]
        except Exception as e:  # noqa: BLE001 - a user's function: whatever it raises is reported with its name
            raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
        if len(values) != len(completions):
            raise RewardError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        out[metric_name(name)] = values
    return out
