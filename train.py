"""Entry point: ``composer train.py yamls/<run>.yaml [key=value ...]`` (or ``python train.py ...``)."""

from llmshearing.trainer import main

if __name__ == "__main__":
    main()
