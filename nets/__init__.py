"""HRNet trunk, SPM heads and losses."""
