"""`python -m designmodel ...` runs the command line."""
import sys

from designmodel.cli import main

sys.exit(main())
