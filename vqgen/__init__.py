"""vqgen's ground floor: what both stages share, split by concern (see the README's layout)."""
