"""Implicit attention: Phi of every zoo model on one input (MATH.md section 5)."""
