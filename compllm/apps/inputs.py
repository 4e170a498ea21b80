"""Reading what the user asked for: the command line (a question and Hydra overrides), one query or a file of them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
QUERY_ENV = "COMPLLM_QUERY"  # conf/config.yaml reads the question from here: `query: ${oc.env:COMPLLM_QUERY,null}`

# Hydra 1.3's own options (hydra/_internal/utils.py, get_args_parser); tests/test_cli.py checks this table against
# that parser, so a Hydra upgrade that changes them fails a test instead of swallowing a question word.
HYDRA_FLAGS: dict[str, tuple[str, ...]] = {  # long name -> short names
    "--help": ("-h",), "--hydra-help": (), "--version": (), "--cfg": ("-c",), "--resolve": (), "--package": ("-p",),
    "--run": ("-r",), "--multirun": ("-m",), "--shell-completion": ("-sc",), "--config-path": ("-cp",),
    "--config-name": ("-cn",), "--config-dir": ("-cd",), "--experimental-rerun": (), "--info": ("-i",),
}
FLAGS_WITH_VALUE = frozenset({"--cfg", "--package", "--config-path", "--config-name", "--config-dir",
                              "--experimental-rerun"})
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")  # --info's optional value
COMMANDS = ("--run", "--multirun", "--cfg", "--info", "--shell-completion")  # Hydra takes at most one of these
NO_COMPOSE = ("--help", "--hydra-help", "--version", "--shell-completion", "--experimental-rerun")
_SHORT = {short: long for long, shorts in HYDRA_FLAGS.items() for short in shorts}
# A Hydra override: [~|+|++]key[@package][=value], key a dotted (or group/path) name without spaces.
_OVERRIDE = re.compile(r"(~|\+\+|\+)?[A-Za-z_][\w\-]*(?:[./][\w\-]+)*(?:@[\w.\-:/]*)?(=|$)")
_QUERY_KEYS = ("query", "+query", "++query")


class UsageError(ValueError):
    """The command line asks for something impossible; the message says what to type instead."""


@dataclass
class CommandLine:
    """argv split the way compllm reads it: Hydra's flags and overrides, and the question (verbatim)."""

    hydra_args: list[str] = field(default_factory=list)  # what Hydra's own parser gets, in the order typed
    overrides: list[str] = field(default_factory=list)  # the key=value part of hydra_args
    flags: dict[str, Optional[str]] = field(default_factory=dict)  # long flag name -> its value (None: no value)
    question: Optional[str] = None  # plain words joined by spaces, or query=<anything> outside -m

    @property
    def multirun(self) -> bool:
        return "--multirun" in self.flags or "hydra.mode=MULTIRUN" in self.overrides

    @property
    def composes(self) -> bool:
        """False for the flags that only print help or versions: Hydra composes nothing for them."""
        return not any(flag in self.flags for flag in NO_COMPOSE)


def is_override(arg: str) -> bool:
    """`key=value` with a key Hydra could mean (no spaces, dotted or group/path), or a deletion `~key`."""
    match = _OVERRIDE.match(arg)
    return bool(match) and (match.group(2) == "=" or match.group(1) == "~")


def override_key(arg: str) -> str:
    """`++models.big@x=1` -> `models.big`: the config key an override sets, without prefix or package."""
    return re.split(r"[@=]", arg.lstrip("~+"), maxsplit=1)[0]


def _flag_name(arg: str) -> Optional[str]:
    """The long name of a Hydra option (`-cn`, `--config-n` abbreviated, `--cfg=job`), or None if unknown."""
    name = arg.split("=", 1)[0]
    if name in HYDRA_FLAGS:
        return name
    if name in _SHORT:
        return _SHORT[name]
    if name.startswith("--"):
        matches = [flag for flag in HYDRA_FLAGS if flag.startswith(name)]  # argparse accepts unique prefixes
        return matches[0] if len(matches) == 1 else None
    return None


def config_roots(config_dirs: Sequence[str] = (CONF_DIR,)) -> set[str]:
    """Top-level config keys and group names: what an override can start with."""
    from compllm.config.schema import CompllmConfig

    groups = {p.name for d in config_dirs if Path(d).is_dir() for p in Path(d).iterdir() if p.is_dir()}
    return {f.name for f in fields(CompllmConfig)} | groups | {"hydra"}


def _reads_as_question(arg: str, roots: set[str]) -> bool:
    """`"key=value? What does it mean?"`: spaces, and a key no config has, so it cannot be an override."""
    root = re.split(r"[./]", override_key(arg), maxsplit=1)[0]
    return any(c.isspace() for c in arg) and not arg.startswith(("~", "+")) and root not in roots


def split_command_line(argv: Sequence[str], roots: Optional[set[str]] = None) -> CommandLine:
    """Separate the question from Hydra's flags and overrides before Hydra sees argv.

    Hydra's override grammar reads `query=a, b` as a sweep and rejects quotes, brackets and `${` in it, while a
    person types questions with all of those. So: an argument is for Hydra if it is one of Hydra's options (with its
    value) or looks like an override; every other word is part of the question, and `query=<anything>` is taken
    verbatim (under -m it stays a Hydra override: `-m query=a,b` sweeps). Everything after `--` is question too.
    An argument with spaces whose key is no config key (`roots`) is question as well: it could only fail as an
    override. Without spaces (`x=5`) it stays an override, so that a mistyped key is an error, not a question.
    """
    roots = config_roots() if roots is None else roots
    line, words, query_values, query_args = CommandLine(), [], [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            words += argv[i + 1:]
            break
        if arg.startswith("-") and len(arg) > 1:
            name = _flag_name(arg)
            if name is None:
                raise UsageError(f"unknown option {arg!r} (compllm --help lists them); a question that starts with "
                                 f"'-' goes after --: compllm -- {arg!r}")
            value, taken = (arg.split("=", 1)[1], 1) if "=" in arg else (None, 1)
            if value is None and name in FLAGS_WITH_VALUE:
                if i + 1 >= len(argv):
                    raise UsageError(f"{arg} needs a value, e.g. {arg} {'job' if name == '--cfg' else 'NAME'}")
                value, taken = argv[i + 1], 2
            elif value is None and name == "--info" and i + 1 < len(argv) and argv[i + 1] in INFO_TOPICS:
                value, taken = argv[i + 1], 2
            line.flags[name] = value
            line.hydra_args += argv[i: i + taken]
            i += taken
            continue
        if is_override(arg) and not _reads_as_question(arg, roots):
            line.overrides.append(arg)
            line.hydra_args.append(arg)
            if arg.split("=", 1)[0] in _QUERY_KEYS:
                query_args.append(arg)
        else:
            words.append(arg)
        i += 1
    if sum(flag in line.flags for flag in COMMANDS) > 1:
        raise UsageError(f"use only one of {', '.join(COMMANDS)} (-m is --multirun)")
    if "--resolve" in line.flags and not {"--cfg", "--help"} & set(line.flags):
        raise UsageError("--resolve only works with --cfg, e.g. compllm --cfg job --resolve")
    if not line.multirun:  # one run: query=<anything> is the question, verbatim, whatever its punctuation
        for arg in query_args:
            line.overrides.remove(arg)
            line.hydra_args.remove(arg)
            query_values.append(arg.split("=", 1)[1])
    if len(query_values) > 1:
        raise UsageError("query= is given more than once; ask one question, or use queries_file=path.txt")
    if words and query_args:
        raise UsageError(f'give the question once: as plain words (compllm "your question") or as query=..., '
                         f"not both (the words: {' '.join(words)!r})")
    if words or query_values:
        line.question = " ".join(words) if words else query_values[0]
        try:
            line.question.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
            raise UsageError("the question is not valid UTF-8 text; check the terminal's encoding") from None
    return line


def blank_query_problem(query: object) -> Optional[str]:
    """A question that is empty or only whitespace would cost a planner run to answer nothing: refuse it."""
    if query is not None and not str(query).strip():
        return f'query={str(query)!r} is empty; ask a question: compllm "What is 15% of 240?"'
    return None


def read_queries(cfg: DictConfig) -> list[str]:
    problem = blank_query_problem(cfg.query)
    if problem:
        raise UsageError(problem)
    if cfg.query and cfg.queries_file:
        raise UsageError("give either query=... or queries_file=..., not both")
    if cfg.query:
        return [str(cfg.query)]
    if cfg.queries_file:
        return read_queries_file(Path(hydra.utils.to_absolute_path(cfg.queries_file)))
    raise UsageError('no query: run `compllm "your question"` or `compllm queries_file=path.txt`')


def read_queries_file(path: Path) -> list[str]:
    """One query per non-blank line of a UTF-8 text file."""
    if not path.is_file():
        raise UsageError(f"queries_file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UsageError(f"queries_file {str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} on line "
                         f"{line}); save it as UTF-8") from None
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise UsageError(f"queries_file {str(path)!r} holds no query (one per line)")
    return queries
