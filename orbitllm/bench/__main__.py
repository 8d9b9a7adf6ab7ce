"""``python -m orbitllm.bench throughput|serve ...`` is ``orbitllm bench ...``."""
import sys

from orbitllm.cli import main

# Guarded: tensor-parallel workers are spawned and re-import the main module.
if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
