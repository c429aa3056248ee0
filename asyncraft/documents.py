"""Reading the RAFT job's input: a file or a folder (recursively) of .txt, .md, .pdf, .json and .jsonl.

Every bad item (unreadable, empty, undecodable, oversized, malformed) becomes a ``DocProblem``
naming its path, so the job records it and goes on with the rest; nothing here raises for bad
input. Traversal order is sorted and independent of the file system, so the same folder always
yields the same documents in the same order (task ids and exports depend on it).
"""

from __future__ import annotations

import codecs
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("asyncraft")

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text", ".rst")
SUFFIXES = (*TEXT_SUFFIXES, ".pdf", ".json", ".jsonl")


@dataclass(frozen=True, slots=True)
class Document:
    source: str  # path relative to the input root (plus ":line" or "[index]" inside JSON files)
    text: str


@dataclass(frozen=True, slots=True)
class DocProblem:
    source: str
    message: str


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: Path
    rel: str  # stable name: relative to the input folder, or the file name for a single file
    size: int
    mtime_ns: int


def list_files(root: Path) -> Iterator[FileEntry | DocProblem]:
    """Supported files under ``root`` in sorted order; hidden files and folders are skipped."""
    if root.is_file():
        try:
            st = root.stat()
        except OSError as exc:
            yield DocProblem(root.name, f"{root}: cannot read: {exc.strerror}")
            return
        yield FileEntry(root, root.name, st.st_size, st.st_mtime_ns)
        return
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(SUFFIXES):
                continue
            path = base / name
            found.append((path.relative_to(root).as_posix(), path))
    # One order for the whole tree (by relative path), whatever order the file system lists.
    for rel, path in sorted(found):
        try:
            st = path.stat()
        except OSError as exc:
            yield DocProblem(rel, f"{rel}: cannot read: {exc.strerror or exc}")
            continue
        yield FileEntry(path, rel, st.st_size, st.st_mtime_ns)


def read_file(entry: FileEntry, *, text_field: str = "text",
              max_bytes: int = 64 << 20) -> Iterator[Document | DocProblem]:
    """The documents of one file (JSON files may hold many), or the problems that stop them."""
    rel = entry.rel
    if entry.size > max_bytes:
        yield DocProblem(rel, f"{rel}: {entry.size / (1 << 20):.1f} MiB is over the limit of "
                              f"{max_bytes / (1 << 20):g} MiB (ASYNCRAFT_MAX_DOCUMENT_MB); split it or raise the limit")
        return
    try:
        data = entry.path.read_bytes()
    except OSError as exc:
        yield DocProblem(rel, f"{rel}: cannot read: {exc.strerror or exc}")
        return
    suffix = entry.path.suffix.lower()
    if suffix == ".pdf":
        yield _one(rel, *pdf_text(data, rel))
    elif suffix == ".jsonl":
        yield from jsonl_documents(rel, data, text_field)
    elif suffix == ".json":
        yield from json_documents(rel, data, text_field)
    else:
        yield _one(rel, *decode_text(data, rel))


def _one(rel: str, text: str | None, problem: str | None) -> Document | DocProblem:
    if problem is not None or text is None:
        return DocProblem(rel, problem or f"{rel}: no text")
    if not text.strip():
        return DocProblem(rel, f"{rel}: empty document (no text to generate from)")
    return Document(rel, text)


def decode_text(data: bytes, rel: str) -> tuple[str | None, str | None]:
    """UTF-8 (with or without BOM) or UTF-16 with a BOM; anything else is reported, not guessed."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        return None, (f"{rel}: not valid {encoding.upper().replace('-SIG', '')} text (byte {exc.start}: "
                      f"{exc.reason}); convert it to UTF-8")
    if "\x00" in text:
        return None, f"{rel}: contains NUL characters; it looks like a binary file, not text"
    return text, None


def pdf_text(data: bytes, rel: str) -> tuple[str | None, str | None]:
    """Text of every page, pages joined by a blank line so the last word of a page and the first
    of the next never merge."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    # pypdf logs recoverable oddities of real-world PDFs as warnings; they are not the user's problem.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    return None, f"{rel}: the PDF is encrypted with a password"
            except (PyPdfError, NotImplementedError) as exc:
                return None, f"{rel}: the PDF is encrypted and cannot be opened ({exc})"
        pages = []
        for page in reader.pages:
            pages.append((page.extract_text() or "").strip())
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError,
            RecursionError, AssertionError, ZeroDivisionError) as exc:
        return None, f"{rel}: not a readable PDF ({type(exc).__name__}: {str(exc)[:200]})"
    text = "\n\n".join(p for p in pages if p)
    if not text.strip():
        return None, f"{rel}: the PDF has no extractable text (scanned pages need OCR first)"
    return text, None


def _field_text(obj: Any, text_field: str) -> str | None:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        value = obj.get(text_field)
        if isinstance(value, str):
            return value
    return None


def json_documents(rel: str, data: bytes, text_field: str) -> Iterator[Document | DocProblem]:
    """A .json file: an object with the text field (one document) or a list of them (one each)."""
    text, problem = decode_text(data, rel)
    if problem is not None or text is None:
        yield DocProblem(rel, problem or f"{rel}: no text")
        return
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        yield DocProblem(rel, f"{rel}: not valid JSON ({exc})")
        return
    if isinstance(obj, list):
        if not obj:
            yield DocProblem(rel, f"{rel}: empty JSON list")
        for i, item in enumerate(obj):
            src = f"{rel}[{i}]"
            value = _field_text(item, text_field)
            if value is None:
                yield DocProblem(src, f"{src}: no string field {text_field!r} (set ASYNCRAFT_JSON_TEXT_FIELD)")
            else:
                yield _one(src, value, None)
        return
    value = _field_text(obj, text_field)
    if value is None:
        yield DocProblem(rel, f"{rel}: no string field {text_field!r} (set ASYNCRAFT_JSON_TEXT_FIELD)")
        return
    yield _one(rel, value, None)


def jsonl_documents(rel: str, data: bytes, text_field: str) -> Iterator[Document | DocProblem]:
    """A .jsonl file: one document per line; a bad line is reported with its number, the rest go on."""
    if not data.strip():
        yield DocProblem(rel, f"{rel}: empty file")
        return
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        src = f"{rel}:{lineno}"
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield DocProblem(src, f"{src}: not valid JSON ({exc})")
            continue
        value = _field_text(obj, text_field)
        if value is None:
            yield DocProblem(src, f"{src}: no string field {text_field!r} (set ASYNCRAFT_JSON_TEXT_FIELD)")
            continue
        yield _one(src, value, None)
