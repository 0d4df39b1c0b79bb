"""Command-line front ends: argument parsing, one-line errors, logging set-up."""
