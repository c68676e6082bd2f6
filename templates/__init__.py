"""jinja2 Triton templates, one folder per family (package data of designmodel)."""
