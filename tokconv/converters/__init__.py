"""Converter designs; importing this package registers every preset."""
