import sys

from truss_llm.cli import main

# vLLM's EngineCore is a spawned process that re-imports the main module: keep the guard.
if __name__ == "__main__":
    sys.exit(main())
