"""Side-by-side comparison of SR models (``tools/compare.py``): :mod:`.compare` runs them, one process each
(:mod:`.runner`), and :mod:`.report` writes the table, the plot and the HTML page."""
from .compare import check_compare_options, run_comparison  # noqa: F401
