"""Shared vocabulary of every layer: plain data classes, the project's error type and RELION's Euler
convention. Imports nothing from mspecies; core, formats and everything above may import it."""
