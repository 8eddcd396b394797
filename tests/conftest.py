"""Shared test setup: only what every test directory needs."""

import sys
from pathlib import Path

# ``import fakes`` (tests/fakes.py) from every test directory, tests/e2e/ included.
sys.path.insert(0, str(Path(__file__).parent))
