"""Measuring the models: verification metrics over labelled pairs (verification.py) and the evaluation command."""
