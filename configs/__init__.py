"""Configs: one get_config(arg) file per model; common.py holds shared pieces."""
