"""``python -m fedcifar_app.data info|clear``: the cache CLI without the console script."""

import sys

from .cache_cli import main

sys.exit(main())
