"""``python -m quant_gru``: the command line."""

from quant_gru.cli import main

raise SystemExit(main())
