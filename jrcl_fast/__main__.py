import sys

from jrcl_fast.cli import main

sys.exit(main())
