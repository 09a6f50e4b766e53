"""deltareg gc commands (filled in by the issue-3 work)."""
