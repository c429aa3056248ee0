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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from asyncraft.errors import ConfigError

PROMPT_VERSION = "raft-2"
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
    # Runs of words of the answer instructions (the template without its question and context, and the
    # notes the job adds), to see a reply that repeats the prompt instead of answering it.
    answer_shingles: frozenset[tuple[str, ...]] = frozenset()

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
        instructions = [re.sub(r"\{(?:question|context)\}", "\n", c) for _, c in answers]
        instructions += [structured_note("answers"), retry_note("answers", 0),
                         retry_note("answers", 0, structured=True)]
        return cls(questions, answers, style, digest, frozenset().union(*map(_shingles, instructions)))

    def question_messages(self, chunk: str, n: int) -> Messages:
        values = {"chunk": chunk, "n": str(n)}
        return [{"role": r, "content": _fill(c, values)} for r, c in self.questions]

    def answer_messages(self, question: str, context: str) -> Messages:
        values = {"question": question, "context": context}
        return [{"role": r, "content": _fill(c, values)} for r, c in self.answers]

    def repeats_instructions(self, reply: str) -> bool:
        """Whether most of a reply is the answer prompt's own instructions (small and base models
        echo their prompt, tags included). A good answer may borrow a phrase of the example, not
        the bulk of the instructions."""
        runs = _shingles(reply)
        return bool(runs) and len(runs & self.answer_shingles) > ECHO_SHARE * len(runs)


SHINGLE_WORDS = 5
ECHO_SHARE = 0.4


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = _words(text).split()
    return {tuple(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


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

# "1.", "1)", "(1)", "[1]", "Q1:", "Question 1:", "-", "*", "•", "**1.**", "#", "> " at the start of a line.
_MARKER = re.compile(
    r"^\s*(?:[>#]+\s*)?(?:[-*+\u2022\u2013\u2014]\s+)?(?:\*\*|__)?\s*"
    r"(?:(?:q(?:uestion)?\s*)?[(\[]?\d{1,3}\s*(?:[.):\]](?!\d)|-\s)|\(?[a-z][.)]\s|q(?:uestion)?\s*\d{0,3}\s*[:.-])?"
    r"\s*(?:\*\*|__)?\s*",
    re.IGNORECASE)
# How a question starts when the model forgot its question mark. In English an auxiliary first ("Is
# the lens French"), or a question word before one ("Why do tides vary", "Which lens was first"):
# "When the dough rises, ..." and "How a bicycle stays upright" (a heading) are no questions.
_AUXILIARIES = frozenset("""
    is are was were am do does did can could should would will shall may might must has have had
    isn't aren't wasn't weren't don't doesn't didn't can't couldn't shouldn't wouldn't won't hasn't haven't
""".split())
_WH = frozenset("what which who whom whose when where why how".split())
_HOW_MUCH = frozenset("many much long far often old big large high deep".split())
# Other languages: their question words alone (a question with its mark is a question in any language).
_INTERROGATIVES = frozenset("""
    qui que quoi quel quelle quels quelles quand où pourquoi comment combien est-ce
    wer wen wem wessen wann wo warum wieso weshalb wie welche welcher welches welchen wohin woher
    qué quién quiénes cuál cuáles cuándo dónde cómo cuánto cuánta cuántos cuántas
    chi cosa quale quali quando dove perché quanto quanta quanti quante
    quem quais onde porque quantos
    wat welke wanneer waar waarom hoe
""".split())
_QUESTION_MARKS = ("?", "\uff1f", "\u061f", "\u037e")  # ASCII, fullwidth, Arabic, Greek
_COPY_MIN_WORDS = 4
# Longer than any question a user would ask: a model running on (small models do, even under a grammar).
MAX_QUESTION_WORDS = 40
MAX_QUESTION_CHARS = 300


def clean_question(line: str) -> str:
    """A question line without its numbering, bullet, emphasis or quotes."""
    q = _MARKER.sub("", line, count=1).strip()
    q = re.sub(r"^(?:\*\*|__)|(?:\*\*|__)$", "", q).strip()
    if len(q) >= 2 and q[0] == q[-1] and q[0] in "\"'`":
        q = q[1:-1].strip()
    elif len(q) >= 2 and q[0] in "\u201c\u2018" and q[-1] in "\u201d\u2019":
        q = q[1:-1].strip()
    return re.sub(r"\s+", " ", q)


def _words(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def reads_as_question(q: str) -> bool:
    """Starts like a sentence, and ends with a question mark, or starts the way a question does
    and does not end like a statement (the model forgot the mark)."""
    if not q or not (q[0].isalnum() or q[0] in "\u00bf\u00a1\"'\u201c\u2018("):
        return False  # "]}, {'question': ..." is a model writing JSON into a string
    end = q.rstrip(" \"'\u201d\u2019)*_")
    words = [w.lower().strip(",:;\"'\u201c\u2018*_").replace("\u2019", "'") for w in q.split()[:3]]
    first, rest = words[0], words[1:]
    if q[0].islower() and first not in _AUXILIARIES and first not in _WH and first not in _INTERROGATIVES:
        return False  # the rest of a sentence broken across lines: "a link to your article and ... century?"
    if end.endswith(_QUESTION_MARKS) or q.startswith("\u00bf"):
        return True
    if end.endswith((".", "!", ":", ";")) or "?" in q or re.search(r"[.!:;]\s", q):
        return False  # ends like a statement, or holds one: "can move easily on its own. If it was"
    if first in _AUXILIARIES:
        return True
    if first in _WH:
        if first == "how" and rest and rest[0] in _HOW_MUCH:
            return True
        # "Why do ...", and "Which lens was ..." (what, which and whose take a noun first).
        return any(w in _AUXILIARIES for w in (rest if first in ("what", "which", "whose") else rest[:1]))
    return first in _INTERROGATIVES


def select_questions(candidates: Iterable[str], n: int, source: str = "") -> tuple[list[str], Counter[str]]:
    """At most ``n`` questions from candidate lines or strings, and what was dropped, by reason.

    Numbering and bullets are stripped; blank candidates are skipped. A candidate is dropped when it
    has no letters, does not read as a question (so preambles such as "Here are 5 questions:" and
    statements go too), is longer than any question (``MAX_QUESTION_WORDS``), copies a sentence of
    ``source`` (the chunk, and the prompt with its example questions; a statement with a question
    mark is still a copy), repeats an earlier one (ignoring case and spacing), or comes after the
    first ``n`` (the first ones are usually the best)."""
    seen: set[str] = set()
    out: list[str] = []
    dropped: Counter[str] = Counter()
    source_words = f" {_words(source)} " if source else ""
    for raw in candidates:
        if not raw.strip():
            continue
        q = clean_question(raw)
        key = _words(q)
        if not key or not any(ch.isalpha() for ch in q):
            dropped["no letters"] += 1
        elif not reads_as_question(q):
            dropped["not a question"] += 1
        elif len(q) > MAX_QUESTION_CHARS or len(q.split()) > MAX_QUESTION_WORDS:
            dropped["too long"] += 1
        elif source_words and len(key.split()) >= _COPY_MIN_WORDS and f" {key} " in source_words:
            dropped["copied"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            out.append(q)
    if len(out) > n:
        dropped["beyond the number asked"] += len(out) - n
        out = out[:n]
    return out, dropped


def parse_questions(content: str | None, n: int, source: str = "") -> tuple[list[str], Counter[str]]:
    """The questions of a free-text question-generation reply, one per line (see ``select_questions``)."""
    return select_questions((content or "").splitlines(), n, source)


_TAG = re.compile(r"<\s*answer\s*>\s*:?", re.IGNORECASE)


def is_placeholder(final: str) -> bool:
    """A final answer that is the prompt's placeholder ("$answer", "{ANSWER}") or no answer at all."""
    return not any(ch.isalnum() for ch in final) or re.sub(r"[\W_]+", "", final).lower() == "answer"


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
    if is_placeholder(final):
        return None, f"nothing after {ANSWER_TAG}"
    normalised = text[: last.start()] + ANSWER_TAG + " " + final
    return normalised, final


def final_answer(cot_answer: str) -> str:
    """The text after the last ``<ANSWER>:`` (the whole answer if there is none)."""
    matches = list(_TAG.finditer(cot_answer))
    return cot_answer[matches[-1].end():].strip() if matches else cot_answer.strip()


def retry_note(kind: str, attempt: int, n: int = 0, *, structured: bool = False) -> str:
    """Added to a request that is asked again after an unusable answer; it also makes the
    request differ from the one already paid for."""
    if kind == "questions":
        if structured:
            return (f"\n\n(Attempt {attempt + 1}: reply with the JSON object only, holding {n} questions about the "
                    "text, each ending with a question mark.)")
        return (f"\n\n(Attempt {attempt + 1}: write exactly {n} questions, one per line, each ending with a question "
                "mark, and nothing else.)")
    if structured:
        return (f"\n\n(Attempt {attempt + 1}: the previous reply was unusable. Reply with the JSON object only: copy "
                "each quote word for word from the context, keep the reasoning short, and give the final answer.)")
    return (f"\n\n(Attempt {attempt + 1}: the previous answer did not end with a final answer. Keep the reasoning "
            f"short and end your response with a line that starts with {ANSWER_TAG} followed by the succinct final "
            "answer.)")


def structured_note(kind: str, n: int = 0) -> str:
    """What a request in a structured form adds to the free-text prompt: the fields to fill."""
    if kind == "questions":
        return f'\n\nReply with a JSON object {{"questions": [...]}} holding the {n} questions as strings.'
    return ('\n\nReply with a JSON object instead of free text: "reasoning" is your step-by-step reasoning, "quotes" '
            "lists the sentences of the context that the answer rests on, copied word for word, and \"answer\" is the "
            "succinct final answer.")


def with_note(messages: list[dict[str, Any]], note: str, *, role: str) -> list[dict[str, Any]]:
    """A copy of the messages with ``note`` appended to the last message of ``role``."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") == role:
            m["content"] = str(m.get("content", "")) + note
            return out
    out.append({"role": role, "content": note.strip()})
    return out


def without_note(messages: list[dict[str, Any]], note: str, *, role: str) -> list[dict[str, Any]]:
    """The messages ``with_note`` was given back (a copy)."""
    out = [dict(m) for m in messages]
    for i in range(len(out) - 1, -1, -1):
        m = out[i]
        if m.get("role") != role:
            continue
        content = str(m.get("content", ""))
        if content == note.strip():
            del out[i]
        elif content.endswith(note):
            m["content"] = content[: -len(note)]
        break
    return out
