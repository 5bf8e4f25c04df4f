"""``python -m bscompress`` runs the CLI."""

from bscompress.app.cli import main

if __name__ == "__main__":
    main()
