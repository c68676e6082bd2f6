"""`python3 -m examples.collision` is `python3 -m examples.collision.run`."""
import sys

from examples.collision.run import main

sys.exit(main())
