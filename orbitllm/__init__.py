"""orbitllm: a small, fast LLM inference and serving engine."""
from orbitllm.entrypoints.llm import LLM
from orbitllm.outputs import BeamSearchOutput, CompletionOutput, Logprob, RequestOutput
from orbitllm.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
