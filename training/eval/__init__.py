"""Held-out and closed-loop evaluation (temporary stub; the evaluation package lands here)."""
