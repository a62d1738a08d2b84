import sys

from minwm.cli import main

sys.exit(main())
