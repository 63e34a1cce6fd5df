"""Shared by every role: the typed run config and the records that cross role boundaries."""
