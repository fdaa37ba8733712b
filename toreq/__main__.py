import sys

from toreq.cli import main

sys.exit(main())
