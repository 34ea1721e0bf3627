"""Thin Typer commands: parse flags, call one library function, report."""
