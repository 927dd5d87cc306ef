"""``python -m fc2conv`` runs the command line."""

from fc2conv.cli.main import main

if __name__ == "__main__":
    main()
