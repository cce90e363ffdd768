import sys

from distbatch.cli import main

sys.exit(main())
