"""`python -m fedcifar_app.deploy` runs the `fedcifar-deploy` command line."""

import sys

from .cli import main

sys.exit(main())
