"""`python -m tokenbridge <flow> ...`: the same as the `tokenbridge` command."""

from tokenbridge.cli import main

main()
