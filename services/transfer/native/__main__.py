"""`python -m services.transfer.native`: build the data-path library now (make setup, images)."""

from services.transfer.native import build

print(build())
