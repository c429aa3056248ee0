"""``asyncraft demo``: the RAFT job end to end on the bundled documents, then the prompts job on the bundled
prompts, against the built-in simulator.

The simulator runs in this process on 127.0.0.1 with a few injected faults (429s with Retry-After
and 500s), so the demo shows retries without a real model or key. It writes the state dirs, a RAFT
dataset, its chat fine-tuning version and the prompts job's results into one folder and prints how to
look at them and how to run each job on your own input.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile
from pathlib import Path

from asyncraft import app, export
from asyncraft.config import Settings
from asyncraft.storage import StateDir

DEMO_DOCS = Path(__file__).resolve().parent / "data" / "docs"
DEMO_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"


async def _demo(settings: Settings, workdir: Path) -> int:
    from asyncraft.simulate import SimConfig, Simulator

    sim_cfg = SimConfig(port=0, latency_ms=80, latency_dist="lognormal", p_429=0.04, p_500=0.03,
                        fault_retry_after=0.2, seed=7)
    state = workdir / "state"
    prompts_state = workdir / "prompts-state"
    results_out = workdir / "results.jsonl"
    async with Simulator(sim_cfg) as sim:
        s = dataclasses.replace(settings, job="raft", input=str(DEMO_DOCS), state_dir=str(state),
                                base_url=(sim.base_url,), model="sim-1", concurrency=32, backoff_base=0.05,
                                backoff_max=1.0, api_key="demo-key", progress_interval=1.0, questions=3,
                                distractors=3, p=0.8, chunk_size=128, chunk_overlap=0)
        print(f"asyncraft demo: the RAFT job on {DEMO_DOCS} against the simulator at {sim.base_url} "
              "(4% 429s and 3% 500s injected)", file=sys.stderr)
        code = await app.main(s)
        print(f"asyncraft demo: the prompts job on {DEMO_PROMPTS} (one completion per line)", file=sys.stderr)
        ps = dataclasses.replace(s, job="prompts", input=str(DEMO_PROMPTS), state_dir=str(prompts_state))
        prompts_code = await app.main(ps)
    await asyncio.to_thread(export.export, StateDir(prompts_state), "prompts", results_out, settings=ps)
    sd = StateDir(state)
    raft_out = workdir / "raft.jsonl"
    chat_out = workdir / "train.jsonl"
    written = await asyncio.to_thread(export.export, sd, "raft", raft_out, settings=s)
    chat_settings = dataclasses.replace(s, split="eval=0.1", system_prompt="Answer from the documents; quote them.")
    await asyncio.to_thread(export.export, sd, "chat", chat_out, settings=chat_settings)
    print(f"\nasyncraft demo: the RAFT job exited {code}; {sum(sum(c.values()) for _p, c in written)} RAFT records")
    print(f"  RAFT records (all fields):   {raft_out}")
    print(f"  chat fine-tuning data:       {chat_out} and {export.split_path(chat_out, 'eval')}")
    print(f"  tail the journal:            python -m asyncraft tail -f --state-dir {state}")
    print(f"  status:                      python -m asyncraft status --state-dir {state}")
    print(f"  other formats:               python -m asyncraft export --state-dir {state} --format "
          f"completion --out {workdir / 'completion.parquet'}")
    print(f"asyncraft demo: the prompts job exited {prompts_code}")
    print(f"  one result per input line:   {results_out}")
    print("\nOn your own input, against a server of yours (or `python -m asyncraft simulate --port 8000`):")
    print("  export ASYNCRAFT_BASE_URL=http://127.0.0.1:8000/v1 ASYNCRAFT_MODEL=sim-1 ASYNCRAFT_API_KEY=any")
    print(f"  python -m asyncraft run --job raft --input {DEMO_DOCS} --state-dir raft-state/")
    print(f"  python -m asyncraft run --job prompts --input {DEMO_PROMPTS} --state-dir prompts-state/")
    print("  python -m asyncraft run --help     # every option, by section, with examples")
    return code or prompts_code


def main(settings: Settings, directory: str | None) -> int:
    if directory:
        workdir = Path(directory)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="asyncraft-demo-"))
    return asyncio.run(_demo(settings, workdir))
