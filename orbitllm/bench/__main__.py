"""``python -m orbitllm.bench throughput|serve ...`` is ``orbitllm bench ...``."""
import sys

from orbitllm.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
