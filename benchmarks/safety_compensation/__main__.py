"""``python -m benchmarks.safety_compensation``: see the package docstring and ``--help``."""

from benchmarks.safety_compensation.cli import main

if __name__ == "__main__":
    main()
