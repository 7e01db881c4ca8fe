import sys

from minimtp.serve.cli import main

sys.exit(main())
