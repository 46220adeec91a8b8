import sys

from seamlm.cli import main

sys.exit(main())
