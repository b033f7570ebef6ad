"""``python -m tbdiag`` runs the CLI."""

from tbdiag.cli import main

if __name__ == "__main__":
    main()
