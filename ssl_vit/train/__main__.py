"""`accelerate launch -m ssl_vit.train --recipe recipes/<name>.yaml [key=value ...]`"""
import sys

from ssl_vit.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
