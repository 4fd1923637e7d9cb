"""``python -m pipeline.gpu [options] -- <command ...>``: run the command in a slot."""

import sys

from pipeline.gpu.run import main

sys.exit(main())
