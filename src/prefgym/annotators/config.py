"""Judge and pool configurations, read from YAML in a format AlpacaEval users will recognise.

A pool file looks like:

    label_flip_prob: 0.25          # AlpacaFarm's training noise; 0 for evaluation
    judges:                        # name -> judge config (or a path to another pool file)
      my-judge:
        prompt_template: "..."     # {instruction} {input} {output_1} {output_2}
        fn_completions: openai_chat
        completions_kwargs: {model_name: gpt-4o, temperature: 0, max_tokens: 5}
        fn_completion_parser: regex_parser
        completion_parser_kwargs: {outputs_to_match: {1: 'Output \\(a\\)', 2: 'Output \\(b\\)'}}
        batch_size: 1
        price_per_prompt_token: 0.00001

Unknown keys raise ConfigError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prefgym.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "annotators"

BACKENDS = ("world_judges", "world_humans", "openai_chat", "openai_completions", "huggingface_logprobs")
PARSERS = ("regex_parser", "json_parser", "logprob_parser")

# Fields that change cost or speed but never the answer: left out of the cache key.
_NOT_IN_CACHE_KEY = {"name", "source", "max_concurrency", "price_per_prompt_token",
                     "price_per_completion_token", "price_per_example", "seconds_per_example",
                     "description"}
_KWARGS_NOT_IN_CACHE_KEY = {"timeout", "max_retries", "retry_backoff", "api_key_env"}


@dataclass
class JudgeConfig:
    """One judge: how its prompt is built, which backend answers, how the answer is parsed."""

    name: str
    """Name written in the `annotator` field of every row it labels."""
    fn_completions: str
    """Backend: world_judges, world_humans, openai_chat, openai_completions, huggingface_logprobs."""
    prompt_template: str = ""
    """Prompt for one example ({instruction}, {input}, {output_1}, {output_2}); with
    `example_template`, the whole prompt around `{examples}` (and `{n_examples}`)."""
    prompt_template_no_input: str | None = None
    """Same, for examples whose `input` is empty (defaults to `prompt_template`)."""
    example_template: str | None = None
    """One example inside a batched prompt ({index}, {instruction}, {input}, {output_1}, {output_2})."""
    example_template_no_input: str | None = None
    """Same, for examples whose `input` is empty (defaults to `example_template`)."""
    system_prompt: str | None = None
    """System message for chat backends."""
    completions_kwargs: dict = field(default_factory=dict)
    """Backend settings: model_name, temperature, max_tokens, base_url, api_key_env, ..."""
    fn_completion_parser: str = "regex_parser"
    """How the completion becomes preferences: regex_parser, json_parser or logprob_parser."""
    completion_parser_kwargs: dict = field(default_factory=dict)
    """Parser settings (patterns, JSON key, the two answer tokens)."""
    batch_size: int = 1
    """Examples per prompt."""
    is_randomize_output_order: bool = True
    """Show the two outputs in a seeded random order per example (and swap the answer back)."""
    price_per_prompt_token: float = 0.0
    """USD per prompt token."""
    price_per_completion_token: float = 0.0
    """USD per completion token."""
    price_per_example: float = 0.0
    """USD per example on top of token prices (e.g. paid human labelers)."""
    seconds_per_example: float | None = None
    """Fixed time per example (simulated labelers); None = measured wall time."""
    max_concurrency: int = 1
    """Calls in flight at once (threads)."""
    max_parse_retries: int = 1
    """Times an example whose answer could not be parsed is asked again, alone."""
    description: str = ""
    """Free text."""
    source: str = ""
    """The file this judge was read from (derived)."""

    def cache_hash(self) -> str:
        """A hash of everything that affects the judge's answers (never the API key itself)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IN_CACHE_KEY}
        d["completions_kwargs"] = {k: v for k, v in self.completions_kwargs.items()
                                   if k not in _KWARGS_NOT_IN_CACHE_KEY}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


@dataclass
class PoolConfig:
    """A pool of judges: one drawn at random per example, then label-flip noise."""

    judges: list[JudgeConfig]
    """The judges, drawn uniformly per example."""
    label_flip_prob: float = 0.0
    """Probability that a label is flipped (AlpacaFarm: 0.25 for training, 0 for evaluation)."""
    name: str = ""
    """The pool's name (file stem or built-in name)."""
    source: str = ""
    """The file it was read from (derived)."""


_EXAMPLE_FIELDS = {"instruction", "input", "output_1", "output_2", "index"}
_HEADER_FIELDS = {"examples", "n_examples"}
_JUDGE_KEYS = {f.name for f in dataclasses.fields(JudgeConfig)} - {"name", "source"}
_POOL_KEYS = {"judges", "label_flip_prob", "description"}
# The YAML types each judge setting accepts (by its annotation; bool is not taken for a number).
_FIELD_TYPES = {"str": (str,), "str | None": (str, type(None)), "int": (int,), "float": (int, float),
                "float | None": (int, float, type(None)), "bool": (bool,), "dict": (dict,)}
_JUDGE_FIELD_TYPE = {f.name: f.type for f in dataclasses.fields(JudgeConfig)}


def available_configs() -> list[str]:
    """Names of the configs shipped with prefgym."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in config name (e.g. "world_pool_noisy") or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: annotator config file not found")
        return p
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    raise ConfigError(f"unknown annotators '{name_or_path}': give a YAML file or one of "
                      f"{', '.join(available_configs())}")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _judge_from_dict(name: str, d: dict, path: Path) -> JudgeConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: judge '{name}' must be a mapping of settings")
    for key in d:
        if key not in _JUDGE_KEYS:
            raise ConfigError(f"{path}: judge '{name}': unknown key '{key}' "
                              f"(known: {', '.join(sorted(_JUDGE_KEYS))})")
    if "fn_completions" not in d:
        raise ConfigError(f"{path}: judge '{name}': missing key 'fn_completions' ({', '.join(BACKENDS)})")
    for key, value in d.items():
        allowed = _FIELD_TYPES[_JUDGE_FIELD_TYPE[key]]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{path}: judge '{name}': key '{key}' must be {names}, got "
                              f"{type(value).__name__} {value!r:.40}")
    for key, low in (("max_concurrency", 1), ("max_parse_retries", 0)):
        if key in d and d[key] < low:
            raise ConfigError(f"{path}: judge '{name}': key '{key}' must be an integer >= {low}")
    judge = JudgeConfig(name=str(name), source=str(path), **d)
    if judge.fn_completions not in BACKENDS:
        raise ConfigError(f"{path}: judge '{name}': key 'fn_completions' is '{judge.fn_completions}'; "
                          f"use one of {', '.join(BACKENDS)}")
    if judge.fn_completion_parser not in PARSERS:
        raise ConfigError(f"{path}: judge '{name}': key 'fn_completion_parser' is "
                          f"'{judge.fn_completion_parser}'; use one of {', '.join(PARSERS)}")
    if not isinstance(judge.batch_size, int) or judge.batch_size < 1:
        raise ConfigError(f"{path}: judge '{name}': key 'batch_size' must be an integer >= 1")
    if judge.batch_size > 1 and not judge.example_template:
        raise ConfigError(f"{path}: judge '{name}': key 'batch_size' > 1 needs 'example_template' "
                          "(and '{examples}' in 'prompt_template')")
    if judge.example_template and "{examples}" not in judge.prompt_template:
        raise ConfigError(f"{path}: judge '{name}': key 'prompt_template' must contain '{{examples}}' "
                          "when 'example_template' is given")
    if judge.fn_completion_parser == "logprob_parser" and judge.batch_size != 1:
        raise ConfigError(f"{path}: judge '{name}': key 'batch_size' must be 1 with logprob_parser")
    for key in ("completions_kwargs", "completion_parser_kwargs"):
        if not isinstance(getattr(judge, key), dict):
            raise ConfigError(f"{path}: judge '{name}': key '{key}' must be a mapping")
    batched = judge.example_template is not None
    for key, allowed in (("prompt_template", _HEADER_FIELDS if batched else _EXAMPLE_FIELDS),
                         ("prompt_template_no_input", _HEADER_FIELDS if batched else _EXAMPLE_FIELDS),
                         ("example_template", _EXAMPLE_FIELDS), ("example_template_no_input", _EXAMPLE_FIELDS)):
        for field_name in re.findall(r"\{([A-Za-z_][A-Za-z_0-9]*)\}", getattr(judge, key) or ""):
            if field_name not in allowed:
                raise ConfigError(f"{path}: judge '{name}': key '{key}' has an unknown placeholder "
                                  f"'{{{field_name}}}' (allowed: {', '.join(sorted(allowed))})")
    return judge


def load_pool(name_or_path: str | os.PathLike, _seen: tuple = ()) -> PoolConfig:
    """Read a pool of judges from a built-in name or a YAML file (ConfigError on any problem)."""
    path = resolve_config_path(name_or_path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'judges' refers back to itself")
    data = _read_yaml(path)
    for key in data:
        if key not in _POOL_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(sorted(_POOL_KEYS))})")
    if "judges" not in data:
        raise ConfigError(f"{path}: missing key 'judges' (a mapping name -> judge config, "
                          "or the path of another pool file)")
    judges_spec = data["judges"]
    if isinstance(judges_spec, str):
        ref = Path(judges_spec)
        if not ref.is_absolute():
            ref = path.parent / ref
        judges = load_pool(ref, _seen + (path.resolve(),)).judges
    elif isinstance(judges_spec, dict) and judges_spec:
        judges = [_judge_from_dict(n, d, path) for n, d in judges_spec.items()]
    else:
        raise ConfigError(f"{path}: key 'judges' must be a non-empty mapping or a file path")
    p = data.get("label_flip_prob", 0.0)
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 0.5:
        raise ConfigError(f"{path}: key 'label_flip_prob' must be a number in [0, 0.5]")
    return PoolConfig(judges=judges, label_flip_prob=float(p), name=path.stem, source=str(path))
