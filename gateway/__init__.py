"""Metergate: the metering proxy."""
