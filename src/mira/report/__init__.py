"""Reporting: progress bars, plots and tables."""
