"""Spool pickup: recordings the PBX made itself, picked up with their sidecars."""
