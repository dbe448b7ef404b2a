"""`python -m mergebuild` runs the CLI."""

from mergebuild.cli import main

main()
