import sys

from orbitllm.cli import main

sys.exit(main())
