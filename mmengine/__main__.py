"""`python -m mmengine serve ...`: the same as the `mmengine` command."""
from mmengine.cli import main

raise SystemExit(main())
