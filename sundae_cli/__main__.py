"""`python -m sundae_cli` runs the same program as the `sundae` command."""

from sundae_cli.app import main

if __name__ == "__main__":
    main()
