"""`python -m padt.train`: see `padt.train.run`."""

from padt.train.run import main

if __name__ == "__main__":
    main()
