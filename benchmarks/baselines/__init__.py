"""What tokenrelay is measured against. Never shipped in the package."""
