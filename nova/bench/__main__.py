import sys

from nova.bench.cli import main

sys.exit(main())
