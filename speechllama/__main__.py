import sys

from speechllama.cli import main

sys.exit(main())
