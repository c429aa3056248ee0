"""RAFT prompts (the ``gpt`` and ``llama`` styles of Gorilla's raft.py), user templates, and parsing.

``PROMPT_VERSION`` is part of every task id: change it whenever a built-in prompt or a parser
changes, so a state dir never mixes outputs of two prompt versions under the same ids.

User templates are text files whose whole content is the user message, or ``.json`` files holding
a list of ``{"role", "content"}`` messages. Placeholders are replaced literally (no ``str.format``,
so braces in examples need no escaping): ``{chunk}`` (also ``{context}``) and ``{n}`` in question
templates, ``{question}`` and ``{context}`` in answer templates.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from asyncraft.errors import ConfigError

PROMPT_VERSION = "raft-1"
ANSWER_TAG = "<ANSWER>:"

Messages = list[dict[str, str]]

_QUESTION_SYSTEM = {
    "gpt": (
        "You are a synthetic question-answer pair generator. Given a chunk of context about some topic(s), "
        "generate {n} example questions a user could ask and would be answered using information from the chunk. "
        "For example, if the given context was a Wikipedia paragraph about the United States, an example question "
        "could be 'How many states are in the United States?'"),
    "llama": (
        "You are a synthetic question generator.\n\n"
        "Instructions:\n"
        "- Given a chunk of context about some topic(s), generate {n} example questions a user could ask\n"
        "- Questions should be answerable using only information from the chunk.\n"
        "- Generate one question per line\n"
        "- Generate only questions\n"
        "- Questions should be succinct\n\n"
        "Here are some samples:\n"
        "Context: A Wikipedia paragraph about the United States,\n"
        "Question: How many states are in the United States?\n\n"
        "Context: A Wikipedia paragraph about vampire bats,\n"
        "Question: What are the different species of vampire bats?"),
}
_QUESTION_SYSTEM_2 = ("The questions should be able to be answered in a few words or less. "
                      "Include only the questions in your response.")

_ANSWER_SYSTEM = "You are a helpful question answerer who can provide an answer given a question and relevant context."
_ANSWER_USER = {
    "gpt": (
        "Question: {question}\nContext: {context}\n\n"
        "Answer this question using the information given in the context above. Here is things to pay attention to:\n"
        "- First provide step-by-step reasoning on how to answer the question.\n"
        "- In the reasoning, if you need to copy paste some sentences from the context, include them in "
        "##begin_quote## and ##end_quote##. This would mean that things outside of ##begin_quote## and "
        "##end_quote## are not directly copy paste from the context.\n"
        "- End your response with final answer in the form <ANSWER>: $answer, the answer should be succinct.\n"
        "You MUST begin your final answer with the tag \"<ANSWER>:\"."),
    "llama": (
        "Question: {question}\nContext: {context}\n\n"
        "Answer this question using the information given in the context above.\n\n"
        "Instructions:\n"
        "- Provide step-by-step reasoning on how to answer the question.\n"
        "- Explain which parts of the context are meaningful and why.\n"
        "- Copy paste the relevant sentences from the context in ##begin_quote## and ##end_quote##.\n"
        "- Provide a summary of how you reached your answer.\n"
        "- End your response with the final answer in the form <ANSWER>: $answer, the answer should be succinct.\n"
        "- You MUST begin your final answer with the tag \"<ANSWER>:\".\n\n"
        "Here are some samples:\n\n"
        "Example question: What movement did the arrest of Jack Weinberg in Sproul Plaza give rise to?\n"
        "Example answer: To answer the question, we need to identify the movement that was sparked by the arrest "
        "of Jack Weinberg in Sproul Plaza. The context provided gives us the necessary information to determine "
        "this.\nFirst, we look for the part of the context that directly mentions Jack Weinberg's arrest. We find "
        "it in the sentence: ##begin_quote##The arrest in Sproul Plaza of Jack Weinberg, a CORE member, provoked "
        "the Free Speech Movement.##end_quote##\nFrom this sentence, we understand that the arrest of Jack Weinberg "
        "led to the Free Speech Movement. Therefore, the movement that was provoked by the arrest of Jack Weinberg "
        "in Sproul Plaza is the Free Speech Movement.\n<ANSWER>: Free Speech Movement"),
}
STYLES = tuple(_QUESTION_SYSTEM)


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass, so a value that contains "{question}" is never substituted again.
    return re.sub(r"\{(" + "|".join(map(re.escape, values)) + r")\}", lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class Prompts:
    """The question and answer message templates of one run."""

    questions: tuple[tuple[str, str], ...]  # (role, content template)
    answers: tuple[tuple[str, str], ...]
    style: str
    digest: str  # hash of both templates: part of the fingerprint

    @classmethod
    def build(cls, style: str = "gpt", question_file: str | None = None, answer_file: str | None = None) -> Prompts:
        if style not in STYLES:
            raise ConfigError(f"ASYNCRAFT_PROMPT_STYLE must be one of {', '.join(STYLES)} (got {style!r})")
        questions: tuple[tuple[str, str], ...] = (
            ("system", _QUESTION_SYSTEM[style]), ("system", _QUESTION_SYSTEM_2), ("user", "{chunk}"))
        answers: tuple[tuple[str, str], ...] = (("system", _ANSWER_SYSTEM), ("user", _ANSWER_USER[style]))
        if question_file:
            questions = _load_template(question_file, "ASYNCRAFT_QUESTION_TEMPLATE", questions,
                                       ("{chunk}", "{context}"))
            questions = tuple((r, c.replace("{context}", "{chunk}")) for r, c in questions)
        if answer_file:
            answers = _load_template(answer_file, "ASYNCRAFT_ANSWER_TEMPLATE", answers, ("{question}",), ("{context}",))
        digest = hashlib.blake2b(orjson.dumps([questions, answers]), digest_size=8).hexdigest()
        return cls(questions, answers, style, digest)

    def question_messages(self, chunk: str, n: int) -> Messages:
        values = {"chunk": chunk, "n": str(n)}
        return [{"role": r, "content": _fill(c, values)} for r, c in self.questions]

    def answer_messages(self, question: str, context: str) -> Messages:
        values = {"question": question, "context": context}
        return [{"role": r, "content": _fill(c, values)} for r, c in self.answers]


def _load_template(path: str, env: str, default: tuple[tuple[str, str], ...], need_any: tuple[str, ...],
                   need_all: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{env}: cannot read template {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if p.suffix.lower() == ".json":
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{env}: {path} is not valid JSON ({exc})") from None
        if not isinstance(obj, list) or not obj or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in obj):
            raise ConfigError(f"{env}: {path} must hold a list of {{\"role\": ..., \"content\": ...}} messages")
        messages = tuple((m["role"], m["content"]) for m in obj)
    else:
        if not raw.strip():
            raise ConfigError(f"{env}: template {path} is empty")
        # A plain text file replaces the user message and keeps the built-in system messages.
        messages = (*(m for m in default if m[0] == "system"), ("user", raw))
    text = "\n".join(c for _, c in messages)
    if not any(tok in text for tok in need_any):
        raise ConfigError(f"{env}: template {path} must contain {' or '.join(need_any)}")
    for tok in need_all:
        if tok not in text:
            raise ConfigError(f"{env}: template {path} must contain {tok}")
    return messages


# -- parsing ---------------------------------------------------------------------------------------

# "1.", "1)", "(1)", "Q1:", "Question 1:", "-", "*", "•", "**1.**", "#", "> " at the start of a line.
_MARKER = re.compile(
    r"^\s*(?:[>#]+\s*)?(?:[-*+\u2022\u2013\u2014]\s+)?(?:\*\*|__)?\s*"
    r"(?:(?:q(?:uestion)?\s*)?\(?\d{1,3}\s*(?:[.):\]](?!\d)|-\s)|\(?[a-z][.)]\s|q(?:uestion)?\s*\d{0,3}\s*[:.-])?"
    r"\s*(?:\*\*|__)?\s*",
    re.IGNORECASE)
_PREAMBLE = re.compile(r"^(?:here\s+(?:are|is)|sure\b|certainly\b|okay\b|ok\b|the following\b)", re.IGNORECASE)


def clean_question(line: str) -> str:
    """A question line without its numbering, bullet, emphasis or quotes."""
    q = _MARKER.sub("", line, count=1).strip()
    q = re.sub(r"^(?:\*\*|__)|(?:\*\*|__)$", "", q).strip()
    if len(q) >= 2 and q[0] == q[-1] and q[0] in "\"'`":
        q = q[1:-1].strip()
    elif len(q) >= 2 and q[0] in "\u201c\u2018" and q[-1] in "\u201d\u2019":
        q = q[1:-1].strip()
    return re.sub(r"\s+", " ", q)


def parse_questions(content: str | None, n: int) -> tuple[list[str], int]:
    """Questions of a question-generation answer, at most ``n``, and how many lines were dropped.

    Numbering and bullets are stripped; blank lines, preambles ("Here are 5 questions:"), lines
    without letters and duplicates (ignoring case and spacing) are dropped; extra questions
    beyond ``n`` are cut (the first ones are usually the best)."""
    seen: set[str] = set()
    out: list[str] = []
    dropped = 0
    for line in (content or "").splitlines():
        if not line.strip():
            continue
        q = clean_question(line)
        key = re.sub(r"[^\w]+", " ", q.lower()).strip()
        if (not key or not any(ch.isalpha() for ch in q) or key in seen
                or (q.endswith(":") and "?" not in q) or (_PREAMBLE.match(q) and "?" not in q)):
            dropped += 1
            continue
        seen.add(key)
        out.append(q)
    if len(out) > n:
        dropped += len(out) - n
        out = out[:n]
    return out, dropped


_TAG = re.compile(r"<\s*answer\s*>\s*:?", re.IGNORECASE)


def parse_answer(content: str | None) -> tuple[str | None, str]:
    """(the chain-of-thought answer with its tag written as ``<ANSWER>:``, the final answer), or
    (None, why) when there is no usable final answer."""
    text = (content or "").strip()
    if not text:
        return None, "empty answer"
    matches = list(_TAG.finditer(text))
    if not matches:
        return None, f"no {ANSWER_TAG} tag"
    last = matches[-1]
    final = text[last.end():].strip()
    if not final:
        return None, f"nothing after {ANSWER_TAG}"
    normalised = text[: last.start()] + ANSWER_TAG + " " + final
    return normalised, final


def final_answer(cot_answer: str) -> str:
    """The text after the last ``<ANSWER>:`` (the whole answer if there is none)."""
    matches = list(_TAG.finditer(cot_answer))
    return cot_answer[matches[-1].end():].strip() if matches else cot_answer.strip()


def retry_note(kind: str, attempt: int, n: int = 0) -> str:
    """Added to a request that is asked again after an unusable answer; it also makes the
    request differ from the one already paid for."""
    if kind == "questions":
        return (f"\n\n(Attempt {attempt + 1}: write exactly {n} questions, one per line, and nothing else.)")
    return (f"\n\n(Attempt {attempt + 1}: the previous answer did not end with a final answer. End your response "
            f"with a line that starts with {ANSWER_TAG} followed by the succinct final answer.)")


def with_note(messages: list[dict[str, Any]], note: str, *, role: str) -> list[dict[str, Any]]:
    """A copy of the messages with ``note`` appended to the last message of ``role``."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") == role:
            m["content"] = str(m.get("content", "")) + note
            return out
    out.append({"role": role, "content": note.strip()})
    return out
