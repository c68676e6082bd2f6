"""`python3 -m examples.implicit_attention` is `python3 -m examples.implicit_attention.run`."""
import sys

from examples.implicit_attention.run import main

sys.exit(main())
