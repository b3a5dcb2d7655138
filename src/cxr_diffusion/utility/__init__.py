"""Downstream utility (issue 15): train a classifier on synthetic images, test it on real ones."""
