"""Worked examples of designmodel (each runnable as `python3 -m examples.<name>.run`)."""
