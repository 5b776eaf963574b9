import sys

from faceclip_zoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
