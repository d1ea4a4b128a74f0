"""Reliability catalogs: bad inputs across the system and what each must report."""
