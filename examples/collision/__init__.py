"""The collision study: retrieval error against the number of writes (MATH.md section 7)."""
