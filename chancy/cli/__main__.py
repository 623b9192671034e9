"""``python -m chancy.cli``: the same as the ``chancy`` console script."""

from chancy.cli import main

if __name__ == "__main__":
    main(prog_name="chancy")
