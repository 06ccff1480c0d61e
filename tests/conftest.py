import sys
from pathlib import Path

# tests/helpers.py is imported as ``helpers`` by unit and e2e tests alike.
sys.path.insert(0, str(Path(__file__).resolve().parent))
