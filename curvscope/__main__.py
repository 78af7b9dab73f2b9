"""``python -m curvscope``: the command-line interface."""

from curvscope.cli import main

if __name__ == "__main__":
    main()
