"""`python -m actclient`: the same command line as the `actclient` script."""

import sys

from actclient.cli import main

sys.exit(main())
