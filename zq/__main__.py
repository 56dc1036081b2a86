"""`python -m zq` runs the command line (the same as the `zq` console script)."""
from zq.cli import main

if __name__ == "__main__":
    main()
