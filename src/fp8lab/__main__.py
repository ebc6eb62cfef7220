import sys

from fp8lab.cli import main

sys.exit(main())
