"""Cold start: a fresh process that imports, loads the default GGUF model and answers a chat's first token.

Measured for orbitllm with an empty weight cache (the first run on a machine), orbitllm with the cache
that run left (every later run), and transformers on the same file, each in its own fresh process:

    python benchmarks/startup.py [--model path.gguf] [--repeats 3]

The GGUF itself is read once before timing, so every run finds it in the page cache, as a second start
on a real machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def orbitllm_first_token(model: str) -> dict:
    """Child process body: orbitllm from import to the first generated token."""
    start = time.perf_counter()
    from orbitllm import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(model=model, dtype="float32")
    loaded = time.perf_counter()
    output = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    done = time.perf_counter()
    return _phases(start, imported, loaded, done, output[0].outputs[0].text)


def transformers_first_token(model: str) -> dict:
    """Child process body: transformers from import to the first generated token, on the same file."""
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = time.perf_counter()
    path = Path(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    loaded = time.perf_counter()
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = hf_model.generate(**ids, max_new_tokens=1, do_sample=False)
    done = time.perf_counter()
    return _phases(start, imported, loaded, done, tokenizer.decode(generated[0, ids["input_ids"].shape[1] :]))


def _phases(start: float, imported: float, loaded: float, done: float, text: str) -> dict:
    return {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "first_token_s": done - loaded,
        "total_s": done - start,
        "text": text,
    }


CHILDREN = {"orbitllm": orbitllm_first_token, "transformers": transformers_first_token}


def run_child(kind: str, model: str, cache_dir: str) -> dict:
    """One fresh interpreter; its timings come back as the last line of its stdout."""
    env = dict(os.environ, ORBITLLM_CACHE_DIR=cache_dir, TQDM_DISABLE="1")
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--model", model],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(model: str, repeats: int) -> dict[str, list[dict]]:
    """Per scenario, `repeats` fresh-process runs; the cold-cache scenario gets a new cache folder each time."""
    runs: dict[str, list[dict]] = {"orbitllm, cold cache": [], "orbitllm, warm cache": [], "transformers": []}
    with tempfile.TemporaryDirectory(prefix="orbitllm-startup-") as scratch:
        for repeat in range(repeats):
            cache = str(Path(scratch) / f"cache-{repeat}")
            runs["orbitllm, cold cache"].append(run_child("orbitllm", model, cache))
            runs["orbitllm, warm cache"].append(run_child("orbitllm", model, cache))
            runs["transformers"].append(run_child("transformers", model, cache))
    return runs


def report(runs: dict[str, list[dict]]) -> None:
    print(f"{'scenario':22s} {'import':>8s} {'load':>8s} {'1st tok':>8s} {'total':>8s} {'(min)':>8s}  first token")
    for scenario, results in runs.items():
        keys = ("import_s", "load_s", "first_token_s", "total_s")
        median = {key: statistics.median(r[key] for r in results) for key in keys}
        best = min(r["total_s"] for r in results)
        print(
            f"{scenario:22s} {median['import_s']:8.2f} {median['load_s']:8.2f} {median['first_token_s']:8.2f} "
            f"{median['total_s']:8.2f} {best:8.2f}  {results[0]['text']!r}"
        )
    print("seconds, medians over fresh processes (min: fastest total)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a .gguf file (default: the built-in default model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.model)))
        return
    from orbitllm.models.default_model import find_default_model

    model = args.model or str(find_default_model())
    Path(model).read_bytes()  # into the page cache, so no scenario pays the first disk read alone
    report(measure(model, args.repeats))


if __name__ == "__main__":
    main()
