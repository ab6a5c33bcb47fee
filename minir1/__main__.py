import sys

from minir1.cli import main

sys.exit(main())
