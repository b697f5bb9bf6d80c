import sys

from dmdr.cli import main

sys.exit(main())
