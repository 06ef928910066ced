"""``python -m repo_lightning``: the LightningCLI entry point."""

from repo_lightning.cli import main

if __name__ == "__main__":
    main()
