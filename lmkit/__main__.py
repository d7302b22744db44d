"""``python -m lmkit`` is the same as the ``lmkit`` console script."""

from lmkit.cli import main

if __name__ == "__main__":
    main()
