"""python -m cli: the x2x command line (what the x2x script runs)."""
from cli.app import main

main()
