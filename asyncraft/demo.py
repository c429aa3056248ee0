"""``asyncraft demo``: the whole pipeline against the built-in simulator, with a few injected faults."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile
from pathlib import Path

import orjson

from asyncraft import app, export, store
from asyncraft.config import Settings

DEMO_TOPICS = [
    "why the sky is blue", "how tides work", "what a hash function is", "how vaccines train immunity",
    "why bread rises", "how a bicycle stays upright", "what causes seasons", "how compilers work",
    "why leaves change colour", "how rainbows form",
]


def write_demo_prompts(path: Path, n: int = 200) -> None:
    with open(path, "wb") as fh:
        for i in range(n):
            topic = DEMO_TOPICS[i % len(DEMO_TOPICS)]
            line = {"custom_id": f"demo-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "system", "content": "You are a concise teacher."},
                                          {"role": "user", "content": f"Explain {topic} (variant {i})."}],
                             "max_tokens": 64}}
            fh.write(orjson.dumps(line) + b"\n")


async def _demo(settings: Settings, workdir: Path) -> int:
    from asyncraft.simulate import SimConfig, Simulator

    sim_cfg = SimConfig(port=0, latency_ms=80, latency_dist="lognormal", p_429=0.03, p_500=0.02, seed=7)
    async with Simulator(sim_cfg) as sim:
        prompts = workdir / "requests.jsonl"
        write_demo_prompts(prompts)
        state = workdir / "state"
        s = dataclasses.replace(settings, job="prompts", input=str(prompts), state_dir=str(state),
                                base_url=(sim.base_url,), model="sim-1", concurrency=32, backoff_base=0.05,
                                backoff_max=1.0, api_key="demo-key", progress_interval=1.0)
        print(f"asyncraft demo: simulator at {sim.base_url} (3% 429s, 2% 500s injected)", file=sys.stderr)
        code = await app.main(s)
    out = workdir / "results.jsonl"
    counts = await asyncio.to_thread(export.export, store.StateDir(state), "prompts", out)
    print(f"\nasyncraft demo: exit {code}; {sum(counts.values())} results in {out}")
    print(f"  look at the journal:  python -m asyncraft tail --state-dir {state}")
    print(f"  status:               python -m asyncraft status --state-dir {state}")
    print(f"  check integrity:      python -m asyncraft verify --state-dir {state}")
    return code


def main(settings: Settings, directory: str | None) -> int:
    if directory:
        workdir = Path(directory)
        workdir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_demo(settings, workdir))
    workdir = Path(tempfile.mkdtemp(prefix="asyncraft-demo-"))
    return asyncio.run(_demo(settings, workdir))
