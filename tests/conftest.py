import os
import sys

# The tests import `tests.oracle`; run from the repository root or anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
