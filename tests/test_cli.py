"""The command line: help lists the commands, every engine option is a flag, and
generate / chat run end to end in a fresh process."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

from orbitllm.config import EngineConfig


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orbitllm", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_commands_and_the_default_model():
    out = _cli("--help").stdout
    for cmd in ("generate", "chat", "serve", "bench", "models"):
        assert cmd in out
    assert "SmolLM2" in out


def test_every_engine_option_is_a_flag():
    for cmd in (["generate"], ["chat"], ["serve"], ["bench", "throughput"]):
        out = _cli(*cmd, "--help").stdout
        for f in dataclasses.fields(EngineConfig):
            if f.name != "model" or cmd != ["serve"]:
                assert "--" + f.name.replace("_", "-") in out, (cmd, f.name)


def test_generate_prints_the_completion(tiny_models):
    r = _cli("generate", "--model", tiny_models["llama"], "--prompt", "The quick brown fox",
             "--max-tokens", "5", "--num-kv-blocks", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_bad_flag_value_is_a_clear_error(tiny_models):
    r = _cli("generate", "--model", tiny_models["llama"], "--prompt", "x", "--block-size", "3")
    assert r.returncode == 2 and "block_size" in r.stderr


def test_chat_keeps_the_conversation_and_exits_on_eof(tiny_models):
    r = _cli("chat", "--model", tiny_models["qwen2"], "--temperature", "0", "--max-tokens", "4",
             "--num-kv-blocks", "32", stdin="Hello\nAnd again\n")
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stdout.splitlines() if line.strip()]) >= 1


def test_default_model_one_shot_chat():
    r = _cli("chat", "--message", "What is the capital of France?", "--temperature", "0",
             "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
