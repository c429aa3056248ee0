"""Settings: every option is a flag and an ``ASYNCRAFT_*`` variable; flag > environment > default.

This module is the only reader of ``os.environ`` for settings. Every option is declared once in
``OPTIONS``; the CLI flags, the environment names, validation and the README table all come from
that one list, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from yarl import URL

from asyncraft.errors import ConfigError

ENV_PREFIX = "ASYNCRAFT_"


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def _number(kind: type, minimum: float | None = None, maximum: float | None = None) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= {minimum:g}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum:g}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _json_object(raw: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"must be a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object such as {\"temperature\": 0.2}")
    return value


def _text(raw: str) -> str:
    return raw.strip()


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


def _optional_port(raw: str) -> int | None:
    value = raw.strip().lower()
    if value in ("", "off", "none"):
        return None
    port: int = _number(int, 0, 65535)(value)
    return port


def parse_split(raw: str) -> list[tuple[str, float]]:
    """``eval=0.1,test=0.05`` -> [("eval", 0.1), ("test", 0.05)]; the rest of the records stay in OUT."""
    out: list[tuple[str, float]] = []
    for part in (x.strip() for x in raw.split(",")):
        if not part:
            continue
        name, sep, frac = part.partition("=")
        name = name.strip()
        if not sep or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"must look like eval=0.1 (NAME=FRACTION, comma-separated), not {part!r}")
        try:
            value = float(frac)
        except ValueError:
            raise ValueError(f"{name}: fraction must be a number") from None
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name}: fraction must be between 0 and 1")
        if any(n == name for n, _ in out):
            raise ValueError(f"{name} is named twice")
        out.append((name, value))
    if sum(v for _, v in out) >= 1.0:
        raise ValueError("the fractions must add up to less than 1")
    return out


def _split_spec(raw: str) -> str:
    return ",".join(f"{n}={v:g}" for n, v in parse_split(raw))


def _column(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _url_list(raw: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in raw.replace(",", " ").split() if u.strip())
    if not urls:
        raise ValueError("must name at least one URL")
    for url in urls:
        shown = _shown_url(url)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{shown!r} must start with http:// or https://")
        try:
            parsed = URL(url)
            port = parsed.port
        except ValueError:
            raise ValueError(f"{shown!r} is not a valid URL") from None
        if not parsed.host:
            raise ValueError(f"{shown!r} names no host")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"{shown!r} has an invalid port")
        if parsed.fragment or "#" in url:
            raise ValueError(f"{shown!r} has a #fragment, which cannot be joined with the API paths")
    return urls


def _shown_url(url: str) -> str:
    """A URL for an error message: without user, password and query, which may hold secrets."""
    try:
        return str(URL(url).with_user(None).with_query(None).with_fragment(None))
    except ValueError:
        return url.split("@")[-1].split("?")[0]


@dataclass(frozen=True)
class Option:
    name: str  # Settings field; flag is --name-with-dashes; env is ASYNCRAFT_NAME
    parse: Callable[[str], Any]
    default: Any
    help: str
    commands: tuple[str, ...] = ("run",)
    flag: bool = True  # False: environment only (secrets, test hooks)
    metavar: str | None = None
    is_bool: bool = False
    group: str = ""  # a key of GROUPS: where --help lists it

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")


_STATEFUL = ("run", "status", "tail", "export", "verify")

# The sections of --help, in this order: what to run first, then the server, how fast and how much, the
# RAFT job, export, and what only matters when something goes wrong or a run is watched.
GROUPS: dict[str, str] = {
    "job": "job and state",
    "api": "API (the server, the model and how calls are made)",
    "limits": "limits and spending",
    "raft": "RAFT job",
    "export": "export",
    "durability": "durability",
    "operations": "operations (shutdown, progress, logs, metrics)",
}

OPTIONS: tuple[Option, ...] = (
    Option("state_dir", _text, "asyncraft-state", "directory holding the journal, snapshots and errors",
           commands=_STATEFUL, metavar="DIR", group="job"),
    Option("input", _text, "", "input: a JSONL file of chat requests (prompts job) or a file/folder of documents "
           "(raft job); export re-reads it for input order", commands=("run", "export"), metavar="PATH", group="job"),
    Option("job", _choice("prompts", "raft"), "prompts", "which job to run: prompts (JSONL of chat requests "
           "in, one completion per line out) or raft", metavar="JOB", group="job"),
    # -- the prompts job --
    Option("samples", _number(int, 1, 1000), 1, "prompts: independent answers per input line (the sample index "
           "is part of the task id; exports carry it); at 1, identical lines share one answer", metavar="K",
           group="job"),
    # -- the raft job (they change what is generated: recorded in the state dir's fingerprint) --
    Option("questions", _number(int, 1, 100), 5, "raft: questions generated per chunk (one call per chunk)",
           metavar="N", group="raft"),
    Option("distractors", _number(int, 0, 100), 3, "raft: distractor chunks in the context of each record",
           metavar="K", group="raft"),
    Option("p", _number(float, 0.0, 1.0), 0.8, "raft: probability that a record's context holds its oracle chunk "
           "(the RAFT paper's P)", metavar="P", group="raft"),
    Option("chunk_size", _number(int, 16, 100_000), 512, "raft: chunk size in estimated tokens (4 characters a "
           "token)", metavar="TOKENS", group="raft"),
    Option("chunk_overlap", _number(int, 0, 50_000), 0, "raft: tokens of whole sentences that neighbouring chunks "
           "share (at most half of --chunk-size)", metavar="TOKENS", group="raft"),
    Option("chunker", _choice("simple", "semantic"), "simple", "raft: simple (offline, sentence-aware) or semantic "
           "(cuts where /v1/embeddings shows the topic moving; those calls are journaled like every other)",
           metavar="KIND", group="raft"),
    Option("embedding_model", _text, "text-embedding-3-small", "raft: embeddings model of --chunker semantic",
           metavar="NAME", group="raft"),
    Option("prompt_style", _choice("gpt", "llama"), "gpt", "raft: built-in prompts, as raft.py's gpt and llama "
           "prompt keys", metavar="STYLE", group="raft"),
    Option("question_template", _optional_text, None, "raft: question prompt file: text is the user message "
           "with {chunk} and {n}; .json is a list of {role, content} messages", metavar="FILE", group="raft"),
    Option("answer_template", _optional_text, None, "raft: answer prompt file: text is the user message with "
           "{question} and {context}; .json is a list of {role, content} messages", metavar="FILE", group="raft"),
    Option("json_text_field", _text, "text", "raft: field holding the text of .json and .jsonl documents",
           metavar="FIELD", group="raft"),
    Option("max_document_mb", _number(float, 0.001), 64.0, "raft: larger documents are recorded in errors.jsonl "
           "and skipped", metavar="MB", group="raft"),
    Option("answer_retries", _number(int, 0, 20), 2, "raft: paid retries of a reply the job cannot use (an answer "
           "without a final answer or a quote, a question call without questions, a malformed response) before it is "
           "set aside as failed with its raw text", metavar="N", group="raft"),
    Option("structured", _choice("auto", "on", "off"), "auto", "raft: constrained output (response_format with a "
           "JSON schema, enforced by the server); auto falls back to free-text prompts when the server refuses or "
           "ignores it, on never does, off uses free-text prompts only", metavar="MODE", group="raft"),
    Option("question_tokens", _number(int, 8, 4096), 40, "raft: max_tokens of a question call per question "
           "asked (the call gets this times --questions); a max_tokens in --extra-body wins", metavar="N",
           group="raft"),
    Option("answer_tokens", _number(int, 16, 100_000), 400, "raft: max_tokens of an answer call; an answer cut off "
           "there is asked again once with twice the room; a max_tokens in --extra-body wins", metavar="N",
           group="raft"),
    Option("quality_stop", _number(float, 0.0, 1.0), 0.7, "raft: stop (exit 75) when more than this share of the "
           "first 20 answers (or question replies) of a run is rejected, saying what the model returned (1 = never "
           "stop)",
           metavar="SHARE", group="raft"),
    Option("max_records", _number(int, 0), 0, "raft: stop cleanly (exit 75) once the state dir holds this many "
           "records; raise it and run again to continue (0 = no cap)", metavar="N", group="raft"),
    Option("seed", _number(int, 0), 0, "raft: seed of the distractor sampling and of export --split",
           metavar="N", group="raft"),
    # -- export of raft datasets --
    Option("split", _split_spec, "", "export: also write NAME=FRACTION of the records (comma-separated for more) "
           "to OUT with .NAME before the suffix, e.g. eval=0.1; chosen by record id with the --seed of the run",
           commands=("export",), metavar="SPEC", group="export"),
    Option("system_prompt", _optional_text, None, "export --format chat: system message opening every "
           "conversation", commands=("export",), metavar="TEXT", group="export"),
    Option("prompt_column", _column, "prompt", "export --format completion: name of the prompt column",
           commands=("export",), metavar="NAME", group="export"),
    Option("completion_column", _column, "completion", "export --format completion: name of the completion "
           "column", commands=("export",), metavar="NAME", group="export"),
    Option("stop_token", _text, "<STOP>", "export --format completion: appended to every completion (empty = "
           "none)", commands=("export",), metavar="TEXT", group="export"),
    Option("base_url", _url_list, ("https://api.openai.com/v1",), "OpenAI-compatible base URL that gets every "
           "call and the API key, e.g. http://127.0.0.1:8000/v1 (vLLM, Ollama, llama.cpp) or an Azure deployment "
           "URL (several, comma-separated, share the work); OPENAI_BASE_URL is read when this is not set",
           metavar="URL", group="api"),
    Option("model", _optional_text, None, "model name sent with every request (overrides the model in "
           "input lines); required unless every input line names one", metavar="NAME", group="api"),
    Option("api_type", _choice("auto", "openai", "azure"), "auto", "auth style: openai (Authorization: Bearer) "
           "or azure (api-key header + api-version); auto picks azure for *.azure.com hosts", metavar="TYPE",
           group="api"),
    Option("api_version", _optional_text, None, "Azure api-version query parameter, e.g. 2024-10-21",
           metavar="VER", group="api"),
    Option("extra_body", _json_object, {}, "JSON object merged into every request body, overriding the same "
           "keys of input lines, e.g. '{\"temperature\": 0}'", metavar="JSON", group="api"),
    Option("concurrency", _number(int, 1, 100_000), 64, "API calls in flight at most", metavar="N", group="limits"),
    Option("rpm", _number(float, 0), 0.0, "client requests/minute limit, paced evenly (0 = none; the server's "
           "x-ratelimit headers and its 429s still set the pace)", metavar="N", group="limits"),
    Option("tpm", _number(float, 0), 0.0, "client tokens/minute limit, prompt estimate + max_tokens counted "
           "before the call, corrected from usage after (0 = none)", metavar="N", group="limits"),
    Option("stream", _choice("auto", "off"), "auto", "auto: stream answers (every chunk shows the call is alive) "
           "where the server can, and fall back to plain calls where it cannot; off: never stream", metavar="MODE",
           group="api"),
    Option("request_timeout", _number(float, 0.1), 600.0, "seconds one API call may take in total; a call that "
           "runs longer is cancelled and retried", metavar="S", group="api"),
    Option("connect_timeout", _number(float, 0.1), 10.0, "seconds to open a connection", metavar="S", group="api"),
    Option("stall_timeout", _number(float, 0.1), 120.0, "a streamed call that receives no byte for this many "
           "seconds is cancelled and retried (a call that is not streamed is never cancelled for this)",
           metavar="S", group="api"),
    Option("max_retries", _number(int, 0, 1000), 8, "retries of one call on 5xx, timeouts and connection errors "
           "before it is left for the next run (never recorded as failed; 429s do not count)", metavar="N",
           group="api"),
    Option("rate_limit_wait", _number(float, 1.0), 600.0, "seconds a call keeps being retried after 429s before "
           "it is left for the next run", metavar="S", group="limits"),
    Option("model_check", _choice("on", "off"), "on", "before the first paid call, ask GET /models and refuse a "
           "model the server does not list (skipped where the server has no such list)", metavar="ON_OFF", group="api"),
    Option("backoff_base", _number(float, 0.0), 1.0, "first retry delay in seconds (exponential, full jitter)",
           metavar="S", group="api"),
    Option("backoff_max", _number(float, 0.0), 60.0, "longest retry delay in seconds", metavar="S", group="api"),
    Option("fsync", _choice("always", "batch", "off"), "batch", "journal durability: always = fsync before "
           "every acknowledgement with no added delay; batch = group commit, waiting at most --fsync-interval "
           "to gather records; off = no fsync (survives kill -9, not power loss)", metavar="POLICY",
           group="durability"),
    Option("fsync_interval", _number(float, 0.0, 10.0), 0.005, "seconds the batch policy may wait to gather "
           "records into one fsync", metavar="S", group="durability"),
    Option("segment_mb", _number(float, 0.001), 64.0, "journal segment size before rotation (MiB)",
           metavar="MB", group="durability"),
    Option("snapshot_every", _number(int, 1), 100_000, "compact a snapshot after this many journal records",
           metavar="N", group="durability"),
    Option("grace", _number(float, 0.0), 30.0, "seconds in-flight calls may finish after SIGINT/SIGTERM "
           "(a second signal exits at once)", metavar="S", group="operations"),
    Option("disk_full_wait", _number(float, 0.0), 60.0, "seconds to keep retrying journal writes on a full "
           "disk before stopping (exit 75)", metavar="S", group="durability"),
    Option("output_tokens_estimate", _number(int, 1), 256, "expected completion tokens for a request without "
           "max_tokens, used by --tpm until real usage is seen", metavar="N", group="limits"),
    Option("price_input_per_m", _number(float, 0), 0.0, "price of one million prompt tokens, for the cost "
           "estimate and --max-cost", commands=("run", "status", "demo"), metavar="USD", group="limits"),
    Option("price_output_per_m", _number(float, 0), 0.0, "price of one million completion tokens, for the cost "
           "estimate and --max-cost", commands=("run", "status", "demo"), metavar="USD", group="limits"),
    Option("max_cost", _number(float, 0), 0.0, "stop cleanly (exit 75) once the estimated cost of the state dir "
           "reaches this (calls already in flight still finish and count); raise it and run again to continue "
           "(0 = no cap)", metavar="USD", group="limits"),
    Option("max_tokens_total", _number(int, 0), 0, "stop cleanly (exit 75) once the state dir has used this many "
           "tokens (prompt + completion; calls already in flight still finish and count); raise it and run again "
           "to continue (0 = no cap)", metavar="N", group="limits"),
    Option("watch", _parse_bool, False, "keep running when the input is done and pick up new or changed input "
           "as it appears (until SIGINT/SIGTERM)", is_bool=True, group="job"),
    Option("watch_interval", _number(float, 0.05), 10.0, "seconds between scans of the input in --watch mode",
           metavar="S", group="job"),
    Option("retry_failed", _parse_bool, False, "retry tasks recorded as failed (400s, unparsable answers)",
           is_bool=True, group="job"),
    Option("allow_config_change", _parse_bool, False, "resume a state dir whose job was created with another "
           "model or parameters (finished results are kept; changed requests get new ids)", is_bool=True, group="job"),
    Option("salvage", _parse_bool, False, "set damaged journal records aside (state/damaged/) and redo their "
           "tasks instead of refusing to resume", is_bool=True, group="durability"),
    Option("log_format", _choice("text", "json"), "text", "progress and log lines as text or JSON",
           commands=("run", "demo"), metavar="FMT", group="operations"),
    Option("progress_interval", _number(float, 0.1), 5.0, "seconds between progress lines",
           commands=("run", "demo"), metavar="S", group="operations"),
    Option("progress", _choice("auto", "live", "lines", "off"), "auto", "progress display: live (redrawn "
           "table, needs a terminal), lines (one line every --progress-interval), off; auto = live on a terminal, "
           "lines otherwise", commands=("run", "demo"), metavar="MODE", group="operations"),
    Option("metrics_port", _optional_port, None, "serve Prometheus /metrics and /healthz on this port (0 = any "
           "free port, logged and written to status.json; empty = no server)", commands=("run", "demo"),
           metavar="PORT", group="operations"),
    Option("metrics_host", _text, "127.0.0.1", "address the metrics and health server listens on (0.0.0.0 "
           "inside a container so that the port can be published)", commands=("run", "demo"), metavar="HOST",
           group="operations"),
    Option("health_writer_timeout", _number(float, 0.1), 120.0, "/healthz fails when the journal writer holds "
           "records but has committed nothing for this many seconds", commands=("run", "demo"), metavar="S",
           group="operations"),
    Option("health_stall_timeout", _number(float, 0.1), 300.0, "/healthz fails when tasks wait but no call, "
           "retry, commit or rate-limit wait has happened for this many seconds (never less than --backoff-max "
           "plus 1 s, or two request intervals of --rpm)", commands=("run", "demo"), metavar="S", group="operations"),
    Option("failpoints", _text, "", "test hook: comma-separated failpoints (name[=action][@hit])",
           flag=False, group="operations"),
    # -- state beyond the machine (asyncraft.remote) --
    Option("state_url", _optional_text, None, "s3://, gs://, az:// or file:// URL holding the state; the local "
           "state dir becomes a cache (credentials from the store's usual variables: AWS_*, GOOGLE_*, AZURE_*)",
           commands=_STATEFUL, metavar="URL", group="job"),
    Option("remote_durability", _choice("async", "sync"), "async", "async: a result is acknowledged once on the "
           "local disk (losing the machine re-pays at most one interval of results); sync: once the object store "
           "has it", metavar="MODE", group="durability"),
    Option("remote_interval", _number(float, 0.01, 3600.0), 1.0, "seconds between shipments of the journal's "
           "tail to the state URL (async durability)", metavar="S", group="durability"),
    Option("remote_lease", _number(float, 1.0, 86_400.0), 30.0, "seconds the state URL's lease lasts without "
           "renewal; another machine takes over only after it expires", metavar="S", group="durability"),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Validated configuration. The API key is excluded from repr and from the fingerprint."""

    state_dir: str = "asyncraft-state"
    input: str = ""
    job: str = "prompts"
    samples: int = 1
    questions: int = 5
    distractors: int = 3
    p: float = 0.8
    chunk_size: int = 512
    chunk_overlap: int = 0
    chunker: str = "simple"
    embedding_model: str = "text-embedding-3-small"
    prompt_style: str = "gpt"
    question_template: str | None = None
    answer_template: str | None = None
    json_text_field: str = "text"
    max_document_mb: float = 64.0
    answer_retries: int = 2
    structured: str = "auto"
    question_tokens: int = 40
    answer_tokens: int = 400
    quality_stop: float = 0.7
    max_records: int = 0
    seed: int = 0
    split: str = ""
    system_prompt: str | None = None
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    stop_token: str = "<STOP>"
    base_url: tuple[str, ...] = ("https://api.openai.com/v1",)
    model: str | None = None
    api_type: str = "auto"
    api_version: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 64
    rpm: float = 0.0
    tpm: float = 0.0
    stream: str = "auto"
    request_timeout: float = 600.0
    connect_timeout: float = 10.0
    stall_timeout: float = 120.0
    max_retries: int = 8
    rate_limit_wait: float = 600.0
    model_check: str = "on"
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    fsync: str = "batch"
    fsync_interval: float = 0.005
    segment_mb: float = 64.0
    snapshot_every: int = 100_000
    grace: float = 30.0
    disk_full_wait: float = 60.0
    output_tokens_estimate: int = 256
    price_input_per_m: float = 0.0
    price_output_per_m: float = 0.0
    max_cost: float = 0.0
    max_tokens_total: int = 0
    watch: bool = False
    watch_interval: float = 10.0
    retry_failed: bool = False
    allow_config_change: bool = False
    salvage: bool = False
    log_format: str = "text"
    progress_interval: float = 5.0
    progress: str = "auto"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    health_writer_timeout: float = 120.0
    health_stall_timeout: float = 300.0
    failpoints: str = ""
    state_url: str | None = None
    remote_durability: str = "async"
    remote_interval: float = 1.0
    remote_lease: float = 30.0
    api_key: str | None = field(default=None, repr=False)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def resolved_api_type(self) -> str:
        if self.api_type != "auto":
            return self.api_type
        return "azure" if any(".azure.com" in u or ".azure-api.net" in u for u in self.base_url) else "openai"


KEY_VARIABLES = ("ASYNCRAFT_API_KEY", "OPENAI_API_KEY")
KEY_FILE_VARIABLE = "ASYNCRAFT_API_KEY_FILE"
# Read from the environment but not options: the key, and the simulator's own settings.
OTHER_VARIABLES = (*KEY_VARIABLES, KEY_FILE_VARIABLE)
OTHER_PREFIXES = ("ASYNCRAFT_SIM_",)


def _read_api_key(env: Mapping[str, str]) -> tuple[str | None, str]:
    """The API key and the variable it came from."""
    for name in KEY_VARIABLES:
        if env.get(name, "").strip():
            return env[name].strip(), name
    key_file = env.get(KEY_FILE_VARIABLE, "").strip()
    if key_file:
        try:
            return Path(key_file).read_text(encoding="utf-8").strip() or None, KEY_FILE_VARIABLE
        except OSError as exc:
            raise ConfigError(f"{KEY_FILE_VARIABLE}: cannot read {key_file}: {exc.strerror}") from None
    return None, ""


def _check_key(key: str, source: str) -> None:
    """A key goes into an HTTP header: a line break or a control character there would make every
    call fail. The message never shows the key."""
    for i, char in enumerate(key):
        if not 0x21 <= ord(char) <= 0x7E:
            what = "a line break" if char in "\r\n" else "a space" if char == " " else (
                "a control character" if ord(char) < 0x20 or ord(char) == 0x7F else "a non-ASCII character")
            raise ConfigError(f"{source} contains {what} at position {i + 1}; an API key is printable ASCII "
                              "(check how the variable or file was written)")


def _check_environment(env: Mapping[str, str]) -> None:
    """Every ASYNCRAFT_ variable must be a setting: a misspelt one would be ignored without a word."""
    known = {o.env for o in OPTIONS} | set(OTHER_VARIABLES)
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in known or name.startswith(OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        raise ConfigError(f"{name} is not a setting" + (f"; did you mean {close[0]}?" if close else
                                                          " (see --help for the ASYNCRAFT_ variables)"))


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flags of ``command``, in the sections of GROUPS; defaults are SUPPRESSed so we can tell a given flag
    from a default."""
    options = [o for o in OPTIONS if command in o.commands and o.flag]
    used = {o.group for o in options}
    sections = {key: parser.add_argument_group(title) for key, title in GROUPS.items() if key in used}
    for opt in options:
        section = sections.get(opt.group)
        if section is None:  # an option declared without a known group still works; a test names it
            section = sections[opt.group] = parser.add_argument_group("other options")
        help_text = f"{opt.help} [env {opt.env}; default {_show_default(opt.default)}]"
        if opt.is_bool:
            section.add_argument(opt.flag_name, dest=opt.name, action="store_const", const="1",
                                 default=argparse.SUPPRESS, help=help_text)
        else:
            section.add_argument(opt.flag_name, dest=opt.name, default=argparse.SUPPRESS,
                                 metavar=opt.metavar, help=help_text)


def _show_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    if value is None:
        return "none"
    if value == "":
        return "empty"
    return str(value)


def load(command: str, flags: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
         **overrides: Any) -> Settings:
    """Build Settings for ``command`` from flags (raw strings), environment and defaults."""
    env = os.environ if env is None else env
    flags = flags or {}
    _check_environment(env)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        if opt.name in flags:
            raw, source = flags[opt.name], opt.flag_name
        elif opt.env in env:
            raw, source = env[opt.env], opt.env
        elif opt.name == "base_url" and "OPENAI_BASE_URL" in env:
            raw, source = env["OPENAI_BASE_URL"], "OPENAI_BASE_URL"  # as OPENAI_API_KEY: the SDK's name
        else:
            continue
        try:
            values[opt.name] = opt.parse(str(raw))
        except ValueError as exc:
            raise ConfigError(f"{source} {exc} (got {_shown_value(opt.name, str(raw))!r})") from None
        sources[opt.name] = source
    values.update(overrides)
    key_source = ""
    if command in ("run", "demo"):
        values["api_key"], key_source = _read_api_key(env)
    settings = Settings(**values)
    _check(settings, command, url_source=sources.get("base_url", "ASYNCRAFT_BASE_URL"), key_source=key_source)
    return settings


def _shown_value(name: str, raw: str) -> str:
    return " ".join(_shown_url(u) for u in raw.replace(",", " ").split()) if name == "base_url" else raw


def _check(s: Settings, command: str, *, url_source: str = "ASYNCRAFT_BASE_URL", key_source: str = "") -> None:
    if s.api_key is not None:
        _check_key(s.api_key, key_source or "the API key")
        for url in s.base_url:
            if URL(url).user is not None:
                raise ConfigError(f"{url_source} carries credentials (user:password@) and {key_source or 'an API key'} "
                                  "is set too: they would be sent as two Authorization headers; use one of them")
    if command == "run":
        if not s.input:
            raise ConfigError("--input (ASYNCRAFT_INPUT) is required: the file or folder to generate from")
        if s.backoff_max < s.backoff_base:
            raise ConfigError("ASYNCRAFT_BACKOFF_MAX must be >= ASYNCRAFT_BACKOFF_BASE")
        if s.max_cost and not (s.price_input_per_m or s.price_output_per_m):
            raise ConfigError("ASYNCRAFT_MAX_COST needs ASYNCRAFT_PRICE_INPUT_PER_M and/or "
                              "ASYNCRAFT_PRICE_OUTPUT_PER_M to turn tokens into money")
        if s.resolved_api_type() == "azure" and not s.api_version:
            raise ConfigError("ASYNCRAFT_API_VERSION is required for Azure OpenAI (e.g. 2024-10-21)")
        if s.salvage and s.state_url is not None:
            raise ConfigError("--salvage repairs a local state dir, but with --state-url the object store holds the "
                              "state: move a damaged local dir away and run again to restore it; if the store's own "
                              "state is damaged, run --salvage on its restored local dir without --state-url, then "
                              "replicate that to a new URL")


def fingerprint_settings(s: Settings) -> dict[str, Any]:
    """The settings that change what is generated (not how fast or where): stored in the state dir."""
    return {"job": s.job, "model": s.model, "extra_body": s.extra_body}


def as_public_dict(s: Settings) -> dict[str, Any]:
    """Settings without secrets, for logs and the state dir."""
    out = dataclasses.asdict(s)
    out.pop("api_key", None)
    out["api_key_set"] = s.api_key is not None
    return out


def env_table() -> str:
    """Markdown table of every variable, for the README (a test keeps the README in sync)."""
    rows = ["| variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for opt in OPTIONS:
        flag = opt.flag_name if opt.flag else "(env only)"
        rows.append(f"| `{opt.env}` | `{flag}` | `{_show_default(opt.default)}` | {opt.help} |")
    rows.append("| `ASYNCRAFT_API_KEY` / `OPENAI_API_KEY` | (env only) | none | API key, sent to every base URL "
                "(never written anywhere) |")
    rows.append("| `ASYNCRAFT_API_KEY_FILE` | (env only) | none | file holding the API key (Docker secrets) |")
    rows.append("| `OPENAI_BASE_URL` | (env only) | none | read as `ASYNCRAFT_BASE_URL` when that is not set |")
    return "\n".join(rows)
