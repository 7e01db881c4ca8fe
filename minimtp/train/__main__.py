"""``python -m minimtp.train <cmd>``."""

from minimtp.train.cli import main

main()
