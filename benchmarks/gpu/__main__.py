"""``python -m benchmarks.gpu``; the import waits for ``__main__``, since the load generator's spawned processes
import this module again and need none of the benchmark."""

import sys

if __name__ == "__main__":
    from benchmarks.gpu.cli import main

    sys.exit(main())
