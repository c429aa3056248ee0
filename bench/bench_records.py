"""Size of a prompts job's done record: the whole response body (kept since the batch export) against the
fields kept before (first choice's message, finish_reason, model), as written to the journal and as sealed
into a zstd-compressed run.

    python bench/bench_records.py

Every figure is a ratio to the old record's size, measured in the same run. The bodies are OpenAI-shaped
chat completions: the simulator's short answers and longer answers (1, 4 KB), with and without logprobs.
"""

from __future__ import annotations

import random

import zstandard

from asyncraft import records, simcontent
from asyncraft.simulate import _logprobs
from asyncraft.storage.runfile import FRAME_RAW, LEVEL

N = 2_000
_rng = random.Random(0)
VOCABULARY = ["".join(_rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(_rng.randint(2, 9)))
              for _ in range(5000)]


def body(i: int, words: int, logprobs: bool) -> dict[str, object]:
    if words <= 12:
        text = simcontent.chat_reply({"messages": [{"role": "user", "content": f"question {i}"}]})
    else:  # prose-like: words drawn from a vocabulary of 5,000, so that it compresses about as text does
        rng = random.Random(i)
        text = " ".join(VOCABULARY[int(rng.paretovariate(1.1)) % len(VOCABULARY)] for _ in range(words))
    return {"id": f"chatcmpl-{i:024x}", "object": "chat.completion", "created": 1764460800 + i, "model": "gpt-4o-mini",
            "system_fingerprint": "fp_0123456789", "service_tier": "default",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                                 "annotations": []},
                         "logprobs": _logprobs(text, 0) if logprobs else None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 40, "completion_tokens": len(text) // 4, "total_tokens": 40 + len(text) // 4,
                      "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                    "accepted_prediction_tokens": 0,
                                                    "rejected_prediction_tokens": 0}}}


def old_record(i: int, raw: dict[str, object]) -> dict[str, object]:
    choice = raw["choices"][0]  # type: ignore[index]
    return {"k": "done", "id": f"{i:032x}", "stage": "prompts", "line": i + 1, "custom_id": f"req-{i}",
            "message": {"content": choice["message"]["content"]}, "finish_reason": "stop", "model": raw["model"],
            "usage": {"prompt_tokens": 40, "completion_tokens": 10}, "seq": i + 1}


def new_record(i: int, raw: dict[str, object]) -> dict[str, object]:
    return {"k": "done", "id": f"{i:032x}", "stage": "prompts", "line": i + 1, "custom_id": f"req-{i}", "raw": raw,
            "request_id": f"req_{i:032x}", "usage": {"prompt_tokens": 40, "completion_tokens": 10}, "seq": i + 1}


def sizes(recs: list[dict[str, object]]) -> tuple[float, float]:
    """(bytes per record in the journal, bytes per record in a sealed run)."""
    lines = [records.encode(r) for r in recs]
    cctx = zstandard.ZstdCompressor(level=LEVEL)
    sealed, frame = 0, b""
    for line in lines:
        frame += line
        if len(frame) >= FRAME_RAW:
            sealed += len(cctx.compress(frame))
            frame = b""
    if frame:
        sealed += len(cctx.compress(frame))
    return sum(map(len, lines)) / len(lines), sealed / len(lines)


def main() -> None:
    print(f"{'answer':<24}{'old B':>8}{'new B':>8}{'ratio':>7}   {'old zst':>8}{'new zst':>8}{'ratio':>7}")
    for label, words, logprobs in (("simulator (~12 words)", 10, False), ("~1 KB", 150, False),
                                   ("~4 KB", 600, False), ("~1 KB + logprobs", 150, True)):
        bodies = [body(i, words, logprobs) for i in range(N)]
        old = sizes([old_record(i, b) for i, b in enumerate(bodies)])
        new = sizes([new_record(i, b) for i, b in enumerate(bodies)])
        print(f"{label:<24}{old[0]:>8.0f}{new[0]:>8.0f}{new[0] / old[0]:>7.2f}   {old[1]:>8.0f}{new[1]:>8.0f}"
              f"{new[1] / old[1]:>7.2f}")


if __name__ == "__main__":
    main()
