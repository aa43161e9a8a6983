"""`python -m fedstream` is the `fedstream` command."""

from fedstream.cli import main

if __name__ == "__main__":
    main()
