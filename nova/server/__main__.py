import sys

from nova.server.cli import main

sys.exit(main())
