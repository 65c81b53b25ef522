"""Merging an adapter into its base model, checking the merge, and combining adapters into a new one."""
