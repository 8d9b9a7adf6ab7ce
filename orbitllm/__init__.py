"""orbitllm: a small, fast LLM inference and serving engine."""
from orbitllm.entrypoints.llm import LLM
from orbitllm.outputs import CompletionOutput, Logprob, RequestOutput
from orbitllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
