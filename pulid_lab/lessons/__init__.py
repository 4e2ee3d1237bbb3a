"""What the notebooks import: one module of helpers per lesson, plots and interactive explorers."""
