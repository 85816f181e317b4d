"""``python -m dermfusion.cli``: the same as the ``dermfusion`` command."""
from .app import main

main()
