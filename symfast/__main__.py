"""`python -m symfast ...` is the `symfast` command (torchrun needs the module form)."""
from symfast.cli import main

raise SystemExit(main())
